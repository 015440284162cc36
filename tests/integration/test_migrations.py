"""The migrations build exactly the schema the models describe, both ways."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from models import migrate
from models.db import create_db_engine
from models.settings import Settings, load_settings
from models.tables import Base
from tests.conftest import TEST_DATABASE_URL

pytestmark = pytest.mark.integration

EXPECTED_TABLES = {
    "users",
    "api_keys",
    "templates",
    "template_tags",
    "jobs",
    "documents",
    "job_logs",
}


@pytest.fixture
def migration_pg(pg_settings: Settings) -> Settings:
    """A database of its own, so the shared test schema is left alone."""
    url = make_url(TEST_DATABASE_URL)
    name = f"{url.database}_migrations"
    admin = url.set(drivername="postgresql", database="postgres")
    with psycopg.connect(
        admin.render_as_string(hide_password=False), autocommit=True
    ) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    return load_settings(
        database_url=url.set(database=name).render_as_string(hide_password=False)
    )


@pytest.fixture
def migration_sqlite(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path)


def _drift(settings: Settings) -> list[object]:
    engine = create_db_engine(settings)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True}
            )
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _tables(settings: Settings) -> set[str]:
    engine = create_db_engine(settings)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["migration_pg", "migration_sqlite"])
def test_upgrade_downgrade_upgrade_leaves_no_drift(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """Up, down to nothing, and up again; the result matches the models exactly."""
    settings: Settings = request.getfixturevalue(backend)

    migrate.upgrade(settings)
    assert _tables(settings) == EXPECTED_TABLES
    migrate.downgrade(settings, "base")
    assert _tables(settings) == set()
    migrate.upgrade(settings)

    assert _tables(settings) == EXPECTED_TABLES
    assert _drift(settings) == []
    assert migrate.current_revision(settings) == "0001"


def test_postgres_keeps_updated_at_true_with_a_trigger(migration_pg: Settings) -> None:
    """Even an UPDATE written by hand moves updated_at on PostgreSQL."""
    migrate.upgrade(migration_pg)
    engine = create_db_engine(migration_pg)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO users (username, email, password_hash) "
                    "VALUES ('u', 'u@example.com', 'x')"
                )
            )
        with engine.begin() as connection:
            before = connection.execute(
                text("SELECT updated_at FROM users")
            ).scalar_one()
        with engine.begin() as connection:
            connection.execute(text("UPDATE users SET role = 'admin'"))
            after = connection.execute(
                text("SELECT updated_at FROM users")
            ).scalar_one()
    finally:
        engine.dispose()
    assert after > before
