"""Flower beside the workers: never open, usable with the configured credentials."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from models.settings import Settings
from tests.faults import free_port
from tests.services import WorkerProcess, worker_environment

pytestmark = pytest.mark.e2e

PASSWORD = "s3cret-for-tests"


def _get(url: str, password: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)  # noqa: S310 - a local http URL
    if password is not None:
        token = base64.b64encode(f"ops:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""
    except urllib.error.URLError:
        return 0, b""  # not listening yet


@pytest.fixture
def flower(pg_settings: Settings, celery_worker: WorkerProcess) -> Iterator[str]:
    port = free_port()
    env = worker_environment(pg_settings)
    env.update(ADPA_FLOWER_USER="ops", ADPA_FLOWER_PASSWORD=PASSWORD)
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from producer.cli import main; main()",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while _get(f"{base}/healthcheck")[0] != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("flower did not start")
        time.sleep(0.2)
    yield base
    process.terminate()
    process.wait(timeout=20)


def test_flower_refuses_to_start_without_a_password(pg_settings: Settings) -> None:
    """With no ADPA_FLOWER_PASSWORD, adpa flower stops with one clear line."""
    result = subprocess.run(
        [sys.executable, "-c", "from producer.cli import main; main()", "flower"],
        env=worker_environment(pg_settings),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "Flower never runs open: set ADPA_FLOWER_PASSWORD" in result.stderr


def test_flower_asks_for_credentials_and_shows_the_workers(flower: str) -> None:
    """Pages and API answer 401 without credentials and list workers with them."""
    assert _get(f"{flower}/")[0] == 401
    assert _get(f"{flower}/api/workers", "wrong")[0] == 401

    deadline = time.monotonic() + 30
    while True:
        status, body = _get(f"{flower}/api/workers?refresh=1", PASSWORD)
        assert status == 200
        workers = json.loads(body or b"{}")
        if workers or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert any(name.startswith("test-") for name in workers)
