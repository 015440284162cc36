"""Unit tests of worker.rendering.render: results, errors, and the sandbox's bounds."""

from __future__ import annotations

import signal
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from models.errors import (
    InvalidInput,
    MissingVariable,
    OutputTooLarge,
    RenderTimeout,
    SandboxViolation,
    TemplateError,
)
from worker.rendering import render

LIMIT = 1024
#: A hostile expression must be refused well under this many bytes of memory.
MEMORY_BOUND = 32 * 1024 * 1024


def _render(content: str, data: Any = None, **kwargs: Any) -> str:
    options: dict[str, Any] = {"max_output_bytes": LIMIT, "timeout_s": 5.0}
    options.update(kwargs)
    return render(content, {} if data is None else data, **options)


@contextmanager
def _peak_memory() -> Iterator[list[int]]:
    """Measure the peak of Python allocations in the block, in bytes."""
    result: list[int] = []
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        yield result
    finally:
        result.append(tracemalloc.get_traced_memory()[1])
        if started_here:
            tracemalloc.stop()


def _assert_refused_cheaply(content: str, data: dict[str, Any] | None = None) -> None:
    """Render ``content`` and check it is refused before any big allocation.

    The render timeout is generous on purpose: the sandbox, not the timer, must
    stop these expressions.
    """
    with (
        _peak_memory() as peak,
        pytest.raises((SandboxViolation, OutputTooLarge)) as caught,
    ):
        _render(content, data, max_output_bytes=10_000, timeout_s=5.0)
    assert "out of memory" not in str(caught.value)
    assert peak[0] < MEMORY_BOUND, f"allocated {peak[0] / 1e6:.0f} MB"


# -- ordinary renders -------------------------------------------------------


def test_render_substitutes_variables_loops_and_filters() -> None:
    """A template renders its input's values, loops and filters to the exact text."""
    content = (
        "# {{ title|upper }}\n"
        "{% for item in items %}\n"
        "- {{ item.name }}: {{ item.owner|default('nobody') }}\n"
        "{% endfor %}\n"
    )
    data = {
        "title": "Atlas",
        "items": [{"name": "scope", "owner": "Ana"}, {"name": "budget"}],
    }

    assert _render(content, data) == "# ATLAS\n- scope: Ana\n- budget: nobody\n"


def test_render_accepts_output_exactly_at_the_byte_limit() -> None:
    """Output of exactly max_output_bytes bytes (multibyte included) is accepted."""
    text = _render("{{ 'é' * n }}", {"n": LIMIT // 2})

    assert len(text.encode()) == LIMIT


def test_render_restores_the_alarm_handler_and_leaves_no_timer() -> None:
    """After a render, SIGALRM's handler is restored and its timer no longer runs."""
    before = signal.getsignal(signal.SIGALRM)

    _render("{{ 1 }}", timeout_s=0.05)
    time.sleep(0.1)  # a timer left armed would fire here

    assert signal.getsignal(signal.SIGALRM) is before


# -- errors a template or its input can cause -------------------------------


def test_undefined_variable_raises_missing_variable_naming_it() -> None:
    """A variable the input lacks raises MissingVariable naming that variable."""
    with pytest.raises(MissingVariable) as caught:
        _render("Hello {{ customer_name }}!", {"other": 1})

    assert "customer_name" in str(caught.value)


def test_undefined_attribute_raises_missing_variable_naming_it() -> None:
    """A missing key of a nested object raises MissingVariable naming the key."""
    with pytest.raises(MissingVariable) as caught:
        _render("{{ project.deadline }}", {"project": {"name": "Atlas"}})

    assert "deadline" in str(caught.value)


@pytest.mark.parametrize(
    ("data", "kind"),
    [([1, 2], "list"), ("text", "str"), (3, "int"), (None, "NoneType")],
)
def test_input_that_is_not_a_dict_raises_invalid_input_naming_its_type(
    data: Any, kind: str
) -> None:
    """Input that is not a JSON object raises InvalidInput naming what it was."""
    with pytest.raises(InvalidInput) as caught:
        render("{{ x }}", data, max_output_bytes=LIMIT, timeout_s=5.0)

    assert f"not {kind}" in str(caught.value)


def test_syntax_error_raises_template_error_naming_the_line() -> None:
    """A template that does not compile raises TemplateError naming its line."""
    with pytest.raises(TemplateError) as caught:
        _render("line one\nline two\n{% if %}\n")

    assert "line 3" in str(caught.value)


def test_exception_in_template_raises_template_error_naming_it() -> None:
    """A Python error while rendering becomes a TemplateError naming its type."""
    with pytest.raises(TemplateError) as caught:
        _render("{{ total / count }}", {"total": 10, "count": 0})

    assert type(caught.value) is TemplateError
    assert "ZeroDivisionError" in str(caught.value)


def test_unbounded_recursion_raises_template_error() -> None:
    """A macro calling itself forever raises TemplateError, not RecursionError."""
    with pytest.raises(TemplateError) as caught:
        _render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}")

    assert "recursed too deeply" in str(caught.value)


def test_celery_soft_time_limit_passes_through_unwrapped() -> None:
    """Celery's SoftTimeLimitExceeded during a render is re-raised as it is."""

    def interrupted() -> str:
        raise SoftTimeLimitExceeded()

    with pytest.raises(SoftTimeLimitExceeded):
        _render("{{ interrupted() }}", {"interrupted": interrupted})


# -- output size and render time --------------------------------------------


def test_long_loop_output_raises_output_too_large_naming_the_limit() -> None:
    """A loop writing past max_output_bytes raises OutputTooLarge naming the limit."""
    content = "{% for i in range(100000) %}0123456789{% endfor %}"

    with pytest.raises(OutputTooLarge) as caught:
        _render(content)

    assert f"{LIMIT} byte limit" in str(caught.value)


def test_multibyte_output_over_the_byte_limit_raises_output_too_large() -> None:
    """Output under the limit in characters but over it in bytes is refused."""
    characters = LIMIT // 2 + 1  # 'é' is two bytes in UTF-8

    with pytest.raises(OutputTooLarge) as caught:
        _render("{{ 'é' * n }}", {"n": characters})

    assert f"{LIMIT} byte limit" in str(caught.value)


#: The render timeout is a signal: when it lands in a garbage-collection callback,
#: Python reports the exception there as unraisable and goes on, and the timer,
#: which repeats, ends the render at its next tick. Only the report is ignored.
swallowed_alarm = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


@swallowed_alarm
def test_cpu_bound_template_raises_render_timeout() -> None:
    """A template that loops without output stops at the render timeout."""
    content = (
        "{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% endfor %}{% endfor %}"
    )

    with pytest.raises(RenderTimeout) as caught:
        _render(content, timeout_s=0.2)

    assert "0.2s" in str(caught.value)


@swallowed_alarm
def test_cpu_bound_filter_on_input_raises_render_timeout() -> None:
    """Slow filter work on input values is stopped by the render timeout."""
    with pytest.raises(RenderTimeout):
        _render("{{ x|center(80000)|wordwrap(1)|length }}", {"x": "x"}, timeout_s=0.2)


@swallowed_alarm
def test_cpu_bound_filter_on_literals_raises_render_timeout() -> None:
    """The same slow filter work on literals is stopped by the render timeout too."""
    with pytest.raises(RenderTimeout):
        _render("{{ 'x'|center(80000)|wordwrap(1)|length }}", timeout_s=0.2)


# -- the sandbox: attribute escapes -----------------------------------------


@pytest.mark.parametrize(
    ("content", "attribute"),
    [
        ("{{ ''.__class__.__mro__ }}", "__class__"),
        ("{{ cycler.__init__.__globals__ }}", "__init__"),
        ("{{ joiner.__init__.__globals__ }}", "__init__"),
        ("{{ lipsum.__globals__ }}", "__globals__"),
        ("{{ ''.format.__globals__ }}", "__globals__"),
        ("{{ self.__init__ }}", "__init__"),
    ],
)
def test_attribute_escape_raises_sandbox_violation_naming_it(
    content: str, attribute: str
) -> None:
    """Reaching Python internals through attributes raises SandboxViolation."""
    with pytest.raises(SandboxViolation) as caught:
        _render(content)

    assert attribute in str(caught.value)
    assert "unsafe" in str(caught.value)


# -- the sandbox: expressions that would build huge values ------------------


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("{{ 'x' * 10**9 }}", id="string-repetition"),
        pytest.param("{{ 10**9 * 'x' }}", id="string-repetition-reversed"),
        pytest.param("{{ [1] * 10**8 }}", id="list-repetition"),
        pytest.param("{{ (1,) * 10**8 }}", id="tuple-repetition"),
        pytest.param("{{ 10 ** 100000 }}", id="huge-power"),
        pytest.param("{{ 10.0 ** 100000 }}", id="huge-float-power"),
        pytest.param("{{ range(10**9) }}", id="huge-range"),
        pytest.param("{{ range(10**9)|sum }}", id="huge-range-sum"),
        pytest.param("{{ '%0999999999d' % 1 }}", id="percent-format-width"),
        pytest.param("{{ '%(a)0999999999d' % {'a': 1} }}", id="percent-named-width"),
        pytest.param("{{ '%0999999999d'|format(1) }}", id="format-filter-width"),
        pytest.param("{{ 'x'|center(10**9) }}", id="center-filter"),
        pytest.param("{{ 'x'|indent(10**9) }}", id="indent-filter"),
        pytest.param("{{ 'x'|wordwrap(10**9) }}", id="wordwrap-filter"),
        pytest.param(
            "{{ ('x' * 100000)|replace('x', 'y' * 100000) }}", id="replace-filter"
        ),
        pytest.param(
            "{{ ('x' * 100000).replace('x', 'y' * 100000) }}", id="replace-method"
        ),
        pytest.param("{{ ([('x' * 100000)] * 1000)|join }}", id="join-filter"),
        pytest.param("{{ ''.join([('x' * 100000)] * 1000) }}", id="join-method"),
        pytest.param("{{ range(100000)|join('x' * 999999) }}", id="join-separator"),
        pytest.param("{{ 'a'.ljust(10**9) }}", id="ljust-method"),
        pytest.param("{{ 'a'.rjust(10**9) }}", id="rjust-method"),
        pytest.param("{{ 'a'.center(10**9) }}", id="center-method"),
        pytest.param("{{ '1'.zfill(10**9) }}", id="zfill-method"),
        pytest.param("{{ '\t'.expandtabs(10**9) }}", id="expandtabs-method"),
    ],
)
def test_hostile_expression_is_refused_without_allocating(
    content: str,
) -> None:
    """An expression building a huge value is refused fast, before it allocates."""
    _assert_refused_cheaply(content)


def test_str_format_method_with_huge_width_is_refused() -> None:
    """'{:>99999999}'.format(1) is refused before building its 100 MB string."""
    # The 9-digit width of the brief behaves the same but allocates 1 GB and
    # takes ~2 s under tracemalloc; 8 digits already break the six-digit rule.
    _assert_refused_cheaply("{{ '{:>99999999}'.format(1) }}")


def _assert_sandbox_refuses(content: str, data: dict[str, Any] | None = None) -> None:
    """Render ``content`` and check the sandbox refuses it (SandboxViolation).

    The witnesses below build a few million characters, over the sandbox's
    one-value limit but cheap to build, and print only the length.
    """
    with pytest.raises(SandboxViolation) as caught:
        _render(content, data)

    assert "out of memory" not in str(caught.value)


def test_str_format_map_method_with_wide_field_is_refused() -> None:
    """'{a:>2000000}'.format_map(...) is refused by the sandbox's width rule."""
    _assert_sandbox_refuses("{{ '{a:>2000000}'.format_map({'a': 1})|length }}")


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("{{ ('%*d' % (n, 1))|length }}", id="percent-star-width"),
        pytest.param("{{ '%*d'|format(n, 1)|length }}", id="format-filter-star"),
        pytest.param("{{ '{:>{w}}'.format(1, w=n)|length }}", id="nested-width"),
    ],
)
def test_width_passed_as_an_argument_is_refused(content: str) -> None:
    """A format width of 2 million given as an argument is refused by the sandbox."""
    _assert_sandbox_refuses(content, {"n": 2_000_000})


def test_batch_filter_with_huge_fill_is_refused() -> None:
    """[1]|batch(n, 'x') with n over the value limit is refused by the sandbox."""
    _assert_sandbox_refuses("{{ [1]|batch(n, 'x')|first|length }}", {"n": 2_000_000})


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(
            "{{ ('a\n' * 2000)|indent('x' * 1000)|length }}", id="indent-string"
        ),
        pytest.param(
            "{{ ('a ' * 2000)|wordwrap(1, wrapstring='x' * 1000)|length }}",
            id="wordwrap-wrapstring",
        ),
    ],
)
def test_filter_string_arguments_that_multiply_size_are_refused(content: str) -> None:
    """indent/wordwrap strings repeated per line past the value limit are refused."""
    _assert_sandbox_refuses(content)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(
            "{{ ('x' * 1000).join(range(2000)|map('string'))|length }}",
            id="join-method-iterator",
        ),
        pytest.param("{{ ([10**100] * 20000)|join|length }}", id="join-filter-ints"),
    ],
)
def test_join_building_over_the_value_limit_is_refused(content: str) -> None:
    """A join building over a million characters is refused by the sandbox."""
    _assert_sandbox_refuses(content)
