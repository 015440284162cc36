"""Celery tasks: thin adapters from a message to :mod:`worker.execution`."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import structlog
from celery import Task

from models.settings import Settings
from worker.app import TASK_RENDER, app
from worker.execution import Outcome, run_job
from worker.storage import LocalStorage

logger = structlog.get_logger(__name__)


@lru_cache(maxsize=1)
def _storage(root: str) -> LocalStorage:
    return LocalStorage(Path(root))


def parse_job_id(value: Any) -> int | None:
    """A job id from a message, or None when the message cannot name a job."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


@app.task(name=TASK_RENDER, bind=True, max_retries=None)
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
    settings: Settings = app.conf.adpa_settings
    worker = f"{self.request.hostname or 'worker'}:{os.getpid()}"
    delivery = run_job(
        parsed,
        task_id=self.request.id or "",
        worker=worker,
        settings=settings,
        storage=_storage(str(settings.storage_root)),
    )
    if delivery.outcome in (Outcome.RETRY, Outcome.EARLY):
        raise self.retry(countdown=max(delivery.delay_s, 0.1))
