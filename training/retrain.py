"""``sceneprint retrain``: the training pipeline as a job that ends in the model registry.

    sceneprint retrain training/configs/student-smoke.json --registry ./data/models --min-accuracy 0.3

Stages: the teacher (only with ``--teacher-config``: trained, or resumed, in the run folder), the student
(``train_student``: trains, exports a bundle with its ONNX graph, evaluates it on the held-out classes
through the service's decode-and-embed path, calibrates it), then publishing: the bundle goes into the
registry (verified there again) and becomes its current version when its held-out 5-way 5-shot accuracy
is not below ``--min-accuracy``. A job writes only its run folder, a new version directory and, last, the
registry's pointer, so it is safe while a service serves from the registry: the service sees the pointer
move and reloads by itself.

``--extra-classes DIR`` (off by default) adds labelled clips as training classes, e.g. the service's
enrolled scenes exported from their kept audio by ``sceneprint scenes export`` (one class per scene). The
job writes a merged ``meta.csv`` and split file in its run folder (with links to the two folders: the audio
is read in place) and trains on that: the extra classes are training classes, never held out, so the
held-out figures stay comparable. KD needs a teacher trained on the same classes: with a teacher, extra
classes need ``--teacher-config`` too (the teacher is then trained on the merged classes).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sceneprint.config import to_dict
from sceneprint.manifest import BundleError
from sceneprint.registry import Registry, RegistryError
from sceneprint.training.data import dev_data_root
from sceneprint.training.student import StudentConfig, train_student
from sceneprint.training.teacher import TeacherConfig, train_teacher

EXTRA_LABEL_PREFIX = "extra:"  # keeps an extra class apart from a data-set class of the same name


def merge_extra_classes(root: Path, split: str, extra: Path, out: Path) -> tuple[Path, list[str]]:
    """A data set in ``out`` that is ``root`` plus the classes of ``extra`` (a ``meta.csv`` folder) as training
    classes; returns its folder and the extra classes' labels. The audio is read in place, through links
    ``out/sources/base`` and ``out/sources/extra`` to the two folders (paths in a ``meta.csv`` stay inside it)."""
    fields = ["filename", "scene_label", "source_id", "fold", "license"]
    rows: list[dict[str, Any]] = []
    (out / "sources").mkdir(parents=True, exist_ok=True)
    for folder, name, prefix in ((root, "base", ""), (extra, "extra", EXTRA_LABEL_PREFIX)):
        link = out / "sources" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(folder.resolve(), target_is_directory=True)
        with (folder / "meta.csv").open(newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                rows.append({"filename": f"sources/{name}/{r['filename']}",
                             "scene_label": prefix + r["scene_label"], "source_id": r["source_id"],
                             "fold": r.get("fold") or 1, "license": r.get("license", "")})
    added = sorted({r["scene_label"] for r in rows if r["scene_label"].startswith(EXTRA_LABEL_PREFIX)})
    if not added:
        raise ValueError(f"{extra}/meta.csv lists no clips")
    (out / "splits").mkdir(exist_ok=True)
    with (out / "meta.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    data = json.loads((root / "splits" / f"{split}.json").read_text(encoding="utf-8"))
    data["train_classes"] = sorted(data["train_classes"]) + added
    (out / "splits" / f"{split}.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    return out, added


def retrain(cfg: StudentConfig, *, registry: Path, out_dir: Path, min_accuracy: float | None = None,
            version: str | None = None, teacher: TeacherConfig | None = None,
            extra_classes: Path | None = None) -> dict[str, Any]:
    """Train, evaluate and, when the figures pass the floor, publish; returns the job's summary (also written to
    ``out_dir/summary.json``).

    Args:
        cfg: The student's config (file plus overrides).
        registry: The registry to publish to.
        out_dir: The job's run folder: teacher/, student/ (resumable checkpoints), bundle/, summary.json.
        min_accuracy: The floor on held-out 5-way 5-shot accuracy (None: none).
        version: The registry version's name (default: the registry's next ``v<N>``).
        teacher: Train (or resume) the teacher first, in ``out_dir/teacher``, and distil from it.
        extra_classes: A ``meta.csv`` folder whose classes join the training classes.
    """
    started, t0 = datetime.now(UTC), time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = ["teacher"] * (teacher is not None) + ["student", "publish"]
    bar = tqdm(stages, desc="retrain", unit="stage")
    extra: list[str] = []
    if extra_classes is not None:
        if cfg.teacher and teacher is None:
            raise ValueError("extra classes need a teacher trained on them: pass --teacher-config, or train the "
                             "student without a teacher (teacher=\"\" loss.beta=0 loss.gamma=0)")
        root = dev_data_root(cfg.data.root or None)
        merged, extra = merge_extra_classes(root, cfg.data.split, extra_classes, out_dir / "data")
        cfg = replace(cfg, data=replace(cfg.data, root=str(merged)))
        tqdm.write(f"training data: {root} plus {len(extra)} extra classes from {extra_classes} ({merged}/meta.csv)")
    if teacher is not None:
        bar.set_postfix_str("teacher")
        teacher = replace(teacher, data=replace(teacher.data, root=cfg.data.root, split=cfg.data.split))
        train_teacher(teacher, out_dir / "teacher")
        cfg = replace(cfg, teacher=str(out_dir / "teacher"))
        bar.update()
    elif cfg.teacher and not (Path(cfg.teacher) / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"the config distils from the teacher run {cfg.teacher}, which has no checkpoint.pt: "
                                "train it first, or pass --teacher-config to train it in this job")
    bar.set_postfix_str("student")
    bundle = out_dir / "bundle"
    results = train_student(cfg, out_dir / "student", export=bundle)
    bar.update()
    accuracy = float(results["heldout_fewshot"]["5way_5shot"]["accuracy"])
    summary: dict[str, Any] = {
        "config": to_dict(cfg), "run": str(out_dir), "bundle": str(bundle), "registry": str(registry),
        "model_version": cfg.model_version, "extra_classes": extra, "heldout_5way_5shot": accuracy,
        "min_accuracy": min_accuracy, "published": False, "version": None, "key": None, "reason": None,
        "started_at": started.isoformat(timespec="seconds"),
    }
    bar.set_postfix_str("publish")
    if min_accuracy is not None and accuracy < min_accuracy:
        summary["reason"] = f"held-out accuracy {accuracy:.4f} is below the floor {min_accuracy:.4f}"
    else:
        try:
            published = Registry(registry).publish(bundle, version=version, min_accuracy=min_accuracy)
        except (BundleError, RegistryError) as exc:
            summary["reason"] = str(exc)
        else:
            summary.update(published=True, version=published.version, key=published.key)
    bar.update()
    bar.close()
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
