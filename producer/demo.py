"""``adpa demo``: the whole system once, end to end, on what is configured.

It migrates, registers the sample templates, creates a demo user and key,
submits sample jobs and a few bad ones, runs a real Celery worker as a
subprocess, shows progress, and ends with a table and a summary line.
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from models import accounts, migrate
from models.db import session_scope
from models.errors import AdpaError, NotFound
from models.settings import Settings
from models.tables import Job, JobStatus, Template
from models.templates import TemplateSpec, register_template
from producer.broker import worker_command
from producer.client import JobClient, JobRequest
from producer.samples import load_samples, sample_input, sample_jobs

DEMO_USER = "demo"
#: Shown in place of a password.
MASK = "***"


def printable_database_url(url: str) -> str:
    """A database URL with its password, in the address or the query, masked."""
    try:
        rendered = make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        rendered = url
    return _mask_url_password(rendered)


def printable_broker_url(url: str) -> str:
    """A broker URL (or several, separated by ;) with every password masked."""
    return ";".join(_mask_url_password(part) for part in url.split(";"))


def _mask_url_password(url: str) -> str:
    # Read as urllib (and so kombu) reads it: user:password@host, ?password=.
    # Only the password is replaced; the rest of the URL is kept as written.
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    user_info, at, host = parts.netloc.rpartition("@")
    user, colon, _ = user_info.partition(":")
    netloc = f"{user}{colon}{MASK if colon else ''}{at}{host}"
    pairs = []
    for pair in parts.query.split("&"):
        key, equals, _ = pair.partition("=")
        hidden = equals and _is_password(unquote_plus(key))
        pairs.append(f"{key}={MASK}" if hidden else pair)
    scheme = f"{parts.scheme}:" if parts.scheme else ""
    authority = f"//{netloc}" if url.startswith(f"{scheme}//") else ""
    query = f"?{'&'.join(pairs)}" if parts.query else ""
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{scheme}{authority}{parts.path}{query}{fragment}"


def _is_password(key: str) -> bool:
    return "password" in key.lower()


@dataclass(frozen=True)
class BadJob:
    """A job the demo submits to show a clear failure."""

    label: str
    template: str
    input_data: Any
    #: Error kind the job must end with (or be refused with at submission).
    expected_kind: str


def _bad_jobs() -> list[BadJob]:
    charter = sample_input("project-charter")
    missing = {k: v for k, v in charter.items() if k != "project_name"}
    return [
        BadJob("missing variable", "project-charter", missing, "missing_variable"),
        BadJob("hostile template", "demo-hostile", {"n": 10**9}, "sandbox_violation"),
        BadJob("failing template", "demo-broken", {"count": 0}, "template_error"),
        BadJob("unknown template", "no-such-template", {}, "unknown_template"),
        BadJob(
            "input not an object",
            "project-charter",
            ["not", "an", "object"],
            "invalid_input",
        ),
    ]


_DEMO_TEMPLATES = [
    TemplateSpec(
        "demo-hostile",
        "{{ 'x' * n }}",
        "Tries to build a huge string.",
        "demo",
        ["demo"],
    ),
    TemplateSpec(
        "demo-broken",
        "Average: {{ 100 // count }}\n",
        "Divides by its input.",
        "demo",
        ["demo"],
    ),
]


def _prepare(settings: Settings) -> str:
    """Migrate, register templates, and return a fresh API key for the demo user."""
    migrate.upgrade(settings)
    with session_scope(settings) as session:
        load_samples(session)
        for spec in _DEMO_TEMPLATES:
            register_template(session, spec)
        try:
            user = accounts.get_user(session, DEMO_USER)
        except NotFound:
            user = accounts.create_user(
                session, DEMO_USER, "demo@example.com", secrets.token_urlsafe(16)
            )
        return accounts.issue_api_key(session, user, "adpa demo").secret


def _start_worker(settings: Settings, concurrency: int) -> subprocess.Popen[bytes]:
    quiet = ["--without-gossip", "--without-mingle", "-l", "WARNING"]
    name = ["-n", f"demo-{os.getpid()}@%h"]
    command = worker_command(settings, concurrency, *quiet, *name)
    # The worker must see exactly the demo's settings, whatever .env says.
    env = dict(os.environ)
    for field in ("database_url", "broker_url", "storage_url", "data_dir"):
        env[f"ADPA_{field.upper()}"] = str(getattr(settings, field))
    with open(settings.data_dir / "demo-worker.log", "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def _stop_worker(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_demo(
    settings: Settings,
    console: Console,
    *,
    job_count: int,
    timeout_s: float,
    concurrency: int,
) -> bool:
    """Run the demo; True when every good job succeeded and every bad one failed."""
    settings.ensure_data_dirs()
    console.print(f"database: {printable_database_url(settings.resolved_database_url)}")
    console.print(f"broker:   {printable_broker_url(settings.resolved_broker_url)}")
    console.print(f"storage:  {settings.storage_root}")
    api_key = _prepare(settings)

    started = time.monotonic()
    good = [
        JobRequest(line["template"], line["input"])
        for line in itertools.islice(sample_jobs(), job_count)
    ]
    refused: dict[str, str] = {}
    bad_ids: dict[int, BadJob] = {}
    with JobClient(api_key, settings) as client:
        good_ids = client.submit_many(good)
        for bad in _bad_jobs():
            try:
                bad_ids[client.submit(bad.template, bad.input_data)] = bad
            except AdpaError as exc:
                refused[bad.label] = f"[{exc.kind}] {exc}"
    console.print(
        f"submitted {len(good_ids)} sample jobs and {len(bad_ids)} bad ones; "
        f"{len(refused)} bad submissions refused"
    )

    worker = _start_worker(settings, concurrency)
    try:
        finished = _wait_with_progress(
            settings, console, [*good_ids, *bad_ids], timeout_s, worker
        )
    finally:
        _stop_worker(worker)
    elapsed = time.monotonic() - started

    rows = _job_rows(settings, [*good_ids, *bad_ids])
    _print_table(console, rows, bad_ids, refused)
    good_ok = sum(1 for i in good_ids if rows[i]["status"] == JobStatus.SUCCEEDED)
    bad_ok = sum(
        1
        for i, bad in bad_ids.items()
        if rows[i]["status"] == JobStatus.FAILED
        and rows[i]["kind"] == bad.expected_kind
    )
    expected_refusals = {b.label for b in _bad_jobs()} - {
        b.label for b in bad_ids.values()
    }
    ok = (
        finished
        and good_ok == len(good_ids)
        and bad_ok == len(bad_ids)
        and set(refused) == expected_refusals
    )
    console.print(
        f"demo {'passed' if ok else 'FAILED'}: {good_ok}/{len(good_ids)} sample jobs "
        f"succeeded, {bad_ok}/{len(bad_ids)} bad jobs failed with their reason, "
        f"{len(refused)} bad submissions refused; {elapsed:.1f}s "
        f"({len(good_ids) / elapsed:.1f} jobs/s)"
    )
    return ok


def _wait_with_progress(
    settings: Settings,
    console: Console,
    job_ids: list[int],
    timeout_s: float,
    worker: subprocess.Popen[bytes],
) -> bool:
    finished_states = [s.value for s in JobStatus.finished()]
    deadline = time.monotonic() + timeout_s
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("rendering", total=len(job_ids))
        while True:
            with session_scope(settings) as session:
                done = (
                    session.scalar(
                        select(func.count())
                        .select_from(Job)
                        .where(Job.job_id.in_(job_ids), Job.status.in_(finished_states))
                    )
                    or 0
                )
            progress.update(task, completed=done)
            if done == len(job_ids):
                return True
            if worker.poll() is not None:
                console.print(
                    f"[red]the worker exited with code {worker.returncode}; "
                    f"see {settings.data_dir / 'demo-worker.log'}[/]"
                )
                return False
            if time.monotonic() > deadline:
                console.print(
                    f"[red]{len(job_ids) - done} jobs unfinished after "
                    f"{timeout_s:g}s[/]"
                )
                return False
            time.sleep(0.3)


def _job_rows(settings: Settings, job_ids: list[int]) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    with session_scope(settings) as session:
        query = (
            select(Job, Template.name)
            .join(Template, Template.template_id == Job.template_id)
            .where(Job.job_id.in_(job_ids))
        )
        for job, name in session.execute(query):
            duration = (
                (job.finished_at - job.started_at).total_seconds()
                if job.started_at and job.finished_at
                else None
            )
            rows[job.job_id] = {
                "template": name,
                "status": JobStatus(job.status),
                "duration": duration,
                "result": (job.output_data or {}).get("file_path")
                or job.last_error
                or "",
                "kind": job.last_error_kind,
            }
    return rows


def _print_table(
    console: Console,
    rows: dict[int, dict[str, Any]],
    bad_ids: dict[int, BadJob],
    refused: dict[str, str],
) -> None:
    table = Table(
        "job", "template", "status", "duration", "document or error", title="demo jobs"
    )
    colour = {JobStatus.SUCCEEDED: "green", JobStatus.FAILED: "red"}
    for job_id in sorted(rows):
        row = rows[job_id]
        label = f" ({bad_ids[job_id].label})" if job_id in bad_ids else ""
        duration = f"{row['duration']:.2f}s" if row["duration"] is not None else ""
        style = colour.get(row["status"], "yellow")
        table.add_row(
            str(job_id),
            row["template"] + label,
            f"[{style}]{row['status']}[/]",
            duration,
            row["result"],
        )
    for label, reason in refused.items():
        table.add_row("-", label, "[red]refused[/]", "", reason)
    console.print(table)
