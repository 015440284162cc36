"""Unit tests of the producer: input checks, JSON reading, sending to the broker."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import structlog
from celery import Celery
from kombu.exceptions import OperationalError

from models.errors import InvalidInput
from models.settings import load_settings
from producer import broker
from producer.broker import TASK_RENDER, create_sender, send_jobs
from producer.cli import _read_input
from producer.client import validate_input
from tests.unit.conftest import FakeBroker

# -- validate_input ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ([{"a": 1}], "an array"),
        ("text", "a string"),
        (3, "a number"),
        (2.5, "a number"),
        (True, "a boolean"),
        (None, "null"),
    ],
)
def test_validate_input_refuses_non_objects_naming_what_it_got(
    value: Any, kind: str
) -> None:
    """A job input that is not a JSON object is refused, naming its JSON kind."""
    with pytest.raises(InvalidInput) as caught:
        validate_input(value, 10_000)

    assert str(caught.value) == f"job input must be a JSON object, not {kind}"


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_validate_input_refuses_nan_and_infinity(number: float) -> None:
    """NaN and infinities, which JSON cannot hold, are refused as invalid JSON."""
    with pytest.raises(InvalidInput) as caught:
        validate_input({"score": number}, 10_000)

    assert "not valid JSON" in str(caught.value)
    assert "float" in str(caught.value)


def test_validate_input_refuses_values_json_cannot_hold_naming_the_type() -> None:
    """A value with no JSON form is refused, naming its Python type."""
    with pytest.raises(InvalidInput) as caught:
        validate_input({"tags": {"a", "b"}}, 10_000)

    assert "not valid JSON" in str(caught.value)
    assert "set" in str(caught.value)


def test_validate_input_refuses_oversized_input_naming_both_sizes() -> None:
    """An input over max_bytes is refused with its size and the limit."""
    data = {"notes": "x" * 2000}
    size = len(json.dumps(data).encode())

    with pytest.raises(InvalidInput) as caught:
        validate_input(data, 1024)

    assert str(caught.value) == f"job input is {size} bytes; the limit is 1024"


def test_validate_input_accepts_input_exactly_at_the_limit() -> None:
    """An input whose JSON is exactly max_bytes long is accepted."""
    data = {"notes": "x" * 100}
    size = len(json.dumps(data).encode())

    assert validate_input(data, size) == data


def test_validate_input_accepts_an_object_and_returns_a_dict_copy() -> None:
    """A JSON object is accepted and returned as a new plain dict."""
    data = {"title": "Atlas", "items": [1, 2], "owner": None, "ok": True}

    result = validate_input(data, 10_000)

    assert result == data
    assert result is not data


def test_validate_input_accepts_a_mapping_that_is_not_a_dict() -> None:
    """A read-only Mapping passes the object check and is returned as a dict."""
    assert validate_input(MappingProxyType({"a": 1}), 10_000) == {"a": 1}


# -- _read_input (the CLI's --input) ----------------------------------------


def test_read_input_parses_json_of_any_kind() -> None:
    """_read_input returns the parsed JSON; its kind is checked later."""
    assert _read_input(io.StringIO('{"a": [1, 2]}')) == {"a": [1, 2]}
    assert _read_input(io.StringIO("[1]")) == [1]


def test_read_input_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    """Malformed JSON raises InvalidInput naming the file, line and column."""
    source = tmp_path / "input.json"
    source.write_text('{\n  "a": 1,\n}\n', encoding="utf-8")

    with source.open(encoding="utf-8") as handle, pytest.raises(InvalidInput) as caught:
        _read_input(handle)

    message = str(caught.value)
    assert message.startswith(f"{source} is not valid JSON: ")
    assert message.endswith("at line 3 column 1")


def test_read_input_from_a_stream_without_a_name_says_input() -> None:
    """Malformed JSON from a nameless stream is reported as 'input'."""
    with pytest.raises(InvalidInput) as caught:
        _read_input(io.StringIO("not json"))

    assert str(caught.value).startswith("input is not valid JSON: ")
    assert "line 1 column 1" in str(caught.value)


# -- send_jobs --------------------------------------------------------------


@pytest.fixture
def fake_sender(fake_broker: FakeBroker, tmp_path: Path) -> Iterator[Celery]:
    """A producer app whose broker is the test's fakeredis server."""
    app = create_sender(load_settings(data_dir=tmp_path, broker_url=fake_broker.url))
    yield app
    app.close()


def _queued_messages(fake_broker: FakeBroker, queue: str) -> list[dict[str, Any]]:
    """The kombu messages waiting in the Redis list of ``queue``, oldest first."""
    raw = fake_broker.client.lrange(queue, 0, -1)
    return [json.loads(item) for item in reversed(raw)]


def _body_args(message: dict[str, Any]) -> list[Any]:
    assert message["properties"]["body_encoding"] == "base64"
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return list(args)


def test_send_jobs_puts_one_message_per_job_on_the_named_queue(
    fake_sender: Celery, fake_broker: FakeBroker
) -> None:
    """Each job becomes one render_document message with its id, on the queue."""
    sent = send_jobs(fake_sender, [11, 12, 13], "adpa.bulk")

    assert sent == [11, 12, 13]
    messages = _queued_messages(fake_broker, "adpa.bulk")
    assert [m["headers"]["task"] for m in messages] == [TASK_RENDER] * 3
    assert TASK_RENDER == "adpa.render_document"
    assert [_body_args(m) for m in messages] == [[11], [12], [13]]
    assert [m["properties"]["delivery_info"]["routing_key"] for m in messages] == [
        "adpa.bulk"
    ] * 3
    assert len({m["headers"]["id"] for m in messages}) == 3
    assert fake_broker.client.llen("adpa.default") == 0


def test_send_jobs_with_no_jobs_sends_nothing(
    fake_sender: Celery, fake_broker: FakeBroker
) -> None:
    """An empty list of jobs sends no message and returns no id."""
    assert send_jobs(fake_sender, [], "adpa.bulk") == []
    assert fake_broker.client.llen("adpa.bulk") == 0


def test_send_jobs_returns_only_the_ids_sent_before_a_failure(
    fake_sender: Celery, fake_broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the broker fails midway, only the ids already sent are returned."""
    real_send = fake_sender.send_task

    def failing_on_third(name: str, **options: Any) -> Any:
        if options["args"] == [3]:
            raise OperationalError("connection lost")
        return real_send(name, **options)

    monkeypatch.setattr(fake_sender, "send_task", failing_on_third)

    assert send_jobs(fake_sender, [1, 2, 3, 4], "adpa.default") == [1, 2]
    assert [_body_args(m) for m in _queued_messages(fake_broker, "adpa.default")] == [
        [1],
        [2],
    ]


def test_send_jobs_with_an_unreachable_broker_returns_no_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker nobody listens on makes send_jobs return [] and log, not raise."""
    # Same number of retries as in production, with short waits between them.
    monkeypatch.setitem(broker._RETRY_POLICY, "interval_start", 0.01)
    monkeypatch.setitem(broker._RETRY_POLICY, "interval_step", 0.01)
    monkeypatch.setitem(broker._RETRY_POLICY, "interval_max", 0.01)
    app = create_sender(
        load_settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0")
    )

    with structlog.testing.capture_logs() as logs:
        monkeypatch.setattr(broker, "logger", structlog.get_logger("producer.broker"))
        sent = send_jobs(app, [5, 6], "adpa.default")
    app.close()

    assert sent == []
    assert [(e["event"], e["log_level"], e["unsent"]) for e in logs] == [
        ("job_enqueue_deferred", "warning", 2)
    ]
    assert "127.0.0.1:1" in logs[0]["reason"]
