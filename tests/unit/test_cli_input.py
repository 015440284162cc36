"""How ``adpa submit`` reads its input file: bounded, and every bad file one line."""

from __future__ import annotations

import io

import pytest

from models.errors import InvalidInput
from producer.cli import _read_input, _read_text

LIMIT = 1024


class InputFile(io.BytesIO):
    """An input file in memory, named as click names an opened file."""

    name = "in.json"


def read(data: bytes, limit: int = LIMIT) -> object:
    return _read_input(InputFile(data), limit)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            '{"a": 1' + "0" * 5000 + "}",
            "an integer has 5001 digits; at most 4300 are allowed",
        ),
        (
            '{"a": -1' + "0" * 4300 + "}",
            "an integer has 4301 digits; at most 4300 are allowed",
        ),
        ('{"a": NaN}', "NaN is not a JSON value"),
        ('{"a": Infinity}', "Infinity is not a JSON value"),
        ('{"a": -Infinity}', "-Infinity is not a JSON value"),
        ('{"a": 1e999}', "the number 1e999 is too large"),
        (
            '{"a": -1' + "0" * 400 + ".5}",
            "the number -1000000000000000000... is too large",
        ),
        ("{not json", "Expecting property name enclosed in double quotes at line 1"),
    ],
    ids=[
        "huge-integer",
        "huge-negative-integer",
        "nan",
        "infinity",
        "minus-infinity",
        "float-overflow",
        "long-float-overflow",
        "malformed",
    ],
)
def test_input_that_is_not_json_is_one_line_naming_the_file(
    text: str, reason: str
) -> None:
    """Each way json.loads can refuse or overflow is one line naming the file."""
    with pytest.raises(InvalidInput) as caught:
        read(text.encode(), limit=len(text))

    assert str(caught.value).startswith(f"in.json is not valid JSON: {reason}")
    assert "\n" not in str(caught.value)


def test_an_integer_within_the_digit_limit_is_kept() -> None:
    """The refusal is about overflow, not about big numbers."""
    number = int("9" * 4300)

    assert read(f'{{"a": {number}}}'.encode(), limit=5000) == {"a": number}


def test_input_nested_too_deeply_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"^in\.json is nested too deeply$"):
        read(b"[" * 100_000, limit=100_000)


def test_input_that_is_not_utf8_names_the_byte() -> None:
    with pytest.raises(InvalidInput) as caught:
        read(b'{"a": "\xc3\xa9\xff"}')

    assert str(caught.value) == "in.json is not UTF-8 text (byte 9 cannot be decoded)"


def test_input_of_exactly_the_limit_is_accepted() -> None:
    data = b"{}" + b" " * (LIMIT - 2)

    assert read(data) == {}


def test_input_over_the_limit_is_refused_naming_the_limit() -> None:
    with pytest.raises(InvalidInput) as caught:
        read(b"{}" + b" " * (LIMIT - 1))

    assert str(caught.value) == (
        f"in.json is larger than {LIMIT} bytes, the input limit (ADPA_MAX_INPUT_BYTES)"
    )


def test_a_large_input_is_read_no_further_than_the_limit() -> None:
    """A huge file costs at most the limit in memory: one byte past it is enough."""
    source = InputFile(b" " * 20_000_000)

    with pytest.raises(InvalidInput):
        _read_input(source, LIMIT)

    assert source.tell() == LIMIT + 1


class TemplateFile(io.StringIO):
    """A template file in memory, named as click names an opened file."""

    name = "big.md.j2"

    def read(self, size: int | None = -1) -> str:
        self.largest_read = size
        return super().read(size)


def test_a_template_file_is_read_no_further_than_one_past_the_limit() -> None:
    """An endless or huge template file is refused without loading all of it."""
    source = TemplateFile("x" * 50_000)

    with pytest.raises(InvalidInput) as caught:
        _read_text(source, 1000)

    assert str(caught.value) == "big.md.j2 is longer than 1000 characters"
    assert source.largest_read == 1001
