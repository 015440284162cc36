"""Every read and write of job rows: the lifecycle's only owner.

A job moves ``queued -> running`` through one conditional update that also
counts the attempt; that attempt number is the claim's token, and every later
move of a running job names it, so a worker whose claim was taken over can no
longer change the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from models.tables import Document, Job, JobLog, JobStatus, Template
from models.types import rows_changed, utc_after, utcnow

#: Longest error text kept in a job row; the log keeps the same cut.
MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class NewJob:
    """What a producer asks for: one row to insert."""

    template_id: int
    input_data: dict[str, Any]
    queue: str
    max_attempts: int
    priority: int = 0
    idempotency_key: str | None = None
    not_before: datetime | None = None


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker holds, with what it needs to render it."""

    job_id: int
    attempt: int
    max_attempts: int
    template_name: str
    template_content: str
    input_data: dict[str, Any]


@dataclass(frozen=True)
class StoredDocument:
    """A file written under the storage root, ready to be recorded."""

    file_name: str
    file_path: str
    file_size: int
    sha256: str


def add_log(
    session: Session,
    job_id: int,
    event: str,
    message: str,
    *,
    level: str = "INFO",
    attempt: int = 0,
    error_kind: str | None = None,
) -> None:
    """Append one job_logs row in the session's transaction."""
    session.add(
        JobLog(
            job_id=job_id,
            event=event,
            message=message[:MAX_ERROR_CHARS],
            log_level=level,
            attempt=attempt,
            error_kind=error_kind,
        )
    )


def insert_jobs(
    session: Session, user_id: int, new_jobs: Sequence[NewJob]
) -> list[int]:
    """Insert queued jobs with a ``submitted`` log line each; returns their ids."""
    rows = [
        Job(
            user_id=user_id,
            template_id=new.template_id,
            input_data=new.input_data,
            queue=new.queue,
            max_attempts=new.max_attempts,
            priority=new.priority,
            idempotency_key=new.idempotency_key,
            not_before=new.not_before,
        )
        for new in new_jobs
    ]
    session.add_all(rows)
    session.flush()
    for row in rows:
        add_log(session, row.job_id, "submitted", f"queued on {row.queue}")
    return [row.job_id for row in rows]


def find_by_idempotency_keys(
    session: Session, user_id: int, keys: Sequence[str]
) -> dict[str, int]:
    """Jobs this user already submitted under any of these keys."""
    if not keys:
        return {}
    rows = session.execute(
        select(Job.idempotency_key, Job.job_id).where(
            Job.user_id == user_id, Job.idempotency_key.in_(keys)
        )
    )
    return {key: job_id for key, job_id in rows if key is not None}


def mark_enqueued(session: Session, job_ids: Sequence[int]) -> None:
    """Record that the broker accepted a message for each of these jobs."""
    if job_ids:
        session.execute(
            update(Job)
            .where(Job.job_id.in_(job_ids))
            .values(enqueued_at=utcnow())
            .execution_options(synchronize_session=False)
        )


def claim_job(
    session: Session, job_id: int, *, worker: str, task_id: str, lease_s: float
) -> ClaimedJob | None:
    """Move a due queued job to running, or return None when it is not claimable.

    The single conditional update is what makes two deliveries of one message
    harmless: only one of them can see the job queued.
    """
    claimed = session.execute(
        update(Job)
        .where(
            Job.job_id == job_id,
            Job.status == JobStatus.QUEUED.value,
            or_(Job.not_before.is_(None), Job.not_before <= utcnow()),
        )
        .values(
            status=JobStatus.RUNNING.value,
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, utcnow()),
            lease_expires_at=utc_after(lease_s),
            worker=worker,
            task_id=task_id,
        )
        .returning(Job.attempts, Job.max_attempts, Job.template_id, Job.input_data)
    ).one_or_none()
    if claimed is None:
        return None

    attempt, max_attempts, template_id, input_data = claimed
    name, content = session.execute(
        select(Template.name, Template.content).where(
            Template.template_id == template_id
        )
    ).one()
    add_log(session, job_id, "claimed", f"claimed by {worker}", attempt=attempt)
    return ClaimedJob(job_id, attempt, max_attempts, name, content, input_data)


def describe_unclaimable(session: Session, job_id: int) -> tuple[str, float | None]:
    """Why a delivery found nothing to do, and seconds until due if it is early."""
    row = session.execute(
        select(Job.status, Job.not_before, utcnow()).where(Job.job_id == job_id)
    ).one_or_none()
    if row is None:
        return "no such job", None
    status, not_before, now = row
    if status == JobStatus.QUEUED.value and not_before is not None and not_before > now:
        return "not due yet", (not_before - now).total_seconds()
    return f"job is {status}", None


def _running_claim(job_id: int, attempt: int) -> Any:
    return and_(
        Job.job_id == job_id,
        Job.status == JobStatus.RUNNING.value,
        Job.attempts == attempt,
    )


def complete_job(session: Session, claim: ClaimedJob, document: StoredDocument) -> bool:
    """Record the document and mark the job succeeded, in the caller's transaction.

    Returns False, having changed nothing, when the claim is no longer current
    (the sweep gave the job to another worker, or it was canceled); the caller
    rolls back and removes its file.
    """
    output = {
        "file_path": document.file_path,
        "file_size": document.file_size,
        "sha256": document.sha256,
    }
    result = session.execute(
        update(Job)
        .where(_running_claim(claim.job_id, claim.attempt))
        .where(Job.cancel_requested_at.is_(None))
        .values(
            status=JobStatus.SUCCEEDED.value,
            finished_at=utcnow(),
            output_data=output,
            lease_expires_at=None,
            last_error=None,
            last_error_kind=None,
        )
        .execution_options(synchronize_session=False)
    )
    if rows_changed(result) != 1:
        return False

    session.add(
        Document(
            job_id=claim.job_id,
            file_name=document.file_name,
            file_path=document.file_path,
            file_size=document.file_size,
            sha256=document.sha256,
        )
    )
    add_log(
        session,
        claim.job_id,
        "stored",
        f"{document.file_path} ({document.file_size} bytes)",
        attempt=claim.attempt,
    )
    add_log(session, claim.job_id, "succeeded", "document ready", attempt=claim.attempt)
    return True


def fail_job(session: Session, claim: ClaimedJob, error_kind: str, error: str) -> bool:
    """Mark a running job failed with its error; False if the claim is stale."""
    result = session.execute(
        update(Job)
        .where(_running_claim(claim.job_id, claim.attempt))
        .values(
            status=JobStatus.FAILED.value,
            finished_at=utcnow(),
            last_error=error[:MAX_ERROR_CHARS],
            last_error_kind=error_kind,
            lease_expires_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    if rows_changed(result) != 1:
        return False
    add_log(
        session,
        claim.job_id,
        "failed",
        error,
        level="ERROR",
        attempt=claim.attempt,
        error_kind=error_kind,
    )
    return True


def requeue_job(
    session: Session,
    claim: ClaimedJob,
    error_kind: str,
    error: str,
    *,
    delay_s: float,
) -> bool:
    """Give a running job back to the queue after a transient error."""
    result = session.execute(
        update(Job)
        .where(_running_claim(claim.job_id, claim.attempt))
        .values(
            status=JobStatus.QUEUED.value,
            not_before=utc_after(delay_s),
            last_error=error[:MAX_ERROR_CHARS],
            last_error_kind=error_kind,
            lease_expires_at=None,
            worker=None,
        )
        .execution_options(synchronize_session=False)
    )
    if rows_changed(result) != 1:
        return False
    add_log(
        session,
        claim.job_id,
        "retry_scheduled",
        f"{error} (next attempt in {delay_s:.1f}s)",
        level="WARNING",
        attempt=claim.attempt,
        error_kind=error_kind,
    )
    return True


def get_job(session: Session, job_id: int) -> Job | None:
    return session.get(Job, job_id)


def job_logs(session: Session, job_id: int) -> list[JobLog]:
    return list(
        session.scalars(
            select(JobLog).where(JobLog.job_id == job_id).order_by(JobLog.log_id)
        )
    )


def job_documents(session: Session, job_id: int) -> list[Document]:
    return list(
        session.scalars(
            select(Document)
            .where(Document.job_id == job_id)
            .order_by(Document.document_id)
        )
    )


def document_recorded(session: Session, file_path: str) -> bool:
    """Whether a documents row points at this path."""
    found = session.scalar(
        select(Document.document_id).where(Document.file_path == file_path)
    )
    return found is not None
