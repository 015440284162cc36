"""Cancel and retry, through the producer API, on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import jobs
from models.db import session_scope
from models.errors import Conflict, NotFound
from models.jobs import StoredDocument
from models.settings import Settings
from producer.client import JobClient
from producer.samples import sample_input
from worker.execution import Outcome, run_job
from worker.storage import LocalStorage

pytestmark = pytest.mark.integration


@pytest.fixture
def client(idle_client: JobClient) -> JobClient:
    """Jobs stay where the test puts them: no worker consumes their queue."""
    return idle_client


class CancelingStorage(LocalStorage):
    """Storage that lets a user's cancel arrive at a chosen step of the run."""

    def __init__(self, root: Path, settings: Settings, job_id: int, when: str) -> None:
        super().__init__(root)
        self.settings = settings
        self.job_id = job_id
        self.when = when

    def _cancel(self) -> None:
        with session_scope(self.settings) as session:
            jobs.request_cancel(session, self.job_id)

    def remove_tree(self, relative_path: str) -> None:
        super().remove_tree(relative_path)
        if self.when == "while rendering":
            self._cancel()

    def write(self, relative_path: str, data: bytes) -> StoredDocument:
        stored = super().write(relative_path, data)
        if self.when == "after the write":
            self._cancel()
        return stored


def _run(settings: Settings, job_id: int, storage: LocalStorage) -> Outcome:
    return run_job(
        job_id, task_id="t", worker="w:1", settings=settings, storage=storage
    ).outcome


def test_canceling_a_queued_job_ends_it_at_once(
    client: JobClient, clean_db: Settings
) -> None:
    """A queued job is canceled with finished_at; a later delivery does nothing."""
    job_id = client.submit("user-stories", sample_input("user-stories"))

    assert client.cancel(job_id) == "canceled"

    job = client.get(job_id)
    assert job.status == "canceled" and job.finished_at is not None
    assert _run(clean_db, job_id, LocalStorage(clean_db.storage_root)) == Outcome.DONE
    assert client.get(job_id).status == "canceled"
    assert [e.event for e in client.logs(job_id)] == ["submitted", "canceled"]


@pytest.mark.parametrize("when", ["while rendering", "after the write"])
def test_a_running_job_stops_at_its_next_safe_point(
    client: JobClient, clean_db: Settings, when: str
) -> None:
    """A cancel during a run ends the job canceled, with no document left behind."""
    job_id = client.submit("user-stories", sample_input("user-stories"))
    storage = CancelingStorage(clean_db.storage_root, clean_db, job_id, when)

    assert _run(clean_db, job_id, storage) == Outcome.DONE

    job = client.get(job_id)
    assert job.status == "canceled"
    assert job.finished_at is not None
    assert client.documents(job_id) == []
    assert not any(
        p.is_file() for p in (clean_db.storage_root / str(job_id)).rglob("*")
    )
    events = [e.event for e in client.logs(job_id)]
    assert events[-2:] == ["cancel_requested", "canceled"]


def test_retrying_a_failed_job_runs_it_again_with_attempts_reset(
    client: JobClient, clean_db: Settings
) -> None:
    """failed -> queued -> succeeded, and the new run's timestamps are its own."""
    data = sample_input("user-stories")
    job_id = client.submit(
        "user-stories", {k: v for k, v in data.items() if k != "epic"}
    )
    storage = LocalStorage(clean_db.storage_root)
    _run(clean_db, job_id, storage)
    failed = client.get(job_id)
    assert failed.status == "failed"
    # The input was fixed in place by an operator before the retry.
    with session_scope(clean_db) as session:
        row = jobs.get_job(session, job_id)
        assert row is not None
        row.input_data = data

    client.retry(job_id)

    queued = client.get(job_id)
    assert (queued.status, queued.attempts) == ("queued", 0)
    assert queued.started_at is None and queued.finished_at is None
    assert _run(clean_db, job_id, storage) == Outcome.DONE
    done = client.get(job_id)
    assert (done.status, done.attempts) == ("succeeded", 1)
    assert done.started_at is not None and done.started_at > failed.finished_at  # type: ignore[operator]
    assert [d.file_path.split("/")[1] for d in client.documents(job_id)] == ["2"]


def test_only_queued_or_running_jobs_can_be_canceled_and_only_ended_ones_retried(
    client: JobClient, clean_db: Settings
) -> None:
    """Moves outside the lifecycle are refused with the job's current status."""
    job_id = client.submit("user-stories", sample_input("user-stories"))
    _run(clean_db, job_id, LocalStorage(clean_db.storage_root))

    with pytest.raises(Conflict, match=f"job {job_id} is succeeded; only queued"):
        client.cancel(job_id)
    with pytest.raises(Conflict, match=f"job {job_id} is succeeded; only failed"):
        client.retry(job_id)
    with pytest.raises(NotFound):
        client.cancel(job_id + 1000)


def test_a_user_cannot_cancel_another_users_job(
    client: JobClient, clean_db: Settings, make_account: object
) -> None:
    """The API key limits cancel and retry to the key's own jobs."""
    job_id = client.submit("user-stories", sample_input("user-stories"))
    other = make_account("intruder")  # type: ignore[operator]

    with JobClient(other.api_key, clean_db) as intruder, pytest.raises(NotFound):
        intruder.cancel(job_id)
    assert client.get(job_id).status == "queued"
