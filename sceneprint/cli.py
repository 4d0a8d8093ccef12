"""The ``sceneprint`` command: the top of the stack, where each half of the project adds its commands.

This module is not part of the core: it is the one place that sits above both the service and the
training pipeline. The core (the rest of ``sceneprint/``) imports neither; the service registers
``serve``, ``migrate`` and ``keys`` (``sceneprint.service.commands``), training registers ``train``,
``evaluate`` and ``teacher-bundle`` (``sceneprint.training.commands``); ``manifest`` needs only the core.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sceneprint.service import commands as service_commands
from sceneprint.training import commands as training_commands

app = typer.Typer(help="Sceneprint: few-shot acoustic scene enrollment and classification.", no_args_is_help=True)


@app.command()
def manifest(bundle: Annotated[Path | None, typer.Argument(help="Bundle directory.")] = None) -> None:
    """Print a bundle's manifest after verifying and loading it."""
    from sceneprint.bundle import default_bundle_path, load_bundle

    _, m = load_bundle(bundle or default_bundle_path())
    typer.echo(json.dumps(m.to_json(), indent=2))


service_commands.register(app)
training_commands.register(app)

if __name__ == "__main__":
    app()
