"""The sweep on PostgreSQL and Redis: what it resends, and what it leaves alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import text

from models import jobs
from models.db import session_scope
from models.settings import Settings
from producer.broker import create_sender, sweep_through
from producer.client import JobClient, JobRequest
from producer.samples import sample_input
from tests.conftest import TEST_REDIS_URL
from worker.execution import Outcome, claim_folder, document_path, run_job
from worker.storage import LocalStorage

pytestmark = pytest.mark.integration


@pytest.fixture
def client(idle_client: JobClient) -> JobClient:
    """Jobs stay where the test puts them: no worker consumes their queue."""
    return idle_client


def _age_messages(settings: Settings, hours: int = 1) -> None:
    """Pretend every job's message went out long ago."""
    with session_scope(settings) as session:
        session.execute(
            text("UPDATE jobs SET enqueued_at = now() - make_interval(hours => :h)"),
            {"h": hours},
        )


def _resend_count(settings: Settings) -> int:
    with session_scope(settings) as session:
        return int(
            session.execute(
                text("SELECT count(*) FROM job_logs WHERE event = 'resent'")
            ).scalar_one()
        )


def test_a_backlog_still_in_the_broker_is_not_sent_twice(
    client: JobClient, clean_db: Settings
) -> None:
    """Jobs waiting behind a long queue keep their one message."""
    client.submit_many([JobRequest("user-stories", sample_input("user-stories"))] * 10)
    _age_messages(clean_db)
    queue = client.settings.bulk_queue
    broker = redis.Redis.from_url(TEST_REDIS_URL)
    assert broker.llen(queue) == 10

    report = sweep_through(client._sender, clean_db)

    assert report.resent == 0
    assert broker.llen(queue) == 10


def test_messages_the_broker_lost_are_sent_again_once(
    client: JobClient, clean_db: Settings
) -> None:
    """Only as many jobs are resent as the queue lacks, and each of them once."""
    client.submit_many([JobRequest("user-stories", sample_input("user-stories"))] * 10)
    _age_messages(clean_db)
    queue = client.settings.bulk_queue
    broker = redis.Redis.from_url(TEST_REDIS_URL)
    for _ in range(4):
        broker.rpop(queue)  # four messages lost

    first = sweep_through(client._sender, clean_db)
    second = sweep_through(client._sender, clean_db)

    assert first.resent == 4
    assert second.resent == 0
    assert broker.llen(queue) == 10
    assert _resend_count(clean_db) == 4


def test_a_job_never_sent_is_sent_whatever_the_queue_holds(
    client: JobClient, clean_db: Settings
) -> None:
    """A committed job whose send failed is sent by the next sweep."""
    client.submit_many([JobRequest("user-stories", sample_input("user-stories"))] * 3)
    unsent = client.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with JobClient(client._api_key, unsent) as offline:
        job_id = offline.submit("user-stories", sample_input("user-stories"))
    with session_scope(clean_db) as session:
        session.execute(
            text(
                "UPDATE jobs SET created_at = now() - interval '1 hour'"
                " WHERE job_id = :j"
            ),
            {"j": job_id},
        )

    report = sweep_through(client._sender, clean_db)

    assert report.resent == 1
    with session_scope(clean_db) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None and job.enqueued_at is not None


def test_a_job_due_far_ahead_is_left_to_the_sweep(
    client: JobClient, clean_db: Settings
) -> None:
    """A worker does not hold a message for hours; the sweep sends it when due."""
    later = datetime.now(UTC) + timedelta(hours=2)
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

    assert delivery.outcome == Outcome.DONE
    assert sweep_through(client._sender, clean_db).resent == 0
    with session_scope(clean_db) as session:
        session.execute(
            text(
                "UPDATE jobs SET not_before = now() - interval '1 second',"
                " created_at = now() - interval '1 hour' WHERE job_id = :j"
            ),
            {"j": job_id},
        )
    assert sweep_through(client._sender, clean_db).resent == 1


@pytest.mark.parametrize("cancel", [False, True], ids=["failed", "canceled"])
def test_a_job_the_sweep_ends_loses_only_the_files_of_its_dead_claim(
    client: JobClient, clean_db: Settings, cancel: bool
) -> None:
    """The sweep ends a job whose worker vanished and removes that claim's folder.

    Another claim's folder of the same job is not touched: by then an operator
    may have retried the job, and its new claim may hold a recorded document.
    """
    job_id = client.submit("user-stories", sample_input("user-stories"))
    with session_scope(clean_db) as session:
        claim = jobs.claim_job(session, job_id, worker="gone", task_id="t", lease_s=60)
        assert claim is not None
        session.execute(
            text(
                "UPDATE jobs SET lease_expires_at = now() - interval '1 minute',"
                " max_attempts = 1, cancel_requested_at = :cancel WHERE job_id = :j"
            ),
            {"j": job_id, "cancel": datetime.now(UTC) if cancel else None},
        )
    storage = LocalStorage(clean_db.storage_root)
    dead = storage.write(document_path(claim), b"written before the worker died")
    later = storage.write(f"{claim_folder(job_id, claim.token + 1)}/kept.md", b"x")
    removed: list[tuple[int, int]] = []

    def discard(job: int, token: int) -> None:
        removed.append((job, token))
        storage.remove_tree(claim_folder(job, token))

    report = sweep_through(client._sender, clean_db, discard)

    assert (report.failed, report.canceled) == ((0, 1) if cancel else (1, 0))
    assert client.get(job_id).status == ("canceled" if cancel else "failed")
    assert removed == [(job_id, claim.token)]
    assert not storage.exists(dead.file_path)
    assert not (clean_db.storage_root / claim_folder(job_id, claim.token)).exists()
    assert storage.exists(later.file_path)


def test_a_retry_the_broker_missed_is_sent_by_the_next_sweep(
    client: JobClient, clean_db: Settings
) -> None:
    """A retried job forgets its old send, so the sweep does not wait for it."""
    job_id = client.submit("user-stories", sample_input("user-stories"))
    with session_scope(clean_db) as session:
        session.execute(
            text(
                "UPDATE jobs SET status = 'failed', finished_at = now(),"
                " created_at = now() - interval '1 hour' WHERE job_id = :j"
            ),
            {"j": job_id},
        )
    broker_down = clean_db.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})

    with JobClient(client._api_key, broker_down) as offline:
        offline.retry(job_id)

    with session_scope(clean_db) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None
        assert (job.status, job.enqueued_at) == ("queued", None)
    assert sweep_through(client._sender, clean_db).resent == 1


def test_sweeps_running_at_once_share_the_work_and_do_nothing_twice(
    client: JobClient, clean_db: Settings
) -> None:
    """Four sweepers at once: each lost message resent once, each job requeued once."""
    queued = client.submit_many(
        [JobRequest("user-stories", sample_input("user-stories"))] * 120
    )
    running = client.submit_many(
        [JobRequest("risk-register", sample_input("risk-register"))] * 40
    )
    with session_scope(clean_db) as session:
        for job_id in running:
            jobs.claim_job(session, job_id, worker="gone", task_id="t", lease_s=60)
        session.execute(
            text(
                "UPDATE jobs SET lease_expires_at = now() - interval '1 minute'"
                " WHERE status = 'running'"
            )
        )
    _age_messages(clean_db)
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()  # every message is lost
    start = threading.Barrier(4)

    def sweep_once() -> tuple[int, int]:
        sender = create_sender(clean_db)
        try:
            start.wait()
            report = sweep_through(sender, clean_db)
            return report.resent, report.requeued
        finally:
            sender.close()

    with ThreadPoolExecutor(max_workers=4) as pool:
        reports = list(pool.map(lambda _: sweep_once(), range(4)))

    assert sum(resent for resent, _ in reports) == len(queued)
    assert sum(requeued for _, requeued in reports) == len(running)
    with session_scope(clean_db) as session:
        per_job = session.execute(
            text(
                "SELECT job_id, count(*) FROM job_logs"
                " WHERE event IN ('resent', 'requeued') GROUP BY job_id"
            )
        ).all()
    assert sorted(job_id for job_id, _ in per_job) == sorted(queued + running)
    assert {count for _, count in per_job} == {1}


def test_a_sweep_with_the_broker_down_counts_nothing_as_resent(
    client: JobClient, clean_db: Settings
) -> None:
    """Messages the broker did not take are reported unsent, and sent next time."""
    job_ids = client.submit_many(
        [JobRequest("user-stories", sample_input("user-stories"))] * 3
    )
    _age_messages(clean_db)
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    broker_down = clean_db.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    sender = create_sender(broker_down)
    try:
        report = sweep_through(sender, clean_db)
    finally:
        sender.close()

    assert (report.resent, report.unsent) == (0, len(job_ids))
    with session_scope(clean_db) as session:
        waiting = session.execute(
            text("SELECT count(*) FROM jobs WHERE enqueued_at IS NULL")
        ).scalar_one()
    assert waiting == len(job_ids)
