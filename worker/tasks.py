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
from celery.exceptions import WorkerLostError
from celery.worker.request import Request
from sqlalchemy.exc import SQLAlchemyError

from models import jobs
from models.db import session_scope
from models.errors import StorageError
from models.settings import Settings
from producer.broker import sweep_through
from worker.app import TASK_RENDER, TASK_SWEEP, app
from worker.execution import Outcome, claim_folder, parse_job_id, run_job
from worker.storage import LocalStorage

logger = structlog.get_logger(__name__)


@lru_cache(maxsize=1)
def _storage(root: str) -> LocalStorage:
    return LocalStorage(Path(root))


def _settings() -> Settings:
    settings: Settings = app.conf.adpa_settings
    return settings


def worker_name(hostname: str | None, pid: int) -> str:
    """How a job row names the process that claimed it."""
    return f"{hostname or 'worker'}:{pid}"


def _settle_lost_task(
    args: Sequence[Any],
    task_id: str,
    worker: str,
    kind: str,
    error: str,
    *,
    requeue: bool,
) -> None:
    """From the worker's main process: end or give back a job whose process died."""
    job_id = parse_job_id(args[0] if args else None)
    if job_id is None:
        return
    try:
        with session_scope(_settings()) as session:
            settled = jobs.end_lost_task(
                session, job_id, task_id, worker, kind, error, requeue=requeue
            )
    except SQLAlchemyError as exc:
        # The job stays running; its lease runs out and the sweep settles it.
        logger.warning("lost_task_unsettled", job_id=job_id, error=str(exc)[:200])
        return
    if settled is None:
        return
    status, token = settled
    if status != "queued":
        discard_claim_files(job_id, token)
    logger.warning("lost_task_settled", job_id=job_id, status=status, error_kind=kind)


def discard_claim_files(job_id: int, token: int) -> None:
    """Remove what a claim that ended without a document left in storage."""
    try:
        _storage(str(_settings().storage_root)).remove_tree(claim_folder(job_id, token))
    except StorageError as exc:
        logger.warning("job_files_left", job_id=job_id, error=str(exc))


class JobRequest(Request):
    """A delivery as the worker's main process sees it.

    When the pool process running it dies or is killed at the hard time
    limit, the job is settled here, before the message goes back to the
    queue: the redelivery must find the job queued, not running.
    """

    def on_failure(
        self,
        exc_info: ExceptionInfo,
        send_failed_event: bool = True,
        return_ok: bool = False,
    ) -> Any:
        error = exc_info.exception
        error = getattr(error, "exc", error)  # the pool wraps it with its traceback
        if isinstance(error, WorkerLostError):
            self._settle(
                "worker_lost", f"the process running the job died: {error}", True
            )
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft:
            self._settle(
                "time_limit", f"killed at the hard time limit of {timeout:g}s", False
            )
        super().on_timeout(soft, timeout)

    def _settle(self, kind: str, error: str, requeue: bool) -> None:
        if self.worker_pid is None:
            return  # no process took the message, so none claimed its job
        worker = worker_name(self.hostname, int(self.worker_pid))
        _settle_lost_task(self.args, self.id, worker, kind, error, requeue=requeue)


class JobTask(Task):  # type: ignore[type-arg]
    """Base of the render task: its requests settle jobs whose process died."""

    Request = "worker.tasks:JobRequest"


@app.task(name=TASK_RENDER, bind=True, base=JobTask, max_retries=None)
def render_document(
    self: Task[Any, Any], job_id: Any = None, *extra: Any, **options: Any
) -> None:
    """Render one job's template and store its document."""
    parsed = parse_job_id(job_id)
    if parsed is None or extra or options:
        reason = (
            "job id missing, not a number or out of range"
            if parsed is None
            else "arguments other than the job id"
        )
        logger.warning(
            "message_dropped",
            reason=reason,
            value=repr((job_id, *extra, options))[:100],
        )
        return
    settings = _settings()
    delivery = run_job(
        parsed,
        task_id=self.request.id or "",
        worker=worker_name(self.request.hostname, os.getpid()),
        settings=settings,
        storage=_storage(str(settings.storage_root)),
    )
    if delivery.outcome in (Outcome.RETRY, Outcome.EARLY):
        raise self.retry(countdown=max(delivery.delay_s, 0.1))


@app.task(name=TASK_SWEEP, ignore_result=True)
def sweep() -> dict[str, int]:
    """Resend lost messages and settle jobs whose worker stopped renewing."""
    report = sweep_through(app, _settings(), discard_claim_files)
    return dict(report.__dict__)
