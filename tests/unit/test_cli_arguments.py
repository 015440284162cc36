"""How ``adpa`` answers its command line: help, usage errors, text that is not UTF-8.

These run the entry point in this process; nothing here needs a database.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click
import pytest

import producer.demo
from producer.cli import cli, main


@dataclass(frozen=True)
class Result:
    code: int | str | None
    stdout: str
    stderr: str


def run_adpa(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """Run ``adpa ARGS`` as the console script does; exit code 0 when it returns."""
    try:
        main(list(args))
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def _refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise AssertionError("the command ran; it should have stopped at its arguments")


@pytest.fixture(autouse=True)
def _nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that got past its arguments must not replace or start processes."""
    monkeypatch.setattr(os, "execv", _refuse)
    monkeypatch.setattr(producer.demo, "run_demo", _refuse)


def _command_paths(
    group: click.Group = cli, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _command_paths(command, (*path, name))


COMMAND_PATHS = [path for path, _ in _command_paths()]
FLOAT_OPTIONS = [
    (path, option.opts[0])
    for path, command in _command_paths()
    for option in command.params
    if isinstance(option, click.Option)
    and isinstance(option.type, click.types.FloatParamType)
]


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=" ".join)
def test_help_of_every_command_works_without_a_database(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, path: tuple[str, ...]
) -> None:
    """--help prints the usage and exits 0 on a machine with no database at all."""
    result = run_adpa(capsys, *path, "--help")

    assert result.code == 0, result.stderr
    assert result.stdout.startswith(f"Usage: adpa {' '.join(path)} ")
    assert result.stderr == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("jobs", "show", "0"),
            "Invalid value for 'JOB_ID': 0 is not in the range 1<=x<=2147483647.",
        ),
        (("jobs", "show"), "Missing argument 'JOB_ID'."),
        (("nosuch",), "No such command 'nosuch'."),
        (("jobs", "list", "--bogus"), "No such option '--bogus'."),
        (("submit", "-i", "-"), "Missing option '--template' / '-t'."),
        (
            ("jobs", "list", "--status", "done"),
            "Invalid value for '--status': 'done' is not one of",
        ),
        (("db", "current", "extra"), "Got unexpected extra argument (extra)"),
    ],
    ids=[
        "out-of-range",
        "missing-argument",
        "unknown-command",
        "unknown-option",
        "missing-option",
        "bad-choice",
        "extra-argument",
    ],
)
def test_a_usage_error_is_one_line_with_exit_2(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], expected: str
) -> None:
    """click's message, on one stderr line of the adpa form; no Usage, no Try."""
    result = run_adpa(capsys, *args)

    assert result.code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"adpa: error: {expected}")
    assert result.stderr.count("\n") == 1, result.stderr


def test_adpa_without_a_command_still_shows_its_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No command at all is not an error line: the help says what there is."""
    result = run_adpa(capsys)

    assert result.code == 2
    assert "Commands:" in result.stderr


def test_every_float_option_is_found() -> None:
    """The float options the next test checks include the known ones."""
    assert {(("submit",), "--wait"), (("demo",), "--timeout")} <= set(FLOAT_OPTIONS)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999", "-1"])
@pytest.mark.parametrize(
    ("path", "option"), FLOAT_OPTIONS, ids=[f"{p[-1]} {o}" for p, o in FLOAT_OPTIONS]
)
def test_a_float_option_refuses_what_is_not_a_finite_positive_number(
    capsys: pytest.CaptureFixture[str],
    path: tuple[str, ...],
    option: str,
    value: str,
) -> None:
    """nan passes a range check and would wait forever, as would inf; -1 is no time."""
    result = run_adpa(capsys, *path, option, value)

    assert result.code == 2
    assert result.stderr.startswith(f"adpa: error: Invalid value for '{option}': ")
    assert result.stderr.count("\n") == 1, result.stderr


# A byte that is not UTF-8 reaches Python as this lone surrogate.
BAD = "\udcff"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("submit", "-t", BAD, "-i", "f.json"), "argument 3 (after -t)"),
        (("keys", "list", BAD), "argument 3"),
        (("keys", "create", BAD), "argument 3"),
        (("keys", "revoke", BAD), "argument 3"),
        (
            ("submit", "-t", "t", "-i", "f.json", "--api-key", f"adpa_abc_{BAD}"),
            "argument 7 (after --api-key)",
        ),
        (
            ("submit", "-t", "t", "-i", "f.json", f"--idempotency-key={BAD}"),
            "the value of --idempotency-key",
        ),
        (
            ("users", "create", "z", "--email", f"a{BAD}@b.c"),
            "argument 5 (after --email)",
        ),
        (("templates", "add", "t", "f", "--tag", BAD), "argument 6 (after --tag)"),
        ((f"--{BAD}",), "argument 1"),
    ],
    ids=[
        "template",
        "keys-list",
        "keys-create",
        "keys-revoke",
        "api-key",
        "idempotency-key",
        "email",
        "tag",
        "option-name",
    ],
)
def test_an_argument_that_is_not_utf8_is_named_with_exit_2(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], expected: str
) -> None:
    """One line naming the argument by position or option, never showing its value."""
    result = run_adpa(capsys, *args)

    assert result.code == 2
    assert result.stderr == f"adpa: error: {expected} is not valid UTF-8\n"
    assert result.stdout == ""


@pytest.mark.parametrize(
    "variable",
    ["ADPA_API_KEY", "ADPA_DATABASE_URL", "ADPA_BROKER_URL", "adpa_data_dir"],
)
def test_an_adpa_variable_that_is_not_utf8_is_named_with_exit_2(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    variable: str,
) -> None:
    """The variable is named, its value (maybe a secret) is not shown."""
    monkeypatch.setenv(variable, f"secret{BAD}")

    result = run_adpa(capsys, "jobs", "list")

    assert result.code == 2
    assert result.stderr == (
        f"adpa: invalid setting {variable}: the value is not valid UTF-8\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_adpa_variable_name_that_is_not_utf8_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is shown with its byte escaped."""
    monkeypatch.setenv(f"ADPA_{BAD}", "1")

    result = run_adpa(capsys, "jobs", "list")

    assert result.code == 2
    assert result.stderr == (
        "adpa: invalid setting ADPA_\\xff: the name is not valid UTF-8\n"
    )


def test_other_variables_are_not_checked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only adpa's own variables are its business."""
    monkeypatch.setenv("SOMETHING_ELSE", f"x{BAD}")
    monkeypatch.setenv("ADPA_TEST_OTHER", f"x{BAD}")

    result = run_adpa(capsys, "submit", "--help")

    assert result.code == 0, result.stderr
