"""Celery tasks: thin adapters from a message to :mod:`worker.execution`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import structlog
from billiard.einfo import ExceptionInfo
from celery import Task
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from celery.worker.request import Request
from sqlalchemy.exc import SQLAlchemyError

from models import jobs
from models.db import session_scope
from models.errors import StorageError
from models.settings import Settings
from producer.broker import sweep_through
from worker.app import TASK_RENDER, TASK_SWEEP, app
from worker.execution import Outcome, run_job
from worker.storage import LocalStorage

logger = structlog.get_logger(__name__)


@lru_cache(maxsize=1)
def _storage(root: str) -> LocalStorage:
    return LocalStorage(Path(root))


def _settings() -> Settings:
    settings: Settings = app.conf.adpa_settings
    return settings


def parse_job_id(value: Any) -> int | None:
    """A job id from a message, or None when the message cannot name a job."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _settle_lost_task(
    args: Sequence[Any], task_id: str, kind: str, error: str, *, requeue: bool
) -> None:
    """From the worker's main process: end or give back a job whose process died."""
    job_id = parse_job_id(args[0] if args else None)
    if job_id is None:
        return
    try:
        with session_scope(_settings()) as session:
            status = jobs.end_lost_task(
                session, job_id, task_id, kind, error, requeue=requeue
            )
        if status == "failed":
            _discard_job_files(job_id)
    except SQLAlchemyError as exc:
        # The job stays running; its lease runs out and the sweep settles it.
        logger.warning("lost_task_unsettled", job_id=job_id, error=str(exc)[:200])
        return
    if status is not None:
        logger.warning(
            "lost_task_settled", job_id=job_id, status=status, error_kind=kind
        )


def _discard_job_files(job_id: int) -> None:
    try:
        _storage(str(_settings().storage_root)).remove_tree(str(job_id))
    except StorageError as exc:
        logger.warning("job_files_left", job_id=job_id, error=str(exc))


class JobRequest(Request):
    """A delivery as the worker's main process sees it."""

    def on_failure(
        self,
        exc_info: ExceptionInfo,
        send_failed_event: bool = True,
        return_ok: bool = False,
    ) -> Any:
        # Before the message goes back to the queue: the job must be queued
        # again when the redelivery arrives, or it would find it running.
        error = exc_info.exception
        error = getattr(error, "exc", error)  # the pool wraps it with its traceback
        if isinstance(error, WorkerLostError):
            _settle_lost_task(
                self.args,
                self.id,
                "worker_lost",
                f"the process running the job died: {error}",
                requeue=True,
            )
        return super().on_failure(exc_info, send_failed_event, return_ok)


class JobTask(Task):  # type: ignore[type-arg]
    """Base of the render task: settles jobs whose process was killed."""

    Request = "worker.tasks:JobRequest"

    def on_failure(
        self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        # Called in the main process when the hard time limit killed the child.
        if isinstance(exc, TimeLimitExceeded):
            limit = exc.args[0] if exc.args else _settings().task_time_limit_s
            _settle_lost_task(
                args,
                task_id,
                "time_limit",
                f"killed at the hard time limit of {limit}s",
                requeue=False,
            )


@app.task(name=TASK_RENDER, bind=True, base=JobTask, max_retries=None)
def render_document(self: Task[Any, Any], job_id: Any = None, *_extra: Any) -> None:
    """Render one job's template and store its document."""
    parsed = parse_job_id(job_id)
    if parsed is None:
        logger.warning(
            "message_dropped",
            reason="job id missing or not a number",
            value=repr(job_id)[:100],
        )
        return
    settings = _settings()
    delivery = run_job(
        parsed,
        task_id=self.request.id or "",
        worker=f"{self.request.hostname or 'worker'}:{os.getpid()}",
        settings=settings,
        storage=_storage(str(settings.storage_root)),
    )
    if delivery.outcome in (Outcome.RETRY, Outcome.EARLY):
        raise self.retry(countdown=max(delivery.delay_s, 0.1))


@app.task(name=TASK_SWEEP, ignore_result=True)
def sweep() -> dict[str, int]:
    """Resend lost messages and settle jobs whose worker stopped renewing."""
    report = sweep_through(app, _settings(), _discard_job_files)
    return dict(report.__dict__)
