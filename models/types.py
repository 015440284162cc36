"""Column types and SQL functions that behave the same on PostgreSQL and SQLite."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import JSON, CursorResult, DateTime, Float, Result, literal
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator

#: JSONB on PostgreSQL, JSON text elsewhere.
JsonDocument = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """A ``timestamptz`` that always comes back timezone-aware, in UTC.

    PostgreSQL answers in the session's time zone, which the server's or the
    client's configuration may set to anything; the value is converted. SQLite
    has no timezone type and returns naive values; they are stored in UTC, so
    they are marked as such on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a timezone-aware column")
        if dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class utcnow(FunctionElement[datetime]):  # noqa: N801 - reads as a SQL function
    """The database's current time: ``now()``, or UTC with milliseconds on SQLite."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(utcnow)
def _utcnow_default(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    return "now()"


@compiles(utcnow, "sqlite")
def _utcnow_sqlite(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    return "strftime('%Y-%m-%d %H:%M:%f', 'now')"


class utc_after(FunctionElement[datetime]):  # noqa: N801 - reads as a SQL function
    """The database's current time plus a number of seconds (a bound parameter)."""

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, seconds: float) -> None:
        super().__init__(literal(float(seconds), Float()))


@compiles(utc_after)
def _utc_after_default(element: utc_after, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"(now() + make_interval(secs => {seconds}))"


@compiles(utc_after, "sqlite")
def _utc_after_sqlite(element: utc_after, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return (
        f"strftime('%Y-%m-%d %H:%M:%f', 'now', CAST({seconds} AS TEXT) || ' seconds')"
    )


def rows_changed(result: Result[Any]) -> int:
    """How many rows an UPDATE or DELETE changed."""
    return cast(CursorResult[Any], result).rowcount


#: A JSON ``\\u0000`` escape, not a literal backslash followed by ``u0000``.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def label_problem(value: object, max_chars: int) -> str | None:
    """What makes ``value`` unfit for a short text column, or None if it fits.

    The answer completes a sentence that names the field: "... must be text".
    """
    if not isinstance(value, str):
        return f"must be text, not {type(value).__name__}"
    if not value.strip() or len(value) > max_chars:
        return f"must have 1 to {max_chars} characters, not all blank"
    problem = unstorable_text(value)
    return f"contains {problem}" if problem else None


def unstorable_text(text: str) -> str | None:
    """What in ``text`` PostgreSQL cannot store, or None when all of it can be.

    ``text`` is a string or its JSON encoding: PostgreSQL refuses NUL in text
    and ``\\u0000`` in JSONB, and neither takes lone surrogates.
    """
    if "\x00" in text or _JSON_NUL.search(text):
        return "a NUL character, which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "text that is not valid Unicode"
    return None
