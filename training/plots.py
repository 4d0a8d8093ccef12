"""Learning curves of a training run, as a PNG for docs/.

    python -m sceneprint.training.plots runs/default-bn docs/default-model-training.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def learning_curves(run_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    epochs = [r["epoch"] for r in records]
    evals = [r for r in records if "val_acc" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], label="train loss (mixup CE)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot([r["epoch"] for r in evals], [r["val_acc"] for r in evals], "o-", label="closed-set val accuracy")
    ax_acc.plot([r["epoch"] for r in evals], [r["heldout_5w5s"] for r in evals], "s-",
                label="held-out classes, 5-way 5-shot (300 episodes)")
    baseline = metrics.get("heldout_fewshot_logmel_stats_baseline_5way_5shot")
    if baseline:
        ax_acc.axhline(baseline["accuracy"], color="gray", ls="--", label="log-mel mean/std baseline, 5-way 5-shot")
    ax_acc.axhline(0.95, color="red", ls=":", label="ContrastASC bar (95%)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{run_dir.name}: training curves")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    learning_curves(args.run_dir, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
