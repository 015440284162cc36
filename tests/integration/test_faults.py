"""Delivery guarantees under faults: processes killed, servers restarted.

Each test here runs against a Redis and a PostgreSQL of its module's own, so
it can stop and restart them without touching the machine's shared services.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import text

from models import accounts, migrate
from models.db import dispose_engines, session_scope
from models.settings import Settings, load_settings
from models.sweep import SweepReport
from models.templates import TemplateSpec, register_template
from producer.broker import (
    TASK_RENDER,
    celery_command,
    create_sender,
    send_jobs,
    sweep_through,
)
from producer.client import JobClient, JobRequest
from producer.samples import load_samples, sample_input
from tests.faults import PostgresCluster, RedisServer, kill_tree
from tests.services import (
    WorkerProcess,
    start_worker,
    stop_worker,
    worker_environment,
)

pytestmark = pytest.mark.integration

#: A render that takes a few seconds of CPU, long enough to be caught running.
SLOW_TEMPLATE = (
    "{% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}"
    "slow job {{ n }}\n"
)
SLOW_N = 9000
#: A render of several seconds more than the stack's lease.
LONG_N = 16000


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    cluster.create()
    yield cluster
    dispose_engines()
    cluster.destroy()


@pytest.fixture(scope="module")
def stack_settings(
    redis_server: RedisServer,
    postgres: PostgresCluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> Settings:
    folder = tmp_path_factory.mktemp("faults")
    settings = load_settings(
        database_url=postgres.url,
        broker_url=redis_server.url,
        data_dir=folder,
        storage_url=str(folder / "documents"),
        lease_s=6,
        render_timeout_s=20,
        task_soft_time_limit_s=30,
        task_time_limit_s=40,
        retry_backoff_base_s=0.2,
        retry_backoff_max_s=1,
        sweep_queued_after_s=3,
        sweep_unsent_after_s=1,
        sweep_interval_s=1,
    )
    migrate.upgrade(settings)
    return settings


@pytest.fixture
def stack(stack_settings: Settings, redis_server: RedisServer) -> Settings:
    """The module's own services, emptied before each test."""
    with session_scope(stack_settings) as session:
        session.execute(
            text(
                "TRUNCATE job_logs, documents, jobs, template_tags, templates,"
                " api_keys, users CASCADE"
            )
        )
    redis.Redis.from_url(redis_server.url).flushdb()
    shutil.rmtree(stack_settings.storage_root, ignore_errors=True)
    with session_scope(stack_settings) as session:
        load_samples(session)
        register_template(session, TemplateSpec("slow", SLOW_TEMPLATE))
    return stack_settings


@pytest.fixture
def api_key(stack: Settings) -> str:
    with session_scope(stack) as session:
        user = accounts.create_user(
            session, "faults", "f@example.com", "faults-password"
        )
        return accounts.issue_api_key(session, user).secret


@pytest.fixture
def workers(stack: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Builder: prefork workers on the module's services, stopped after the test."""
    started: list[WorkerProcess] = []

    def build(name: str = "w", concurrency: int = 2) -> WorkerProcess:
        worker = start_worker(
            stack,
            tmp_path / f"{name}.log",
            concurrency=concurrency,
            name=f"{name}-{uuid.uuid4().hex[:6]}",
        )
        started.append(worker)
        return worker

    yield build
    for worker in started:
        stop_worker(worker)


def _job(settings: Settings, job_id: int) -> dict[str, Any]:
    with session_scope(settings) as session:
        row = (
            session.execute(text("SELECT * FROM jobs WHERE job_id = :j"), {"j": job_id})
            .mappings()
            .one()
        )
        return dict(row)


def _statuses(settings: Settings) -> dict[str, int]:
    with session_scope(settings) as session:
        return dict(
            session.execute(
                text("SELECT status, count(*) FROM jobs GROUP BY status")
            ).all()
        )


def _sweep(settings: Settings) -> SweepReport:
    sender = create_sender(settings)
    try:
        return sweep_through(sender, settings)
    finally:
        sender.close()


def _wait_for(
    predicate: Callable[[], bool],
    what: str,
    timeout_s: float = 60,
    sweep: Settings | None = None,
) -> None:
    """Poll until true, running the sweep between polls when asked."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if sweep is not None:
            _sweep(sweep)
        time.sleep(0.3)


def _check_one_document_per_success(settings: Settings) -> None:
    """Documents = succeeded jobs, one file each, and no stray file on disk."""
    with session_scope(settings) as session:
        succeeded = session.execute(
            text("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
        ).scalar_one()
        paths = session.execute(text("SELECT file_path FROM documents")).scalars().all()
        per_job = session.execute(
            text(
                "SELECT count(*) FROM (SELECT job_id FROM documents GROUP BY job_id"
                " HAVING count(*) > 1) AS duplicated"
            )
        ).scalar_one()
    assert len(paths) == succeeded
    assert per_job == 0
    root = settings.storage_root
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert on_disk == set(paths)


def test_kill_9_of_the_worker_running_a_job_ends_it_once_after_the_sweep(
    stack: Settings, api_key: str, workers: Callable[..., WorkerProcess]
) -> None:
    """The whole worker dies mid-job; the sweep gives the job to another worker."""
    first = workers("first")
    with JobClient(api_key, stack) as client:
        job_id = client.submit("slow", {"n": SLOW_N})
    _wait_for(lambda: _job(stack, job_id)["status"] == "running", "the job to start")

    kill_tree(first.process.pid)
    first.process.wait()
    assert _job(stack, job_id)["status"] == "running"
    workers("second")

    _wait_for(
        lambda: _job(stack, job_id)["status"] == "succeeded",
        "the job to end",
        sweep=stack,
    )
    job = _job(stack, job_id)
    assert job["attempts"] == 2
    _check_one_document_per_success(stack)
    with session_scope(stack) as session:
        events = (
            session.execute(
                text("SELECT event FROM job_logs WHERE job_id = :j ORDER BY log_id"),
                {"j": job_id},
            )
            .scalars()
            .all()
        )
    assert "requeued" in events and events[-1] == "succeeded"


def test_a_job_running_past_its_lease_keeps_it_while_sweeps_run(
    stack: Settings, api_key: str, workers: Callable[..., WorkerProcess]
) -> None:
    """The worker renews the lease of a long job; sweeps meanwhile leave it be."""
    workers()
    with JobClient(api_key, stack) as client:
        job_id = client.submit("slow", {"n": LONG_N})

    _wait_for(
        lambda: _job(stack, job_id)["status"] == "succeeded",
        "the job to end",
        sweep=stack,
    )

    job = _job(stack, job_id)
    ran_s = (job["finished_at"] - job["started_at"]).total_seconds()
    assert ran_s > stack.lease_s, "the job must outlive its first lease"
    assert job["attempts"] == 1
    with session_scope(stack) as session:
        events = (
            session.execute(
                text("SELECT event FROM job_logs WHERE job_id = :j"), {"j": job_id}
            )
            .scalars()
            .all()
        )
    assert events.count("claimed") == 1
    assert "requeued" not in events


def test_kill_9_of_the_pool_process_requeues_the_job_at_once(
    stack: Settings, api_key: str, workers: Callable[..., WorkerProcess]
) -> None:
    """The main process sees its child die and gives the job another attempt."""
    workers("pool")
    with JobClient(api_key, stack) as client:
        job_id = client.submit("slow", {"n": SLOW_N})
    _wait_for(lambda: _job(stack, job_id)["status"] == "running", "the job to start")
    child_pid = int(_job(stack, job_id)["worker"].rsplit(":", 1)[1])

    os.kill(child_pid, signal.SIGKILL)

    # No sweep here: the worker's own handling must bring the job to its end.
    _wait_for(lambda: _job(stack, job_id)["status"] == "succeeded", "the job to end")
    assert _job(stack, job_id)["attempts"] == 2
    _check_one_document_per_success(stack)


def test_copies_of_one_message_racing_on_two_workers_make_one_document(
    stack: Settings, api_key: str, workers: Callable[..., WorkerProcess]
) -> None:
    """Ten copies of each message, two workers: each job renders exactly once."""
    workers("a")
    workers("b")
    with JobClient(api_key, stack) as client:
        job_ids = client.submit_many(
            [JobRequest("user-stories", sample_input("user-stories"))] * 10
        )
        send_jobs(client._sender, job_ids * 10, stack.bulk_queue)

    _wait_for(lambda: _statuses(stack).get("succeeded") == 10, "all jobs")
    time.sleep(1)  # let the remaining copies arrive and be refused
    _check_one_document_per_success(stack)
    with session_scope(stack) as session:
        claims = session.execute(
            text("SELECT count(*) FROM job_logs WHERE event = 'claimed'")
        ).scalar_one()
    assert claims == 10


def test_a_send_that_fails_after_the_commit_is_delivered_by_the_sweep(
    stack: Settings, api_key: str, workers: Callable[..., WorkerProcess]
) -> None:
    """The row commits, the broker is unreachable: the job still runs, later."""
    unreachable = stack.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with JobClient(api_key, unreachable) as client:
        job_id = client.submit("user-stories", sample_input("user-stories"))
    assert _job(stack, job_id)["enqueued_at"] is None
    workers()

    _wait_for(
        lambda: _job(stack, job_id)["status"] == "succeeded",
        "the swept job",
        sweep=stack,
    )
    _check_one_document_per_success(stack)


def test_a_redis_restart_loses_no_accepted_job(
    stack: Settings,
    api_key: str,
    redis_server: RedisServer,
    workers: Callable[..., WorkerProcess],
) -> None:
    """Queued messages vanish with Redis; submits during the outage still count."""
    with JobClient(api_key, stack) as client:
        before = client.submit_many(
            [JobRequest("risk-register", sample_input("risk-register"))] * 20
        )
    redis_server.stop()
    with JobClient(api_key, stack) as client:
        during = client.submit("risk-register", sample_input("risk-register"))
    redis_server.start()
    workers()

    _wait_for(lambda: _statuses(stack) == {"succeeded": 21}, "every job", sweep=stack)
    assert during not in before
    _check_one_document_per_success(stack)


def test_a_postgres_restart_heals_without_restarting_workers(
    stack: Settings,
    api_key: str,
    postgres: PostgresCluster,
    workers: Callable[..., WorkerProcess],
) -> None:
    """Jobs in flight when the database restarts retry and end."""
    worker = workers()
    with JobClient(api_key, stack) as client:
        client.submit_many([JobRequest("slow", {"n": 3000})] * 30)
    _wait_for(lambda: _statuses(stack).get("succeeded", 0) >= 3, "some jobs to finish")

    postgres.restart(down_s=2)

    _wait_for(
        lambda: _statuses(stack) == {"succeeded": 30},
        "every job",
        timeout_s=120,
        sweep=stack,
    )
    assert worker.process.poll() is None
    _check_one_document_per_success(stack)


def test_the_hard_time_limit_kills_a_stuck_process_and_fails_the_job(
    stack: Settings, api_key: str, workers: Callable[..., WorkerProcess]
) -> None:
    """A task that does not answer its soft limit is killed; the job does not hang."""
    worker = workers()
    with JobClient(
        api_key, stack.model_copy(update={"default_queue": "adpa.idle"})
    ) as c:
        job_id = c.submit("slow", {"n": 30000})
    create_sender(stack).send_task(
        TASK_RENDER,
        args=[job_id],
        queue=stack.default_queue,
        soft_time_limit=1,
        time_limit=3,
    )
    _wait_for(lambda: _job(stack, job_id)["status"] == "running", "the job to start")
    # A stopped process stands for one stuck in C code: no signal handler runs.
    os.kill(int(_job(stack, job_id)["worker"].rsplit(":", 1)[1]), signal.SIGSTOP)

    _wait_for(lambda: _job(stack, job_id)["status"] == "failed", "the job to fail")
    job = _job(stack, job_id)
    assert job["last_error_kind"] == "time_limit"
    assert "hard time limit of 3" in job["last_error"]
    assert worker.process.poll() is None
    _check_one_document_per_success(stack)


def test_the_soft_time_limit_ends_a_slow_render_with_a_clear_failure(
    stack: Settings, api_key: str, workers: Callable[..., WorkerProcess]
) -> None:
    """The soft limit interrupts a render and the job fails naming the limit."""
    workers()
    with JobClient(
        api_key, stack.model_copy(update={"default_queue": "adpa.idle"})
    ) as c:
        job_id = c.submit("slow", {"n": 30000})
    create_sender(stack).send_task(
        TASK_RENDER,
        args=[job_id],
        queue=stack.default_queue,
        soft_time_limit=1,
        time_limit=20,
    )

    _wait_for(lambda: _job(stack, job_id)["status"] == "failed", "the job to fail")
    job = _job(stack, job_id)
    assert job["last_error_kind"] == "render_timeout"
    assert "soft time limit" in job["last_error"]


def test_a_message_that_is_not_json_is_dropped_between_good_ones(
    stack: Settings,
    api_key: str,
    redis_server: RedisServer,
    workers: Callable[..., WorkerProcess],
) -> None:
    """Undecodable entries on the queue are dropped; the worker goes on."""
    worker = workers()
    queue = redis.Redis.from_url(redis_server.url)
    with JobClient(api_key, stack) as client:
        first = client.submit("user-stories", sample_input("user-stories"))
        raw = {
            "body": "not json at all {",
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {"task": TASK_RENDER, "id": str(uuid.uuid4())},
            "properties": {
                "delivery_tag": str(uuid.uuid4()),
                "body_encoding": "utf-8",
                "delivery_info": {"exchange": "", "routing_key": "x"},
            },
        }
        queue.lpush(stack.default_queue, json.dumps(raw))
        # Entries that are no message at all: text, and bytes that are not UTF-8.
        queue.lpush(stack.default_queue, "garbage", b"\xff\xfe", "[1, 2]")
        second = client.submit("user-stories", sample_input("user-stories"))
        for job_id in (first, second):
            assert client.wait(job_id, timeout_s=30).status == "succeeded"
    assert worker.process.poll() is None


def test_a_paused_worker_whose_lease_was_taken_cannot_finish_the_job(
    stack: Settings, api_key: str, workers: Callable[..., WorkerProcess]
) -> None:
    """SIGSTOP a worker mid-job, let the sweep hand the job on, then SIGCONT it."""
    paused = workers("paused", concurrency=1)
    with JobClient(api_key, stack) as client:
        job_id = client.submit("slow", {"n": SLOW_N})
    _wait_for(lambda: _job(stack, job_id)["status"] == "running", "the job to start")
    pids = [paused.process.pid, int(_job(stack, job_id)["worker"].rsplit(":", 1)[1])]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        workers("other")
        _wait_for(
            lambda: _job(stack, job_id)["status"] == "succeeded",
            "the other worker to finish",
            sweep=stack,
        )
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)

    time.sleep(SLOW_N**2 / 20e6 + 2)  # the resumed render finishes and tries to commit
    assert _job(stack, job_id)["status"] == "succeeded"
    _check_one_document_per_success(stack)


def test_beat_runs_the_sweep_on_the_workers(
    stack: Settings,
    api_key: str,
    workers: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    """Celery beat sends the sweep task; a worker runs it and delivers the job."""
    unreachable = stack.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with JobClient(api_key, unreachable) as client:
        job_id = client.submit("user-stories", sample_input("user-stories"))
    workers()
    schedule = str(tmp_path / "beat-schedule")
    beat = subprocess.Popen(
        celery_command("beat", "-s", schedule, "-l", "WARNING"),
        env=worker_environment(stack),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(
            lambda: _job(stack, job_id)["status"] == "succeeded", "the beat sweep"
        )
    finally:
        beat.terminate()
        beat.wait(timeout=20)


def test_workers_stay_within_their_connection_budget(
    stack: Settings, api_key: str, postgres: PostgresCluster, tmp_path: Path
) -> None:
    """N pool processes never hold more than (N + 1) x (pool + overflow) connections."""
    bounded = stack.model_copy(update={"db_pool_size": 1, "db_max_overflow": 1})
    workers = [
        start_worker(bounded, tmp_path / f"w{i}.log", concurrency=2, name=f"budget{i}")
        for i in range(2)
    ]
    try:
        with JobClient(api_key, stack) as client:
            client.submit_many([JobRequest("slow", {"n": 1500})] * 60)
        peak = 0
        while _statuses(stack).get("succeeded", 0) < 60:
            peak = max(peak, postgres.connections())
            time.sleep(0.05)
    finally:
        for worker in workers:
            stop_worker(worker)

    processes = 2 * (2 + 1)  # two workers, each a main process and two children
    per_process = bounded.db_pool_size + bounded.db_max_overflow
    own = 2  # this test's engine: polling and the producer
    assert 0 < peak <= processes * per_process + own
