"""The typed SQLAlchemy models of the seven tables.

Names follow the schema document; what the system adds to it, and why, is
listed in ``docs/schema.md``. Alembic's migrations are the only source of the
schema in a database: these models describe it, and a test checks that the
two never drift apart.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from models.types import JsonDocument, UTCDateTime, utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobStatus(StrEnum):
    """Where a job is in its lifecycle; ``models.jobs`` makes every move."""

    #: Inserted by a producer, or given back for another attempt.
    QUEUED = "queued"
    #: Claimed by a worker, which holds its lease.
    RUNNING = "running"
    #: Its document is stored and recorded.
    SUCCEEDED = "succeeded"
    #: A permanent error, or its attempts are spent.
    FAILED = "failed"
    #: Stopped by a user before it finished.
    CANCELED = "canceled"

    @classmethod
    def finished(cls) -> frozenset[JobStatus]:
        return frozenset({cls.SUCCEEDED, cls.FAILED, cls.CANCELED})


Timestamp = Annotated[datetime, mapped_column(UTCDateTime(), server_default=utcnow())]
UpdatedAt = Annotated[
    datetime,
    mapped_column(UTCDateTime(), server_default=utcnow(), onupdate=utcnow()),
]
OptionalTimestamp = Annotated[datetime | None, mapped_column(UTCDateTime())]
Name = Annotated[str, mapped_column(String(255))]
Json = Annotated[Any, mapped_column(JsonDocument)]


class Base(DeclarativeBase):
    """Declarative base with a naming convention, so migrations name constraints."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    """Someone who submits jobs; identified by API keys."""

    __tablename__ = "users"

    user_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[Name] = mapped_column(unique=True)
    email: Mapped[Name] = mapped_column(unique=True)
    #: argon2id hash; the password itself is never stored.
    password_hash: Mapped[Name]
    role: Mapped[str] = mapped_column(String(50), server_default="user")
    created_at: Mapped[Timestamp]
    updated_at: Mapped[UpdatedAt]

    __table_args__ = (CheckConstraint("role IN ('user', 'admin')", name="role"),)


class ApiKey(Base):
    """An API key, stored as a SHA-256 digest behind a short public prefix."""

    __tablename__ = "api_keys"

    api_key_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.user_id", ondelete="CASCADE"), index=True
    )
    #: Public part shown in listings, used to find the key.
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    #: Hex SHA-256 of the whole key.
    key_digest: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[Timestamp]
    updated_at: Mapped[UpdatedAt]
    revoked_at: Mapped[OptionalTimestamp]

    user: Mapped[User] = relationship()


class Template(Base):
    """A Jinja2 template that jobs render; checked when registered."""

    __tablename__ = "templates"

    template_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[Name] = mapped_column(unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(255))
    #: Same tags as the template_tags rows; ``models.templates`` writes both.
    tags: Mapped[Json] = mapped_column(server_default="[]")
    content: Mapped[str] = mapped_column(Text)
    #: Variables the template needs, found when it was registered.
    variables: Mapped[Json] = mapped_column(server_default="[]")
    created_at: Mapped[Timestamp]
    updated_at: Mapped[UpdatedAt]

    tag_rows: Mapped[list[TemplateTag]] = relationship(
        back_populates="template", cascade="all, delete-orphan"
    )


class TemplateTag(Base):
    """One tag of a template, for lookups by tag."""

    __tablename__ = "template_tags"

    tag_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    template_id: Mapped[int] = mapped_column(
        ForeignKey("templates.template_id", ondelete="CASCADE")
    )
    tag: Mapped[Name] = mapped_column(index=True)

    template: Mapped[Template] = relationship(back_populates="tag_rows")

    __table_args__ = (UniqueConstraint("template_id", "tag"),)


#: The largest id a ``SERIAL`` key can hold.
MAX_SERIAL_ID = 2**31 - 1


class Job(Base):
    """One request to render a template with an input."""

    __tablename__ = "jobs"

    job_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.user_id"), index=True)
    template_id: Mapped[int] = mapped_column(
        ForeignKey("templates.template_id"), index=True
    )
    status: Mapped[str] = mapped_column(
        String(50), server_default=JobStatus.QUEUED.value, index=True
    )
    input_data: Mapped[Json]
    #: Set on success: the document's path, size and digest.
    output_data: Mapped[Json | None]
    created_at: Mapped[Timestamp]
    updated_at: Mapped[UpdatedAt]
    started_at: Mapped[OptionalTimestamp]
    finished_at: Mapped[OptionalTimestamp]

    #: Claims in the current run; an operator's retry starts again from 0.
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    #: Claims ever made, never reset: the current claim's token.
    claims: Mapped[int] = mapped_column(Integer, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, server_default="5")
    last_error: Mapped[str | None] = mapped_column(Text)
    #: Kind of the last error (see ``models.errors``).
    last_error_kind: Mapped[str | None] = mapped_column(String(50))
    #: Celery queue the job's messages go to.
    queue: Mapped[str] = mapped_column(String(100), server_default="adpa.default")
    #: The job must not run before this time.
    not_before: Mapped[OptionalTimestamp]
    #: Unique per user when set: a repeated submission returns the first job.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    #: When a message for the job was last handed to the broker.
    enqueued_at: Mapped[OptionalTimestamp]
    #: A running job's worker renews this; past it, the job is given back.
    lease_expires_at: Mapped[OptionalTimestamp]
    #: Celery hostname and pid of the worker holding the job.
    worker: Mapped[str | None] = mapped_column(String(255))
    #: Celery task id of the delivery that claimed the job.
    task_id: Mapped[str | None] = mapped_column(String(255))
    cancel_requested_at: Mapped[OptionalTimestamp]

    template: Mapped[Template] = relationship()
    user: Mapped[User] = relationship()

    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')",
            name="status",
        ),
        CheckConstraint("attempts >= 0", name="attempts"),
        UniqueConstraint("user_id", "idempotency_key"),
        Index("ix_jobs_status_not_before", "status", "not_before"),
    )


class Document(Base):
    """A file a job produced, under the storage root."""

    __tablename__ = "documents"

    document_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(
        ForeignKey("jobs.job_id", ondelete="CASCADE"), index=True
    )
    file_name: Mapped[Name]
    #: Path relative to the storage root.
    file_path: Mapped[str] = mapped_column(String(1024), unique=True)
    file_size: Mapped[int] = mapped_column(BigInteger)
    #: Hex SHA-256 of the file's bytes.
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(
        String(100), server_default="text/markdown"
    )
    created_at: Mapped[Timestamp]

    __table_args__ = (
        UniqueConstraint("job_id", "file_name"),
        CheckConstraint("file_size >= 0", name="file_size"),
    )


class JobLog(Base):
    """One step of a job, or one error with its kind."""

    __tablename__ = "job_logs"

    log_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(
        ForeignKey("jobs.job_id", ondelete="CASCADE"), index=True
    )
    log_level: Mapped[str] = mapped_column(String(50))
    #: Step name: submitted, claimed, rendered, stored, succeeded, failed, ...
    event: Mapped[str] = mapped_column(String(50))
    message: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, server_default="0")
    error_kind: Mapped[str | None] = mapped_column(String(50))
    timestamp: Mapped[Timestamp]
