"""Write a bundle's REPORT.md from its manifest, so every figure in it is the one the bundle carries.

    python -m sceneprint.training.report models/sceneprint-default
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sceneprint.bundle import read_manifest

# The reference embeddings' reports (``sceneprint evaluate --grid``, committed by ``sceneprint.training.results``).
REFERENCES = Path(__file__).resolve().parents[1] / "docs" / "results"


def _pct(result: dict[str, Any]) -> str:
    return f"{100 * result['accuracy']:.1f}% ± {100 * result['ci95']:.1f}"


def reference_5way_5shot(stem: str) -> float | None:
    """A committed reference report's held-out 5-way 5-shot accuracy (prototype rule), if it is there."""
    path = REFERENCES / f"{stem}.json"
    if not path.is_file():
        return None
    grid = json.loads(path.read_text(encoding="utf-8")).get("grid", [])
    return next((c["accuracy"] for c in grid if c.get("probe") == "prototype" and c.get("n_way") == 5
                 and c.get("k_shot") == 5 and "accuracy" in c), None)


def _versus(acc: float, goal: float, what: str) -> str:
    gap = 100 * (acc - goal)
    verdict = f"met, {gap:.1f} points above" if gap >= 0 else f"missed, {-gap:.1f} points below"
    return f"{what} ({100 * goal:.1f}%): **{verdict}**"


def render(bundle: Path) -> str:
    m = read_manifest(bundle)
    t, e = m.training, m.evaluation
    data = t.get("data", {})
    fewshot = e.get("heldout_fewshot", {})
    hop_ms = m.frontend.hop_length / m.sample_rate * 1000
    lines = [
        f"# {m.model_version}",
        "",
        f"Encoder bundle `{bundle.name}`: CP-Mobile ({m.network.norm} normalisation in the blocks, output "
        f"normalisation {m.network.output_norm}), {m.parameter_count:,} parameters, "
        f"{m.macs_per_second / 1e6:.1f} M MACs per second of audio (network only), {m.embedding_dim}-d embedding, "
        f"{m.sample_rate} Hz input, {m.frontend.n_mels} mel bands, {hop_ms:.0f} ms hop; audio longer than "
        f"{m.window.window_seconds:g} s is embedded over windows {m.window.hop_seconds:g} s apart. Created "
        f"{m.created_at}. This file is generated from `manifest.json` by `python -m sceneprint.training.report`.",
        "",
        "## Licence of the weights",
        "",
        "**Non-commercial use only.** " + t.get("licenses", {}).get("note", ""),
        "",
        f"Citation: {t.get('licenses', {}).get('citation', '')}",
        "",
        "## Training",
        "",
        f"- Recipe: {t.get('recipe', 'unknown')}.",
        *([f"- Teacher: {t['teacher']}; {t.get('licenses', {}).get('teacher', '')}."] if "teacher" in t else []),
        f"- Data: {data.get('dataset', '?')}, split `{data.get('split', '?')}`: {data.get('train_clips', '?')} "
        f"training clips, {data.get('val_clips', '?')} validation clips (recordings disjoint from training).",
        f"- Classes trained on ({len(data.get('classes', []))}): {', '.join(data.get('classes', []))}.",
        f"- Held out, never seen in training ({len(data.get('heldout_classes_never_seen', []))}): "
        f"{', '.join(data.get('heldout_classes_never_seen', []))}.",
        "- Full configuration: `training.config` in `manifest.json`.",
        *([f"- Selection: {t['selection']}"] if "selection" in t else []),
        *([f"- After training: {w['kind']}, fitted on {w['fitted_on']}, shrinkage {w['shrinkage']:g} (chosen by "
           f"{w['shrinkage_cross_validation']['probe']} accuracy over "
           f"{w['shrinkage_cross_validation']['folds_of_classes']} folds of those classes: "
           + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in w['shrinkage_cross_validation']['accuracy'].items())
           + "); no held-out clip is used."] if (w := t.get("whitening")) else []),
        "",
        "## Evaluation",
        "",
        f"Protocol: {e.get('protocol', '')}.",
        "",
        "| task | accuracy (95% CI) | episodes |",
        "|---|---|---|",
    ]
    for name, result in fewshot.items():
        lines.append(f"| held-out classes, {name.replace('_', ' ')} | {_pct(result)} | {result['episodes']} |")
    for name, result in e.get("before_whitening", {}).get("heldout_fewshot", {}).items():
        lines.append(f"| the same network before whitening, {name.replace('_', ' ')} | {_pct(result)} | "
                     f"{result['episodes']} |")
    baseline = e.get("heldout_fewshot_logmel_stats_baseline_5way_5shot")
    if baseline:
        lines.append(f"| baseline: log-mel mean/std statistics, 5way 5shot | {_pct(baseline)} | "
                     f"{baseline['episodes']} |")
    if "closed_set_val_accuracy" in e:
        lines.append(f"| closed set: {len(data.get('classes', []))} training classes, validation recordings "
                     f"({e.get('closed_set_val_clips')} clips) | {100 * e['closed_set_val_accuracy']:.1f}% | - |")
    open_set = e.get("heldout_open_set_5way_5shot")
    if open_set:
        lines += [
            "",
            f"Open set (5 scenes enrolled with 5 clips; queries from those and from 5 never-enrolled held-out classes; "
            f"{open_set['episodes']} episodes): the best prototype score separates enrolled from never-enrolled "
            f"scenes with AUROC {open_set['auroc']:.3f}. The service's default unknown threshold is the score with "
            f"the best balanced accuracy, **{open_set['threshold']:.3f}**: it accepts "
            f"{100 * open_set['known_accepted']:.1f}% of queries of enrolled scenes and reports "
            f"{100 * open_set['unknown_rejected']:.1f}% of the others as unknown.",
        ]
    cal = m.calibration
    if cal is not None:
        lines += [
            "",
            f"Enrollment checks ({cal.source}): a clip whose leave-one-out similarity is below "
            f"{cal.min_clip_similarity:.3f}, or a scene whose cohesion is below {cal.min_cohesion:.3f}, is refused "
            f"(the {100 * cal.false_refusal:g}% quantiles of genuine enrollments); decision rule `{cal.rule}`.",
        ]
    fewshot_55 = fewshot.get("5way_5shot")
    if fewshot_55:
        acc = fewshot_55["accuracy"]
        frozen, frozen_whitened = (reference_5way_5shot("yamnet-frozen-embedding"),
                                   reference_5way_5shot("yamnet-frozen-embedding-whitened"))
        lines += [
            "",
            f"Targets (issue: student stage), held-out 5-way 5-shot {100 * acc:.1f}%: "
            + _versus(acc, 0.92, "the bar")
            + ("" if frozen is None else "; " + _versus(acc, frozen, "at or above the frozen 3.7M-parameter YAMNet "
                                                                     "on the same episodes, its embedding as is"))
            + ("" if frozen_whitened is None or "whitening" not in t else "; "
               + _versus(acc, frozen_whitened, "the frozen YAMNet with the same within-class whitening"))
            + " (references: docs/results.md, 500 episodes).",
        ]
    card = e.get("complexity")
    if card:
        cpu = card["cpu"][0]
        lines += [
            "",
            "## Complexity",
            "",
            f"{card['parameters']:,} parameters; {card['frontend_macs_per_second'] / 1e6:.1f} M MACs per second of "
            f"audio in the front-end and {card['network_macs_per_second'] / 1e6:.1f} M in the network; one 5 s clip at "
            f"batch 1 took {cpu['embed_clip']['median_ms']:.1f} ms (median, {cpu['threads']} thread, measured at "
            f"export) against a compute floor of {cpu['floor_ms']:.2f} ms at the measured matmul rate "
            f"({cpu['matmul_gflops']:.0f} GFLOP/s).",
        ]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    args = parser.parse_args()
    (args.bundle / "REPORT.md").write_text(render(args.bundle), encoding="utf-8")
    print(f"wrote {args.bundle / 'REPORT.md'}")


if __name__ == "__main__":
    main()
