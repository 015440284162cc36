"""The CLI's answer when the database is missing, empty or unreachable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT


def _adpa(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ADPA_")}
    environment.update(env, PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run(
        [sys.executable, "-c", "from producer.cli import main; main()", *args],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_command_on_an_empty_database_says_to_migrate(tmp_path: Path) -> None:
    """No schema yet: one line telling the user to run adpa db upgrade."""
    result = _adpa(tmp_path, "templates", "list")

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "adpa: error: the database has no schema (an empty database); this version"
        " needs revision 0001: run 'adpa db upgrade'"
    ]


def test_after_adpa_db_upgrade_the_same_command_works(tmp_path: Path) -> None:
    """The advice in that line is enough."""
    assert _adpa(tmp_path, "db", "upgrade").returncode == 0

    result = _adpa(tmp_path, "templates", "list")

    assert result.returncode == 0, result.stderr
    assert "name" in result.stdout


def test_an_unreachable_database_is_one_line_naming_the_failure(
    tmp_path: Path,
) -> None:
    """A refused connection is reported as such, without a traceback."""
    result = _adpa(
        tmp_path,
        "jobs",
        "list",
        ADPA_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:1/none",
    )

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("adpa: error: database: connection failed")


def _migrated(tmp_path: Path) -> Path:
    assert _adpa(tmp_path, "db", "upgrade").returncode == 0
    return tmp_path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("db", "upgrade", "nosuch"), "adpa: error: migrations: "),
        (("jobs", "show", "99999999999999999999"), "is not in the range"),
        (
            (
                "users",
                "create",
                "bad name",
                "--email",
                "a@b.io",
                "--password",
                "long-enough",
            ),
            "username 'bad name' must be",
        ),
        (
            (
                "users",
                "create",
                "ann",
                "--email",
                "not-an-email",
                "--password",
                "long-enough",
            ),
            "'not-an-email' is not an email address",
        ),
        (
            ("users", "create", "ann", "--email", "a@b.io", "--password", "short"),
            "a password needs at least 8 characters",
        ),
    ],
    ids=[
        "unknown-revision",
        "job-id-out-of-range",
        "bad-username",
        "bad-email",
        "short-password",
    ],
)
def test_bad_arguments_are_one_clear_line(
    tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    """Each mistake is named on stderr, without a traceback."""
    result = _adpa(_migrated(tmp_path), *args)

    assert result.returncode in (1, 2)
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_an_input_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are refused with the file's name and the offset."""
    folder = _migrated(tmp_path)
    (folder / "binary.json").write_bytes(b"\xff\xfe{}")

    result = _adpa(
        folder, "submit", "-t", "x", "-i", "binary.json", ADPA_API_KEY="adpa_00000000_x"
    )

    assert result.returncode == 1
    assert result.stderr.strip() == (
        "adpa: error: binary.json is not UTF-8 text (byte 0 cannot be decoded)"
    )


def test_an_input_file_with_a_huge_integer_is_one_line(tmp_path: Path) -> None:
    """An integer past Python's digit limit is bad JSON, not a traceback."""
    folder = _migrated(tmp_path)
    (folder / "b.json").write_text('{"a": 1' + "0" * 5000 + "}")

    result = _adpa(
        folder, "submit", "-t", "x", "-i", "b.json", ADPA_API_KEY="adpa_00000000_x"
    )

    assert result.returncode == 1
    assert result.stderr == (
        "adpa: error: b.json is not valid JSON: an integer has 5001 digits;"
        " at most 4300 are allowed\n"
    )


def test_an_input_file_over_the_limit_is_refused_naming_it(tmp_path: Path) -> None:
    """The limit is the setting's, and the file is not read past it."""
    folder = _migrated(tmp_path)
    (folder / "big.json").write_bytes(b"{}" + b" " * 5_000_000)

    result = _adpa(
        folder,
        "submit",
        "-t",
        "x",
        "-i",
        "big.json",
        ADPA_API_KEY="adpa_00000000_x",
        ADPA_MAX_INPUT_BYTES="4096",
    )

    assert result.returncode == 1
    assert result.stderr == (
        "adpa: error: big.json is larger than 4096 bytes, the input limit"
        " (ADPA_MAX_INPUT_BYTES)\n"
    )


def test_bytes_that_are_not_utf8_on_the_command_line_are_refused(
    tmp_path: Path,
) -> None:
    """A byte such as 0xff in an argument is named by position, exit 2."""
    folder = _migrated(tmp_path)

    result = _adpa(folder, "keys", "list", os.fsdecode(b"\xff"))

    assert result.returncode == 2
    assert result.stderr == "adpa: error: argument 3 is not valid UTF-8\n"


def test_bytes_that_are_not_utf8_in_an_adpa_variable_are_refused(
    tmp_path: Path,
) -> None:
    """The variable is named, exit 2, before any command runs."""
    result = _adpa(tmp_path, "db", "current", ADPA_API_KEY=os.fsdecode(b"adpa_0_\xff"))

    assert result.returncode == 2
    assert result.stderr == (
        "adpa: invalid setting ADPA_API_KEY: the value is not valid UTF-8\n"
    )


def test_help_needs_no_database(tmp_path: Path) -> None:
    """adpa submit --help on a fresh machine: the help, exit 0, nothing created."""
    result = _adpa(tmp_path, "submit", "--help")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: adpa submit [OPTIONS]")
    assert list(tmp_path.iterdir()) == []


def test_a_usage_error_is_one_line(tmp_path: Path) -> None:
    """click's message in the adpa form, exit 2: no Usage and Try lines."""
    result = _adpa(tmp_path, "jobs", "show", "0")

    assert result.returncode == 2
    assert result.stderr == (
        "adpa: error: Invalid value for 'JOB_ID': 0 is not in the range"
        " 1<=x<=2147483647.\n"
    )


@pytest.mark.parametrize("program", ["worker", "beat", "flower"])
def test_a_celery_program_with_a_bad_folder_setting_is_refused_by_adpa(
    tmp_path: Path, program: str
) -> None:
    """A folder the Celery app cannot make is reported as adpa reports settings."""
    folder = _migrated(tmp_path)
    (folder / "a-file").write_text("")
    storage = folder / "a-file" / "documents"

    result = _adpa(
        folder,
        program,
        ADPA_STORAGE_URL=str(storage),
        ADPA_FLOWER_PASSWORD="long-enough",
    )

    assert result.returncode == 2
    assert result.stderr == (
        f"adpa: invalid setting ADPA_STORAGE_URL: cannot create {storage}:"
        " Not a directory\n"
    )
