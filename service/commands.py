"""The service's commands (``serve``, ``migrate``, ``keys``, the model registry's ``publish``, ``rollback`` and
``models``, and ``scenes export``), registered on the ``sceneprint`` CLI from above. None needs torch.

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
RegistryDir = Annotated[Path | None, typer.Option(help="Model registry directory. Default: $SCENEPRINT_REGISTRY, "
                                                       "else <data dir>/models")]


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
    model: Annotated[Path | None, typer.Option(help="One encoder bundle directory, served without a registry (no "
                                                    "reloads).")] = None,
    registry: Annotated[Path | None, typer.Option(help="Serve the current version of this model registry and "
                                                       "follow it (default: $SCENEPRINT_REGISTRY, else <data "
                                                       "dir>/models, seeded with the bundled model).")] = None,
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

    settings = _settings(data_dir, model_path=model, registry=registry, allow_open=allow_open or None)
    configure_logging(settings.log_format, log_level)
    with _sessions(settings)() as session:
        keys = repo.active_keys(session)
    if not keys and not settings.allow_open and not is_loopback(host):
        typer.echo(f"refusing to serve on {host} with no API key: anyone who can reach it could delete every "
                   "scene. Create a key (`sceneprint keys create --name NAME --scope admin`), bind to 127.0.0.1, "
                   "or pass --allow-open.", err=True)
        raise typer.Exit(2)
    try:
        if settings.model_path is not None:
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


def _registry(registry: Path | None, data_dir: Path | None) -> Path:
    """The registry directory: the one given, else the service's (``$SCENEPRINT_REGISTRY`` or <data dir>/models)."""
    if registry is not None:
        return registry
    settings = _settings(data_dir)
    return settings.registry if settings.registry is not None else settings.data_dir / "models"


def publish(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (with its ONNX graph).")],
    registry: RegistryDir = None,
    version: Annotated[str | None, typer.Option(help="The version's name (default: v<N>, one above the highest).")]
    = None,
    min_accuracy: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Refuse a bundle whose held-out "
                                                                              "5-way 5-shot accuracy is below this "
                                                                              "(where it carries one).")] = None,
    activate: Annotated[bool, typer.Option(help="Make it the current version (services following the registry "
                                                "reload it).")] = True,
    data_dir: DataDir = None,
) -> None:
    """Verify a bundle and publish it as a new registry version (and, by default, the current one)."""
    from sceneprint.manifest import BundleError
    from sceneprint.registry import Registry, RegistryError

    try:
        published = Registry(_registry(registry, data_dir)).publish(bundle, version=version,
                                                                    min_accuracy=min_accuracy, activate=activate)
    except (BundleError, RegistryError) as exc:
        typer.echo(f"not published: {exc}", err=True)
        raise typer.Exit(1) from None
    figure = f", held-out accuracy {published.accuracy:.4f}" if published.accuracy is not None else ""
    state = "now the current version" if published.current else "stored (not current)"
    typer.echo(f"published {bundle} as version {published.version} ({published.key}{figure}); {state}")


def rollback(
    registry: RegistryDir = None,
    to: Annotated[str | None, typer.Option(help="The version to make current (default: the one published before "
                                                "the current one).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Make an earlier registry version current again (verified first); services following the registry reload it."""
    from sceneprint.manifest import BundleError
    from sceneprint.registry import Registry, RegistryError

    try:
        chosen = Registry(_registry(registry, data_dir)).rollback(to)
    except (BundleError, RegistryError) as exc:
        typer.echo(f"not rolled back: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"version {chosen.version} ({chosen.key}) is current again")


def models(
    registry: RegistryDir = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    data_dir: DataDir = None,
) -> None:
    """List the registry's versions, oldest first, with their figures and which one is current."""
    import json
    from dataclasses import asdict

    from sceneprint.registry import Registry

    versions = Registry(_registry(registry, data_dir)).versions()
    if json_out:
        typer.echo(json.dumps([{**asdict(v), "path": str(v.path)} for v in versions], indent=2))
        return
    if not versions:
        typer.echo("no version published yet")
    for v in versions:
        figure = f"{v.accuracy:.4f}" if v.accuracy is not None else "-"
        typer.echo(f"{'*' if v.current else ' '} {v.version}\t{v.key}\taccuracy {figure}\tpublished {v.published_at}")


def scenes_export(
    out: Annotated[Path, typer.Option(help="Folder to write: audio/<scene>/*.wav and meta.csv.")],
    data_dir: DataDir = None,
    sample_rate: Annotated[int, typer.Option(help="Sample rate of the written clips.")] = 32_000,
    segment_seconds: Annotated[float, typer.Option(help="Length of each written clip: a stored clip is cut into "
                                                        "segments of this length (a shorter one is repeated to it)")]
    = 5.0,
) -> None:
    """Write the enrolled scenes' kept audio as a labelled folder data set (meta.csv: one class per scene, one
    source per stored clip), for `sceneprint retrain --extra-classes`."""
    from sceneprint.service.export import export_scenes

    settings = _settings(data_dir)
    summary = export_scenes(_sessions(settings), settings.clip_dir, out, sample_rate=sample_rate,
                            segment_seconds=segment_seconds)
    typer.echo(f"{out}: {summary['clips']} clips of {summary['scenes']} scenes (from {summary['stored_clips']} "
               "stored clips); meta.csv lists them")


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``migrate``, ``keys create|list|revoke``, ``publish``, ``rollback``, ``models`` and
    ``scenes export`` to the CLI."""
    app.command()(serve)
    app.command()(migrate)
    keys_app = typer.Typer(help="API keys: scopes classify, enroll, admin; stored hashed.", no_args_is_help=True)
    keys_app.command("create")(keys_create)
    keys_app.command("list")(keys_list)
    keys_app.command("revoke")(keys_revoke)
    app.add_typer(keys_app, name="keys")
    app.command()(publish)
    app.command()(rollback)
    app.command()(models)
    scenes_app = typer.Typer(help="The enrolled scenes.", no_args_is_help=True)
    scenes_app.command("export")(scenes_export)
    app.add_typer(scenes_app, name="scenes")
