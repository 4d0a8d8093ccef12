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


def schema(url: str) -> dict[str, object]:
    """Everything the inspector sees of a database's schema, comparable across two databases."""
    found = inspect(create_engine(url))
    return {t: {"columns": sorted((c["name"], str(c["type"]), c["nullable"]) for c in found.get_columns(t)),  # by name
                "pk": found.get_pk_constraint(t)["constrained_columns"],
                "fks": sorted((f["constrained_columns"], f["referred_table"], f.get("options", {}).get("ondelete"))
                              for f in found.get_foreign_keys(t)),
                "indexes": sorted((i["name"], i["column_names"], bool(i["unique"])) for i in found.get_indexes(t)),
                "unique": sorted((u["name"], u["column_names"]) for u in found.get_unique_constraints(t))}
            for t in sorted(found.get_table_names())}


def test_a_new_sqlite_database_is_created_at_head_with_the_schema_the_migrations_make(tmp_path: Path) -> None:
    from alembic import command

    from sceneprint.service.migrate import HEAD, create_at_head

    created, migrated = f"sqlite:///{tmp_path / 'created.db'}", f"sqlite:///{tmp_path / 'migrated.db'}"
    assert create_at_head(created)
    command.upgrade(alembic_config(migrated), "head")
    assert schema(created) == schema(migrated)
    assert current_revision(created) == HEAD
    assert not create_at_head(created)  # not empty: left alone
    command.downgrade(alembic_config(created), "base")  # and Alembic can take it from there
    assert set(inspect(create_engine(created)).get_table_names()) == {"alembic_version"}


def test_serving_a_new_database_does_not_import_alembic(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from sceneprint.service.migrate import upgrade; "
            f"upgrade('sqlite:///{tmp_path / 'new.db'}'); upgrade('sqlite:///{tmp_path / 'new.db'}'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
