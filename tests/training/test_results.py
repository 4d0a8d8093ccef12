"""docs/results.md's generator: committed rows survive a fresh clone, a new run replaces its row."""

from __future__ import annotations

import json
from pathlib import Path

from sceneprint.training.results import student_rows, teacher_table


def _row(name: str, accuracy: float) -> dict[str, object]:
    cell = {"accuracy": accuracy, "ci95": 0.01, "auroc": 0.8}
    return {"name": name, "parameter_count": 1000, "macs_per_second": 1e6, "prototype_5way_5shot": cell,
            "logreg_5way_5shot": cell, "prototype_10way_5shot": cell, "logreg_10way_5shot": cell}


def test_committed_rows_are_kept_and_a_new_run_replaces_its_own(tmp_path: Path) -> None:
    committed = tmp_path / "students.json"
    committed.write_text(json.dumps([_row("a-s0", 0.8), _row("b-s0", 0.7)]))
    runs = tmp_path / "runs"
    for name, acc in (("b-s0", 0.9), ("c-s0", 0.6)):
        (runs / name).mkdir(parents=True)
        (runs / name / "eval.json").write_text(json.dumps(_row(name, acc)))
    rows = student_rows(runs, committed=committed)
    assert [(r["name"], r["prototype_5way_5shot"]["accuracy"]) for r in rows] == [
        ("a-s0", 0.8), ("b-s0", 0.9), ("c-s0", 0.6)]
    assert [r["name"] for r in student_rows(runs)] == ["b-s0", "c-s0"]


def test_a_teacher_report_missing_from_the_runs_is_read_from_the_committed_copy(tmp_path: Path) -> None:
    report = {"grid": [{"probe": "prototype", "n_way": 5, "k_shot": 5, "accuracy": 0.9, "ci95": 0.01}],
              "open_set": {"auroc": 0.85}}
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "logmel-stats.json").write_text(json.dumps(report))
    lines, reports = teacher_table(tmp_path / "missing", committed=tmp_path / "docs")
    assert list(reports) == ["logmel-stats"] and "90.0 ± 1.0" in lines[-1]
    assert teacher_table(tmp_path / "missing")[1] == {}


def test_the_headline_groups_seeds_per_method_and_size() -> None:
    from sceneprint.training.results import headline

    rows = [_row("contrastasc-60k-s0", 0.80), _row("contrastasc-60k-s1", 0.90), _row("ftkd-60k-s0", 0.70),
            _row("contrastasc-nomixstyle-110k-s0", 0.88), _row("embdistill-60k-s0", 0.99)]
    lines = headline(rows)[2:]
    assert len(lines) == 3
    assert any(line.startswith("| SupCon teacher + KD + CRD (ContrastASC) | 60k | 2 | 85.0 (80.0-90.0)")
               for line in lines)
    assert any("without Freq-MixStyle | 110k | 1 | 88.0" in line for line in lines)


def test_whitened_figures_are_a_column_where_runs_have_them() -> None:
    from sceneprint.training.results import headline, student_table

    plain, whitened = _row("contrastasc-nomixstyle-mix-110k-s0", 0.89), _row("contrastasc-nomixstyle-mix-110k-s1", 0.88)
    whitened["prototype_5way_5shot_whitened"] = {"accuracy": 0.93, "ci95": 0.01}
    (line,) = headline([plain, whitened])[2:]
    assert line.startswith("| ... and unlabelled two-clip mixes | 110k | 2 | 88.5 (88.0-89.0)")
    assert line.endswith("| 93.0 (93.0-93.0, 1 seed) |")
    table = student_table([plain, whitened])[2:]
    assert table[0].endswith("|  |") and "93.0 ± 1.0 / n/a" in table[1]
