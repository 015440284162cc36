"""Configuration: one pydantic-settings class, read from ``ADPA_`` variables.

With nothing configured, everything runs on an embedded default: a SQLite file
and Celery's filesystem transport under ``ADPA_DATA_DIR``, so the system can be
tried on a machine with no servers. Production, docker-compose and the
integration tests point ``ADPA_DATABASE_URL`` at PostgreSQL and
``ADPA_BROKER_URL`` at Redis.
"""

from __future__ import annotations

import difflib
import os
from enum import StrEnum
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from models.errors import SettingsError

ENV_PREFIX = "ADPA_"
#: Variables for the test suite (database and Redis of the tests), not settings.
TEST_PREFIX = "ADPA_TEST_"
#: Broker URL schemes Celery's transports understand that we support.
BROKER_SCHEMES = frozenset(
    {"redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp", "filesystem", "memory"}
)
#: Databases the code runs on, as (dialect, driver).
DATABASE_DRIVERS = frozenset({("postgresql", "psycopg"), ("sqlite", "pysqlite")})


#: Upper bounds of durations and sizes: far past any sensible value, and well
#: inside what the database's interval and timestamp arithmetic can hold.
HOUR = 3600
DAY = 24 * HOUR
WEEK = 7 * DAY
MIB = 1024 * 1024


class LogFormat(StrEnum):
    """How log lines are written."""

    #: JSON lines when stderr is not a terminal, readable text when it is.
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


class Settings(BaseSettings):
    """Every setting of the system; build it once with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        # An infinite timeout or a NaN limit is never meant; refuse it.
        allow_inf_nan=False,
    )

    #: Folder for the embedded default: SQLite file, broker folders, documents.
    data_dir: Path = Path(".adpa")
    #: SQLAlchemy URL; empty means the SQLite file under ``data_dir``.
    database_url: str = ""
    #: Celery broker URL; empty means the filesystem transport under ``data_dir``.
    broker_url: str = ""
    #: Where documents are written: ``file:///abs/path`` or a plain path.
    storage_url: str = ""

    log_format: LogFormat = LogFormat.AUTO
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    #: Connections each process may hold: pool size plus overflow.
    db_pool_size: int = Field(default=2, ge=1, le=50)
    db_max_overflow: int = Field(default=2, ge=0, le=50)

    #: A render still running after this fails its job with a clear message.
    render_timeout_s: float = Field(default=30.0, gt=0, le=HOUR)
    #: A task still running after this is interrupted and its job fails.
    task_soft_time_limit_s: int = Field(default=60, ge=1, le=DAY)
    #: The worker process running a task is killed after this.
    task_time_limit_s: int = Field(default=90, ge=2, le=DAY)
    #: Redis hands an unacknowledged message back after this long.
    visibility_timeout_s: int = Field(default=3600, ge=60, le=WEEK)
    #: A running job whose lease is older than this is given back by the sweep.
    lease_s: int = Field(default=120, ge=5, le=DAY)

    #: How often beat runs the sweep.
    sweep_interval_s: float = Field(default=30.0, gt=0, le=DAY)
    #: A queued job whose message went out this long ago is sent again.
    sweep_queued_after_s: float = Field(default=600.0, gt=0, le=WEEK)
    #: A queued job never confirmed sent, this long after its insert, is sent.
    sweep_unsent_after_s: float = Field(default=30.0, gt=0, le=WEEK)
    #: Most rows one sweep handles of each kind.
    sweep_batch: int = Field(default=1000, ge=1, le=100_000)

    max_attempts: int = Field(default=5, ge=1, le=50)
    retry_backoff_base_s: float = Field(default=2.0, gt=0, le=HOUR)
    retry_backoff_max_s: float = Field(default=300.0, gt=0, le=DAY)

    #: Address space each worker pool process may use; 0 lifts the cap. A
    #: template that slips past the sandbox's checks fails with MemoryError.
    worker_memory_limit_mb: int = Field(default=1024, ge=0, le=1024 * 1024)

    #: Largest accepted job input, as JSON text.
    max_input_bytes: int = Field(default=256 * 1024, ge=1024, le=64 * MIB)
    #: Largest document a render may produce.
    max_output_bytes: int = Field(default=2 * MIB, ge=1024, le=1024 * MIB)

    default_queue: str = Field(default="adpa.default", pattern=r"^[A-Za-z0-9_.-]+$")
    bulk_queue: str = Field(default="adpa.bulk", pattern=r"^[A-Za-z0-9_.-]+$")
    #: The sweep's own queue, so a backlog of jobs never holds it back.
    sweep_queue: str = Field(default="adpa.sweep", pattern=r"^[A-Za-z0-9_.-]+$")

    #: API key the CLI submits with, when ``--api-key`` is not given.
    api_key: SecretStr | None = None

    flower_user: str = "admin"
    flower_password: SecretStr | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not value:
            return value
        expected = (
            "expected postgresql+psycopg://user:password@host:5432/adpa "
            "or sqlite:///path/to/file"
        )
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(f"not a database URL; {expected}") from None
        if (url.get_backend_name(), url.get_driver_name()) not in DATABASE_DRIVERS:
            raise ValueError(f"unsupported database {url.drivername!r}; {expected}")
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else None
        if value and scheme is None:
            # The value is not shown: it may hold a password.
            raise ValueError("not a URL; expected e.g. redis://host:6379/0")
        if value and scheme not in BROKER_SCHEMES:
            raise ValueError(
                f"unsupported broker URL scheme {scheme!r}; expected one of "
                + ", ".join(sorted(BROKER_SCHEMES))
            )
        for part in value.split(";"):
            try:
                urlsplit(part).port  # noqa: B018 - read for its check
            except ValueError:
                raise ValueError(
                    "the port is not a number from 0 to 65535; "
                    "expected e.g. redis://host:6379/0"
                ) from None
        if scheme in {"redis", "rediss"}:
            database = urlsplit(value).path.strip("/")
            if database and not (database.isascii() and database.isdigit()):
                raise ValueError(
                    f"Redis database {database!r} is not a number; "
                    "expected e.g. redis://host:6379/0"
                )
        return value

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str) -> str:
        if "://" in value and not value.startswith("file://"):
            raise ValueError(
                "only file:// storage is supported; expected file:///path or a path"
            )
        return value

    @model_validator(mode="after")
    def _check_limits(self) -> Self:
        if self.render_timeout_s >= self.task_soft_time_limit_s:
            raise ValueError(
                "ADPA_RENDER_TIMEOUT_S must be lower than ADPA_TASK_SOFT_TIME_LIMIT_S"
            )
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ValueError(
                "ADPA_TASK_SOFT_TIME_LIMIT_S must be lower than ADPA_TASK_TIME_LIMIT_S"
            )
        if len(set(self.worker_queues)) != len(self.worker_queues):
            raise ValueError(
                "ADPA_DEFAULT_QUEUE, ADPA_BULK_QUEUE and ADPA_SWEEP_QUEUE must be "
                "three different queues"
            )
        # A delayed retry stays unacknowledged for its delay, then while it runs.
        held_s = self.retry_backoff_max_s + self.task_time_limit_s
        if self.visibility_timeout_s <= held_s:
            raise ValueError(
                "ADPA_VISIBILITY_TIMEOUT_S must be longer than "
                "ADPA_RETRY_BACKOFF_MAX_S plus ADPA_TASK_TIME_LIMIT_S, or Redis "
                "hands a delayed or running job's message to a second worker"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'adpa.sqlite3').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def storage_root(self) -> Path:
        url = self.storage_url
        if not url:
            return (self.data_dir / "documents").resolve()
        return Path(url.removeprefix("file://")).resolve()

    @property
    def worker_queues(self) -> list[str]:
        """Every queue a worker consumes: jobs one by one, bulk jobs, the sweep."""
        return [self.default_queue, self.bulk_queue, self.sweep_queue]

    @property
    def uses_embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")

    def celery_config(self) -> dict[str, Any]:
        """Celery settings shared by the producer's and the worker's apps."""
        config: dict[str, Any] = {
            "broker_url": self.resolved_broker_url,
            "task_serializer": "json",
            "accept_content": ["json"],
            "result_backend": None,
            "task_ignore_result": True,
            "task_default_queue": self.default_queue,
            "task_create_missing_queues": True,
            "broker_connection_retry_on_startup": True,
            "enable_utc": True,
        }
        if self.uses_embedded_broker:
            folder = str((self.data_dir / "broker").resolve())
            config["broker_transport_options"] = {
                "data_folder_in": folder,
                "data_folder_out": folder,
                "processed_folder": str((self.data_dir / "broker-done").resolve()),
                "store_processed": False,
                # The folder is polled; the default second makes a demo crawl.
                "polling_interval": 0.05,
            }
        else:
            config["broker_transport_options"] = {
                "visibility_timeout": self.visibility_timeout_s,
            }
        return config

    def ensure_data_dirs(self) -> None:
        """Create the data folder (and the embedded broker's folders) if missing."""
        folders = [self.data_dir]
        if self.uses_embedded_broker:
            folders += [self.data_dir / "broker", self.data_dir / "broker-done"]
        for folder in folders:
            _make_folder(folder, "ADPA_DATA_DIR")

    def ensure_storage_root(self) -> None:
        """Create the documents folder; only workers write there."""
        _make_folder(self.storage_root, "ADPA_STORAGE_URL")


def _make_folder(folder: Path, variable: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SettingsError(variable, f"cannot create {folder}: {reason}") from None


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning a validation error into one readable line."""
    try:
        _refuse_unknown_names()
        return Settings(**overrides)
    except UnicodeDecodeError:
        raise SettingsError(None, "the .env file is not valid UTF-8") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        location = [str(part) for part in first["loc"]]
        variable = ENV_PREFIX + location[0].upper() if location else None
        message = first["msg"].removeprefix("Value error, ")
        raise SettingsError(variable, message) from None


def _refuse_unknown_names() -> None:
    """A misspelt ADPA_ name would silently fall back to a default: refuse it."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    env_file = Path(".env")
    names = list(os.environ)
    if env_file.is_file():
        names += [name for name in dotenv_values(env_file) if name]
    for name in names:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper.startswith(TEST_PREFIX):
            continue
        if upper not in known:
            close = difflib.get_close_matches(upper, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise SettingsError(name, f"no such setting{hint}")
