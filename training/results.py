"""Tables and plots of docs/results.md, made from the evaluation JSONs (never typed by hand).

Teacher rows come from ``sceneprint evaluate --grid`` reports; student rows from the ablation
runner's ``eval.json`` files. The generated part of docs/results.md sits between two markers, so
the prose around it is kept; the JSONs are copied to docs/results/ so every figure has its source.

    python -m sceneprint.training.results --eval-dir runs/eval --ablation-dir runs/ablation
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- generated:begin -->", "<!-- generated:end -->"
TEACHERS = [  # (file stem, row label)
    ("logmel-stats", "log-mel statistics (no network)"),
    ("yamnet-frozen-embedding", "YAMNet frozen, pooled 1,024-d embedding"),
    ("yamnet-frozen-scores", "YAMNet frozen, 521 AudioSet scores"),
    ("teacher-ce-bundle", "YAMNet CE-tuned (the conventional teacher)"),
    ("teacher-supcon-bundle", "YAMNet SupCon-tuned (0.25 CE + 0.75 SupCon)"),
    # Beyond the paper: the same embeddings whitened within the training classes (``evaluate --whiten``).
    ("yamnet-frozen-embedding-whitened", "YAMNet frozen, 1,024-d, within-class whitened"),
    ("teacher-supcon-bundle-whitened", "YAMNet SupCon-tuned, within-class whitened"),
]
SHOTS = (1, 5, 20)


def _pct(cell: dict[str, Any] | None) -> str:
    if not cell or "accuracy" not in cell:
        return "n/a"
    return f"{100 * cell['accuracy']:.1f} ± {100 * cell['ci95']:.1f}"


def teacher_table(eval_dir: Path, committed: Path | None = None) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Rows: reference embeddings and teachers; columns: 5-way and 10-way, K = 1/5/20, both probes, AUROC.

    A report missing from ``eval_dir`` (a fresh clone has no runs) is read from ``committed``, the copy
    an earlier run left in docs/results/.
    """
    header = ["embedding"] + [f"{n}-way {k}-shot {p}" for n in (5, 10) for k in SHOTS for p in ("proto", "logreg")]
    lines = ["| " + " | ".join([*header, "open-set AUROC"]) + " |", "|" + "---|" * (len(header) + 1)]
    reports: dict[str, dict[str, Any]] = {}
    for stem, label in TEACHERS:
        path = eval_dir / f"{stem}.json"
        if not path.is_file() and committed is not None:
            path = committed / f"{stem}.json"
        if not path.is_file():
            continue
        report = reports[stem] = json.loads(path.read_text())
        grid = {(r["probe"], r["n_way"], r["k_shot"]): r for r in report.get("grid", [])}
        cells = [_pct(grid.get((p, n, k))) for n in (5, 10) for k in SHOTS for p in ("prototype", "logreg")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {report['open_set']['auroc']:.3f} |")
    return lines, reports


def student_rows(ablation_dir: Path, committed: Path | None = None) -> list[dict[str, Any]]:
    """Every run's evaluation, by name: the rows committed in ``committed`` (docs/results/students.json), each
    replaced by the run of the same name in ``ablation_dir`` where that run exists, plus the new runs. Runs
    and their checkpoints are never committed, so a fresh clone adds its runs to the recorded ones."""
    rows: dict[str, dict[str, Any]] = {}
    if committed is not None and committed.is_file():
        rows = {r["name"]: r for r in json.loads(committed.read_text())}
    for p in sorted(ablation_dir.glob("*/eval.json")):
        row = json.loads(p.read_text())
        rows[row["name"]] = row
    return [rows[name] for name in sorted(rows)]


def student_table(rows: list[dict[str, Any]]) -> list[str]:
    """Every run; the whitened columns (``ablation --whiten``, beyond the paper) where a run has them."""
    lines = ["| run | params | M MACs/s | 5-way 5-shot proto | 5-way 5-shot logreg | 10-way 5-shot proto | "
             "10-way 5-shot logreg | open-set AUROC | 5-way / 10-way proto, whitened |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        whitened = (f"{_pct(r['prototype_5way_5shot_whitened'])} / {_pct(r.get('prototype_10way_5shot_whitened'))}"
                    if "prototype_5way_5shot_whitened" in r else "")
        lines.append(f"| {r['name']} | {r['parameter_count']:,} | {r['macs_per_second'] / 1e6:.1f} | "
                     f"{_pct(r['prototype_5way_5shot'])} | {_pct(r['logreg_5way_5shot'])} | "
                     f"{_pct(r['prototype_10way_5shot'])} | {_pct(r['logreg_10way_5shot'])} | "
                     f"{r['prototype_5way_5shot']['auroc']:.3f} | {whitened} |")
    return lines


def headline(rows: list[dict[str, Any]]) -> list[str]:
    """Mean and spread over seeds of the two methods of the paper's comparison (and ContrastASC without
    Freq-MixStyle), per size."""
    names = {"contrastasc": "SupCon teacher + KD + CRD (ContrastASC)", "ftkd": "CE teacher + KD (FT+KD)",
             "contrastasc-nomixstyle": "ContrastASC without Freq-MixStyle",
             "contrastasc-nomixstyle-mix": "... and unlabelled two-clip mixes",
             "contrastasc-nomixstyle-mix-wemb": "... and the whitened teacher embedding regressed"}
    pattern = re.compile(rf"({'|'.join(map(re.escape, names))})-(\d+k)-s(\d+)")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        m = pattern.fullmatch(r["name"])
        if m:
            groups.setdefault((m.group(1), m.group(2)), []).append(r)
    lines = ["| method | size | seeds | 5-way 5-shot proto, mean (min-max) | 5-way 5-shot logreg | "
             "10-way 5-shot proto | 5-way 5-shot proto, whitened |", "|---|---|---|---|---|---|---|"]
    for method, size in sorted(groups, key=lambda k: (k[1], k[0])):
        runs = groups[(method, size)]

        def agg(col: str, runs: list[dict[str, Any]] = runs) -> str:
            values = [100 * r[col]["accuracy"] for r in runs if col in r]
            if not values:
                return ""
            seeds = "" if len(values) == len(runs) else f", {len(values)} seed{'s' * (len(values) > 1)}"
            return f"{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f}{seeds})"

        lines.append(f"| {names[method]} | {size} | {len(runs)} | {agg('prototype_5way_5shot')} | "
                     f"{agg('logreg_5way_5shot')} | {agg('prototype_10way_5shot')} | "
                     f"{agg('prototype_5way_5shot_whitened')} |")
    return lines


def plot_size(rows: list[dict[str, Any]], teachers: dict[str, dict[str, Any]], out: Path) -> None:
    """Held-out 5-way 5-shot (prototype) against parameters and MACs, the teachers as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"contrastasc": ("C0", "ContrastASC (SupCon teacher + KD + CRD)"), "ftkd": ("C1", "FT+KD (CE teacher)"),
              "student": ("C2", "student alone (CE)")}
    for ax, key, xlabel in ((axes[0], "parameter_count", "parameters"), (axes[1], "macs_per_second",
                                                                         "MACs per second of audio")):
        seen = set()
        for r in rows:
            method = r["name"].split("-")[0]
            color, label = styles.get(method, ("C7", "other ablations"))
            ax.scatter(r[key], 100 * r["prototype_5way_5shot"]["accuracy"], color=color,
                       label=None if label in seen else label, alpha=0.8)
            seen.add(label)
        for stem, ls in (("yamnet-frozen-embedding", ":"), ("teacher-supcon-bundle", "--")):
            if stem in teachers:
                five = next((c for c in teachers[stem].get("grid", []) if c.get("n_way") == 5 and c.get("k_shot") == 5
                             and c.get("probe") == "prototype"), None)
                if five:
                    ax.axhline(100 * five["accuracy"], color="k", ls=ls, lw=1,
                               label=f"{dict(TEACHERS)[stem].split(',')[0]} (3.7M params)")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out 5-way 5-shot accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("sceneprint-dev held-out classes, prototype rule, 500 episodes")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_teachers(teachers: dict[str, dict[str, Any]], out: Path) -> None:
    """Accuracy against shots for each reference embedding and teacher (5-way, both probes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, probe in zip(axes, ("prototype", "logreg"), strict=True):
        for i, (stem, label) in enumerate(TEACHERS):
            if stem not in teachers:
                continue
            cells = sorted((c["k_shot"], c["accuracy"]) for c in teachers[stem].get("grid", [])
                           if c.get("probe") == probe and c.get("n_way") == 5 and "accuracy" in c)
            ax.plot([k for k, _ in cells], [100 * a for _, a in cells], marker="o", color=f"C{i}", label=label)
        ax.set_xscale("log")
        ax.set_xticks([1, 5, 10, 20], ["1", "5", "10", "20"])
        ax.set_xlabel("shots (K)")
        ax.set_title(f"5-way, {probe} probe")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def embedding_map(bundles: list[Path], data: Path, out: Path, split: str = "fewshot-v1") -> None:
    """A 2-D UMAP of each bundle's embeddings of the held-out clips (classes it never saw), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import umap

    from sceneprint.bundle import read_manifest
    from sceneprint.training.evaluate import embed_dataset, select_clips

    clips = select_clips(data, split=split)
    classes = sorted({c.label for c in clips})
    colour = np.array([classes.index(c.label) for c in clips])
    fig, axes = plt.subplots(1, len(bundles), figsize=(5.2 * len(bundles), 5), squeeze=False)
    for ax, bundle in zip(axes[0], bundles, strict=True):
        from sceneprint.bundle import load_bundle

        encoder, manifest = load_bundle(bundle)
        unit, _ = embed_dataset(encoder, clips)
        xy = umap.UMAP(n_neighbors=15, min_dist=0.1, metric="cosine", random_state=0).fit_transform(unit)
        for i, name in enumerate(classes):
            ax.scatter(*xy[colour == i].T, s=8, color=plt.cm.tab10(i), label=name)
        ax.set_title(f"{read_manifest(bundle).model_version}\n{manifest.parameter_count:,} parameters", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=7, markerscale=2, loc="best")
    fig.suptitle("Held-out classes (never trained on): UMAP of clip embeddings (cosine)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-dir", type=Path, default=Path("runs/eval"))
    parser.add_argument("--ablation-dir", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--map", type=Path, nargs="*", default=[], help="bundles for the embedding map")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/sceneprint-dev"))
    args = parser.parse_args(argv)
    if args.map:
        embedding_map(args.map, args.data, args.docs / "embedding-map.png")
    sources = args.docs / "results"
    sources.mkdir(parents=True, exist_ok=True)
    t_lines, teachers = teacher_table(args.eval_dir, committed=sources)
    rows = student_rows(args.ablation_dir, committed=sources / "students.json")
    for stem in teachers:
        if (args.eval_dir / f"{stem}.json").is_file():
            shutil.copy(args.eval_dir / f"{stem}.json", sources / f"{stem}.json")
    (sources / "students.json").write_text(json.dumps(rows, indent=2) + "\n")
    if rows:
        plot_size(rows, teachers, args.docs / "results-size.png")
    if teachers:
        plot_teachers(teachers, args.docs / "results-teachers.png")
    generated = "\n".join([
        BEGIN, "", "### Teachers and reference embeddings (dev held-out classes, 500 episodes, 95% CI)", "",
        *t_lines, "", "![accuracy against shots](results-teachers.png)", "",
        "### Students: the paper's comparison (headline)", "", *headline(rows), "",
        "### Every student run", "", *student_table(rows), "", "![accuracy against size](results-size.png)", "",
        "Sources: `docs/results/*.json` (copied from the runs by `python -m sceneprint.training.results`).", "", END])
    doc = args.docs / "results.md"
    text = doc.read_text() if doc.is_file() else f"# Results\n\n{BEGIN}\n{END}\n"
    start, end = text.index(BEGIN), text.index(END) + len(END)
    doc.write_text(text[:start] + generated + text[end:])
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
