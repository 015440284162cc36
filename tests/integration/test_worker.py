"""The main path on PostgreSQL and Redis, through a real prefork worker."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from models.db import session_scope
from models.settings import Settings
from models.templates import TemplateSpec, register_template
from producer.broker import TASK_RENDER, send_jobs
from producer.client import JobClient
from producer.samples import sample_input
from tests.services import WorkerProcess, fetch_one, wait_all

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("celery_worker")]


def _register(settings: Settings, name: str, content: str) -> None:
    with session_scope(settings) as session:
        register_template(session, TemplateSpec(name, content))


def test_submitted_job_succeeds_with_its_document_logs_and_timestamps(
    client: JobClient, clean_db: Settings
) -> None:
    """A job reaches succeeded with one stored document and a log line per step."""
    job_id = client.submit("project-charter", sample_input("project-charter"))

    job = client.wait(job_id, timeout_s=30)

    assert job.status == "succeeded"
    assert job.started_at is not None and job.finished_at is not None
    assert job.created_at <= job.started_at <= job.finished_at
    assert all(t.tzinfo is not None for t in (job.created_at, job.finished_at))
    documents = client.documents(job_id)
    assert len(documents) == 1
    stored = clean_db.storage_root / documents[0].file_path
    data = stored.read_bytes()
    assert len(data) == documents[0].file_size
    assert hashlib.sha256(data).hexdigest() == documents[0].sha256
    assert data.startswith(b"# ")
    assert job.output_data == {
        "file_path": documents[0].file_path,
        "file_size": documents[0].file_size,
        "sha256": documents[0].sha256,
    }
    events = [entry.event for entry in client.logs(job_id)]
    assert events == ["submitted", "claimed", "rendered", "stored", "succeeded"]


def test_every_sample_template_renders_through_the_worker(client: JobClient) -> None:
    """The six shipped templates succeed with their sample inputs."""
    names = [
        "project-charter",
        "software-requirements-specification",
        "user-stories",
        "stakeholder-register",
        "risk-register",
        "meeting-minutes",
    ]
    job_ids = [client.submit(name, sample_input(name)) for name in names]

    assert [job.status for job in wait_all(client, job_ids)] == ["succeeded"] * 6


def test_missing_variable_fails_the_job_naming_the_variable(
    client: JobClient,
) -> None:
    """A render error fails the job at once, with the cause in the job and its log."""
    data = sample_input("user-stories")
    del data["epic"]

    job = client.wait(client.submit("user-stories", data), timeout_s=30)

    assert job.status == "failed"
    assert job.attempts == 1
    assert job.finished_at is not None
    assert job.last_error_kind == "missing_variable"
    assert "'epic' is undefined" in (job.last_error or "")
    failed = [entry for entry in client.logs(job.job_id) if entry.event == "failed"]
    assert len(failed) == 1 and failed[0].error_kind == "missing_variable"
    assert client.documents(job.job_id) == []


def test_hostile_template_fails_and_the_worker_keeps_serving(
    client: JobClient, clean_db: Settings
) -> None:
    """A template that tries to build a huge string fails; the next job succeeds."""
    _register(clean_db, "bomb", "{{ 'ab' * n }}{% for i in range(n) %}{% endfor %}")
    bomb = client.submit("bomb", {"n": 10**10})
    good = client.submit("risk-register", sample_input("risk-register"))

    jobs = wait_all(client, [bomb, good])

    assert jobs[0].status == "failed"
    assert jobs[0].last_error_kind == "sandbox_violation"
    assert jobs[1].status == "succeeded"


def test_slow_template_fails_with_the_render_time_limit(
    client: JobClient, clean_db: Settings
) -> None:
    """A render that burns CPU past the limit fails with a clear reason."""
    _register(
        clean_db,
        "spin",
        "{% for i in range(99999) %}{% for j in range(99999) %}"
        "{% endfor %}{% endfor %}",
    )

    job = client.wait(client.submit("spin", {}), timeout_s=30)

    assert job.status == "failed"
    assert job.last_error_kind == "render_timeout"
    assert "longer than 2s" in (job.last_error or "")


def test_the_same_message_twice_makes_one_document(
    client: JobClient, clean_db: Settings
) -> None:
    """Duplicate deliveries of one job render it once: one row, one file."""
    job_id = client.submit("meeting-minutes", sample_input("meeting-minutes"))
    send_jobs(client._sender, [job_id, job_id, job_id], clean_db.default_queue)

    client.wait(job_id, timeout_s=30)
    # Let the extra deliveries arrive and be refused.
    client.wait(client.submit("meeting-minutes", sample_input("meeting-minutes")))

    assert len(client.documents(job_id)) == 1
    files = list((clean_db.storage_root / str(job_id)).rglob("*.md"))
    assert len(files) == 1
    claims = [e for e in client.logs(job_id) if e.event == "claimed"]
    assert len(claims) == 1


def test_malformed_messages_are_dropped_and_the_worker_keeps_serving(
    client: JobClient, clean_db: Settings, celery_worker: WorkerProcess
) -> None:
    """Messages that cannot name a job are logged and dropped, each exactly once."""
    sender = client._sender
    dropped_before = celery_worker.log().count('"message_dropped"')
    malformed: list[tuple[list[object], dict[str, object]]] = [
        ([], {}),
        (["not-a-number"], {}),
        ([None], {}),
        ([-4], {}),
        ([2**31], {}),  # past what the key column holds
        (["\u00b2"], {}),  # a digit to str.isdigit, not a job id
        ([1, 2], {}),
        ([1], {"force": True}),
    ]
    for args, kwargs in malformed:
        sender.send_task(
            TASK_RENDER, args=args, kwargs=kwargs, queue=clean_db.default_queue
        )
    sender.send_task(TASK_RENDER, args=[987654321], queue=clean_db.default_queue)

    job = client.wait(client.submit("user-stories", sample_input("user-stories")))

    assert job.status == "succeeded"
    deadline = time.monotonic() + 30
    while celery_worker.log().count('"message_dropped"') < dropped_before + len(
        malformed
    ):
        assert time.monotonic() < deadline, celery_worker.log()[-3000:]
        time.sleep(0.1)
    time.sleep(1)  # a message retried instead of dropped would log again by now
    log = celery_worker.log()
    assert log.count('"message_dropped"') == dropped_before + len(malformed)
    assert "no such job" in log
    assert "claim_deferred" not in log


def test_storage_errors_retry_with_backoff_then_fail_clearly(
    client: JobClient, clean_db: Settings
) -> None:
    """A transient storage error is retried up to max_attempts, then fails the job."""
    job_id = client.submit("risk-register", sample_input("risk-register"))
    # A file where the job's folder must go makes every write fail, even as root.
    blocker: Path = clean_db.storage_root / str(job_id)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")

    job = client.wait(job_id, timeout_s=60)

    assert job.status == "failed"
    assert job.last_error_kind == "storage_error"
    assert job.attempts == clean_db.max_attempts
    events = [e.event for e in client.logs(job_id)]
    assert events.count("retry_scheduled") == clean_db.max_attempts - 1
    assert events.count("claimed") == clean_db.max_attempts
    assert client.documents(job_id) == []
    count = fetch_one(
        clean_db, "SELECT count(*) FROM documents WHERE job_id = :j", j=job_id
    )
    assert count[0] == 0


def test_updated_at_moves_on_every_update_of_a_job(
    client: JobClient, clean_db: Settings
) -> None:
    """updated_at follows the job through its updates, and after a raw SQL update."""
    job = client.wait(client.submit("user-stories", sample_input("user-stories")))
    assert job.updated_at >= job.finished_at  # type: ignore[operator]

    with session_scope(clean_db) as session:
        session.execute(
            text("UPDATE jobs SET max_attempts = 9 WHERE job_id = :j"),
            {"j": job.job_id},
        )

    assert client.get(job.job_id).updated_at > job.updated_at


def test_a_memory_bomb_past_the_sandbox_checks_fails_and_the_worker_goes_on(
    client: JobClient, clean_db: Settings
) -> None:
    """Doubling a string with ~ slips past the value checks; the memory cap stops it."""
    _register(
        clean_db,
        "doubler",
        "{% set ns = namespace(s='x' * 500000) %}"
        "{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
        "{{ ns.s|length }}",
    )
    bomb = client.submit("doubler", {})
    good = client.submit("user-stories", sample_input("user-stories"))

    jobs = wait_all(client, [bomb, good])

    assert jobs[0].status == "failed"
    assert jobs[0].last_error_kind == "sandbox_violation"
    assert "ran out of memory" in (jobs[0].last_error or "")
    assert jobs[1].status == "succeeded"
