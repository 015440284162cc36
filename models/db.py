"""Engines and sessions, one engine per process.

A forked worker process must never reuse a connection its parent opened: the
two would talk over one socket. :func:`get_engine` notices a new process id
and builds a fresh engine, dropping the inherited pool without closing the
parent's connections.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from models.settings import Settings

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}


def _enable_sqlite_rules(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_db_engine(settings: Settings) -> Engine:
    """A new engine with the pool bounds from the settings."""
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.ensure_data_dirs()
        engine = create_engine(
            url,
            connect_args={"timeout": 30},
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
        )
        event.listen(engine, "connect", _enable_sqlite_rules)
        return engine
    return create_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_timeout=30,
    )


def get_engine(settings: Settings) -> Engine:
    """This process's engine for the configured database."""
    key = (os.getpid(), settings.resolved_database_url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            for old_key in [k for k in _engines if k[0] != key[0]]:
                # Inherited from the parent: forget its connections, never close them.
                _engines.pop(old_key).dispose(close=False)
            engine = _engines[key] = create_db_engine(settings)
        return engine


def dispose_engines(*, close: bool = True) -> None:
    """Drop every engine of this process.

    ``close=False`` is for a forked child: the connections it inherited are
    forgotten, not closed, since closing them would end the parent's sessions.
    """
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=close)
        _engines.clear()


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    factory = sessionmaker(get_engine(settings), expire_on_commit=False)
    with factory() as session, session.begin():
        yield session
