"""The layers import only downwards: the core neither the service nor training; those two not each other.

``sceneprint/cli.py`` is the one module above both (each half registers its commands on it), so it is
not part of the core. The check reads every import statement, function-level ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> the import names it must never use.
LAYERS = {
    "sceneprint": ("sceneprint.service", "sceneprint.training", "sceneprint.migrations", "sceneprint.cli"),
    "service": ("sceneprint.training", "sceneprint.cli"),
    "migrations": ("sceneprint.training", "sceneprint.cli"),
    "training": ("sceneprint.service", "sceneprint.migrations", "sceneprint.cli"),
}
ABOVE_THE_CORE = {ROOT / "sceneprint" / "cli.py"}


def modules(folder: str) -> list[Path]:
    base = ROOT / folder
    # sceneprint/service, sceneprint/training and sceneprint/migrations are links to the top-level folders
    # (for type checkers); they are checked as the layers they are.
    links = {p for p in base.iterdir() if p.is_symlink()}
    return sorted(p for p in base.rglob("*.py") if not any(p.is_relative_to(link) for link in links)
                  and p not in ABOVE_THE_CORE)


def imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in {
                "import_module", "__import__"} and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value))
    return names


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_no_layer_imports_upwards_or_sideways(folder: str) -> None:
    files = modules(folder)
    assert files, folder
    forbidden = LAYERS[folder]
    violations = [f"{p.relative_to(ROOT)} imports {name}" for p in files for name in sorted(imported_names(p))
                  if name in forbidden or name.startswith(tuple(f"{x}." for x in forbidden))]
    assert violations == []


def test_default_bundle_path_lives_in_the_core() -> None:
    from sceneprint.bundle import default_bundle_path

    assert (default_bundle_path() / "manifest.json").is_file()
