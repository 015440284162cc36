"""Unit tests of models.sandbox: the registration check and the bounded filters."""

from __future__ import annotations

from typing import Any

import jinja2
import pytest

from models.errors import SandboxViolation, TemplateError
from models.sandbox import (
    MAX_INT_BITS,
    MAX_VALUE_CHARS,
    compile_template,
    required_variables,
    sandbox,
)
from worker.rendering import render


def _run(content: str, **data: Any) -> str:
    return compile_template(content).render(**data)


# -- compiling ---------------------------------------------------------------


@pytest.mark.parametrize(
    "expression",
    [
        "'ab'|center(9)",
        "'a b c'|wordcount",
        "[3, 1, 2]|sort|join(',')",
        "'xa'|replace('x', 'yy')",
        "{'a': 1}|dictsort",  # a filter that takes the environment
        "'<b>'|escape",
    ],
)
def test_filters_on_constants_run_when_rendering_not_when_compiling(
    expression: str,
) -> None:
    """Compiling never runs a filter: render limits cannot be bypassed there.

    Jinja2 folds filters of constants into the compiled code, and a template
    of a thousand ``'a'|center(999999)|wordcount`` took 20 s to register.
    """
    content = "{{ " + expression + " }}"
    source = sandbox().compile(content, raw=True)
    plain = jinja2.Environment(autoescape=False)  # noqa: S701 - plain text, as ours
    expected = plain.from_string(content).render()

    assert "(context, " in source  # a filter call, made when rendering
    assert repr(expected) not in source  # not its result, folded in while compiling
    assert _run(content) == expected


@pytest.mark.parametrize(
    "content",
    [
        "{% if x %}" * 99 + "a" + "{% endif %}" * 99,
        "{% if x %}" * 400 + "a" + "{% endif %}" * 400,
        "{{ " + "(" * 100 + "x" + ")" * 100 + " }}",
        "{{ " + "(" * 3000 + "x" + ")" * 3000 + " }}",
    ],
    ids=["99-ifs", "400-ifs", "100-parentheses", "3000-parentheses"],
)
def test_nesting_python_cannot_compile_is_refused_as_a_template_error(
    content: str,
) -> None:
    """Deep nesting is refused when registered, as one clear error."""
    with pytest.raises(TemplateError) as caught:
        required_variables(content)

    assert str(caught.value) == "template is nested too deeply"


# -- required_variables -----------------------------------------------------


def test_required_variables_lists_top_level_variables_sorted() -> None:
    """Only top-level inputs are listed: not loop or set names, nor attributes."""
    content = (
        "# {{ title }}\n"
        "{% set total = items|length %}\n"
        "{% for item in items %}{{ item.name }} of {{ total }}{% endfor %}\n"
        "{{ project.owner.name|default(fallback) }}\n"
    )

    assert required_variables(content) == ["fallback", "items", "project", "title"]


def test_required_variables_of_a_template_without_variables_is_empty() -> None:
    """A template reading no input needs no variables."""
    assert required_variables("static text {{ 1 + 2 }}") == []


@pytest.mark.parametrize("check", [required_variables, compile_template])
def test_syntax_error_raises_template_error_naming_the_line(check: Any) -> None:
    """A syntax error is a TemplateError whose message names the line it is on."""
    content = "first line\n{{ ok }}\n{% for x in %}\n{% endfor %}\n"

    with pytest.raises(TemplateError) as caught:
        check(content)

    assert str(caught.value).startswith("syntax error on line 3:")


def test_unclosed_block_names_a_line() -> None:
    """An unclosed block is reported with a line number too."""
    with pytest.raises(TemplateError) as caught:
        required_variables("{% if a %}\nopen\n")

    assert "syntax error on line" in str(caught.value)
    assert "endif" in str(caught.value)


@pytest.mark.parametrize(
    ("content", "tag"),
    [
        ("{% include 'header.j2' %}", "include"),
        ("{% extends 'base.j2' %}", "extends"),
        ("{% import 'macros.j2' as m %}", "import"),
        ("{% from 'macros.j2' import title %}", "from ... import"),
    ],
)
def test_tags_reading_other_templates_are_refused_naming_the_tag(
    content: str, tag: str
) -> None:
    """include, extends and import are refused with a message naming the tag."""
    with pytest.raises(TemplateError) as caught:
        required_variables(content)

    assert str(caught.value) == f"the {tag} tag is not supported: templates stand alone"


# -- the wrapped filters still work for ordinary values ---------------------


@pytest.mark.parametrize(
    ("content", "data", "expected"),
    [
        ("{{ items|join(', ') }}", {"items": ["a", "b", "c"]}, "a, b, c"),
        ("{{ items|join }}", {"items": [1, 2, 3]}, "123"),
        ("{{ range(4)|join('-') }}", {}, "0-1-2-3"),
        (
            "{{ people|join(', ', attribute='name') }}",
            {"people": [{"name": "Ana"}, {"name": "Bo"}]},
            "Ana, Bo",
        ),
        (
            "{{ people|map(attribute='name')|join('/') }}",
            {"people": [{"name": "Ana"}, {"name": "Bo"}]},
            "Ana/Bo",
        ),
        ("{{ text|replace('-', '+') }}", {"text": "a-b-c"}, "a+b+c"),
        ("{{ text|replace('a', 'b', 2) }}", {"text": "aaaa"}, "bbaa"),
        ("[{{ text|center(7) }}]", {"text": "abc"}, "[  abc  ]"),
        ("{{ text|indent(2) }}", {"text": "a\nb\nc"}, "a\n  b\n  c"),
        ("{{ text|indent(2, first=True) }}", {"text": "a\nb"}, "  a\n  b"),
        ("{{ text|indent('> ') }}", {"text": "a\nb"}, "a\n> b"),
        ("{{ text|wordwrap(7) }}", {"text": "aaa bbb ccc"}, "aaa bbb\nccc"),
        (
            "{{ text|wordwrap(3, wrapstring='|') }}",
            {"text": "aaa bbb"},
            "aaa|bbb",
        ),
        ("{{ '%s is %d'|format(name, age) }}", {"name": "Ana", "age": 7}, "Ana is 7"),
        ("{{ '%(n)05.1f'|format(n=3.14159) }}", {}, "003.1"),
        ("{{ '{:>5}|{}'.format(1, 'b') }}", {}, "    1|b"),
        ("{{ 'ab' * 3 }}", {}, "ababab"),
        ("{{ 2 ** 10 }}", {}, "1024"),
        ("{{ '%-4s|' % 'ab' }}", {}, "ab  |"),
    ],
)
def test_bounded_operations_behave_normally_on_small_values(
    content: str, data: dict[str, Any], expected: str
) -> None:
    """Filters and operators the sandbox wraps give Jinja2's usual results."""
    assert _run(content, **data) == expected


def test_join_of_undefined_value_still_raises_undefined() -> None:
    """The join wrapper does not hide an undefined value behind a TypeError."""
    with pytest.raises(Exception, match="'missing' is undefined"):
        _run("{{ missing|join(',') }}")


# -- the limit itself -------------------------------------------------------


def test_value_exactly_at_the_limit_is_allowed() -> None:
    """A repetition building exactly MAX_VALUE_CHARS characters is allowed."""
    assert _run("{{ ('x' * n)|length }}", n=MAX_VALUE_CHARS) == str(MAX_VALUE_CHARS)


def test_value_one_over_the_limit_is_refused_naming_both_sizes() -> None:
    """One character over MAX_VALUE_CHARS is refused, naming the size and limit."""
    with pytest.raises(SandboxViolation) as caught:
        _run("{{ ('x' * n)|length }}", n=MAX_VALUE_CHARS + 1)

    message = str(caught.value)
    assert f"build {MAX_VALUE_CHARS + 1} items" in message
    assert f"limit is {MAX_VALUE_CHARS}" in message


def test_power_within_the_integer_bit_limit_is_allowed() -> None:
    """2 ** 50000 (about MAX_INT_BITS bits) is computed normally."""
    assert _run("{{ (2 ** e) == 2 ** e }}", e=MAX_INT_BITS // 2) == "True"


def test_power_over_the_integer_bit_limit_is_refused_naming_the_limit() -> None:
    """A power of more than MAX_INT_BITS bits is refused, naming the limit."""
    with pytest.raises(SandboxViolation) as caught:
        _run("{{ 2 ** e }}", e=MAX_INT_BITS // 2 + 1)

    assert f"the limit is {MAX_INT_BITS}" in str(caught.value)


def test_product_of_huge_integers_is_refused() -> None:
    """Multiplying integers whose product passes MAX_INT_BITS bits is refused."""
    with pytest.raises(SandboxViolation) as caught:
        _run("{{ a * a }}", a=2**MAX_INT_BITS)

    assert "bits" in str(caught.value)


@pytest.mark.parametrize(
    "content",
    [
        "{{ '%.100000000f'|format(1.5) }}",
        "{{ '{:.9999999f}'.format(1.5) }}",
        "{{ '%.*f' % (100000000, 1.5) }}",
        "{{ '{:.{p}f}'.format(1.5, p=100000000) }}",
    ],
    ids=["percent-literal", "brace-literal", "percent-star", "brace-nested"],
)
def test_a_huge_format_precision_is_refused(content: str) -> None:
    """Precision pads like width does: over six digits is refused before it runs."""
    with pytest.raises(SandboxViolation, match="width or precision"):
        render(content, {}, max_output_bytes=10_000, timeout_s=5)


def test_ordinary_formats_and_numbers_in_text_still_work() -> None:
    """Small widths and precisions, and long numbers outside a format, render."""
    content = (
        "Call 5551234567. {{ '%8.2f|%-3s' % (3.14159, 'a') }} {{ '{:>6}'.format(7) }}"
    )

    assert render(content, {}, max_output_bytes=10_000, timeout_s=5) == (
        "Call 5551234567.     3.14|a        7"
    )
