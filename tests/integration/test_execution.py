"""A delivery's steps on PostgreSQL, called directly: no broker, no worker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DataError
from structlog.testing import capture_logs

from models import jobs
from models.db import session_scope
from models.errors import StorageError
from models.jobs import StoredDocument
from models.settings import Settings
from producer.client import JobClient
from producer.samples import sample_input
from worker.execution import Outcome, document_path, run_job
from worker.storage import LocalStorage

pytestmark = pytest.mark.integration


@pytest.fixture
def client(idle_client: JobClient) -> JobClient:
    """Jobs stay where the test puts them: no worker consumes their queue."""
    return idle_client


class BrokenStorage(LocalStorage):
    """Local storage whose writes fail with a chosen exception."""

    def __init__(self, root: Path, error: Exception) -> None:
        super().__init__(root)
        self.error = error

    def write(self, relative_path: str, data: bytes) -> StoredDocument:
        raise self.error


def _submit_unsent(client: JobClient, template: str = "user-stories") -> int:
    """Insert a job without a worker around to take it."""
    return client.submit(template, sample_input(template))


def _run(
    settings: Settings,
    job_id: int,
    storage: LocalStorage | None = None,
    task_id: str = "t-1",
) -> Outcome:
    storage = storage or LocalStorage(settings.storage_root)
    return run_job(
        job_id, task_id=task_id, worker="test:1", settings=settings, storage=storage
    ).outcome


def test_a_second_delivery_does_nothing_but_log_why(
    client: JobClient, clean_db: Settings
) -> None:
    """Once a job is finished, another delivery changes nothing and says why."""
    job_id = _submit_unsent(client)
    assert _run(clean_db, job_id) == Outcome.DONE
    first = client.get(job_id)

    with capture_logs() as logs:
        assert _run(clean_db, job_id, task_id="t-2") == Outcome.DONE

    assert client.get(job_id).started_at == first.started_at
    assert len(client.documents(job_id)) == 1
    skipped = [e for e in logs if e["event"] == "delivery_skipped"]
    assert skipped and skipped[0]["reason"] == "job is succeeded"


def test_a_worker_whose_claim_was_taken_cannot_finish_the_job(
    client: JobClient, clean_db: Settings
) -> None:
    """The attempt number is the claim's token: a stale claim commits nothing."""
    job_id = _submit_unsent(client)
    with session_scope(clean_db) as session:
        stale = jobs.claim_job(session, job_id, worker="a", task_id="a", lease_s=60)
    assert stale is not None
    # The sweep gives the job back and another worker claims it.
    with session_scope(clean_db) as session:
        session.execute(
            text("UPDATE jobs SET status = 'queued' WHERE job_id = :j"), {"j": job_id}
        )
        current = jobs.claim_job(session, job_id, worker="b", task_id="b", lease_s=60)
    assert current is not None and current.attempt == stale.attempt + 1

    storage = LocalStorage(clean_db.storage_root)
    document = storage.write(document_path(stale), b"stale")
    with session_scope(clean_db) as session:
        assert not jobs.complete_job(session, stale, document)
        assert not jobs.fail_job(session, stale, "template_error", "late")

    with session_scope(clean_db) as session:
        assert jobs.complete_job(
            session, current, storage.write(document_path(current), b"current")
        )
    assert client.get(job_id).status == "succeeded"
    assert [d.file_path for d in client.documents(job_id)] == [document_path(current)]


def test_a_delivery_before_the_job_is_due_asks_to_come_back(
    client: JobClient, clean_db: Settings
) -> None:
    """A job with a future not_before is not claimed; the delivery is told when."""
    later = datetime.now(UTC) + timedelta(minutes=5)
    job_id = client.submit(
        "user-stories", sample_input("user-stories"), not_before=later
    )

    delivery = run_job(
        job_id,
        task_id="t",
        worker="w",
        settings=clean_db,
        storage=LocalStorage(clean_db.storage_root),
    )

    assert delivery.outcome == Outcome.EARLY
    assert 200 < delivery.delay_s <= 300
    assert client.get(job_id).status == "queued"


def test_an_unexpected_exception_fails_the_job_instead_of_leaving_it_running(
    client: JobClient, clean_db: Settings
) -> None:
    """A bug in a step ends the job failed, with the exception named."""
    job_id = _submit_unsent(client)
    storage = BrokenStorage(clean_db.storage_root, RuntimeError("disk driver bug"))

    assert _run(clean_db, job_id, storage) == Outcome.DONE

    job = client.get(job_id)
    assert job.status == "failed"
    assert job.last_error_kind == "internal_error"
    assert job.last_error == "RuntimeError: disk driver bug"


def test_a_transient_error_requeues_until_attempts_are_spent(
    client: JobClient, clean_db: Settings
) -> None:
    """Storage errors give the job back with a delay, then fail it on the last try."""
    job_id = _submit_unsent(client)
    storage = BrokenStorage(clean_db.storage_root, StorageError("storage busy"))

    for attempt in range(1, clean_db.max_attempts):
        assert _run(clean_db, job_id, storage) == Outcome.RETRY
        job = client.get(job_id)
        assert (job.status, job.attempts) == ("queued", attempt)
        with session_scope(clean_db) as session:
            session.execute(
                text("UPDATE jobs SET not_before = NULL WHERE job_id = :j"),
                {"j": job_id},
            )

    assert _run(clean_db, job_id, storage) == Outcome.DONE
    job = client.get(job_id)
    assert job.status == "failed"
    assert job.last_error_kind == "storage_error"
    assert f"gave up after {clean_db.max_attempts} attempts" in (job.last_error or "")
    assert client.documents(job_id) == []


def test_started_at_is_kept_across_attempts(
    client: JobClient, clean_db: Settings
) -> None:
    """A retried job keeps the started_at of its first claim."""
    job_id = _submit_unsent(client)
    storage = BrokenStorage(clean_db.storage_root, StorageError("storage busy"))
    _run(clean_db, job_id, storage)
    first_start = client.get(job_id).started_at
    with session_scope(clean_db) as session:
        session.execute(
            text("UPDATE jobs SET not_before = NULL WHERE job_id = :j"), {"j": job_id}
        )

    assert _run(clean_db, job_id) == Outcome.DONE

    job = client.get(job_id)
    assert job.status == "succeeded"
    assert job.started_at == first_start
    assert job.attempts == 2


def test_a_claim_the_database_refuses_drops_the_message(clean_db: Settings) -> None:
    """A statement refused for its values is dropped, not retried for ever."""
    with capture_logs() as logs:
        delivery = run_job(
            2**31,  # past what the key column holds: the claim's UPDATE is refused
            task_id="t",
            worker="w",
            settings=clean_db,
            storage=LocalStorage(clean_db.storage_root),
        )

    assert delivery.outcome == Outcome.DONE
    dropped = [e for e in logs if e["event"] == "message_dropped"]
    assert dropped and "out of range" in dropped[0]["error"]


def test_a_statement_the_database_refuses_fails_the_job_at_once(
    client: JobClient, clean_db: Settings
) -> None:
    """Only a lost connection is worth another attempt; a refused value is not."""
    job_id = _submit_unsent(client)
    refused = DataError("INSERT ...", {}, ValueError("value too long"))
    storage = BrokenStorage(clean_db.storage_root, refused)

    assert _run(clean_db, job_id, storage) == Outcome.DONE

    job = client.get(job_id)
    assert (job.status, job.attempts) == ("failed", 1)
    assert job.last_error_kind == "internal_error"
    assert "value too long" in (job.last_error or "")


class CancelingStorage(LocalStorage):
    """Storage whose write fails after a user asked to cancel the job."""

    def __init__(self, root: Path, settings: Settings, job_id: int) -> None:
        super().__init__(root)
        self.settings = settings
        self.job_id = job_id

    def write(self, relative_path: str, data: bytes) -> StoredDocument:
        with session_scope(self.settings) as session:
            jobs.request_cancel(session, self.job_id)
        raise StorageError("storage busy")


@pytest.mark.parametrize("attempts_left", [True, False], ids=["retry", "last"])
def test_a_cancel_asked_during_a_failing_attempt_cancels_the_job(
    client: JobClient, clean_db: Settings, attempts_left: bool
) -> None:
    """A transient error neither requeues nor fails a job its user canceled."""
    job_id = _submit_unsent(client)
    if not attempts_left:
        with session_scope(clean_db) as session:
            session.execute(
                text("UPDATE jobs SET max_attempts = 1 WHERE job_id = :j"),
                {"j": job_id},
            )
    storage = CancelingStorage(clean_db.storage_root, clean_db, job_id)

    assert _run(clean_db, job_id, storage) == Outcome.DONE

    job = client.get(job_id)
    assert job.status == "canceled"
    assert job.finished_at is not None
    events = [e.event for e in client.logs(job_id)]
    assert events[-2:] == ["cancel_requested", "canceled"]
    assert "retry_scheduled" not in events
    assert client.documents(job_id) == []


class WrittenThenBroken(LocalStorage):
    """Storage that puts the file in place, then fails (say, syncing its folder)."""

    def write(self, relative_path: str, data: bytes) -> StoredDocument:
        super().write(relative_path, data)
        raise StorageError(f"cannot write {relative_path}: Input/output error")


def test_a_failed_attempt_leaves_no_file_behind_even_after_a_late_write_error(
    client: JobClient, clean_db: Settings
) -> None:
    """The file an attempt wrote goes with the attempt, retried or failed."""
    job_id = _submit_unsent(client)
    with session_scope(clean_db) as session:
        session.execute(
            text("UPDATE jobs SET max_attempts = 2 WHERE job_id = :j"), {"j": job_id}
        )
    storage = WrittenThenBroken(clean_db.storage_root)

    assert _run(clean_db, job_id, storage) == Outcome.RETRY
    assert list((clean_db.storage_root / str(job_id)).rglob("*")) == []
    with session_scope(clean_db) as session:
        session.execute(
            text("UPDATE jobs SET not_before = NULL WHERE job_id = :j"), {"j": job_id}
        )
    assert _run(clean_db, job_id, storage) == Outcome.DONE

    assert client.get(job_id).status == "failed"
    assert list((clean_db.storage_root / str(job_id)).rglob("*")) == []
