"""Soak test: thousands of jobs through the whole system while it is broken.

Run it with ``make soak`` or ``.venv/bin/python scripts/soak.py [--jobs N]``.
It is not part of ``make test``: a run takes minutes (about three for the
default 3000 jobs on two cores).

The soak starts a stack of its own, never the machine's shared services: a
redis-server, a throwaway PostgreSQL cluster, two prefork Celery workers and
Celery beat running the periodic sweep. It submits the shipped sample jobs
in batches through :class:`producer.client.JobClient` while a chaos thread
SIGKILLs pool processes every few seconds, kills one whole worker (and starts
a replacement) and restarts Redis once in the middle of the submission.

When every job has ended, or the timeout has passed, it stops the workers
and checks what the system promises: no job lost, no job rendered twice, one
document row per succeeded job, and on disk exactly the files the rows name,
each with the size and SHA-256 its row records. It prints a table of figures
and exits 0 only when every check holds; otherwise it prints which check
failed, the jobs involved with their ``job_logs`` rows and worker log lines,
and keeps its work folder for a closer look.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text
from sqlalchemy import text

# ``tests`` is not an installed package: import it from the project folder.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from models import accounts, migrate  # noqa: E402
from models.db import dispose_engines, session_scope  # noqa: E402
from models.logs import configure_logging  # noqa: E402
from models.settings import Settings, load_settings  # noqa: E402
from producer.broker import celery_command  # noqa: E402
from producer.client import JobClient, JobRequest  # noqa: E402
from producer.samples import load_samples, sample_jobs  # noqa: E402
from tests.faults import (  # noqa: E402
    PostgresCluster,
    RedisServer,
    kill_tree,
    process_children,
)
from tests.services import (  # noqa: E402
    WorkerProcess,
    start_worker,
    stop_worker,
    worker_environment,
)

#: Failure kinds the chaos can cause legitimately: a job killed on each of
#: its attempts. Any other kind of failure is a finding.
CHAOS_FAILURE_KINDS = frozenset({"worker_lost", "lease_expired"})
END_STATES = ("succeeded", "failed", "canceled")
WORKERS = 2
CONCURRENCY = 2
#: How long Redis stays down when it is restarted.
REDIS_DOWN_S = 3.0
#: Seconds between two pool-process kills, drawn uniformly.
KILL_EVERY_S = (2.0, 5.0)
#: Longest wait for a worker running a job before killing an idle one.
WORKER_KILL_PATIENCE_S = 10.0
#: A batch that raises is tried again this many times before the soak gives up.
BATCH_TRIES = 10
#: Problem jobs shown in detail per failed check.
SHOWN_PER_CHECK = 5
#: Worker log lines shown per job and log file (the last ones).
LOG_LINES_PER_JOB = 40

console = Console()


# --------------------------------------------------------------------------
# Options and settings


@dataclass(frozen=True)
class Options:
    jobs: int
    batch: int
    backlog: int
    timeout_s: float
    keep: bool
    seed: int | None


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="Submit many jobs while killing workers and restarting Redis, "
        "then check that every job ended once with its one document."
    )
    parser.add_argument("--jobs", type=int, default=3000, help="jobs to submit")
    parser.add_argument("--batch", type=int, default=250, help="jobs per submit call")
    parser.add_argument(
        "--backlog",
        type=int,
        default=0,
        help="wait before a batch while more than this many jobs are unfinished "
        "(0, the default: submit as fast as possible; with a limit the Redis "
        "outage may fall between two batches)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds to wait for every job"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder even on success"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for the chaos")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.batch < 1 or args.backlog < 0:
        parser.error("--jobs and --batch must be positive, --backlog not negative")
    return Options(
        args.jobs, args.batch, args.backlog, args.timeout, args.keep, args.seed
    )


def soak_settings(
    redis: RedisServer, postgres: PostgresCluster, work: Path
) -> Settings:
    """Short leases and sweeps, so lost work comes back within seconds."""
    return load_settings(
        _env_file=None,
        database_url=postgres.url,
        broker_url=redis.url,
        data_dir=work,
        storage_url=str(work / "documents"),
        log_format="json",
        lease_s=6,
        sweep_queued_after_s=5,
        sweep_unsent_after_s=2,
        sweep_interval_s=2,
        render_timeout_s=20,
        task_soft_time_limit_s=30,
        task_time_limit_s=40,
        retry_backoff_base_s=0.2,
        retry_backoff_max_s=1,
        max_attempts=5,
    )


def log_to_file(settings: Settings, path: Path) -> None:
    """This process's log lines (the producer's) go to a file, not the screen."""
    configure_logging(settings)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(path.open("a", encoding="utf-8"))


# --------------------------------------------------------------------------
# The stack: servers, workers, beat


class Stack:
    """Everything the soak starts, and how to stop all of it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.redis = RedisServer()
        self.postgres = PostgresCluster()
        self._settings: Settings | None = None
        self._beat: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._live: list[WorkerProcess] = []
        self._started: list[WorkerProcess] = []

    @property
    def settings(self) -> Settings:
        assert self._settings is not None, "the stack is not started"
        return self._settings

    def start(self) -> str:
        """Start the servers, the schema and the workers; returns an API key."""
        self.redis.start()
        self.postgres.create()
        self._settings = soak_settings(self.redis, self.postgres, self.work)
        log_to_file(self.settings, self.work / "soak.log")
        migrate.upgrade(self.settings)
        api_key = create_account(self.settings)
        for _ in range(WORKERS):
            self.add_worker()
        self._start_beat()
        return api_key

    def _start_beat(self) -> None:
        with (self.work / "beat.log").open("ab") as log:
            self._beat = subprocess.Popen(
                celery_command(
                    "beat", "-s", str(self.work / "beat-schedule"), "-l", "INFO"
                ),
                env=worker_environment(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
            )

    def add_worker(self) -> WorkerProcess:
        with self._lock:
            number = len(self._started) + 1
        worker = start_worker(
            self.settings,
            self.work / f"worker-{number}.log",
            concurrency=CONCURRENCY,
            name=f"soak{number}",
        )
        with self._lock:
            self._started.append(worker)
            self._live.append(worker)
        return worker

    def live_workers(self) -> list[WorkerProcess]:
        with self._lock:
            return [w for w in self._live if w.process.poll() is None]

    def pool_processes(self) -> list[int]:
        """Pids of the live workers' pool processes."""
        return [
            pid
            for worker in self.live_workers()
            for pid in process_children(worker.process.pid)
        ]

    def kill_worker(self, worker: WorkerProcess) -> None:
        """kill -9 a worker with its pool, the way a machine dies."""
        with self._lock:
            self._live.remove(worker)
        kill_tree(worker.process.pid)
        worker.process.wait()

    def worker_logs(self) -> list[Path]:
        with self._lock:
            return [worker.log_path for worker in self._started]

    def stop_processes(self) -> None:
        """Stop beat and the workers, and any pool process left behind."""
        if self._beat is not None and self._beat.poll() is None:
            self._beat.terminate()
            try:
                self._beat.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._beat.kill()
                self._beat.wait()
        with self._lock:
            workers = list(self._started)
        for worker in workers:
            with contextlib.suppress(Exception):
                stop_worker(worker)
        kill_leftovers()

    def close(self) -> None:
        """Stop everything; safe to call at any point, and more than once."""
        steps: list[Callable[[], None]] = [
            self.stop_processes,
            dispose_engines,
            self.redis.stop,
            self.postgres.destroy,
        ]
        for step in steps:
            try:
                step()
            except Exception as exc:  # cleanup goes on whatever one step did
                console.print(f"[yellow]cleanup: {step.__name__}: {exc}[/]")


def kill_leftovers() -> None:
    """SIGKILL any worker process of this run still alive.

    A worker killed while it was starting, or one that missed its shutdown,
    can leave pool processes behind. They are found by the node name this
    run gave its workers (``soak<n>-<this pid>@``), so no other process is hit.
    """
    marker = re.compile(rb"\x00soak\d+-%d@" % os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.search(command):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def create_account(settings: Settings) -> str:
    """Register the sample templates and a user; returns the user's API key."""
    with session_scope(settings) as session:
        load_samples(session)
        user = accounts.create_user(
            session, "soak", "soak@example.com", "soak-password"
        )
        return accounts.issue_api_key(session, user, "soak").secret


# --------------------------------------------------------------------------
# Shared state of a run


@dataclass
class Run:
    """What the threads share. Each counter has a single writer."""

    jobs: int
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    submitted: int = 0
    finished: int = 0
    accepted_unsent: int = 0
    batch_retries: int = 0
    pool_kills: int = 0
    busy_kills: int = 0
    worker_kills: int = 0
    worker_kill_jobs: int = 0
    redis_restarts: int = 0
    job_ids: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    submitted_all: threading.Event = field(default_factory=threading.Event)

    def key(self, index: int) -> str:
        return f"soak-{self.run_id}-{index}"


def run_thread(run: Run, name: str, target: Callable[[], None]) -> threading.Thread:
    """Start a daemon thread whose exception stops the run instead of vanishing."""

    def guarded() -> None:
        try:
            target()
        except Exception as exc:
            run.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            run.stop.set()

    thread = threading.Thread(target=guarded, name=name, daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------
# Submission


def requests(run: Run) -> Iterator[JobRequest]:
    """The sample job lines, cycled, each with the run's idempotency key."""
    lines = list(sample_jobs())
    for index in range(run.jobs):
        line = lines[index % len(lines)]
        yield JobRequest(line["template"], line["input"], run.key(index))


def submit_all(run: Run, client: JobClient, batch_size: int, backlog: int) -> None:
    """Submit every job in batches; a batch that raises is submitted again.

    A retried batch inserts nothing twice: its idempotency keys bring back
    the ids of the jobs an earlier try committed.
    """
    pending = list(requests(run))
    for start in range(0, len(pending), batch_size):
        _wait_for_backlog(run, backlog)
        if run.stop.is_set():
            return
        batch = pending[start : start + batch_size]
        ids = _submit_batch(run, client, batch)
        run.accepted_unsent += count_unsent(client.settings, ids)
        run.job_ids.extend(ids)
        run.submitted += len(ids)
    run.submitted_all.set()


def _wait_for_backlog(run: Run, backlog: int) -> None:
    while backlog and run.submitted - run.finished > backlog:
        if run.stop.wait(0.5):
            return


def _submit_batch(run: Run, client: JobClient, batch: list[JobRequest]) -> list[int]:
    for attempt in range(1, BATCH_TRIES + 1):
        try:
            return client.submit_many(batch)
        except Exception as exc:
            if attempt == BATCH_TRIES:
                raise
            run.batch_retries += 1
            logging.getLogger("soak").warning("batch retried after %r", exc)
            run.stop.wait(min(0.5 * 2**attempt, 5))
    raise AssertionError("unreachable")


def count_unsent(settings: Settings, job_ids: Sequence[int]) -> int:
    """Jobs whose row committed while their message did not go out."""
    with session_scope(settings) as session:
        return int(
            session.execute(
                text(
                    "SELECT count(*) FROM jobs"
                    " WHERE job_id = ANY(:ids) AND enqueued_at IS NULL"
                ),
                {"ids": list(job_ids)},
            ).scalar_one()
        )


# --------------------------------------------------------------------------
# Chaos


def chaos(run: Run, stack: Stack, rng: random.Random) -> None:
    """Kill pool processes every few seconds until the run ends.

    Once, halfway through the submission, Redis is restarted (losing every
    message it held); once, when a quarter of the jobs have ended, a whole
    worker running a job is killed and a replacement started.
    """
    next_kill = time.monotonic() + rng.uniform(*KILL_EVERY_S)
    worker_kill_due: float | None = None
    while not run.stop.wait(0.2):
        now = time.monotonic()
        if not run.redis_restarts and run.submitted >= run.jobs / 2:
            stack.redis.restart(down_s=REDIS_DOWN_S)
            run.redis_restarts += 1
        elif not run.worker_kills and run.finished >= run.jobs / 4:
            # Wait a little for a moment when a worker is running a job.
            worker_kill_due = worker_kill_due or now + WORKER_KILL_PATIENCE_S
            jobs_lost = kill_a_worker(stack, rng, busy_only=now < worker_kill_due)
            if jobs_lost is not None:
                run.worker_kills += 1
                run.worker_kill_jobs += jobs_lost
        elif now >= next_kill:
            busy = kill_a_pool_process(stack, rng)
            if busy is not None:
                run.pool_kills += 1
                run.busy_kills += busy
            next_kill = now + rng.uniform(*KILL_EVERY_S)


def kill_a_worker(stack: Stack, rng: random.Random, *, busy_only: bool) -> int | None:
    """kill -9 a whole worker, then start a replacement.

    Returns how many jobs the dead worker left running (the sweep gives them
    back once their lease expires), or None when ``busy_only`` and no worker
    is running a job.
    """
    running = running_pids(stack.settings)
    workers = stack.live_workers()
    pools = {w.process.pid: set(process_children(w.process.pid)) for w in workers}
    candidates = [w for w in workers if running & pools[w.process.pid]] or (
        [] if busy_only else workers
    )
    if not candidates:
        return None
    victim = rng.choice(candidates)
    stack.kill_worker(victim)
    # Counted after the kill: a job may have ended between the look and the kill.
    orphaned = len(running_pids(stack.settings) & pools[victim.process.pid])
    stack.add_worker()
    return orphaned


def kill_a_pool_process(stack: Stack, rng: random.Random) -> bool | None:
    """SIGKILL one pool process, preferring one running a job.

    Returns whether it was running a job, or None when nothing was killed.
    """
    pids = stack.pool_processes()
    busy = set(pids) & running_pids(stack.settings)
    candidates = sorted(busy) or pids
    if not candidates:
        return None
    pid = rng.choice(candidates)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return pid in busy


def running_pids(settings: Settings) -> set[int]:
    """Pool processes holding a running job, from ``jobs.worker`` (host:pid)."""
    with session_scope(settings) as session:
        workers = session.execute(
            text("SELECT worker FROM jobs WHERE status = 'running'")
        ).scalars()
        return {
            int(name.rsplit(":", 1)[1])
            for name in workers
            if name and name.rsplit(":", 1)[-1].isdigit()
        }


# --------------------------------------------------------------------------
# Watching the run


def status_counts(settings: Settings) -> Counter[str]:
    with session_scope(settings) as session:
        rows = session.execute(
            text("SELECT status, count(*) FROM jobs GROUP BY status")
        ).all()
    return Counter({status: int(count) for status, count in rows})


def describe(run: Run, counts: Counter[str]) -> str:
    return (
        f"queued {counts['queued']} · running {counts['running']} · "
        f"succeeded {counts['succeeded']} · failed {counts['failed']} · "
        f"pool kills {run.pool_kills} · worker kills {run.worker_kills} · "
        f"redis restarts {run.redis_restarts}"
    )


def watch(run: Run, settings: Settings, timeout_s: float) -> None:
    """Show progress until every job has ended, a thread failed or time is up."""
    deadline = time.monotonic() + timeout_s
    with _Display(run) as display:
        while True:
            counts = status_counts(settings)
            run.finished = sum(counts[state] for state in END_STATES)
            display.update(counts)
            if run.errors:
                return
            if run.submitted_all.is_set() and run.finished >= run.submitted:
                return
            if time.monotonic() > deadline:
                run.errors.append(f"timed out after {timeout_s:g}s")
                return
            time.sleep(1)


class _Display:
    """Bars and a status line on a terminal; elsewhere a plain line every 5s."""

    PLAIN_EVERY_S = 5.0

    def __init__(self, run: Run) -> None:
        self.run = run
        self.started = time.monotonic()
        self._last_line = 0.0
        self._progress = Progress(
            TextColumn("{task.description:>9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        self._submitted = self._progress.add_task("submitted", total=run.jobs)
        self._ended = self._progress.add_task("ended", total=run.jobs)
        self._live: Live | None = None

    def __enter__(self) -> _Display:
        if console.is_terminal:
            self._live = Live(self._progress, console=console, refresh_per_second=4)
            self._live.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def update(self, counts: Counter[str]) -> None:
        detail = describe(self.run, counts)
        if self._live is not None:
            self._progress.update(self._submitted, completed=self.run.submitted)
            self._progress.update(self._ended, completed=self.run.finished)
            self._live.update(Group(self._progress, Text(detail)))
            return
        now = time.monotonic()
        if now - self._last_line >= self.PLAIN_EVERY_S:
            self._last_line = now
            console.print(
                f"[{now - self.started:6.0f}s] submitted {self.run.submitted}"
                f"/{self.run.jobs}, ended {self.run.finished}: {detail}",
                highlight=False,
                soft_wrap=True,
            )


# --------------------------------------------------------------------------
# Checks


@dataclass(frozen=True)
class DocumentRow:
    job_id: int
    file_path: str
    file_size: int
    sha256: str


@dataclass
class Findings:
    """What the database and the disk hold once the workers have stopped."""

    jobs_in_db: int
    run_keys_in_db: int
    statuses: Counter[str]
    failed_kinds: Counter[str]
    #: Failed jobs whose kind the chaos cannot explain.
    odd_failures: list[int]
    unfinished: list[int]
    documents: list[DocumentRow]
    succeeded: set[int]
    events: Counter[str]
    max_attempts_used: int
    on_disk: set[str]
    bad_files: dict[str, str] = field(default_factory=dict)

    @property
    def documents_per_job(self) -> Counter[int]:
        return Counter(row.job_id for row in self.documents)

    @property
    def jobs_with_several_documents(self) -> list[int]:
        return sorted(j for j, n in self.documents_per_job.items() if n > 1)

    @property
    def surplus_documents(self) -> int:
        return len(self.documents) - len(self.documents_per_job)

    @property
    def documents_of_unsucceeded_jobs(self) -> list[int]:
        return sorted(set(self.documents_per_job) - self.succeeded)

    @property
    def stray_files(self) -> list[str]:
        return sorted(self.on_disk - {row.file_path for row in self.documents})


def gather(settings: Settings, run: Run) -> Findings:
    """Read the outcome from the database and the storage folder."""
    chaos_kinds = sorted(CHAOS_FAILURE_KINDS)
    with session_scope(settings) as session:

        def rows(sql: str, **params: Any) -> list[Any]:
            return list(session.execute(text(sql), params).all())

        findings = Findings(
            jobs_in_db=rows("SELECT count(*) FROM jobs")[0][0],
            run_keys_in_db=rows(
                "SELECT count(DISTINCT idempotency_key) FROM jobs"
                " WHERE idempotency_key LIKE :prefix",
                prefix=f"soak-{run.run_id}-%",
            )[0][0],
            statuses=Counter(
                dict(rows("SELECT status, count(*) FROM jobs GROUP BY status"))
            ),
            failed_kinds=Counter(
                {
                    str(kind): int(n)
                    for kind, n in rows(
                        "SELECT last_error_kind, count(*) FROM jobs"
                        " WHERE status = 'failed' GROUP BY last_error_kind"
                    )
                }
            ),
            odd_failures=[
                r[0]
                for r in rows(
                    "SELECT job_id FROM jobs WHERE status = 'failed'"
                    " AND coalesce(last_error_kind, '') <> ALL(:kinds)"
                    " ORDER BY job_id",
                    kinds=chaos_kinds,
                )
            ],
            unfinished=[
                r[0]
                for r in rows(
                    "SELECT job_id FROM jobs WHERE status IN ('queued', 'running')"
                    " ORDER BY job_id"
                )
            ],
            documents=[
                DocumentRow(*r)
                for r in rows(
                    "SELECT job_id, file_path, file_size, sha256 FROM documents"
                )
            ],
            succeeded={
                r[0] for r in rows("SELECT job_id FROM jobs WHERE status = 'succeeded'")
            },
            events=Counter(
                {
                    f"{event}:{kind or ''}": int(n)
                    for event, kind, n in rows(
                        "SELECT event, error_kind, count(*) FROM job_logs"
                        " GROUP BY event, error_kind"
                    )
                }
            ),
            max_attempts_used=rows("SELECT coalesce(max(attempts), 0) FROM jobs")[0][0],
            on_disk=files_on_disk(settings.storage_root),
        )
    findings.bad_files = check_files(settings.storage_root, findings.documents)
    return findings


def files_on_disk(root: Path) -> set[str]:
    if not root.exists():
        return set()
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def check_files(root: Path, documents: Sequence[DocumentRow]) -> dict[str, str]:
    """Rows whose file is missing or differs from the row: path -> what is wrong."""
    bad: dict[str, str] = {}
    for row in documents:
        path = root / row.file_path
        if not path.is_file():
            bad[row.file_path] = "missing"
            continue
        data = path.read_bytes()
        if len(data) != row.file_size:
            bad[row.file_path] = f"size {len(data)}, row says {row.file_size}"
        elif hashlib.sha256(data).hexdigest() != row.sha256:
            bad[row.file_path] = "sha256 differs from the row"
    return bad


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    job_ids: tuple[int, ...] = ()


def checks(run: Run, found: Findings) -> list[Check]:
    """What must hold after any amount of chaos."""
    stray_jobs = sorted({_job_of(path) for path in found.stray_files})
    bad_jobs = sorted({_job_of(path) for path in found.bad_files})
    return [
        Check("no job lost", not found.unfinished, tuple(found.unfinished)),
        Check(
            "one job row per submitted job",
            found.jobs_in_db == found.run_keys_in_db == run.jobs
            and len(set(run.job_ids)) == run.jobs,
        ),
        Check(
            "no duplicate document",
            found.surplus_documents == 0,
            tuple(found.jobs_with_several_documents),
        ),
        Check(
            "documents = succeeded jobs",
            len(found.documents) == len(found.succeeded)
            and not found.documents_of_unsucceeded_jobs,
            tuple(found.documents_of_unsucceeded_jobs),
        ),
        Check(
            "every document's file matches its row",
            not found.bad_files,
            tuple(bad_jobs),
        ),
        Check("no stray file", not found.stray_files, tuple(stray_jobs)),
        Check(
            "failures only of a chaos kind",
            not found.odd_failures,
            tuple(found.odd_failures),
        ),
    ]


def _job_of(path: str) -> int:
    """The job a stored path belongs to: its first folder."""
    first = path.split("/", 1)[0]
    return int(first) if first.isdigit() else 0


# --------------------------------------------------------------------------
# Report


def figures_table(
    run: Run, found: Findings, elapsed_s: float, results: list[Check]
) -> Table:
    failed = found.statuses["failed"]
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(found.failed_kinds.items()))
    ok = {check.name: check.ok for check in results}

    def mark(name: str) -> str:
        return "[green]ok[/]" if ok[name] else "[red]FAILED[/]"

    table = Table(title=f"Soak run {run.run_id}", show_lines=False)
    table.add_column("Figure")
    table.add_column("Value", justify="right")
    table.add_column("Check")
    rows: list[tuple[str, str, str]] = [
        ("jobs submitted", str(run.jobs), ""),
        ("job ids returned (distinct)", str(len(set(run.job_ids))), ""),
        (
            "distinct jobs in DB",
            str(found.jobs_in_db),
            mark("one job row per submitted job"),
        ),
        ("accepted while unsent (sent by the sweep)", str(run.accepted_unsent), ""),
        ("batches retried", str(run.batch_retries), ""),
        ("pool processes killed", str(run.pool_kills), ""),
        ("  of which running a job", str(run.busy_kills), ""),
        ("whole workers killed", str(run.worker_kills), ""),
        ("  jobs it left running", str(run.worker_kill_jobs), ""),
        ("Redis restarts", str(run.redis_restarts), ""),
        ("jobs succeeded", str(found.statuses["succeeded"]), ""),
        (
            "jobs failed",
            f"{failed}" + (f" ({kinds})" if kinds else ""),
            mark("failures only of a chaos kind"),
        ),
        ("jobs canceled", str(found.statuses["canceled"]), ""),
        ("still not finished (lost)", str(len(found.unfinished)), mark("no job lost")),
        (
            "jobs with more than one document",
            str(len(found.jobs_with_several_documents)),
            "",
        ),
        (
            "duplicate document rows",
            str(found.surplus_documents),
            mark("no duplicate document"),
        ),
        ("documents rows", str(len(found.documents)), ""),
        (
            "documents of jobs not succeeded",
            str(len(found.documents_of_unsucceeded_jobs)),
            mark("documents = succeeded jobs"),
        ),
        ("files on disk", str(len(found.on_disk)), ""),
        (
            "rows whose file is missing or differs",
            str(len(found.bad_files)),
            mark("every document's file matches its row"),
        ),
        ("stray files on disk", str(len(found.stray_files)), mark("no stray file")),
        ("claims (attempts started)", str(found.events["claimed:"]), ""),
        ("most attempts on one job", str(found.max_attempts_used), ""),
        (
            "requeued after a pool kill",
            str(found.events["requeued:worker_lost"]),
            "",
        ),
        (
            "requeued by the sweep (lease expired)",
            str(found.events["requeued:lease_expired"]),
            "",
        ),
        ("messages resent by the sweep", str(found.events["resent:"]), ""),
        ("elapsed", f"{elapsed_s:.0f} s", ""),
        ("jobs/s", f"{run.jobs / elapsed_s:.1f}" if elapsed_s else "-", ""),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def diagnose(
    settings: Settings, stack: Stack, results: list[Check], found: Findings
) -> str:
    """The jobs behind each failed check: their row, job_logs and worker lines."""
    parts: list[str] = []
    for check in results:
        if check.ok:
            continue
        parts.append(f"== {check.name}: FAILED")
        if check.name == "no stray file":
            parts.extend(f"   stray: {path}" for path in found.stray_files[:50])
        if check.name == "every document's file matches its row":
            parts.extend(
                f"   {p}: {why}" for p, why in list(found.bad_files.items())[:50]
            )
        for job_id in check.job_ids[:SHOWN_PER_CHECK]:
            parts.append(describe_job(settings, stack, job_id))
        if len(check.job_ids) > SHOWN_PER_CHECK:
            rest = ", ".join(map(str, check.job_ids[SHOWN_PER_CHECK:]))
            parts.append(f"   other jobs: {rest}")
    return "\n".join(parts)


def describe_job(settings: Settings, stack: Stack, job_id: int) -> str:
    with session_scope(settings) as session:
        job = (
            session.execute(
                text(
                    "SELECT job_id, status, attempts, claims, worker, task_id,"
                    " last_error_kind, last_error, enqueued_at, not_before"
                    " FROM jobs WHERE job_id = :j"
                ),
                {"j": job_id},
            )
            .mappings()
            .one_or_none()
        )
        logs = session.execute(
            text(
                "SELECT timestamp, event, attempt, error_kind, message FROM job_logs"
                " WHERE job_id = :j ORDER BY log_id"
            ),
            {"j": job_id},
        ).all()
        documents = session.execute(
            text(
                "SELECT document_id, file_path, file_size FROM documents"
                " WHERE job_id = :j"
            ),
            {"j": job_id},
        ).all()
    row = ", ".join(f"{k}={v}" for k, v in job.items()) if job else "no row"
    lines = [f"-- job {job_id}: {row}"]
    lines += [f"   document {d[0]}: {d[1]} ({d[2]} bytes)" for d in documents]
    lines += [
        f"   log {t:%H:%M:%S.%f} {event} attempt={attempt} kind={kind}: {message}"
        for t, event, attempt, kind, message in logs
    ]
    pattern = re.compile(rf'"job_id": {job_id}\b')
    for path in stack.worker_logs():
        with path.open(errors="replace") as log:
            hits = [line.rstrip() for line in log if pattern.search(line)]
        if len(hits) > LOG_LINES_PER_JOB:
            left_out = len(hits) - LOG_LINES_PER_JOB
            lines.append(f"   {path.name}: ({left_out} earlier lines left out)")
            hits = hits[-LOG_LINES_PER_JOB:]
        lines += [f"   {path.name}: {hit}" for hit in hits]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Main


def soak(options: Options, stack: Stack) -> bool:
    """One whole run; True when every check holds."""
    console.print(f"Starting Redis, PostgreSQL, {WORKERS} workers and beat...")
    api_key = stack.start()
    settings = stack.settings
    run = Run(options.jobs)
    rng = random.Random(options.seed)
    console.print(
        f"Run {run.run_id}: {options.jobs} jobs in batches of {options.batch}; "
        f"work folder {stack.work}"
    )
    started = time.monotonic()
    with JobClient(api_key, settings) as client:
        threads = [
            run_thread(
                run,
                "submitter",
                lambda: submit_all(run, client, options.batch, options.backlog),
            ),
            run_thread(run, "chaos", lambda: chaos(run, stack, rng)),
        ]
        try:
            watch(run, settings, options.timeout_s)
        finally:
            run.stop.set()
            for thread in threads:
                thread.join(timeout=60)
    elapsed_s = time.monotonic() - started

    console.print("Stopping the workers and checking...")
    stack.stop_processes()
    found = gather(settings, run)
    results = checks(run, found)
    console.print(figures_table(run, found, elapsed_s, results))
    return report(run, settings, stack, results, found)


def report(
    run: Run, settings: Settings, stack: Stack, results: list[Check], found: Findings
) -> bool:
    """Say what failed, with the jobs behind it; True when nothing did."""
    for error in run.errors:
        console.print(f"[red]FAILED: {error}[/]", highlight=False)
    failed = found.statuses["failed"]
    if failed and failed > max(3, run.jobs // 100):
        console.print(
            f"[yellow]note: {failed} jobs failed, more than the chaos should cause[/]"
        )
    broken = [check for check in results if not check.ok]
    if broken:
        details = diagnose(settings, stack, results, found)
        (stack.work / "diagnostics.txt").write_text(details + "\n", encoding="utf-8")
        console.print(details, highlight=False, markup=False, soft_wrap=True)
        for check in broken:
            console.print(f"[red]FAILED: {check.name}[/]")
    if not broken and not run.errors:
        console.print("[green]All checks passed.[/]")
        return True
    return False


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    for name in [n for n in os.environ if n.startswith("ADPA_")]:
        del os.environ[name]
    signal.signal(signal.SIGTERM, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="adpa-soak-"))
    stack = Stack(work)
    passed = False
    try:
        passed = soak(options, stack)
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted; cleaning up.[/]")
        return 130
    except Exception as exc:
        console.print(f"[red]FAILED: the soak stopped: {type(exc).__name__}: {exc}[/]")
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.close()
        if passed and not options.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            console.print(f"Logs kept in {work}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
