"""Alembic environment: migrations run online against the URL the service passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from sceneprint.service.tables import Base

config = context.config
url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
if not url:
    raise RuntimeError("no database URL: pass config.attributes['database_url'] or sqlalchemy.url")

connectable = create_engine(url, poolclass=pool.NullPool)
with connectable.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
connectable.dispose()
