"""The Redis transport workers consume with: an entry that is no message is dropped.

kombu decodes each entry it pops from a queue as a JSON envelope; an entry
that is not one (pushed by hand, or by a foreign client) raises out of the
consumer and stops the whole worker. Here it is logged and dropped: it is
already off the queue, and no retry could make it readable.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from kombu.transport import redis
from kombu.transport.virtual import Message as VirtualMessage

logger = structlog.get_logger(__name__)


class NotAMessage(ValueError):
    """A queue entry that decodes as JSON but not as a message envelope."""


class Message(VirtualMessage):
    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise NotAMessage(f"{type(exc).__name__}: {exc}") from exc


class Channel(redis.Channel):
    Message = Message

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))  # type: ignore[misc]
        except (json.JSONDecodeError, UnicodeDecodeError, NotAMessage) as exc:
            logger.warning(
                "message_dropped",
                reason="a queue entry that is not a message",
                error=str(exc)[:200],
            )
            return True


class Transport(redis.Transport):
    Channel = Channel
