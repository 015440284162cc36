"""Fixtures shared by every test: clean settings, real services, factories.

Integration and end-to-end tests use the machine's PostgreSQL and Redis
(``ADPA_TEST_DATABASE_URL``, ``ADPA_TEST_REDIS_URL``); when either is missing
they fail with one line saying how to start it, never skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.db import dispose_engines

TEST_DATABASE_URL = os.environ.get(
    "ADPA_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/adpa_test"
)
TEST_REDIS_URL = os.environ.get("ADPA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PROJECT_ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.services"]


@pytest.fixture(autouse=True)
def _isolated_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[None]:
    """No ADPA_ variable or .env file of the developer's leaks into a test."""
    for name in list(os.environ):
        if name.startswith("ADPA_") and not name.startswith("ADPA_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield
    dispose_engines()
