"""Alembic migrations: they build the schema from an empty database, match the ORM, and go back down."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from typer.testing import CliRunner

from sceneprint.cli import app as cli
from sceneprint.service.migrate import alembic_config, current_revision, upgrade
from sceneprint.service.tables import Base


def test_migrations_build_the_schema_from_an_empty_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    upgrade(url)
    tables = set(inspect(create_engine(url)).get_table_names())
    assert {"scenes", "clips", "clip_embeddings", "prototypes", "api_keys", "served_models",
            "alembic_version"} <= tables
    assert current_revision(url) == "0005"


def test_the_migrated_schema_matches_the_orm_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    with create_engine(url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_migrations_downgrade_to_empty_and_upgrade_again(tmp_path: Path) -> None:
    from alembic import command

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    command.downgrade(alembic_config(url), "base")
    assert set(inspect(create_engine(url)).get_table_names()) == {"alembic_version"}
    upgrade(url)
    assert current_revision(url) == "0005"


def test_cli_migrate_creates_the_database_in_the_data_dir(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["migrate", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    assert "revision 0005" in result.output
    assert (tmp_path / "data" / "sceneprint.db").is_file()


def test_the_head_constant_is_the_newest_migration() -> None:
    # The service skips Alembic when the database is stamped HEAD: a new migration must move HEAD with it.
    from alembic.script import ScriptDirectory

    from sceneprint.service.migrate import HEAD

    assert ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head() == HEAD


def test_a_database_at_head_is_not_migrated_again_and_an_old_one_is(tmp_path: Path) -> None:
    from alembic import command

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    command.downgrade(alembic_config(url), "0004")
    assert current_revision(url) == "0004"
    upgrade(url)  # behind head: migrated
    assert current_revision(url) == "0005"
    upgrade(url)  # at head: a no-op
    assert current_revision(url) == "0005"
