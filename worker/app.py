"""The Celery app the workers run: ``celery -A worker.app worker``.

It is configured for delivery that loses nothing: a message is acknowledged
only after its job is recorded, goes back to the queue when the process
running it dies, and each process takes one message at a time. PostgreSQL
holds every outcome, so there is no result backend.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import structlog
from celery import Celery, signals
from kombu import Queue

from models.db import dispose_engines
from models.errors import SettingsError
from models.logs import configure_logging
from models.settings import Settings, load_settings

TASK_RENDER = "adpa.render_document"
TASK_SWEEP = "adpa.sweep"


def _load() -> Celery:
    try:
        loaded = load_settings()
        return create_app(loaded)
    except SettingsError as exc:
        # Worker, beat and Flower all load this app: name none of them.
        print(f"adpa: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from the settings."""
    settings.ensure_data_dirs()
    settings.ensure_storage_root()
    app = Celery("adpa", include=["worker.tasks"])
    app.conf.update(settings.celery_config())
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Workers and beat wait out a broker outage of any length; a bounded
        # count would end them after a couple of minutes without Redis.
        broker_connection_max_retries=None,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_queues=[Queue(name) for name in settings.worker_queues],
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # A task in flight when the broker connection drops finishes its
        # database work; its message, if redelivered, finds the job done.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # A process that grew past half its cap (a template came close to it)
        # is replaced after its task, instead of carrying the memory on.
        worker_max_memory_per_child=(settings.worker_memory_limit_mb * 1024 // 2)
        or None,
        beat_schedule={
            "sweep": {
                "task": TASK_SWEEP,
                "schedule": settings.sweep_interval_s,
                "options": {
                    "queue": settings.sweep_queue,
                    "expires": settings.sweep_interval_s,
                },
            },
        },
    )
    if settings.resolved_broker_url.startswith("redis://"):
        app.conf.broker_transport = "worker.transport:Transport"
    if settings.uses_embedded_broker:
        # The filesystem transport has no broadcast: no remote control, so no
        # events for Flower either. The embedded default is for trying things.
        app.conf.update(
            worker_enable_remote_control=False, worker_send_task_events=False
        )
    app.conf.adpa_settings = settings
    return app


app = _load()
settings: Settings = app.conf.adpa_settings


@signals.setup_logging.connect
def _setup_logging(**_kwargs: Any) -> None:
    configure_logging(settings)


@signals.worker_process_init.connect
def _after_fork(**_kwargs: Any) -> None:
    # Connections opened before the fork belong to the parent, which goes on
    # using them (it settles jobs whose process died): forget, never close.
    dispose_engines(close=False)
    configure_logging(settings)
    limit_memory(settings.worker_memory_limit_mb)


def limit_memory(limit_mb: int) -> None:
    """Cap this process's address space, so a runaway render cannot take the host."""
    if limit_mb <= 0:
        return
    limit = limit_mb * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


@signals.task_prerun.connect
def _bind_task_context(task_id: str | None = None, **kwargs: Any) -> None:
    structlog.contextvars.clear_contextvars()
    args = kwargs.get("args") or ()
    structlog.contextvars.bind_contextvars(
        task_id=task_id, job_id=args[0] if args else None
    )


@signals.task_postrun.connect
def _clear_task_context(**_kwargs: Any) -> None:
    structlog.contextvars.clear_contextvars()
