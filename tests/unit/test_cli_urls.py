"""URLs the CLI and the demo print show no password."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

import producer.demo
from models.settings import Settings
from producer.demo import printable_broker_url, printable_database_url, run_demo


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+psycopg://postgres:s3cretpw@db.example:5432/adpa",
            "postgresql+psycopg://postgres:***@db.example:5432/adpa",
        ),
        (
            "postgresql+psycopg://ann:p%40ss%3Aw0rd@db/adpa",
            "postgresql+psycopg://ann:***@db/adpa",
        ),
        (
            "postgresql+psycopg://ann@db/adpa?password=s3cretpw&sslmode=require",
            "postgresql+psycopg://ann@db/adpa?password=***&sslmode=require",
        ),
        (
            "postgresql+psycopg://ann@db/adpa?sslmode=require",
            "postgresql+psycopg://ann@db/adpa?sslmode=require",
        ),
        (
            "sqlite:////srv/adpa data/adpa.sqlite3",
            "sqlite:////srv/adpa data/adpa.sqlite3",
        ),
    ],
    ids=["password", "encoded-password", "query-password", "no-password", "sqlite"],
)
def test_a_database_url_is_printed_without_its_password(url: str, shown: str) -> None:
    assert printable_database_url(url) == shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cretpw@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://ann:s3cretpw@redis:6380/1", "rediss://ann:***@redis:6380/1"),
        (
            "redis://redis:6379/0?password=s3cretpw&ssl_cert_reqs=none",
            "redis://redis:6379/0?password=***&ssl_cert_reqs=none",
        ),
        (
            "sentinel://:s3cretpw@s1:26379;sentinel://:s3cretpw@s2:26379",
            "sentinel://:***@s1:26379;sentinel://:***@s2:26379",
        ),
        ("amqp://guest:s3cretpw@rabbit//", "amqp://guest:***@rabbit//"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("filesystem://", "filesystem://"),
        ("redis://:s3cretpw@[::1/0", "***"),
    ],
    ids=[
        "redis",
        "user-and-password",
        "query-password",
        "sentinels",
        "amqp",
        "no-password",
        "embedded",
        "unparsable",
    ],
)
def test_a_broker_url_is_printed_without_its_password(url: str, shown: str) -> None:
    assert printable_broker_url(url) == shown


class _Stop(Exception):
    pass


def test_the_demo_prints_its_database_and_broker_without_passwords(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The lines the demo starts with name the services, not their secrets."""

    def stop(_settings: Settings) -> str:
        raise _Stop

    monkeypatch.setattr(producer.demo, "_prepare", stop)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url="postgresql+psycopg://postgres:s3cretpw@127.0.0.1:1/adpa",
        broker_url="redis://:brokerpw@127.0.0.1:1/0",
    )
    output = io.StringIO()

    with pytest.raises(_Stop):
        run_demo(
            settings,
            Console(file=output, width=200),
            job_count=1,
            timeout_s=1,
            concurrency=1,
        )

    printed = output.getvalue()
    assert "s3cretpw" not in printed
    assert "brokerpw" not in printed
    assert "postgresql+psycopg://postgres:***@127.0.0.1:1/adpa" in printed
    assert "redis://:***@127.0.0.1:1/0" in printed
