"""Fixtures for tests on real services: PostgreSQL, Redis, a prefork Celery worker."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.engine import make_url

from models import accounts, migrate
from models.db import create_db_engine, session_scope
from models.settings import Settings, load_settings
from producer.broker import worker_command
from producer.client import JobClient, JobView
from producer.samples import load_samples
from tests.conftest import PROJECT_ROOT, TEST_DATABASE_URL, TEST_REDIS_URL

TABLES = "job_logs, documents, jobs, template_tags, templates, api_keys, users"


def _ensure_database(url: str) -> None:
    """Create the test database when missing; fail with how to start the server."""
    parsed = make_url(url)
    admin = parsed.set(drivername="postgresql", database="postgres")
    dsn = admin.render_as_string(hide_password=False)
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as connection:
            exists = connection.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (parsed.database,)
            ).fetchone()
            if not exists:
                connection.execute(f'CREATE DATABASE "{parsed.database}"')
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {parsed.host}:{parsed.port} ({exc}); "
            "start it with: pg_ctlcluster --skip-systemctl-redirect "
            "$(ls /etc/postgresql) main start",
            pytrace=False,
        )


def _check_redis(url: str) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis is not reachable at {url} ({exc}); start it with: "
            "redis-server --daemonize yes --port 6379 --save '' --appendonly no",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def pg_settings(services_dir: Path) -> Settings:
    """Settings for PostgreSQL + Redis, with the schema migrated once per run."""
    _ensure_database(TEST_DATABASE_URL)
    _check_redis(TEST_REDIS_URL)
    settings = load_settings(
        database_url=TEST_DATABASE_URL,
        broker_url=TEST_REDIS_URL,
        data_dir=services_dir,
        storage_url=str(services_dir / "documents"),
        render_timeout_s=2,
        task_soft_time_limit_s=5,
        task_time_limit_s=10,
        retry_backoff_base_s=0.2,
        retry_backoff_max_s=1,
        worker_memory_limit_mb=400,
    )
    engine = create_db_engine(settings)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    migrate.upgrade(settings)
    return settings


def worker_environment(settings: Settings) -> dict[str, str]:
    """Environment that makes a subprocess use the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADPA_")}
    for field in Settings.model_fields:
        value = getattr(settings, field)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            env[f"ADPA_{field.upper()}"] = str(value)
    env["ADPA_LOG_FORMAT"] = "json"
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    return env


@dataclass
class WorkerProcess:
    """A prefork Celery worker running as a subprocess."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_worker(
    settings: Settings, log_path: Path, *, concurrency: int = 2, name: str = "test"
) -> WorkerProcess:
    quiet = ["--without-gossip", "--without-mingle", "-l", "INFO"]
    node = ["-n", f"{name}-{os.getpid()}@%h"]
    command = worker_command(settings, concurrency, *quiet, *node)
    with open(log_path, "ab") as handle:
        process = subprocess.Popen(
            command,
            env=worker_environment(settings),
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
        )
    worker = WorkerProcess(process, log_path)
    deadline = time.monotonic() + 30
    while "ready" not in worker.log():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start:\n{worker.log()[-3000:]}")
        time.sleep(0.1)
    return worker


def stop_worker(worker: WorkerProcess) -> None:
    if worker.process.poll() is None:
        worker.process.terminate()
        try:
            worker.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()


@pytest.fixture(scope="session")
def celery_worker(pg_settings: Settings, services_dir: Path) -> Iterator[WorkerProcess]:
    """One prefork worker (two processes) shared by the integration tests."""
    worker = start_worker(pg_settings, services_dir / "worker.log")
    yield worker
    stop_worker(worker)


@pytest.fixture
def clean_db(pg_settings: Settings) -> Settings:
    """Empty tables, broker and storage before the test."""
    with session_scope(pg_settings) as session:
        session.execute(text(f"TRUNCATE {TABLES} CASCADE"))
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    shutil.rmtree(pg_settings.storage_root, ignore_errors=True)
    return pg_settings


@dataclass
class Account:
    user_id: int
    api_key: str


@pytest.fixture
def make_account(clean_db: Settings) -> Callable[..., Account]:
    """Builder: a user with an API key (names default to unique ones)."""
    counter = iter(range(1, 10_000))

    def build(username: str | None = None) -> Account:
        name = username or f"user{next(counter)}"
        with session_scope(clean_db) as session:
            user = accounts.create_user(
                session, name, f"{name}@example.com", "password-" + name
            )
            issued = accounts.issue_api_key(session, user, "tests")
            return Account(user.user_id, issued.secret)

    return build


@pytest.fixture
def samples(clean_db: Settings) -> list[str]:
    """The shipped sample templates, registered."""
    with session_scope(clean_db) as session:
        return load_samples(session)


@pytest.fixture
def client(
    clean_db: Settings, make_account: Callable[..., Account], samples: list[str]
) -> Iterator[JobClient]:
    """A producer client for a fresh user, with the samples registered."""
    with JobClient(make_account().api_key, clean_db) as job_client:
        yield job_client


def wait_all(
    client: JobClient, job_ids: list[int], timeout_s: float = 60
) -> list[JobView]:
    return [client.wait(job_id, timeout_s=timeout_s) for job_id in job_ids]


def fetch_one(settings: Settings, sql: str, **params: Any) -> Any:
    with session_scope(settings) as session:
        return session.execute(text(sql), params).one()


@pytest.fixture
def idle_client(
    clean_db: Settings, make_account: Callable[..., Account], samples: list[str]
) -> Iterator[JobClient]:
    """A producer client whose messages go to queues no test worker consumes."""
    settings = clean_db.model_copy(
        update={"default_queue": "adpa.idle", "bulk_queue": "adpa.idle-bulk"}
    )
    with JobClient(make_account().api_key, settings) as job_client:
        yield job_client
