"""Sending tasks by name, through a Celery app built from the shared settings.

The producer never imports worker code: it knows the task's name and the
queue, and the worker registers the task under that name.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import structlog
from celery import Celery
from sqlalchemy.exc import SQLAlchemyError

from models import jobs
from models.db import session_scope
from models.errors import first_line
from models.settings import Settings
from models.sweep import DiscardFiles, SweepReport, run_sweep

#: The worker's task that renders one job; kept in step with ``worker.app``.
TASK_RENDER = "adpa.render_document"

logger = structlog.get_logger(__name__)

_RETRY_POLICY = {
    "max_retries": 3,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 2.0,
}


def celery_command(program: str, *args: str) -> list[str]:
    """The command line of a Celery program (worker, beat, flower) for our app."""
    return [sys.executable, "-m", "celery", "-A", "worker.app", program, *args]


def worker_command(settings: Settings, concurrency: int, *args: str) -> list[str]:
    """A prefork worker consuming every queue, as ``adpa worker`` starts it."""
    queues = ",".join(settings.worker_queues)
    pool = ["-P", "prefork", "-c", str(concurrency), "-Q", queues]
    return celery_command("worker", *pool, *args)


def create_sender(settings: Settings) -> Celery:
    """A Celery app used only to send messages."""
    settings.ensure_data_dirs()
    app = Celery("adpa-producer", set_as_current=False)
    app.conf.update(settings.celery_config())
    return app


def send_jobs(app: Celery, job_ids: Sequence[int], queue: str) -> list[int]:
    """Send one message per job; returns the ids the broker accepted.

    A job whose message could not be sent stays queued in the database and is
    sent again by the sweep, so a broker outage loses no accepted job.
    """
    sent: list[int] = []
    try:
        with app.producer_or_acquire() as producer:
            for job_id in job_ids:
                app.send_task(
                    TASK_RENDER,
                    args=[job_id],
                    queue=queue,
                    producer=producer,
                    retry=True,
                    retry_policy=_RETRY_POLICY,
                )
                sent.append(job_id)
    except Exception as exc:  # kombu raises many kinds for an unreachable broker
        logger.warning(
            "job_enqueue_deferred",
            reason=f"{type(exc).__name__}: {exc}",
            unsent=len(job_ids) - len(sent),
        )
    return sent


def enqueue(
    app: Celery, settings: Settings, job_ids: Sequence[int], queue: str
) -> list[int]:
    """Send committed jobs' messages and record which went out; returns those ids.

    The jobs are accepted whatever happens here. A send that fails leaves them
    to the sweep; a record that fails after the send (the database blinked)
    only means the sweep may send a second message, which the claim ignores.
    """
    sent = send_jobs(app, job_ids, queue)
    if sent:
        try:
            with session_scope(settings) as session:
                jobs.mark_enqueued(session, sent)
        except SQLAlchemyError as exc:
            logger.warning(
                "job_enqueue_unrecorded",
                count=len(sent),
                reason=first_line(exc),
            )
    return sent


def queue_depth(app: Celery, queue: str) -> int:
    """Messages waiting in a queue; 0 when the broker cannot be asked."""
    try:
        with app.connection_for_read() as connection:
            channel: Any = connection.default_channel
            declared = channel.queue_declare(queue=queue, passive=True)
            return int(declared.message_count)
    except Exception as exc:  # kombu raises many kinds for an unreachable broker
        logger.warning("queue_depth_unknown", queue=queue, reason=str(exc))
        return 0


def sweep_through(
    app: Celery, settings: Settings, discard: DiscardFiles | None = None
) -> SweepReport:
    """Run one sweep, sending its messages through ``app`` and asking it for depths."""
    return run_sweep(
        settings,
        lambda job_ids, queue: send_jobs(app, job_ids, queue),
        discard,
        lambda queue: queue_depth(app, queue),
    )
