"""The service's commands (``serve``, ``migrate``, ``keys``), registered on the ``sceneprint`` CLI from above.

Heavy imports happen inside the commands, so that ``sceneprint --help`` and the training commands
never load the web stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from sceneprint.service.settings import Settings

DataDir = Annotated[Path | None, typer.Option(help="Data directory (database, clip store). "
                                                   "Default: $SCENEPRINT_DATA_DIR or ./data")]


def _settings(data_dir: Path | None, **overrides: Any) -> Settings:
    """Settings from the environment, with the command line's options (those given) on top."""
    from pydantic import ValidationError

    from sceneprint.service.settings import Settings

    given = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        given["data_dir"] = data_dir
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise typer.BadParameter("; ".join(str(e["msg"]) for e in exc.errors())) from None


def _sessions(settings: Settings) -> sessionmaker[Session]:
    """Sessions on the settings' database, migrated to the newest schema first."""
    from sceneprint.service.db import make_engine, make_session_factory
    from sceneprint.service.migrate import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    return make_session_factory(make_engine(settings.resolved_database_url, busy_timeout_s=settings.db_busy_timeout_s))


def serve(
    host: Annotated[str, typer.Option(help="Interface to bind (a non-loopback one needs an API key, or "
                                           "--allow-open).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    data_dir: DataDir = None,
    model: Annotated[Path | None, typer.Option(help="Encoder bundle directory (default: the bundled model).")] = None,
    allow_open: Annotated[bool, typer.Option("--allow-open", help="Serve without API keys on a non-loopback "
                                                                  "address.")] = False,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run the HTTP service (migrates the database first)."""
    from sceneprint.manifest import BundleError
    from sceneprint.runtime import read_servable_manifest
    from sceneprint.service import repository as repo
    from sceneprint.service.app import create_app
    from sceneprint.service.connections import make_server, raise_open_file_limit
    from sceneprint.service.deps import is_loopback
    from sceneprint.service.logs import configure_logging

    settings = _settings(data_dir, model_path=model, allow_open=allow_open or None)
    configure_logging(settings.log_format, log_level)
    with _sessions(settings)() as session:
        keys = repo.active_keys(session)
    if not keys and not settings.allow_open and not is_loopback(host):
        typer.echo(f"refusing to serve on {host} with no API key: anyone who can reach it could delete every "
                   "scene. Create a key (`sceneprint keys create --name NAME --scope admin`), bind to 127.0.0.1, "
                   "or pass --allow-open.", err=True)
        raise typer.Exit(2)
    try:
        read_servable_manifest(settings.model_path)
    except BundleError as exc:
        typer.echo(f"cannot serve: {exc}", err=True)
        raise typer.Exit(2) from None
    raise_open_file_limit(settings.max_connections)
    make_server(create_app(settings), settings, host=host, port=port, log_level=log_level).run()


def migrate(data_dir: DataDir = None) -> None:
    """Upgrade the database to the newest schema."""
    from sceneprint.service.migrate import current_revision, upgrade

    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url
    upgrade(url)
    typer.echo(f"database at revision {current_revision(url)}: {url}")


def keys_create(
    name: Annotated[str, typer.Option(help="A name for the key (1-64 of a-z, 0-9, '-', '_'), e.g. who holds it.")],
    scope: Annotated[str, typer.Option(help="classify (classify and read), enroll (also enroll, add clips, "
                                            "delete) or admin (everything, including keys).")],
    data_dir: DataDir = None,
) -> None:
    """Create an API key. It is printed once, on the last line; only its hash is stored."""
    from sceneprint.service.errors import SceneprintError
    from sceneprint.service.keys import Scope, create_key

    if scope not in {s.value for s in Scope}:
        raise typer.BadParameter(f"--scope must be one of {', '.join(s.value for s in Scope)}, not {scope!r}")
    try:
        created = create_key(_sessions(_settings(data_dir)), name=name, scope=Scope(scope))
    except SceneprintError as exc:
        raise typer.BadParameter(exc.detail) from None
    typer.echo(f"API key {created.name!r} (scope {created.scope}) created; it is shown this once, below. Send it "
               "as `Authorization: Bearer KEY`.")
    typer.echo(created.key)


def keys_list(data_dir: DataDir = None) -> None:
    """List the API keys (never the keys themselves)."""
    from sceneprint.service.keys import list_keys

    listed = list_keys(_sessions(_settings(data_dir)))
    if not listed:
        typer.echo("no API keys: the service runs open (loopback only unless --allow-open)")
    for k in listed:
        state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M:%S}Z" if k.revoked_at else "active"
        typer.echo(f"{k.name}\t{k.scope}\tcreated {k.created_at:%Y-%m-%d %H:%M:%S}Z\t{state}")


def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")], data_dir: DataDir = None) -> None:
    """Revoke an API key; a running service refuses it within SCENEPRINT_KEY_REFRESH_S."""
    from sceneprint.service.errors import SceneprintError
    from sceneprint.service.keys import revoke_key

    try:
        revoked = revoke_key(_sessions(_settings(data_dir)), name=name)
    except SceneprintError as exc:
        raise typer.BadParameter(exc.detail) from None
    typer.echo(f"API key {revoked.name!r} revoked")


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``migrate`` and ``keys create|list|revoke`` to the CLI."""
    app.command()(serve)
    app.command()(migrate)
    keys_app = typer.Typer(help="API keys: scopes classify, enroll, admin; stored hashed.", no_args_is_help=True)
    keys_app.command("create")(keys_create)
    keys_app.command("list")(keys_list)
    keys_app.command("revoke")(keys_revoke)
    app.add_typer(keys_app, name="keys")
