"""The sandbox templates render in, and the check run when one is registered.

Templates are user data. They render in Jinja2's sandboxed environment with
undefined variables as errors, and this module adds the bounds the sandbox
lacks: string and list repetition, ``%``-formatting and the few filters that
can build huge values from small inputs are refused before they allocate.
Output size and render time are bounded by :mod:`worker.rendering`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sized
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from models.errors import SandboxViolation, TemplateError

#: Largest string or list one expression may build.
MAX_VALUE_CHARS = 1_000_000
#: Largest integer, in bits, one arithmetic expression may build.
MAX_INT_BITS = 100_000
_WIDE_FORMAT = re.compile(r"(?<![\d.])\d{7,}")


def _size(value: object) -> int:
    return len(value) if isinstance(value, Sized) else 0


def _refuse_large(result_size: int, what: str) -> None:
    if result_size > MAX_VALUE_CHARS:
        raise SandboxViolation(
            f"{what} would build {result_size} items; the limit is {MAX_VALUE_CHARS}"
        )


class BoundedSandbox(SandboxedEnvironment):
    """Jinja2's sandbox, refusing expressions that would build huge values."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        for name in ("replace", "center", "indent", "join", "wordwrap", "format"):
            self.filters[name] = _bounded_filter(name, self.filters[name])

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int):
                    _refuse_large(_size(seq) * count, "a repetition")
            if _is_int(left) and _is_int(right):
                _refuse_big_int(left.bit_length() + right.bit_length())
        elif operator == "**":
            if _is_int(left) and _is_int(right) and right > 0:
                _refuse_big_int(max(left.bit_length(), 1) * right)
        elif operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            raise SandboxViolation("a format width over six digits is not allowed")
        return super().call_binop(context, operator, left, right)

    def call(
        __self,  # noqa: N805 - Jinja2's signature keeps the name free for kwargs
        __context: jinja2.runtime.Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, str) and name in {
            "format",
            "format_map",
            "center",
            "ljust",
            "rjust",
            "zfill",
            "expandtabs",
            "replace",
            "join",
        }:
            _check_str_method(owner, name, args)
        return super().call(__context, __obj, *args, **kwargs)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse_big_int(bits: int) -> None:
    """Huge integers cost memory and C-level time that no signal interrupts."""
    if bits > MAX_INT_BITS:
        raise SandboxViolation(
            f"an integer of about {bits} bits would be built; "
            f"the limit is {MAX_INT_BITS}"
        )


def _check_str_method(owner: str, name: str, args: tuple[Any, ...]) -> None:
    if name in {"format", "format_map"}:
        if _WIDE_FORMAT.search(owner):
            raise SandboxViolation("a format width over six digits is not allowed")
    elif name in {"center", "ljust", "rjust", "zfill"}:
        if args and isinstance(args[0], int):
            _refuse_large(args[0], f"str.{name}")
    elif name == "expandtabs":
        _refuse_large(owner.count("\t") * (args[0] if args else 8), "str.expandtabs")
    elif name == "replace" and len(args) >= 2:
        _refuse_large(_size(owner) + owner.count(args[0]) * _size(args[1]), "replace")
    elif name == "join" and args:
        _refuse_large(_joined_size(args[0], len(owner)), "join")


def _joined_size(items: Any, separator: int) -> int:
    if not isinstance(items, list | tuple):
        return 0
    return sum(_size(item) for item in items) + separator * len(items)


def _bounded_filter(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a builtin filter with a size check made before it runs."""
    pass_arg = getattr(original, "jinja_pass_arg", None)

    def checked(*args: Any, **kwargs: Any) -> Any:
        lead, (value, *params) = (args[:1], args[1:]) if pass_arg else ((), args)
        if name == "join" and value is not None and not isinstance(value, str):
            value = list(value)
        _check_filter(name, value, params)
        return original(*lead, value, *params, **kwargs)

    if pass_arg is not None:
        checked.jinja_pass_arg = pass_arg  # type: ignore[attr-defined]
    return checked


def _check_filter(name: str, value: Any, params: list[Any]) -> None:
    width = params[0] if params and isinstance(params[0], int) else None
    if name == "replace" and len(params) >= 2 and isinstance(value, str):
        added = value.count(str(params[0])) * len(str(params[1]))
        _refuse_large(len(value) + added, "replace")
    elif name in {"center", "wordwrap"} and width is not None:
        _refuse_large(width, name)
    elif name == "indent" and width is not None:
        _refuse_large(width * (str(value).count("\n") + 1), name)
    elif name == "join":
        separator = str(params[0]) if params else ""
        _refuse_large(_joined_size(value, len(separator)), "join")
    elif name == "format" and isinstance(value, str) and _WIDE_FORMAT.search(value):
        raise SandboxViolation("a format width over six digits is not allowed")


@lru_cache(maxsize=1)
def sandbox() -> BoundedSandbox:
    """The process's shared sandbox (its compiled-template cache is thread-safe)."""
    return BoundedSandbox()


@lru_cache(maxsize=256)
def compile_template(content: str) -> jinja2.Template:
    """Compile a template's source, with errors that name the line."""
    try:
        return sandbox().from_string(content)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"syntax error on line {exc.lineno}: {exc.message}"
        ) from exc


def required_variables(content: str) -> list[str]:
    """Check a template's syntax and list the top-level variables it reads."""
    env = sandbox()
    try:
        parsed = env.parse(content)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"syntax error on line {exc.lineno}: {exc.message}"
        ) from exc
    _refuse_unsupported_tags(parsed)
    compile_template(content)
    return sorted(meta.find_undeclared_variables(parsed))


def _refuse_unsupported_tags(parsed: jinja2.nodes.Template) -> None:
    """Templates stand alone: no include, import or extends of other sources."""
    nodes = jinja2.nodes
    for node_type, tag in (
        (nodes.Include, "include"),
        (nodes.Import, "import"),
        (nodes.FromImport, "from ... import"),
        (nodes.Extends, "extends"),
    ):
        if next(parsed.find_all(node_type), None) is not None:
            raise TemplateError(
                f"the {tag} tag is not supported: templates stand alone"
            )
