"""The paper's comparison on our data: train every variant with the same seeds and split, evaluate each alike.

Each run is ``sceneprint train student`` with a base config and overrides, exported as a bundle, then
``sceneprint evaluate`` on the dev held-out classes (both probes, 5-way and 10-way 5-shot, the same
episodes for every run). Finished runs (their ``eval.json`` exists) are skipped, so the runner can be
stopped and started again; runs go ``--parallel`` at a time, one torch thread each.

    python -m sceneprint.training.ablation --runs contrastasc-60k-s0 ftkd-60k-s0 --parallel 2
    python -m sceneprint.training.ablation --list

``--whiten`` also evaluates every run's bundle after a within-class whitening fitted on its training
classes (``sceneprint bundle whiten``), beyond the paper.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).parent / "configs"
CONTRASTASC = str(CONFIGS / "student-contrastasc.json")  # SupCon teacher + KD + CRD
FTKD = str(CONFIGS / "student-ce-kd.json")  # CE teacher + KD: the conventional baseline

# name -> (base config, overrides)
RUNS: dict[str, tuple[str, list[str]]] = {
    **{f"contrastasc-{size}-s{seed}": (CONTRASTASC, [f"model=cpmobile_{size}", f"seed={seed}"])
       for size in ("60k", "110k") for seed in (0, 1, 2)},
    **{f"ftkd-{size}-s{seed}": (FTKD, [f"model=cpmobile_{size}", f"seed={seed}"])
       for size in ("60k", "110k") for seed in (0, 1, 2)},
    "supcon-kd-60k-s0": (CONTRASTASC, ["loss.gamma=0"]),
    "ce-crd-60k-s0": (FTKD, ["loss.gamma=0.1"]),
    "contrastasc-60k-outbatch-s0": (CONTRASTASC, ["output_norm=batch"]),
    "contrastasc-60k-outnone-s0": (CONTRASTASC, ["output_norm=none"]),
    "contrastasc-6k-s0": (CONTRASTASC, ["model=cpmobile_6k"]),
    # Beyond the paper: also regress the teacher backbone's 1,024-d embedding (loss.embed_weight), or put
    # CRD's teacher side on that embedding through a trainable map (Tian et al.'s original CRD).
    **{f"embdistill-{size}-s{seed}": (CONTRASTASC, [f"model=cpmobile_{size}", f"seed={seed}",
                                                   "loss.embed_weight=1.0"])
       for size in ("60k", "110k") for seed in (0, 1, 2)},
    "contrastasc-crdemb-60k-s0": (CONTRASTASC, ["loss.crd_teacher=embedding"]),
    # ... and the frozen AudioSet YAMNet's 521 scores (binary cross-entropy), the knowledge of 521 classes.
    **{f"audioset-{size}-s{seed}": (CONTRASTASC, [f"model=cpmobile_{size}", f"seed={seed}", "loss.embed_weight=1.0",
                                                 "loss.audioset_weight=0.3"])
       for size in ("60k", "110k") for seed in (0, 1, 2)},
    # ... and unlabelled waveform mixes of two training clips in every batch.
    **{f"embmix-{size}-s{seed}": (CONTRASTASC, [f"model=cpmobile_{size}", f"seed={seed}", "loss.embed_weight=1.0",
                                               "optim.mix_bank=3000", "optim.mix_per_batch=32"])
       for size in ("60k", "110k") for seed in (0, 1, 2)},
    "student-alone-60k-s0": (CONTRASTASC, ['teacher=""', "loss.alpha=1", "loss.beta=0", "loss.gamma=0"]),
    # Freq-MixStyle mixes the per-band statistics of clips, i.e. the spectral envelope that tells stationary
    # noise scenes (airplane, washing machine, rain) apart: the embedding-regression recipe without it.
    **{f"embdistill-nomixstyle-{size}-s{seed}": (CONTRASTASC, [f"model=cpmobile_{size}", f"seed={seed}",
                                                              "loss.embed_weight=1.0", "augment.mixstyle_p=0"])
       for size in ("60k", "110k") for seed in (0, 1, 2)},
    # ... and the paper's ContrastASC recipe itself without Freq-MixStyle.
    **{f"contrastasc-nomixstyle-{size}-s{seed}": (CONTRASTASC, [f"model=cpmobile_{size}", f"seed={seed}",
                                                               "augment.mixstyle_p=0"])
       for size in ("60k", "110k") for seed in (0, 1, 2)},
    # ... and with unlabelled two-clip mixes in every batch (more inputs to distil on than the labelled clips).
    **{f"contrastasc-nomixstyle-mix-{size}-s{seed}": (CONTRASTASC, [f"model=cpmobile_{size}", f"seed={seed}",
                                                                   "augment.mixstyle_p=0", "optim.mix_bank=3000",
                                                                   "optim.mix_per_batch=32"])
       for size in ("60k", "110k") for seed in (0, 1, 2)},
    # ... and regressing the teacher backbone's embedding whitened within the training classes (shrinkage 0.1,
    # what cross-validation over the training classes picks for the SupCon teacher's own embedding).
    **{f"contrastasc-nomixstyle-mix-wemb-{size}-s{seed}": (CONTRASTASC, [
        f"model=cpmobile_{size}", f"seed={seed}", "augment.mixstyle_p=0", "optim.mix_bank=3000",
        "optim.mix_per_batch=32", "loss.embed_weight=1.0", "loss.embed_whiten=0.1"])
       for size in ("60k", "110k") for seed in (0, 1, 2)},
}
EVALS = [("prototype", 5), ("logreg", 5), ("prototype", 10), ("logreg", 10)]
WHITENED_EVALS = [("prototype", 5), ("prototype", 10)]


def run_dir(out: Path, name: str) -> Path:
    return out / name


def command(name: str, out: Path, overrides: list[str]) -> list[str]:
    config, extra = RUNS[name]
    d = run_dir(out, name)
    return [sys.executable, "-m", "sceneprint.cli", "train", "student", config, *extra, "threads=1",
            f"model_version=ablation-{name}", *overrides, "--out", str(d), "--export", str(d / "bundle")]


def evaluate_run(name: str, out: Path, data: Path, episodes: int, *, whiten: bool = False) -> dict[str, Any]:
    """Both probes, 5- and 10-way 5-shot, on the dev held-out classes, the same episodes for every run; with
    ``whiten``, also the prototype rule after a within-class whitening (``bundle whiten``, into ``bundle-whitened``).
    """
    d = run_dir(out, name)
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    figures: dict[str, Any] = {}
    runs = [("bundle", probe, ways, "") for probe, ways in EVALS]
    if whiten:
        if not (d / "bundle-whitened" / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "sceneprint.cli", "bundle", "whiten", str(d / "bundle"), "--out",
                            str(d / "bundle-whitened"), "--data", str(data), "--episodes", str(episodes)],
                           check=True, env=env)
        runs += [("bundle-whitened", probe, ways, "_whitened") for probe, ways in WHITENED_EVALS]
    for bundle, probe, ways, suffix in runs:
        path = d / f"eval-{probe}-{ways}way{suffix}.json"
        subprocess.run([sys.executable, "-m", "sceneprint.cli", "evaluate", "--bundle", str(d / bundle),
                        "--data", str(data), "--split", "fewshot-v1", "--ways", str(ways), "--shots", "5",
                        "--episodes", str(episodes), "--probe", probe, "--json", str(path)], check=True, env=env)
        figures[f"{probe}_{ways}way_5shot{suffix}"] = json.loads(path.read_text())
    manifest = json.loads((d / "bundle" / "manifest.json").read_text())
    result = {"name": name, "parameter_count": manifest["parameter_count"],
              "macs_per_second": manifest["macs_per_second"], "config": RUNS[name][0], "overrides": RUNS[name][1],
              **{k: {"accuracy": v["few_shot"]["accuracy"], "ci95": v["few_shot"]["ci95"],
                     "auroc": v.get("open_set", {}).get("auroc")} for k, v in figures.items()}}
    (d / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=[], help="run names (see --list)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("SCENEPRINT_DEV_DATA",
                                                                         "../shared/data/sceneprint-dev")))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--whiten", action="store_true", help="also evaluate each run after a within-class "
                        "whitening fitted on its training classes (re-evaluates finished runs that lack it)")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every run (e.g. optim.epochs=60)")
    args = parser.parse_args(argv)
    # `--runs a b optim.epochs=60`: argparse gives the overrides after the names to --runs; they are overrides.
    args.overrides = [r for r in args.runs if "=" in r] + args.overrides
    args.runs = [r for r in args.runs if "=" not in r]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list:
        for name, (config, extra) in RUNS.items():
            print(f"{name:32s} {Path(config).name} {' '.join(extra)}")
        return
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; see --list")
    def done(r: str) -> bool:
        path = run_dir(args.out, r) / "eval.json"
        return path.is_file() and (not args.whiten or "prototype_5way_5shot_whitened" in json.loads(path.read_text()))

    for r in args.runs:  # trained, not (yet) evaluated as asked
        if not done(r) and (run_dir(args.out, r) / "bundle" / "manifest.json").is_file() and \
                (run_dir(args.out, r) / "metrics.json").is_file():
            result = evaluate_run(r, args.out, args.data, args.episodes, whiten=args.whiten)
            print(f"{r}: 5-way 5-shot {100 * result['prototype_5way_5shot']['accuracy']:.1f}%", flush=True)
    pending = [r for r in args.runs if not done(r)]
    running: dict[str, subprocess.Popen[bytes]] = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            d = run_dir(args.out, name)
            d.mkdir(parents=True, exist_ok=True)
            log = (d / "train.log").open("ab")
            running[name] = subprocess.Popen(command(name, args.out, args.overrides), stdout=log,
                                             stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
            print(f"started {name}", flush=True)
        for name, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                print(f"{name} failed ({proc.returncode}); see {run_dir(args.out, name) / 'train.log'}", flush=True)
                continue
            result = evaluate_run(name, args.out, args.data, args.episodes, whiten=args.whiten)
            print(f"{name}: 5-way 5-shot {100 * result['prototype_5way_5shot']['accuracy']:.1f}%", flush=True)
        time.sleep(5)


if __name__ == "__main__":
    main()
