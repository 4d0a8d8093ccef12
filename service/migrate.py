"""Alembic, driven from code: the service and ``sceneprint migrate`` upgrade the database the same way."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import sceneprint.migrations


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(sceneprint.migrations.__file__).parent))
    # Passed as an attribute, not a main option: ConfigParser interpolation would mangle '%' in URLs.
    config.attributes["database_url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
