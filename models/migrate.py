"""Running Alembic from code: ``adpa db upgrade`` and the tests use this."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import migrations
from models.db import get_engine
from models.errors import SchemaOutOfDate
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
    with get_engine(settings).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    """The newest revision this version of the code ships."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config).get_current_head()


def require_current(settings: Settings) -> None:
    """Refuse to work on a database whose schema is not the one the code expects."""
    current, head = current_revision(settings), head_revision()
    if current != head:
        raise SchemaOutOfDate(current, head)
