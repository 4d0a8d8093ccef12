"""The ablation runner's command line, as README.md and docs/results.md write it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from sceneprint.training import ablation

ROOT = Path(__file__).resolve().parents[2]


def test_overrides_after_the_run_names_are_overrides_not_runs() -> None:
    args = ablation.parse_args(["--whiten", "--runs", "contrastasc-60k-s0", "ftkd-60k-s0", "optim.epochs=60"])
    assert args.runs == ["contrastasc-60k-s0", "ftkd-60k-s0"] and args.overrides == ["optim.epochs=60"]
    command = ablation.command("ftkd-60k-s0", Path("out"), args.overrides)
    # the override reaches the training command, after the run's own settings (so it wins)
    assert command[command.index("seed=0"):].count("optim.epochs=60") == 1
    assert command.index("optim.epochs=60") > command.index("seed=0")


def documented_commands() -> list[list[str]]:
    commands = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "results.md"):
        text = doc.read_text().replace("\\\n", " ")
        for line in re.findall(r"-m sceneprint\.training\.ablation (.*)", text):
            commands.append([a for a in shlex.split(line.split("#")[0]) if a != "..."])
    return commands


@pytest.mark.parametrize("argv", documented_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_documented_ablation_command_names_known_runs(argv: list[str]) -> None:
    args = ablation.parse_args(argv)
    assert set(args.runs) <= set(ablation.RUNS)
    assert all(re.fullmatch(r"[a-z_.]+=\S+", o) for o in args.overrides)


def test_the_documents_show_the_runner_with_overrides() -> None:
    assert any("optim.epochs=60" in argv for argv in documented_commands())
