"""Rendering a template with a job's input, inside the sandbox's bounds.

The render streams its output so a template that writes too much stops at the
limit instead of filling memory, and a timer ends one that runs too long.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jinja2
from celery.exceptions import SoftTimeLimitExceeded
from jinja2.exceptions import SecurityError

from models.errors import (
    InvalidInput,
    MissingVariable,
    OutputTooLarge,
    PermanentError,
    SandboxViolation,
    TemplateError,
)
from models.sandbox import compile_template, deadline


def render(
    content: str,
    input_data: Any,
    *,
    max_output_bytes: int,
    timeout_s: float,
) -> str:
    """Render ``content`` with ``input_data`` as its variables."""
    if not isinstance(input_data, dict):
        raise InvalidInput(
            f"job input must be a JSON object, not {type(input_data).__name__}"
        )
    try:
        with deadline(timeout_s):
            # Compiling evaluates constant expressions: it runs under the timer.
            template = compile_template(content)
            return _collect(template.generate(input_data), max_output_bytes)
    except (PermanentError, SoftTimeLimitExceeded):
        raise
    except jinja2.UndefinedError as exc:
        raise MissingVariable(
            f"template needs a variable the input lacks: {exc}"
        ) from exc
    except SecurityError as exc:
        raise SandboxViolation(f"sandbox refused: {exc}") from exc
    except OverflowError as exc:
        raise SandboxViolation(f"sandbox refused: {exc}") from exc
    except MemoryError as exc:
        raise SandboxViolation("template ran out of memory") from exc
    except RecursionError as exc:
        raise TemplateError("template recursed too deeply") from exc
    except Exception as exc:
        raise TemplateError(f"template failed: {type(exc).__name__}: {exc}") from exc


def _collect(chunks: Iterator[str], max_output_bytes: int) -> str:
    parts: list[str] = []
    # Every character takes at least one byte, so counting characters first
    # stops a runaway render early; the exact byte size is checked at the end.
    characters = 0
    for chunk in chunks:
        characters += len(chunk)
        if characters > max_output_bytes:
            raise OutputTooLarge(f"document exceeds the {max_output_bytes} byte limit")
        parts.append(chunk)
    text = "".join(parts)
    if len(text.encode()) > max_output_bytes:
        raise OutputTooLarge(f"document exceeds the {max_output_bytes} byte limit")
    return text
