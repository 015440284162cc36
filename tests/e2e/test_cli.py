"""The ``adpa`` command, run as a user runs it, against a prefork worker."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from models.settings import Settings
from producer.samples import sample_input
from tests.services import Account, fetch_one, worker_environment

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("celery_worker")]


def adpa(
    settings: Settings, *args: str, stdin: str | None = None, api_key: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = worker_environment(settings)
    env["ADPA_LOG_LEVEL"] = "WARNING"
    if api_key:
        env["ADPA_API_KEY"] = api_key
    return subprocess.run(
        [sys.executable, "-c", "from producer.cli import main; main()", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_adpa_submit_prints_the_job_id_and_the_worker_renders_it(
    clean_db: Settings,
    make_account: Callable[..., Account],
    samples: list[str],
    tmp_path: Path,
) -> None:
    """adpa submit --wait: the job id on stdout, then the document, exit 0."""
    account = make_account()
    source = tmp_path / "charter.json"
    source.write_text(json.dumps(sample_input("project-charter")))

    result = adpa(
        clean_db,
        "submit",
        "--template",
        "project-charter",
        "--input",
        str(source),
        "--wait",
        "60",
        api_key=account.api_key,
    )

    assert result.returncode == 0, result.stderr
    job_id = int(result.stdout.strip())
    assert "succeeded" in result.stderr
    status, path = fetch_one(
        clean_db,
        "SELECT j.status, d.file_path FROM jobs j JOIN documents d USING (job_id)"
        " WHERE j.job_id = :j",
        j=job_id,
    )
    assert status == "succeeded"
    assert (clean_db.storage_root / path).is_file()

    shown = adpa(clean_db, "jobs", "show", str(job_id))
    assert shown.returncode == 0, shown.stderr
    for step in ("claimed", "rendered", "stored", "succeeded"):
        assert step in shown.stdout


def test_adpa_submit_reads_standard_input(
    clean_db: Settings, make_account: Callable[..., Account], samples: list[str]
) -> None:
    """--input - takes the JSON object from stdin."""
    result = adpa(
        clean_db,
        "submit",
        "-t",
        "user-stories",
        "-i",
        "-",
        stdin=json.dumps(sample_input("user-stories")),
        api_key=make_account().api_key,
    )

    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) > 0


@pytest.mark.parametrize(
    ("template", "stdin", "expected"),
    [
        ("user-stories", "{not json", "<stdin> is not valid JSON"),
        ("user-stories", "[1, 2]", "job input must be a JSON object, not an array"),
        ("no-such", "{}", "unknown template 'no-such'"),
    ],
    ids=["malformed-json", "not-an-object", "unknown-template"],
)
def test_adpa_submit_refuses_bad_input_with_one_clear_line(
    clean_db: Settings,
    make_account: Callable[..., Account],
    samples: list[str],
    template: str,
    stdin: str,
    expected: str,
) -> None:
    """Bad input: exit 1, one line on stderr naming the problem, nothing inserted."""
    result = adpa(
        clean_db,
        "submit",
        "-t",
        template,
        "-i",
        "-",
        stdin=stdin,
        api_key=make_account().api_key,
    )

    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert expected in result.stderr
    assert fetch_one(clean_db, "SELECT count(*) FROM jobs")[0] == 0


def test_adpa_keys_revoke_stops_submissions(
    clean_db: Settings, make_account: Callable[..., Account], samples: list[str]
) -> None:
    """A key revoked with the CLI is refused by adpa submit."""
    key = make_account().api_key
    revoked = adpa(clean_db, "keys", "revoke", key.split("_")[1])
    assert revoked.returncode == 0, revoked.stderr

    result = adpa(
        clean_db,
        "submit",
        "-t",
        "user-stories",
        "-i",
        "-",
        stdin=json.dumps(sample_input("user-stories")),
        api_key=key,
    )

    assert result.returncode == 1
    assert "was revoked" in result.stderr
    assert fetch_one(clean_db, "SELECT count(*) FROM jobs")[0] == 0
