"""The Python API other services use to submit jobs and read them back.

Example::

    from producer.client import JobClient

    with JobClient(api_key="adpa_1a2b3c4d_...") as client:
        job_id = client.submit("project-charter", {"project_name": "Atlas", ...})
        job = client.wait(job_id, timeout_s=60)
        print(job.status, job.output_data)

A job's row is committed before its message is sent, so a job the client has
an id for is never lost: if the broker was down, the sweep sends it later.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from models import accounts, jobs
from models.db import session_scope
from models.errors import Conflict, InvalidInput, NotFound, TemplateNotFound
from models.logs import default_to_stdlib
from models.settings import Settings, load_settings
from models.tables import MAX_SERIAL_ID, Job, JobStatus, Template
from models.templates import MAX_LABEL_CHARS
from models.types import label_problem, unstorable_text
from producer.broker import create_sender, enqueue

logger = structlog.get_logger(__name__)

#: Longest idempotency key, as the column allows.
MAX_IDEMPOTENCY_KEY = 255


@dataclass(frozen=True)
class JobRequest:
    """One job to submit."""

    template: str
    input_data: Any
    idempotency_key: str | None = None
    not_before: datetime | None = None


@dataclass(frozen=True)
class JobView:
    """A job as its submitter sees it."""

    job_id: int
    template: str
    status: JobStatus
    attempts: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    last_error: str | None
    last_error_kind: str | None
    output_data: dict[str, Any] | None
    queue: str

    @property
    def finished(self) -> bool:
        return self.status in JobStatus.finished()


@dataclass(frozen=True)
class LogView:
    timestamp: datetime
    level: str
    event: str
    message: str
    attempt: int
    error_kind: str | None


@dataclass(frozen=True)
class DocumentView:
    document_id: int
    file_name: str
    file_path: str
    file_size: int
    sha256: str


def validate_input(input_data: Any, max_bytes: int) -> dict[str, Any]:
    """A job input must be a JSON object that PostgreSQL can store, within size."""
    if not isinstance(input_data, Mapping):
        raise InvalidInput(
            f"job input must be a JSON object, not {_json_kind(input_data)}"
        )
    data = dict(input_data)
    try:
        encoded = json.dumps(data, allow_nan=False, ensure_ascii=False)
    except RecursionError:
        raise InvalidInput("job input is nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"job input is not valid JSON: {exc}") from exc
    size = len(encoded.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        raise InvalidInput(f"job input is {size} bytes; the limit is {max_bytes}")
    problem = unstorable_text(encoded)
    if problem:
        raise InvalidInput(f"job input contains {problem}")
    # As the database will hold it: tuples become lists, keys become strings,
    # so a repeated submission compares equal to the stored input.
    normalized: dict[str, Any] = json.loads(encoded)
    return normalized


def check_job_id(job_id: Any) -> int:
    """A job id as the caller gave it, or NotFound when no job can have it."""
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise NotFound(f"no job {job_id!r}: a job id is a positive integer")
    if not 0 < job_id <= MAX_SERIAL_ID:
        raise NotFound(f"no job {job_id}")
    return job_id


def _check_text(value: Any, what: str, max_chars: int) -> None:
    problem = label_problem(value, max_chars)
    if problem:
        raise InvalidInput(f"{what} {problem}")


def _check_requests(batch: Sequence[Any]) -> None:
    """Refuse, naming it, a request whose fields no job could have.

    These checks need no database, so they run once, before the transaction
    (which runs again when a concurrent submission wins an idempotency key).
    """
    for position, request in enumerate(batch):
        where = f"request {position + 1}: " if len(batch) > 1 else ""
        if not isinstance(request, JobRequest):
            raise InvalidInput(
                f"request {position + 1}: expected a JobRequest, not "
                f"{type(request).__name__}"
            )
        _check_text(request.template, f"{where}the template name", MAX_LABEL_CHARS)
        if request.idempotency_key is not None:
            _check_text(
                request.idempotency_key,
                f"{where}an idempotency key",
                MAX_IDEMPOTENCY_KEY,
            )
        when = request.not_before
        if when is not None and (
            not isinstance(when, datetime) or when.utcoffset() is None
        ):
            raise InvalidInput(f"{where}not_before must be a timezone-aware datetime")


def _json_kind(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, int | float) else type(value).__name__


def _job_view(job: Job, template_name: str) -> JobView:
    return JobView(
        job_id=job.job_id,
        template=template_name,
        status=JobStatus(job.status),
        attempts=job.attempts,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        last_error=job.last_error,
        last_error_kind=job.last_error_kind,
        output_data=job.output_data,
        queue=job.queue,
    )


class JobClient:
    """Submit and read jobs as the user an API key belongs to."""

    def __init__(self, api_key: str, settings: Settings | None = None) -> None:
        default_to_stdlib()
        self.settings = settings or load_settings()
        self._api_key = api_key
        self._sender = create_sender(self.settings)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sender.close()

    def submit(
        self,
        template: str,
        input_data: Any,
        *,
        idempotency_key: str | None = None,
        not_before: datetime | None = None,
        queue: str | None = None,
    ) -> int:
        """Submit one job and return its id."""
        request = JobRequest(template, input_data, idempotency_key, not_before)
        return self.submit_many([request], queue=queue or self.settings.default_queue)[
            0
        ]

    def submit_many(
        self,
        requests: Iterable[JobRequest],
        *,
        queue: str | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Submit jobs in order, in one transaction, and return their ids.

        Every request is checked first: one bad request refuses the whole
        call with an error naming it, and nothing is inserted. Requests whose
        idempotency key was used before return the earlier job's id.
        """
        queue = queue or self.settings.bulk_queue
        queues = (self.settings.default_queue, self.settings.bulk_queue)
        try:
            batch = list(requests)
        except TypeError:
            raise InvalidInput(
                f"requests must be an iterable of JobRequest, not "
                f"{type(requests).__name__}"
            ) from None
        _check_requests(batch)
        if queue not in queues:
            raise InvalidInput(
                f"unknown queue {queue!r}; workers consume {queues[0]} and {queues[1]}"
            )
        try:
            positions, known, inserted = self._insert(batch, queue)
        except IntegrityError as exc:
            if "idempotency_key" not in str(exc.orig):
                raise
            # Another submission with one of these keys committed first: this
            # one now finds its job, or a conflict with other input.
            positions, known, inserted = self._insert(batch, queue)
        ids = [known.get(i, 0) for i in range(len(batch))]
        for position, job_id in zip(positions, inserted, strict=True):
            ids[position] = job_id

        sent = enqueue(self._sender, self.settings, inserted, queue)
        logger.info("jobs_submitted", count=len(inserted), sent=len(sent), queue=queue)
        if on_batch is not None:
            on_batch(len(batch))
        return ids

    def _insert(
        self, batch: Sequence[JobRequest], queue: str
    ) -> tuple[list[int], dict[int, int], list[int]]:
        """Check and insert a batch in one transaction.

        Returns the batch positions of the new jobs, the job ids known for
        positions whose idempotency key was used before, and the new ids.
        """
        with session_scope(self.settings) as session:
            user = accounts.authenticate(session, self._api_key)
            new_jobs, positions, known = self._prepare(
                session, user.user_id, batch, queue
            )
            inserted = jobs.insert_jobs(session, user.user_id, new_jobs)
        return positions, known, inserted

    def _prepare(
        self, session: Any, user_id: int, batch: Sequence[JobRequest], queue: str
    ) -> tuple[list[jobs.NewJob], list[int], dict[int, int]]:
        names = {request.template for request in batch}
        template_ids = dict(
            session.execute(
                select(Template.name, Template.template_id).where(
                    Template.name.in_(names)
                )
            ).all()
        )
        keys = [r.idempotency_key for r in batch if r.idempotency_key]
        existing = jobs.find_by_idempotency_keys(session, user_id, keys)

        new_jobs: list[jobs.NewJob] = []
        positions: list[int] = []
        known: dict[int, int] = {}
        seen_keys: dict[str, int] = {}
        for position, request in enumerate(batch):
            where = f"request {position + 1}: " if len(batch) > 1 else ""
            if request.template not in template_ids:
                raise TemplateNotFound(request.template, where=where)
            try:
                data = validate_input(request.input_data, self.settings.max_input_bytes)
            except InvalidInput as exc:
                raise InvalidInput(f"{where}{exc}") from None
            key = request.idempotency_key
            if key and key in existing:
                job_id, template_id, previous = existing[key]
                if template_id != template_ids[request.template] or previous != data:
                    raise Conflict(
                        f"{where}idempotency key {key!r} was used for job {job_id} "
                        "with another template or input"
                    )
                known[position] = job_id
                continue
            if key and key in seen_keys:
                raise InvalidInput(
                    f"{where}idempotency key {key!r} repeats in the batch"
                )
            if key:
                seen_keys[key] = position
            new_jobs.append(
                jobs.NewJob(
                    template_id=template_ids[request.template],
                    input_data=data,
                    queue=queue,
                    max_attempts=self.settings.max_attempts,
                    idempotency_key=key,
                    not_before=request.not_before,
                )
            )
            positions.append(position)
        return new_jobs, positions, known

    def _own_job(self, session: Any, job_id: int) -> tuple[Job, str]:
        check_job_id(job_id)
        user = accounts.authenticate(session, self._api_key)
        row = session.execute(
            select(Job, Template.name)
            .join(Template, Template.template_id == Job.template_id)
            .where(Job.job_id == job_id, Job.user_id == user.user_id)
        ).one_or_none()
        if row is None:
            raise NotFound(f"no job {job_id} for this API key")
        return row[0], row[1]

    def get(self, job_id: int) -> JobView:
        """The job's current state."""
        with session_scope(self.settings) as session:
            job, template_name = self._own_job(session, job_id)
            return _job_view(job, template_name)

    def logs(self, job_id: int) -> list[LogView]:
        """Every step the job went through, oldest first."""
        with session_scope(self.settings) as session:
            self._own_job(session, job_id)
            return [
                LogView(
                    r.timestamp,
                    r.log_level,
                    r.event,
                    r.message,
                    r.attempt,
                    r.error_kind,
                )
                for r in jobs.job_logs(session, job_id)
            ]

    def documents(self, job_id: int) -> list[DocumentView]:
        """The job's documents (one, once it succeeded)."""
        with session_scope(self.settings) as session:
            self._own_job(session, job_id)
            return [
                DocumentView(
                    d.document_id, d.file_name, d.file_path, d.file_size, d.sha256
                )
                for d in jobs.job_documents(session, job_id)
            ]

    def cancel(self, job_id: int) -> JobStatus:
        """Cancel a job: queued ones at once, running ones at their next safe point.

        Returns the status after the call: ``canceled``, or ``running`` while
        the worker finishes its current step.
        """
        check_job_id(job_id)
        with session_scope(self.settings) as session:
            user = accounts.authenticate(session, self._api_key)
            status = jobs.request_cancel(session, job_id, user.user_id)
        logger.info("job_cancel_requested", job_id=job_id, status=status)
        return JobStatus(status)

    def retry(self, job_id: int) -> None:
        """Put a failed or canceled job back in the queue, attempts reset."""
        check_job_id(job_id)
        with session_scope(self.settings) as session:
            user = accounts.authenticate(session, self._api_key)
            queue = jobs.retry_job(session, job_id, user.user_id).queue
        enqueue(self._sender, self.settings, [job_id], queue)

    def wait(
        self, job_id: int, *, timeout_s: float = 60.0, poll_s: float = 0.25
    ) -> JobView:
        """Poll until the job is finished; raises TimeoutError after ``timeout_s``."""
        for name, value in (("timeout_s", timeout_s), ("poll_s", poll_s)):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise InvalidInput(f"{name} must be a finite number of seconds >= 0")
        deadline = time.monotonic() + timeout_s
        while True:
            view = self.get(job_id)
            if view.finished:
                return view
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {job_id} is still {view.status} after {timeout_s:g}s"
                )
            time.sleep(poll_s)
