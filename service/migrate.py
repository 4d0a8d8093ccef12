"""Alembic, driven from code: the service and ``sceneprint migrate`` upgrade the database the same way.

Alembic is imported only when a migration is pending: a service starting on a database that is already at
the newest revision (every start but the first after an upgrade) reads one row instead, which keeps
Alembic's import (about 0.1 s and 11 MB of resident memory) out of the serving process. A new, empty SQLite
database (a newcomer's first start) is created from the models and stamped at the newest revision in one
transaction, Alembic's own recipe for new databases; tests/service/test_migrations.py checks that the schema
this makes is the one the migrations make. PostgreSQL is always migrated by Alembic (the compose ``migrate``
service runs it once, before the replicas start).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import DBAPIError

import sceneprint.migrations

if TYPE_CHECKING:
    from alembic.config import Config

# The newest revision in migrations/versions; tests/service/test_migrations.py checks it against Alembic's
# own script directory, so a new migration without this line updated fails the suite.
HEAD = "0005"


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(sceneprint.migrations.__file__).parent))
    # Passed as an attribute, not a main option: ConfigParser interpolation would mangle '%' in URLs.
    config.attributes["database_url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (nothing to do, and no Alembic import, when already at head)."""
    if revision == "head":
        stamped = _stamped(url)
        if stamped == HEAD or (stamped is None and url.startswith("sqlite") and create_at_head(url)):
            return
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def create_at_head(url: str) -> bool:
    """Create the schema of an empty database from the models and stamp it at ``HEAD``, in one transaction;
    False (nothing done) where the database is not empty."""
    from sceneprint.service.tables import Base

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            if inspect(conn).get_table_names():
                return False
            Base.metadata.create_all(conn)
            conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                              "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"))
            conn.execute(text("INSERT INTO alembic_version (version_num) VALUES (:head)"), {"head": HEAD})
        return True
    finally:
        engine.dispose()


def _stamped(url: str) -> str | None:
    """The revision recorded in ``alembic_version`` (None: no such table yet, or no row)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one_or_none()
    except DBAPIError:  # no table: a new database
        return None
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
