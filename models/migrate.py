"""Running Alembic from code: ``adpa db upgrade`` and the tests use this."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from models.settings import Settings

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


def alembic_config(settings: Settings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Percent signs in a URL (escaped passwords) must survive configparser.
    config.set_main_option(
        "sqlalchemy.url", settings.resolved_database_url.replace("%", "%%")
    )
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    settings.ensure_data_dirs()
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: Settings, revision: str) -> None:
    command.downgrade(alembic_config(settings), revision)


def current_revision(settings: Settings) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from models.db import get_engine

    with get_engine(settings).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
