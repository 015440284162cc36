"""The sample templates and inputs shipped with the package."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from importlib.abc import Traversable
from typing import Any

from sqlalchemy.orm import Session

from models.templates import TemplateSpec, register_template


def _samples() -> Traversable:
    return resources.files("producer").joinpath("samples")


def sample_specs() -> list[TemplateSpec]:
    """The shipped templates, as they are registered."""
    catalogue = json.loads(_samples().joinpath("templates.json").read_text("utf-8"))
    return [
        TemplateSpec(
            name=entry["name"],
            content=_samples().joinpath(entry["file"]).read_text("utf-8"),
            description=entry.get("description"),
            category=entry.get("category"),
            tags=entry.get("tags", []),
        )
        for entry in catalogue
    ]


def load_samples(session: Session) -> list[str]:
    """Register (or refresh) every sample template; returns their names."""
    return [register_template(session, spec).name for spec in sample_specs()]


def sample_input(template_name: str) -> dict[str, Any]:
    text = _samples().joinpath("inputs", f"{template_name}.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def sample_jobs() -> Iterator[dict[str, Any]]:
    """The lines of the shipped JSON Lines batch: ``{"template", "input"}``."""
    with _samples().joinpath("jobs.jsonl").open("r", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)
