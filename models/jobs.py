"""Every read and write of job rows: the lifecycle's only owner.

A job moves ``queued -> running`` through one conditional update that also
counts the attempt and the claim. The claim number is never reset (an
operator's retry resets attempts, not claims), so it is a token no other
delivery can hold: every later move of a running job names it, and a worker
whose claim was taken over can no longer change the job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from models.errors import Conflict, NotFound
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
    idempotency_key: str | None = None
    not_before: datetime | None = None


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker holds, with what it needs to render it."""

    job_id: int
    #: The claim's token: ``jobs.claims`` as this claim set it.
    token: int
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
) -> dict[str, tuple[int, int, Any]]:
    """This user's jobs submitted under any of these keys: id, template, input."""
    if not keys:
        return {}
    rows = session.execute(
        select(Job.idempotency_key, Job.job_id, Job.template_id, Job.input_data).where(
            Job.user_id == user_id, Job.idempotency_key.in_(keys)
        )
    )
    return {
        key: (job_id, template_id, input_data)
        for key, job_id, template_id, input_data in rows
        if key is not None
    }


def mark_enqueued(session: Session, job_ids: Sequence[int]) -> None:
    """Record that the broker accepted a message for each of these jobs."""
    if job_ids:
        session.execute(
            update(Job)
            .where(Job.job_id.in_(job_ids))
            .values(enqueued_at=utcnow())
            .execution_options(synchronize_session=False)
        )


def clear_enqueued(session: Session, job_ids: Sequence[int]) -> None:
    """Forget a send that did not happen, so the sweep retries it soon."""
    session.execute(
        update(Job)
        .where(Job.job_id.in_(job_ids), Job.status == JobStatus.QUEUED.value)
        .values(enqueued_at=None)
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
            claims=Job.claims + 1,
            started_at=func.coalesce(Job.started_at, utcnow()),
            lease_expires_at=utc_after(lease_s),
            worker=worker,
            task_id=task_id,
        )
        .returning(
            Job.claims, Job.attempts, Job.max_attempts, Job.template_id, Job.input_data
        )
    ).one_or_none()
    if claimed is None:
        return None

    token, attempt, max_attempts, template_id, input_data = claimed
    name, content = session.execute(
        select(Template.name, Template.content).where(
            Template.template_id == template_id
        )
    ).one()
    add_log(session, job_id, "claimed", f"claimed by {worker}", attempt=attempt)
    return ClaimedJob(job_id, token, attempt, max_attempts, name, content, input_data)


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


def _running_claim(claim: ClaimedJob) -> Any:
    return and_(
        Job.job_id == claim.job_id,
        Job.status == JobStatus.RUNNING.value,
        Job.claims == claim.token,
    )


def _move_claimed(
    session: Session, claim: ClaimedJob, *conditions: Any, **values: Any
) -> bool:
    """Move a job this claim still holds out of running; False when it does not.

    Every such move ends the lease; ``conditions`` narrow it further.
    """
    result = session.execute(
        update(Job)
        .where(_running_claim(claim), *conditions)
        .values(lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    return rows_changed(result) == 1


def complete_job(session: Session, claim: ClaimedJob, document: StoredDocument) -> bool:
    """Record the document and mark the job succeeded, in the caller's transaction.

    Returns False, having changed nothing, when the claim is no longer current
    (the sweep gave the job to another worker) or a cancel was asked for; the
    caller rolls back and removes its file.
    """
    output = {
        "file_path": document.file_path,
        "file_size": document.file_size,
        "sha256": document.sha256,
    }
    moved = _move_claimed(
        session,
        claim,
        Job.cancel_requested_at.is_(None),
        status=JobStatus.SUCCEEDED.value,
        finished_at=utcnow(),
        output_data=output,
        last_error=None,
        last_error_kind=None,
    )
    if not moved:
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
    stored = f"{document.file_path} ({document.file_size} bytes)"
    add_log(session, claim.job_id, "stored", stored, attempt=claim.attempt)
    add_log(session, claim.job_id, "succeeded", "document ready", attempt=claim.attempt)
    return True


def fail_job(session: Session, claim: ClaimedJob, error_kind: str, error: str) -> bool:
    """Mark a running job failed with its error; False if the claim is stale."""
    moved = _move_claimed(
        session,
        claim,
        status=JobStatus.FAILED.value,
        finished_at=utcnow(),
        last_error=error[:MAX_ERROR_CHARS],
        last_error_kind=error_kind,
    )
    if moved:
        add_log(
            session,
            claim.job_id,
            "failed",
            error,
            level="ERROR",
            attempt=claim.attempt,
            error_kind=error_kind,
        )
    return moved


def requeue_job(
    session: Session,
    claim: ClaimedJob,
    error_kind: str,
    error: str,
    *,
    delay_s: float,
) -> bool:
    """Give a running job back to the queue after a transient error.

    Returns False, having changed nothing, when the claim is stale or a cancel
    was asked for (the caller cancels instead).
    """
    moved = _move_claimed(
        session,
        claim,
        Job.cancel_requested_at.is_(None),
        status=JobStatus.QUEUED.value,
        not_before=utc_after(delay_s),
        enqueued_at=utcnow(),
        last_error=error[:MAX_ERROR_CHARS],
        last_error_kind=error_kind,
        worker=None,
    )
    if moved:
        message = f"{error} (next attempt in {delay_s:.1f}s)"
        add_log(
            session,
            claim.job_id,
            "retry_scheduled",
            message,
            level="WARNING",
            attempt=claim.attempt,
            error_kind=error_kind,
        )
    return moved


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


def renew_lease(session: Session, claim: ClaimedJob, lease_s: float) -> str:
    """Extend a running job's lease; returns what the worker should do next.

    ``"keep"`` while the claim holds, ``"cancel"`` once a user asked to stop
    the job, ``"lost"`` when the claim moved on (the job was given back or
    finished elsewhere).
    """
    row = session.execute(
        update(Job)
        .where(_running_claim(claim))
        .values(lease_expires_at=utc_after(lease_s))
        .returning(Job.cancel_requested_at)
    ).one_or_none()
    if row is None:
        return "lost"
    return "cancel" if row[0] is not None else "keep"


def cancel_running_claim(session: Session, claim: ClaimedJob) -> bool:
    """End a running job as canceled at a safe point (nothing was recorded)."""
    moved = _move_claimed(
        session,
        claim,
        Job.cancel_requested_at.is_not(None),
        status=JobStatus.CANCELED.value,
        finished_at=utcnow(),
    )
    if moved:
        add_log(
            session,
            claim.job_id,
            "canceled",
            "stopped at a safe point",
            attempt=claim.attempt,
        )
    return moved


def request_cancel(session: Session, job_id: int, user_id: int | None = None) -> str:
    """Cancel a job: a queued one at once, a running one at its next safe point.

    Returns the job's status after the call. ``user_id`` limits the call to
    that user's jobs; operators pass None.
    """
    job = _locked_job(session, job_id, user_id)
    if job.status == JobStatus.QUEUED.value:
        job.status = JobStatus.CANCELED.value
        job.finished_at = utcnow()
        add_log(
            session, job_id, "canceled", "canceled while queued", attempt=job.attempts
        )
    elif job.status == JobStatus.RUNNING.value:
        if job.cancel_requested_at is None:
            job.cancel_requested_at = utcnow()
            add_log(
                session,
                job_id,
                "cancel_requested",
                "the worker stops at its next safe point",
                attempt=job.attempts,
            )
    else:
        raise Conflict(
            f"job {job_id} is {job.status}; only queued or running jobs can be canceled"
        )
    session.flush()
    return job.status


def retry_job(session: Session, job_id: int, user_id: int | None = None) -> Job:
    """Put a failed or canceled job back in the queue with its attempts reset."""
    job = _locked_job(session, job_id, user_id)
    if job.status not in (JobStatus.FAILED.value, JobStatus.CANCELED.value):
        raise Conflict(
            f"job {job_id} is {job.status}; only failed or canceled jobs can be retried"
        )
    previous = job.status
    job.status = JobStatus.QUEUED.value
    job.attempts = 0
    job.started_at = None
    job.finished_at = None
    job.not_before = None
    # No message for this run yet: the sweep sends one if the send fails.
    job.enqueued_at = None
    job.cancel_requested_at = None
    job.lease_expires_at = None
    job.worker = None
    job.output_data = None
    why = "it failed" if previous == JobStatus.FAILED.value else "it was canceled"
    add_log(session, job_id, "retried", f"put back in the queue after {why}")
    session.flush()
    return job


def _locked_job(session: Session, job_id: int, user_id: int | None) -> Job:
    query = select(Job).where(Job.job_id == job_id).with_for_update()
    if user_id is not None:
        query = query.where(Job.user_id == user_id)
    job = session.scalar(query)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


@dataclass(frozen=True)
class SweepResult:
    """What one sweep did."""

    #: Queued jobs whose message is sent again: (job_id, queue).
    resend: list[tuple[int, str]]
    #: Running jobs with an expired lease, given back to the queue.
    requeued: list[tuple[int, str]]
    #: Running jobs with an expired lease and no attempts left, now failed:
    #: (job_id, the token of the claim that lost its worker).
    failed: list[tuple[int, int]]
    #: Running jobs with an expired lease whose cancel was asked, now canceled.
    canceled: list[tuple[int, int]]


def sweep(
    session: Session,
    *,
    queued_after_s: float,
    unsent_after_s: float,
    limit: int,
    queue_depth: Callable[[str], int] | None = None,
) -> SweepResult:
    """Find jobs whose message or worker was lost, and fix their rows.

    Queued jobs whose message never went out are sent. Of the jobs whose
    message went out long ago, only as many are sent again as the broker's
    queue lacks (``queue_depth``): a job still waiting behind a long backlog
    keeps its one message, and a backlog is not doubled at every sweep. A
    lost message in a busy queue is resent once the queue drains below the
    number of jobs waiting in it.

    Rows are locked with SKIP LOCKED, so sweeps on several machines share the
    work instead of doing it twice. The caller sends the messages after the
    commit.
    """
    now = session.scalar(select(utcnow()))
    assert now is not None
    queued_before = now - timedelta(seconds=queued_after_s)
    queued = Job.status == JobStatus.QUEUED.value
    never_sent = and_(
        queued,
        Job.enqueued_at.is_(None),
        Job.created_at < now - timedelta(seconds=unsent_after_s),
        or_(Job.not_before.is_(None), Job.not_before <= now),
    )
    sent_long_ago = and_(
        queued,
        Job.enqueued_at < queued_before,
        or_(Job.not_before.is_(None), Job.not_before < queued_before),
    )

    resend = _lock_queued(session, never_sent, limit)
    waiting = session.execute(
        select(Job.queue, func.count()).where(sent_long_ago).group_by(Job.queue)
    ).all()
    for queue, count in waiting:
        missing = count - (queue_depth(queue) if queue_depth else 0)
        if missing > 0:
            condition = and_(sent_long_ago, Job.queue == queue)
            resend += _lock_queued(session, condition, min(missing, limit))
    if resend:
        mark_enqueued(session, [job_id for job_id, _ in resend])
        for job_id, _ in resend:
            add_log(
                session,
                job_id,
                "resent",
                "message sent again by the sweep",
                level="WARNING",
            )

    expired = session.scalars(
        select(Job)
        .where(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)
        .order_by(Job.job_id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    result = SweepResult(resend, [], [], [])
    for job in expired:
        reason = f"worker {job.worker} stopped renewing its lease"
        _release(session, job, result, reason, "lease_expired")
    session.flush()
    return result


def _lock_queued(session: Session, condition: Any, limit: int) -> list[tuple[int, str]]:
    """Lock up to ``limit`` queued jobs, oldest message first; skips locked rows."""
    rows = session.execute(
        select(Job.job_id, Job.queue)
        .where(condition)
        .order_by(Job.enqueued_at.nulls_first(), Job.job_id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    return [(job_id, queue) for job_id, queue in rows]


def _release(
    session: Session,
    job: Job,
    result: SweepResult,
    reason: str,
    kind: str,
    *,
    may_retry: bool = True,
) -> None:
    """End a running job that lost its worker, or give it back to the queue.

    A cancel asked for is honoured; a job with attempts left is queued again
    unless ``may_retry`` is false; any other fails.
    """
    job.lease_expires_at = None
    job.worker = None
    if job.cancel_requested_at is not None:
        job.status = JobStatus.CANCELED.value
        job.finished_at = utcnow()
        add_log(
            session,
            job.job_id,
            "canceled",
            f"{reason}; canceled as asked",
            attempt=job.attempts,
        )
        result.canceled.append((job.job_id, job.claims))
        return

    job.last_error_kind = kind
    spent = job.attempts >= job.max_attempts
    if spent or not may_retry:
        job.status = JobStatus.FAILED.value
        job.finished_at = utcnow()
        job.last_error = (
            f"{reason} (gave up after {job.attempts} attempts)" if spent else reason
        )
        add_log(
            session,
            job.job_id,
            "failed",
            job.last_error,
            level="ERROR",
            attempt=job.attempts,
            error_kind=kind,
        )
        result.failed.append((job.job_id, job.claims))
    else:
        job.status = JobStatus.QUEUED.value
        job.not_before = None
        job.enqueued_at = utcnow()
        job.last_error = reason
        add_log(
            session,
            job.job_id,
            "requeued",
            reason,
            level="WARNING",
            attempt=job.attempts,
            error_kind=kind,
        )
        result.requeued.append((job.job_id, job.queue))


def end_lost_task(
    session: Session,
    job_id: int,
    task_id: str,
    worker: str,
    error_kind: str,
    error: str,
    *,
    requeue: bool,
) -> tuple[str, int] | None:
    """Settle a job whose task process died or was killed, from the worker's parent.

    Only the claim of that delivery (``task_id``) by that process (``worker``)
    is settled, and only while it still holds the job: copies of one message
    share a task id, and another worker may hold the job. With ``requeue``
    the job goes back to the queue while it has attempts left; otherwise it
    fails. Returns the new status and the claim's token, or None when there
    was nothing to settle.
    """
    job = session.scalar(
        select(Job)
        .where(
            Job.job_id == job_id,
            Job.status == JobStatus.RUNNING.value,
            Job.task_id == task_id,
            Job.worker == worker,
        )
        .with_for_update()
    )
    if job is None:
        return None
    token = job.claims
    _release(
        session, job, SweepResult([], [], [], []), error, error_kind, may_retry=requeue
    )
    session.flush()
    return job.status, token
