"""Benchmarks, reported as ratios against a baseline measured in the same run.

Two questions, each answered on this machine, now:

- What does the sandbox cost? The 300 sample jobs rendered by our bounded
  sandbox, against the same templates in Jinja2's plain environment.
- What does batching buy? Jobs submitted with ``submit_many`` (one
  transaction, one broker connection) against ``submit`` one at a time, on
  PostgreSQL and Redis (``ADPA_TEST_DATABASE_URL``, ``ADPA_TEST_REDIS_URL``).

Absolute figures vary with the machine's load; the ratios are the result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jinja2
from rich.console import Console
from rich.table import Table
from sqlalchemy import text

from models import accounts, migrate
from models.db import session_scope
from models.logs import configure_logging
from models.sandbox import sandbox
from models.settings import Settings, load_settings
from producer.client import JobClient, JobRequest
from producer.samples import load_samples, sample_jobs, sample_specs

DATABASE_URL = os.environ.get(
    "ADPA_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/adpa_test"
)
REDIS_URL = os.environ.get("ADPA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def interleaved(
    repeats: int, baseline: Callable[[], int], measured: Callable[[], int]
) -> tuple[float, float, int]:
    """Median seconds of each, run in turns so load changes hit both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    count = 0
    for _ in range(repeats):
        for run, spent in ((baseline, times[0]), (measured, times[1])):
            started = time.perf_counter()
            count = run()
            spent.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1]), count


def bench_rendering(repeats: int) -> tuple[float, float, int]:
    """Seconds to render every sample job: plain Jinja2, then our sandbox."""
    contents = {spec.name: spec.content for spec in sample_specs()}
    lines = list(sample_jobs())
    plain_env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - documents are Markdown, not HTML
    )
    plain = {name: plain_env.from_string(body) for name, body in contents.items()}
    bounded = {name: sandbox().from_string(body) for name, body in contents.items()}

    def render_all(templates: dict[str, jinja2.Template]) -> int:
        for line in lines:
            templates[line["template"]].render(line["input"])
        return len(lines)

    return interleaved(repeats, lambda: render_all(plain), lambda: render_all(bounded))


def _prepare_database(settings: Settings) -> str:
    migrate.upgrade(settings)
    with session_scope(settings) as session:
        session.execute(
            text(
                "TRUNCATE job_logs, documents, jobs, template_tags, templates,"
                " api_keys, users CASCADE"
            )
        )
        load_samples(session)
        user = accounts.create_user(
            session, "bench", "bench@example.com", "bench-password"
        )
        return accounts.issue_api_key(session, user).secret


def bench_submission(jobs: int) -> tuple[float, float, int]:
    """Seconds to submit ``jobs`` jobs one at a time, then as one batch."""
    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(
            database_url=DATABASE_URL,
            broker_url=REDIS_URL,
            data_dir=Path(folder),
            default_queue="adpa.bench",
            bulk_queue="adpa.bench-bulk",
        )
        api_key = _prepare_database(settings)
        lines = list(sample_jobs())
        requests = [
            JobRequest(
                lines[i % len(lines)]["template"], lines[i % len(lines)]["input"]
            )
            for i in range(jobs)
        ]
        with JobClient(api_key, settings) as client:
            started = time.perf_counter()
            for request in requests:
                client.submit(request.template, request.input_data)
            one_by_one_s = time.perf_counter() - started

            started = time.perf_counter()
            client.submit_many(requests)
            batch_s = time.perf_counter() - started
        _prepare_database(settings)
    return one_by_one_s, batch_s, jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument(
        "--skip-submission",
        action="store_true",
        help="Only the rendering benchmark (no servers needed).",
    )
    args = parser.parse_args()
    console = Console()
    configure_logging(load_settings(log_level="WARNING"))

    table = Table("benchmark", "baseline", "measured", "ratio", title="adpa bench")
    plain_s, sandboxed_s, renders = bench_rendering(args.repeats)
    table.add_row(
        f"render {renders} sample jobs",
        f"plain Jinja2 {renders / plain_s:,.0f}/s",
        f"bounded sandbox {renders / sandboxed_s:,.0f}/s",
        f"{sandboxed_s / plain_s:.2f}x the time",
    )
    if not args.skip_submission:
        single_s, batch_s, jobs = bench_submission(args.jobs)
        table.add_row(
            f"submit {jobs} jobs",
            f"one at a time {jobs / single_s:,.0f}/s",
            f"submit_many {jobs / batch_s:,.0f}/s",
            f"{single_s / batch_s:.1f}x faster",
        )
    console.print(table)


if __name__ == "__main__":
    main()
