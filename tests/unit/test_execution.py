"""Unit tests of what a worker decides before it touches a job.

How a message names its job, how long a retry waits, how long a worker may
hold an early message, and what the worker's Celery app consumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models.settings import load_settings
from models.tables import MAX_SERIAL_ID
from producer.broker import worker_command
from worker.execution import backoff_delay, max_countdown_s, parse_job_id


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7, 7),
        ("42", 42),
        (MAX_SERIAL_ID, MAX_SERIAL_ID),
        (str(MAX_SERIAL_ID), MAX_SERIAL_ID),
    ],
)
def test_parse_job_id_reads_positive_ids_the_jobs_table_can_hold(
    value: Any, expected: int
) -> None:
    """A positive integer, or its decimal digits, names a job."""
    assert parse_job_id(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -4,
        2.0,
        "",
        "not-a-number",
        "-4",
        " 4",
        "\u00b2",  # a digit to str.isdigit, not to int()
        "\u0664\u0662",  # Arabic-Indic digits: int() reads them, no job id has them
        MAX_SERIAL_ID + 1,
        str(MAX_SERIAL_ID + 1),
        10**30,
        [4],
        {"job_id": 4},
    ],
)
def test_parse_job_id_refuses_what_cannot_name_a_job(value: Any) -> None:
    """Anything else is None, so the message is dropped instead of retried."""
    assert parse_job_id(value) is None


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap(
    tmp_path: Path,
) -> None:
    """Attempt n waits between half and all of base * 2**(n-1), never past the cap."""
    settings = load_settings(
        data_dir=tmp_path, retry_backoff_base_s=2, retry_backoff_max_s=60
    )

    for attempt, ceiling in [(1, 2), (2, 4), (3, 8), (5, 32), (6, 60), (20, 60)]:
        delays = [backoff_delay(settings, attempt) for _ in range(200)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) > 1  # jittered, not one fixed value


def test_an_early_message_is_held_no_longer_than_the_broker_allows(
    tmp_path: Path,
) -> None:
    """Holding a message, then running it, ends before the visibility timeout."""
    settings = load_settings(
        data_dir=tmp_path,
        visibility_timeout_s=400,
        retry_backoff_max_s=100,
        task_time_limit_s=290,
        task_soft_time_limit_s=280,
        render_timeout_s=30,
    )

    held = max_countdown_s(settings)

    assert held > 0
    assert held + settings.task_time_limit_s < settings.visibility_timeout_s


def test_workers_consume_the_job_queues_and_the_sweep_queue(tmp_path: Path) -> None:
    """The sweep has a queue of its own, so a backlog of jobs cannot delay it."""
    settings = load_settings(data_dir=tmp_path, sweep_queue="ops.sweep")

    command = worker_command(settings, 2)

    queues = command[command.index("-Q") + 1].split(",")
    assert queues == ["adpa.default", "adpa.bulk", "ops.sweep"]


def test_the_worker_app_routes_the_sweep_to_its_queue_and_waits_out_outages(
    tmp_path: Path,
) -> None:
    """Beat sends the sweep to the sweep queue; a broker outage never ends a worker."""
    from worker.app import TASK_SWEEP, create_app

    settings = load_settings(
        data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0", sweep_queue="ops.sweep"
    )

    app = create_app(settings)

    entry = app.conf.beat_schedule["sweep"]
    assert entry["task"] == TASK_SWEEP
    assert entry["options"]["queue"] == "ops.sweep"
    assert {queue.name for queue in app.conf.task_queues} == {
        "adpa.default",
        "adpa.bulk",
        "ops.sweep",
    }
    assert app.conf.broker_connection_max_retries is None
