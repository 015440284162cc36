"""The sandbox templates render in, and the check run when one is registered.

Templates are user data. They render in Jinja2's sandboxed environment with
undefined variables as errors, and this module adds the bounds the sandbox
lacks: repetition, concatenation, big-integer arithmetic, format widths and
the filters that can build a huge value from a small input are refused
before they allocate. Two nets catch what slips through these checks: the
render deadline (:func:`deadline`) and, in workers, a cap on the process's
memory.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from contextlib import contextmanager
from functools import lru_cache
from types import FrameType
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from models.errors import RenderTimeout, SandboxViolation, TemplateError

#: Largest string or list one expression may build.
MAX_VALUE_CHARS = 1_000_000
#: Largest integer, in bits, one arithmetic expression may build.
MAX_INT_BITS = 100_000
#: Longest a template may take to compile when it is registered.
COMPILE_TIMEOUT_S = 5.0

#: A %-conversion or a {}-field, whose width and precision are checked.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d*)(?:\.(\*|\d*))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")
_NESTED_FIELD = re.compile(r"\{[^{}]*\{")
#: Width or precision in digits past which padding alone builds a huge string.
_WIDE = re.compile(r"\d{7,}")
_SEQUENCES = (str, list, tuple)
#: Filters whose result can be far larger than their input.
_BOUNDED_FILTERS = (
    "replace",
    "center",
    "indent",
    "join",
    "wordwrap",
    "format",
    "batch",
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text_size(value: object) -> int:
    """Characters ``value`` takes once turned into text, without building it."""
    if isinstance(value, Sized):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 3 + 1
    return len(str(value)) if isinstance(value, float | bool) or value is None else 16


def refuse_large(size: int, what: str) -> None:
    """Raise SandboxViolation when ``what`` would build more than the limit."""
    if size > MAX_VALUE_CHARS:
        raise SandboxViolation(
            f"{what} would build {size} items; the limit is {MAX_VALUE_CHARS}"
        )


def _refuse_big_int(bits: int) -> None:
    # Huge integers cost memory and C-level time that no signal interrupts.
    if bits > MAX_INT_BITS:
        raise SandboxViolation(
            f"an integer of about {bits} bits would be built; "
            f"the limit is {MAX_INT_BITS}"
        )


def check_format(template: str, values: Iterable[Any]) -> None:
    """Refuse a format whose padding would build a huge string.

    A width can be written in the format text, or passed as an argument
    through ``*`` (``%``-formatting) or a nested field (``str.format``).
    """
    percent = [part for spec in _PERCENT_SPEC.findall(template) for part in spec]
    braces = _BRACE_SPEC.findall(template)
    if any(_WIDE.search(part) for part in [*percent, *braces]):
        raise SandboxViolation(
            "a format width or precision over six digits is not allowed"
        )
    takes_width = "*" in percent or _NESTED_FIELD.search(template)
    if takes_width and any(_is_int(v) and abs(v) > MAX_VALUE_CHARS for v in values):
        raise SandboxViolation(
            "a format width or precision over six digits is not allowed"
        )


def _format_values(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any]:
    values = list(args) + list(kwargs.values())
    for value in list(values):
        if isinstance(value, tuple):
            values.extend(value)
        elif isinstance(value, Mapping):
            values.extend(value.values())
    return values


def _joined_size(items: Iterable[Any], separator: int) -> int:
    count = 0
    total = 0
    for item in items:
        count += 1
        total += _text_size(item)
    return total + separator * max(count - 1, 0)


class BoundedSandbox(SandboxedEnvironment):
    """Jinja2's sandbox, refusing expressions that would build huge values."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        super().__init__(
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        for name in _BOUNDED_FILTERS:
            self.filters[name] = _bounded_filter(name, self.filters[name])
        for name, function in self.filters.items():
            self.filters[name] = _at_render_time(function)

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, _SEQUENCES) and _is_int(count):
                    refuse_large(len(seq) * count, "a repetition")
            if _is_int(left) and _is_int(right):
                _refuse_big_int(left.bit_length() + right.bit_length())
        elif operator == "**":
            if _is_int(left) and _is_int(right) and right > 0:
                _refuse_big_int(max(left.bit_length(), 1) * right)
        elif operator == "+":
            if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
                refuse_large(len(left) + len(right), "a concatenation")
        elif operator == "%" and isinstance(left, str):
            args = right if isinstance(right, tuple) else (right,)
            check_format(left, _format_values(args, {}))
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # Jinja2 hands every str.format and str.format_map through here.
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text: str = value.__self__
        mapping = value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            given = args[0] if mapping and args else kwargs
            check_format(text, _format_values(() if mapping else args, given))
            return wrapped(*args, **kwargs)

        return checked

    def call(
        __self,  # noqa: N805 - Jinja2's signature keeps the name free for kwargs
        __context: jinja2.runtime.Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            name = getattr(__obj, "__name__", "")
            if name == "join" and args:
                items = list(args[0])
                refuse_large(_joined_size(items, len(owner)), "join")
                args = (items, *args[1:])
            else:
                _check_str_method(owner, name, args)
        return super().call(__context, __obj, *args, **kwargs)


def _check_str_method(owner: str, name: str, args: tuple[Any, ...]) -> None:
    width = args[0] if args and _is_int(args[0]) else None
    if name in {"center", "ljust", "rjust", "zfill"} and width is not None:
        refuse_large(width, f"str.{name}")
    elif name == "expandtabs":
        refuse_large(owner.count("\t") * (width or 8) + len(owner), "str.expandtabs")
    elif name == "replace" and len(args) >= 2:
        added = owner.count(str(args[0])) * len(str(args[1]))
        refuse_large(len(owner) + added, "replace")


def _bounded_filter(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a builtin filter with a size check made before it runs."""
    pass_arg = getattr(original, "jinja_pass_arg", None)

    def checked(*args: Any, **kwargs: Any) -> Any:
        lead, (value, *params) = (args[:1], args[1:]) if pass_arg else ((), args)
        if name in {"join", "batch"} and not isinstance(value, str | type(None)):
            value = list(value)
        _check_filter(name, value, params, kwargs)
        return original(*lead, value, *params, **kwargs)

    if pass_arg is not None:
        checked.jinja_pass_arg = pass_arg  # type: ignore[attr-defined]
    return checked


def _at_render_time(function: Callable[..., Any]) -> Callable[..., Any]:
    """The same filter, run only while rendering, never while compiling.

    Jinja2 calls a filter on constant arguments at compile time to fold its
    result into the code, outside any render limit: a short template of big
    constant expressions could take minutes and gigabytes to register. It
    never does so for a filter that takes the render context, so every filter
    is given one.
    """
    pass_arg = getattr(function, "jinja_pass_arg", None)
    kind = getattr(pass_arg, "name", None)
    if kind == "context":
        return function

    @jinja2.pass_context
    def at_render_time(context: Context, *args: Any, **kwargs: Any) -> Any:
        if kind == "eval_context":
            return function(context.eval_ctx, *args, **kwargs)
        if kind == "environment":
            return function(context.environment, *args, **kwargs)
        return function(*args, **kwargs)

    return at_render_time


def _check_filter(
    name: str, value: Any, params: list[Any], kwargs: dict[str, Any]
) -> None:
    first = params[0] if params else None
    # Only the text filters read ``text``; str() of a big list would cost as
    # much as the join being checked.
    text = value if isinstance(value, str) else ""
    if name in {"replace", "indent", "wordwrap", "format"} and text == "":
        text = "" if value is None else str(value)
    if name == "replace" and len(params) >= 2:
        added = text.count(str(params[0])) * len(str(params[1]))
        refuse_large(len(text) + added, "replace")
    elif name == "center" and first is not None and _is_int(first):
        refuse_large(int(first), name)
    elif name == "indent":
        width = kwargs.get("width", first if first is not None else 4)
        per_line = width if _is_int(width) else len(str(width))
        refuse_large(per_line * (text.count("\n") + 1) + len(text), name)
    elif name == "wordwrap":
        wrapstring = kwargs.get("wrapstring", params[2] if len(params) > 2 else "\n")
        width = kwargs.get("width", first if first is not None else 79)
        if _is_int(width):
            refuse_large(width, name)  # textwrap allocates in proportion to it
        lines = len(text) // max(width if _is_int(width) else 1, 1) + 1
        refuse_large(len(text) + lines * len(str(wrapstring or "\n")), name)
    elif name == "join":
        separator = str(kwargs.get("d", first if first is not None else ""))
        refuse_large(_joined_size(value or [], len(separator)), "join")
    elif name == "batch":
        size = kwargs.get("linecount", first)
        if size is not None and _is_int(size):
            refuse_large(int(size), "batch")
    elif name == "format":
        check_format(text, _format_values(tuple(params), kwargs))


@contextmanager
def deadline(timeout_s: float, what: str = "render") -> Iterator[None]:
    """Raise RenderTimeout in this thread after ``timeout_s`` seconds.

    Only the main thread can take a signal; elsewhere (a threaded pool) the
    worker's soft time limit is the bound. A timer already set by the caller
    is put back, less the time spent here.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise RenderTimeout(f"{what} took longer than {timeout_s:g}s")

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, expire)
    # The timer repeats: Jinja2 swallows an exception raised while it folds
    # constants at compile time, so one alarm alone could be lost.
    previous_timer = signal.setitimer(signal.ITIMER_REAL, timeout_s, 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_timer[0] > 0:
            remaining = max(previous_timer[0] - (time.monotonic() - started), 0.001)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_timer[1])


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
    except (RecursionError, SyntaxError):
        # Python refuses the code Jinja2 writes for deep nesting.
        raise TemplateError("template is nested too deeply") from None


def required_variables(content: str) -> list[str]:
    """Check a template's syntax and list the top-level variables it reads."""
    env = sandbox()
    try:
        parsed = env.parse(content)
        variables = sorted(meta.find_undeclared_variables(parsed))
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"syntax error on line {exc.lineno}: {exc.message}"
        ) from exc
    except RecursionError:
        raise TemplateError("template is nested too deeply") from None
    _refuse_unsupported_tags(parsed)
    try:
        with deadline(COMPILE_TIMEOUT_S, "compiling the template"):
            compile_template(content)
    except RenderTimeout as exc:
        raise TemplateError(str(exc)) from None
    except SandboxViolation as exc:
        raise TemplateError(f"template refused: {exc}") from None
    return variables


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
