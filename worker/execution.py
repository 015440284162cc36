"""One delivery of a job, step by step: claim, render, store, record.

These are plain functions with explicit arguments, so they run the same under
a Celery task and in a test. The task module only adapts their outcome to
Celery (acknowledge, or retry after a delay).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from models import jobs
from models.db import session_scope
from models.errors import (
    InternalError,
    PermanentError,
    RenderTimeout,
    TransientError,
    first_line,
)
from models.jobs import ClaimedJob, StoredDocument
from models.settings import Settings
from models.tables import MAX_SERIAL_ID
from worker.lease import LeaseKeeper
from worker.rendering import render
from worker.storage import Storage, safe_file_name

logger = structlog.get_logger(__name__)


class Outcome(StrEnum):
    """How a delivery ended, as far as the broker needs to know."""

    #: The job reached an end state, or another delivery owns it.
    DONE = "done"
    #: The job was given back to the queue; send it again after a delay.
    RETRY = "retry"
    #: The delivery came before the job's time; send it again then.
    EARLY = "early"


@dataclass(frozen=True)
class Delivery:
    """The result of :func:`run_job`."""

    outcome: Outcome
    delay_s: float = 0.0


class _StopRequested(Exception):
    """The job was canceled, or its claim moved on, while this delivery ran."""

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state


def parse_job_id(value: Any) -> int | None:
    """A job id from a message, or None when the message cannot name a job."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 < value <= MAX_SERIAL_ID else None


def backoff_delay(settings: Settings, attempt: int) -> float:
    """Exponential backoff with full jitter, capped."""
    ceiling = min(
        settings.retry_backoff_max_s,
        settings.retry_backoff_base_s * 2 ** max(attempt - 1, 0),
    )
    return random.uniform(ceiling / 2, ceiling)


def database_unreachable(exc: BaseException) -> bool:
    """Whether a database error is about reaching the server, and worth retrying.

    Connection loss, a server shutting down, a lock or serialization conflict:
    the same statement can succeed later. A statement the database refuses
    (a value out of range, a broken constraint) fails the same way every time.
    """
    return isinstance(exc, DBAPIError) and (
        exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    )


def max_countdown_s(settings: Settings) -> float:
    """Longest a worker may hold a message before running it.

    The message stays unacknowledged for the wait and then for the run; both
    together must end well before Redis hands it to another worker.
    """
    return (settings.visibility_timeout_s - settings.task_time_limit_s) / 2


def claim_folder(job_id: int, token: int) -> str:
    """The folder of one claim's files: nothing else ever writes there."""
    return f"{job_id}/{token}"


def document_path(claim: ClaimedJob) -> str:
    """Where a claim's document goes; each claim has a folder of its own."""
    name = safe_file_name(claim.template_name)
    return f"{claim_folder(claim.job_id, claim.token)}/{name}-{claim.job_id}.md"


def run_job(
    job_id: int, *, task_id: str, worker: str, settings: Settings, storage: Storage
) -> Delivery:
    """Take one delivery of a job as far as it can go."""
    log = logger.bind(job_id=job_id, task_id=task_id)
    try:
        claim, reason, due_in_s = _claim(job_id, task_id, worker, settings)
    except DBAPIError as exc:
        error = first_line(exc)
        if not database_unreachable(exc):
            # Asking again would be refused the same way, for ever.
            log.error("message_dropped", reason="the claim was refused", error=error)
            return Delivery(Outcome.DONE)
        # Nothing changed: the job is still queued. Ask for the message again.
        delay_s = backoff_delay(settings, 1)
        log.warning("claim_deferred", error=error, delay_s=delay_s)
        return Delivery(Outcome.RETRY, delay_s)
    if claim is None:
        log.info("delivery_skipped", reason=reason)
        if due_in_s is None:
            return Delivery(Outcome.DONE)
        if due_in_s <= max_countdown_s(settings):
            return Delivery(Outcome.EARLY, due_in_s)
        # Too far off to hold in a worker: Redis would hand the held message
        # to another worker after its visibility timeout. The sweep sends it.
        with session_scope(settings) as session:
            jobs.clear_enqueued(session, [job_id])
        return Delivery(Outcome.DONE)

    structlog.contextvars.bind_contextvars(
        template_name=claim.template_name, attempt=claim.attempt
    )
    log.info("job_claimed")
    started = time.monotonic()
    succeeded = False
    try:
        with LeaseKeeper(claim, settings) as lease:
            # Files of earlier attempts were never recorded: none can be kept.
            storage.remove_tree(str(claim.job_id))
            document = _render_and_store(claim, settings, storage, lease)
            _record_success(claim, document, settings, started)
            succeeded = True
    except _StopRequested as stop:
        return _settle_stop(claim, stop.state, settings)
    except (PermanentError, SoftTimeLimitExceeded) as exc:
        _record_failure(claim, exc, settings)
    except TransientError as exc:
        return _record_transient(claim, exc, settings)
    except Exception as exc:
        if database_unreachable(exc):
            return _record_transient(claim, exc, settings)
        # A bug of ours, or a statement the database refuses, would fail the
        # same way on every attempt: it must not leave the job running.
        log.exception("job_crashed")
        _record_failure(claim, InternalError(f"{type(exc).__name__}: {exc}"), settings)
    finally:
        if not succeeded:
            # Whatever ended the attempt, a file it wrote must not outlive it.
            _discard_unrecorded(claim, settings, storage)
    return Delivery(Outcome.DONE)


def _claim(
    job_id: int, task_id: str, worker: str, settings: Settings
) -> tuple[ClaimedJob | None, str, float | None]:
    with session_scope(settings) as session:
        claim = jobs.claim_job(
            session, job_id, worker=worker, task_id=task_id, lease_s=settings.lease_s
        )
        if claim is not None:
            return claim, "", None
        reason, due_in_s = jobs.describe_unclaimable(session, job_id)
        return None, reason, due_in_s


def _checkpoint(lease: LeaseKeeper) -> None:
    """A safe point: stop here if the job was canceled or its claim moved on."""
    if lease.renew() != "keep":
        raise _StopRequested(lease.state)


def _settle_stop(claim: ClaimedJob, state: str, settings: Settings) -> Delivery:
    if state == "cancel":
        with session_scope(settings) as session:
            canceled = jobs.cancel_running_claim(session, claim)
        if canceled:
            logger.info("job_canceled")
            return Delivery(Outcome.DONE)
    logger.warning("claim_lost", reason="the job moved on while this delivery ran")
    return Delivery(Outcome.DONE)


def _render_and_store(
    claim: ClaimedJob, settings: Settings, storage: Storage, lease: LeaseKeeper
) -> StoredDocument:
    text = render(
        claim.template_content,
        claim.input_data,
        max_output_bytes=settings.max_output_bytes,
        timeout_s=settings.render_timeout_s,
    )
    logger.info("template_rendered", chars=len(text))
    _checkpoint(lease)
    document = storage.write(document_path(claim), text.encode())
    logger.info(
        "document_written", file_path=document.file_path, size=document.file_size
    )
    return document


def _record_success(
    claim: ClaimedJob, document: StoredDocument, settings: Settings, started: float
) -> None:
    """Commit the document row, the final status and the log lines together."""
    duration_ms = round((time.monotonic() - started) * 1000)
    with session_scope(settings) as session:
        jobs.add_log(
            session,
            claim.job_id,
            "rendered",
            f"{claim.template_name} rendered in {duration_ms} ms",
            attempt=claim.attempt,
        )
        if not jobs.complete_job(session, claim, document):
            raise _StopRequested("cancel")
    logger.info("job_succeeded", duration_ms=duration_ms, file_path=document.file_path)


def _discard_unrecorded(
    claim: ClaimedJob, settings: Settings, storage: Storage
) -> None:
    """Remove the claim's folder, with any file written, unless its row committed.

    When the database cannot say (the commit's answer was lost with the
    connection), the file stays: a stray file is harmless, while a row pointing
    at a deleted file would break the one-outcome rule.
    """
    try:
        with session_scope(settings) as session:
            recorded = jobs.document_recorded(session, document_path(claim))
        if not recorded:
            storage.remove_tree(claim_folder(claim.job_id, claim.token))
    except Exception:
        logger.warning("document_left_unverified", file_path=document_path(claim))


def _record_failure(
    claim: ClaimedJob, exc: PermanentError | SoftTimeLimitExceeded, settings: Settings
) -> None:
    error = (
        exc
        if isinstance(exc, PermanentError)
        else RenderTimeout(
            f"task passed its soft time limit of {settings.task_soft_time_limit_s}s"
        )
    )
    with session_scope(settings) as session:
        recorded = jobs.fail_job(session, claim, error.kind, str(error))
    if recorded:
        logger.error("job_failed", error_kind=error.kind, error=str(error))
    else:
        logger.warning("claim_lost", reason="the job moved on before it failed")


def _record_transient(
    claim: ClaimedJob, exc: Exception, settings: Settings
) -> Delivery:
    """Give the job back for a later attempt, or fail it when attempts are spent.

    A cancel asked for while the attempt ran wins over both.
    """
    kind = exc.kind if isinstance(exc, TransientError) else "database_error"
    error = first_line(exc)
    spent = claim.attempt >= claim.max_attempts
    message = f"{error} (gave up after {claim.attempt} attempts)" if spent else error
    delay_s = backoff_delay(settings, claim.attempt)
    try:
        with session_scope(settings) as session:
            if not spent and jobs.requeue_job(
                session, claim, kind, error, delay_s=delay_s
            ):
                outcome = "requeued"
            elif jobs.cancel_running_claim(session, claim):
                outcome = "canceled"
            elif spent and jobs.fail_job(session, claim, kind, message):
                outcome = "failed"
            else:
                outcome = "lost"
    except DBAPIError:
        # The job stays running; when its lease runs out the sweep gives it back.
        logger.warning("job_left_running", reason="database unreachable", error=error)
        return Delivery(Outcome.DONE)

    if outcome == "requeued":
        logger.warning(
            "job_retry_scheduled", error_kind=kind, error=error, delay_s=delay_s
        )
        return Delivery(Outcome.RETRY, delay_s)
    if outcome == "canceled":
        logger.info("job_canceled", after=error)
    elif outcome == "failed":
        logger.error("job_failed", error_kind=kind, error=message)
    else:
        logger.warning("claim_lost", reason="the job moved on before it was retried")
    return Delivery(Outcome.DONE)
