"""Fixtures for unit tests: a broker held in memory, never a server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import fakeredis
import kombu.transport.redis
import pytest


@dataclass(frozen=True)
class FakeBroker:
    """A Redis broker URL served by fakeredis, and a client to inspect it."""

    url: str
    client: fakeredis.FakeRedis


@pytest.fixture
def fake_broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBroker]:
    """Point kombu's Redis transport at fakeredis, on a server of this test alone.

    fakeredis shares one in-memory server per host and port, so every test gets
    a host name of its own; the name does not resolve, so a connection that
    escaped the patch would fail instead of reaching a real server.
    """
    monkeypatch.setattr(
        kombu.transport.redis.Channel,
        "connection_class",
        fakeredis.FakeRedisConnection,
    )
    host = f"fake-redis-{uuid.uuid4().hex}.invalid"
    client = fakeredis.FakeRedis(host=host, port=6379, db=0)
    yield FakeBroker(url=f"redis://{host}:6379/0", client=client)
    client.close()
