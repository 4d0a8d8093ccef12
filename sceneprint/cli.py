"""The ``sceneprint`` command: serve the API, migrate the database, inspect a bundle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from sceneprint.service.settings import Settings

app = typer.Typer(help="Sceneprint: few-shot acoustic scene enrollment and classification.", no_args_is_help=True)

DataDir = Annotated[Path | None, typer.Option(help="Data directory (database, clip store). "
                                                   "Default: $SCENEPRINT_DATA_DIR or ./data")]


def _settings(data_dir: Path | None, model: Path | None = None) -> Settings:
    """Settings from the environment, with the command line's options on top."""
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if model is not None:
        overrides["model_path"] = model
    return Settings(**overrides)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    data_dir: DataDir = None,
    model: Annotated[Path | None, typer.Option(help="Encoder bundle directory (default: the bundled model).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the HTTP service (migrates the database first)."""
    import uvicorn

    from sceneprint.service.app import create_app

    settings = _settings(data_dir, model)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level,
                timeout_keep_alive=5, limit_concurrency=int(os.environ.get("SCENEPRINT_LIMIT_CONCURRENCY", "256")))


@app.command()
def migrate(data_dir: DataDir = None) -> None:
    """Upgrade the database to the newest schema."""
    from sceneprint.service.migrate import current_revision, upgrade

    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url
    upgrade(url)
    typer.echo(f"database at revision {current_revision(url)}: {url}")


@app.command()
def manifest(bundle: Annotated[Path | None, typer.Argument(help="Bundle directory.")] = None) -> None:
    """Print a bundle's manifest after verifying and loading it."""
    from sceneprint.bundle import load_bundle
    from sceneprint.service.settings import default_bundle_path

    _, m = load_bundle(bundle or default_bundle_path())
    typer.echo(json.dumps(m.to_json(), indent=2))


if __name__ == "__main__":
    app()
