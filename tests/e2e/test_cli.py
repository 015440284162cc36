"""The ``adpa`` command, run as a user runs it, against a prefork worker."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from models.db import session_scope
from models.settings import Settings
from producer.client import JobClient
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
        (
            "user-stories",
            '{"a": 1' + "0" * 5000 + "}",
            "<stdin> is not valid JSON: an integer has 5001 digits",
        ),
        ("user-stories", '{"a": NaN}', "<stdin> is not valid JSON: NaN is not"),
        (
            "user-stories",
            "{}" + " " * 3_000_000,
            "<stdin> is larger than 262144 bytes, the input limit",
        ),
    ],
    ids=[
        "malformed-json",
        "not-an-object",
        "unknown-template",
        "huge-integer",
        "nan",
        "too-large",
    ],
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


def test_adpa_sweep_delivers_a_job_whose_send_failed(
    clean_db: Settings, make_account: Callable[..., Account], samples: list[str]
) -> None:
    """A job committed while the broker was down is sent by adpa sweep, then runs."""
    broken = clean_db.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    key = make_account().api_key
    result = adpa(
        broken,
        "submit",
        "-t",
        "user-stories",
        "-i",
        "-",
        stdin=json.dumps(sample_input("user-stories")),
        api_key=key,
    )
    assert result.returncode == 0, result.stderr
    job_id = int(result.stdout.strip())
    with session_scope(clean_db) as session:
        session.execute(
            text(
                "UPDATE jobs SET created_at = now() - interval '1 hour'"
                " WHERE job_id = :j"
            ),
            {"j": job_id},
        )

    swept = adpa(clean_db, "sweep")

    assert swept.returncode == 0, swept.stderr
    assert "resent" in swept.stdout
    with JobClient(key, clean_db) as client:
        assert client.wait(job_id, timeout_s=30).status == "succeeded"


def test_adpa_jobs_cancel_and_retry(
    clean_db: Settings, make_account: Callable[..., Account], samples: list[str]
) -> None:
    """cancel a queued job, then retry it: it is queued again, attempts reset."""
    idle = clean_db.model_copy(update={"default_queue": "adpa.idle"})
    key = make_account().api_key
    with JobClient(key, idle) as client:
        job_id = client.submit("user-stories", sample_input("user-stories"))

    canceled = adpa(clean_db, "jobs", "cancel", str(job_id))
    assert canceled.returncode == 0, canceled.stderr
    assert f"job {job_id} canceled" in canceled.stdout
    again = adpa(clean_db, "jobs", "cancel", str(job_id))
    assert again.returncode == 1
    assert "is canceled; only queued or running jobs can be canceled" in again.stderr

    retried = adpa(clean_db, "jobs", "retry", str(job_id))

    assert retried.returncode == 0, retried.stderr
    assert f"job {job_id} queued again on adpa.idle" in retried.stdout
    with JobClient(key, clean_db) as client:
        job = client.get(job_id)
        assert (job.status, job.attempts, job.finished_at) == ("queued", 0, None)
        events = [e.event for e in client.logs(job_id)]
    assert events == ["submitted", "canceled", "retried"]
