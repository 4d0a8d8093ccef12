"""BEATs: the official checkpoint format, strict loading, the fbank front-end, presets and shapes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torchaudio.compliance.kaldi as kaldi
from torch import nn

from sceneprint.beats import (
    FBANK_MEAN,
    FBANK_STD,
    PRESETS,
    SAMPLE_RATE,
    BEATs,
    BEATsCheckpointError,
    WeightNormConv1d,
    beats_base,
    beats_config_from_checkpoint_cfg,
    beats_fbank,
    beats_tiny,
    load_beats_checkpoint,
    preset,
    relative_position_buckets,
    save_beats_checkpoint,
)
from sceneprint.config import ConfigError
from tests import audio_factory as af

# The ``cfg`` dict of Microsoft's BEATs_iter3 checkpoint.
ITER3_CFG: dict[str, Any] = {
    "input_patch_size": 16, "embed_dim": 512, "conv_bias": False, "encoder_layers": 12, "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12, "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 0.6, "layer_norm_first": False, "deep_norm": True, "dropout": 0.0,
    "attention_dropout": 0.0, "activation_dropout": 0.0, "encoder_layerdrop": 0.05, "dropout_input": 0.0,
    "conv_pos": 128, "conv_pos_groups": 16, "relative_position_embedding": True, "num_buckets": 320,
    "max_distance": 800, "gru_rel_pos": True, "finetuned_model": False,
}
# What the fine-tuned (AudioSet) checkpoints add.
FINETUNED_CFG = {**ITER3_CFG, "finetuned_model": True, "predictor_dropout": 0.0, "predictor_class": 527}

# Parameter names the official checkpoints' ``model`` state dict holds.
OFFICIAL_KEYS = [
    "patch_embedding.weight",
    "layer_norm.weight",
    "layer_norm.bias",
    "post_extract_proj.weight",
    "post_extract_proj.bias",
    "encoder.pos_conv.0.weight_g",
    "encoder.pos_conv.0.weight_v",
    "encoder.pos_conv.0.bias",
    "encoder.layer_norm.weight",
    "encoder.layers.0.self_attn.q_proj.weight",
    "encoder.layers.0.self_attn.k_proj.weight",
    "encoder.layers.0.self_attn.v_proj.bias",
    "encoder.layers.0.self_attn.out_proj.weight",
    "encoder.layers.0.self_attn.grep_linear.weight",
    "encoder.layers.0.self_attn.grep_a",
    "encoder.layers.0.self_attn.relative_attention_bias.weight",
    "encoder.layers.11.self_attn.relative_attention_bias.weight",
    "encoder.layers.0.self_attn_layer_norm.weight",
    "encoder.layers.0.fc1.weight",
    "encoder.layers.0.fc2.bias",
    "encoder.layers.11.final_layer_norm.bias",
]

# (lower, upper) parameter bounds per preset; base is the paper's "90M".
SIZE_BOUNDS = {"beats_base": (89_000_000, 91_000_000), "beats_tiny": (50_000, 200_000)}


def tiny_model(seed: int = 0, **changes: Any) -> BEATs:
    torch.manual_seed(seed)
    return BEATs(dataclasses.replace(beats_tiny(), **changes)).eval()


def audio(seconds: float, batch: int = 2) -> torch.Tensor:
    """A batch (B, N) of distinct 16 kHz noise clips."""
    return torch.stack([torch.from_numpy(af.noise(seconds, rate=SAMPLE_RATE, seed=i)) for i in range(batch)])


def test_official_iter3_cfg_gives_the_base_preset() -> None:
    assert beats_config_from_checkpoint_cfg(ITER3_CFG) == beats_base()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_its_parameter_budget(name: str) -> None:
    with torch.device("meta"):
        model = BEATs(preset(name))
    low, high = SIZE_BOUNDS[name]
    assert low <= sum(p.numel() for p in model.parameters()) <= high


def test_base_preset_uses_the_official_parameter_names() -> None:
    with torch.device("meta"):
        keys = set(BEATs(beats_base()).state_dict())
        finetuned_keys = set(BEATs(beats_config_from_checkpoint_cfg(FINETUNED_CFG)).state_dict())
    assert set(OFFICIAL_KEYS) <= keys
    assert not any(k.startswith("predictor") for k in keys)
    assert finetuned_keys - keys == {"predictor.weight", "predictor.bias"}


def test_preset_names_are_checked() -> None:
    with pytest.raises(ValueError, match="beats_base"):
        preset("beats_large")


def test_cfg_with_an_unknown_key_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match="label_rate"):
        beats_config_from_checkpoint_cfg({**ITER3_CFG, "label_rate": 50})


def test_cfg_with_a_value_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(ConfigError, match="encoder_layers"):
        beats_config_from_checkpoint_cfg({**ITER3_CFG, "encoder_layers": "12"})


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = tiny_model()
    path = tmp_path / "beats.pt"
    save_beats_checkpoint(model, path)
    loaded = load_beats_checkpoint(path)
    x = audio(1.0)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.extract_features(x), model.extract_features(x))
    assert loaded.config == model.config
    assert not loaded.training


def test_checkpoint_is_written_in_the_official_format(tmp_path: Path) -> None:
    model = tiny_model()
    path = tmp_path / "beats.pt"
    save_beats_checkpoint(model, path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"cfg", "model"}
    assert set(checkpoint["cfg"]) == set(ITER3_CFG) | {"predictor_dropout", "predictor_class"}
    assert set(checkpoint["model"]) == set(model.state_dict())
    assert checkpoint["model"]["encoder.pos_conv.0.weight_g"].shape == (1, 1, model.config.conv_pos)


@pytest.mark.parametrize(("change", "key"), [
    ("drop", "encoder.layers.1.fc2.weight"),
    ("add", "encoder.layers.2.fc2.weight"),
])
def test_checkpoint_with_a_missing_or_extra_key_is_refused_naming_it(tmp_path: Path, change: str, key: str) -> None:
    model = tiny_model()
    state = model.state_dict()
    if change == "drop":
        del state[key]
    else:
        state[key] = torch.zeros(1)
    path = tmp_path / "beats.pt"
    torch.save({"cfg": dataclasses.asdict(model.config), "model": state}, path)
    with pytest.raises(BEATsCheckpointError, match=key):
        load_beats_checkpoint(path)


def test_checkpoint_with_a_wrongly_shaped_tensor_is_refused(tmp_path: Path) -> None:
    model = tiny_model()
    state = model.state_dict()
    state["encoder.layers.0.self_attn.grep_a"] = torch.ones(1, 5, 1, 1)
    path = tmp_path / "beats.pt"
    torch.save({"cfg": dataclasses.asdict(model.config), "model": state}, path)
    with pytest.raises(BEATsCheckpointError, match="grep_a"):
        load_beats_checkpoint(path)


def test_checkpoint_with_an_unknown_cfg_key_is_refused(tmp_path: Path) -> None:
    model = tiny_model()
    path = tmp_path / "beats.pt"
    torch.save({"cfg": {**dataclasses.asdict(model.config), "mask_prob": 0.75}, "model": model.state_dict()}, path)
    with pytest.raises(BEATsCheckpointError, match="mask_prob"):
        load_beats_checkpoint(path)


def test_checkpoint_that_is_not_a_cfg_and_model_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "beats.pt"
    torch.save(tiny_model().state_dict(), path)
    with pytest.raises(BEATsCheckpointError, match="'cfg', 'model'"):
        load_beats_checkpoint(path)


def test_fbank_is_kaldi_fbank_of_16_bit_samples_normalised_by_the_beats_constants() -> None:
    x = audio(1.0)
    direct = torch.stack([
        kaldi.fbank(clip[None] * 32768, num_mel_bins=128, sample_frequency=16000, frame_length=25, frame_shift=10)
        for clip in x
    ])
    # Batched and export-friendly, but the same arithmetic: float32 rounding apart (log energies to ~3e-4).
    torch.testing.assert_close(beats_fbank(x), (direct - 15.41663) / (2 * 6.55582), atol=1e-4, rtol=1e-4)
    assert (FBANK_MEAN, FBANK_STD) == (15.41663, 6.55582)


@pytest.mark.parametrize(("seconds", "patches"), [(1.0, 48), (3.0, 144)])
def test_output_shapes_for_one_and_three_seconds(seconds: float, patches: int) -> None:
    # 1 s gives 98 fbank frames: 6 whole patches in time, times 128 / 16 = 8 in frequency.
    model = tiny_model()
    x = audio(seconds)
    with torch.inference_mode():
        features = model.extract_features(x)
        embedding = model(x)
    assert features.shape == (2, patches, 64)
    assert embedding.shape == (2, 64)
    torch.testing.assert_close(embedding, features.mean(dim=1))


def test_waveform_shorter_than_one_patch_is_refused() -> None:
    model = tiny_model()
    shortest = model.config.min_samples  # 25 ms + 15 hops of 10 ms
    assert shortest == 2800
    with torch.inference_mode():
        assert model(0.1 * torch.randn(2, shortest)).shape == (2, 64)
        with pytest.raises(ValueError, match="at least 2800 samples"):
            model(0.1 * torch.randn(2, shortest - 1))


def test_finetuned_model_gives_mean_patch_logits() -> None:
    model = tiny_model(finetuned_model=True, predictor_class=10)
    assert model.predictor is not None
    x = audio(1.0)
    with torch.inference_mode():
        logits = model.logits(x)
        per_patch = model.predictor(model.extract_features(x))  # (B, P, K)
    torch.testing.assert_close(logits, per_patch.mean(dim=1))
    with pytest.raises(ValueError, match="no predictor"):
        tiny_model().logits(x)


def test_relative_position_buckets_match_a_hand_computed_case() -> None:
    # 8 buckets: 4 per side, distances 0-1 exact, then floor(2 + 2 * log(d / 2) / log(16 / 2)), capped at 3.
    buckets = relative_position_buckets(10, num_buckets=8, max_distance=16)
    assert buckets[0].tolist() == [0, 5, 6, 6, 6, 6, 7, 7, 7, 7]  # keys after the query: upper half
    assert buckets[9].tolist() == [3, 3, 3, 3, 2, 2, 2, 2, 1, 0]  # keys before it: lower half
    assert torch.equal(buckets[4, 4:], buckets[0, :6])  # depends on the offset only


def test_relative_position_bias_is_one_table_shared_by_all_layers() -> None:
    model = tiny_model()
    tables = {id(layer.self_attn.relative_attention_bias) for layer in model.encoder.layers}  # type: ignore[union-attr]
    assert len(tables) == 1


def test_weight_norm_conv_matches_torch_weight_norm_over_the_kernel_axis() -> None:
    conv = WeightNormConv1d(channels=8, kernel_size=4, groups=2)
    with torch.no_grad():
        conv.weight_g.mul_(torch.rand(1, 1, 4) + 0.5)
    reference = nn.Conv1d(8, 8, kernel_size=4, padding=2, groups=2)
    nn.utils.parametrizations.weight_norm(reference, dim=2)
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(conv.weight_g)  # type: ignore[union-attr,operator]
        reference.parametrizations.weight.original1.copy_(conv.weight_v)  # type: ignore[union-attr,operator]
        reference.bias.copy_(torch.randn(8))  # type: ignore[union-attr]
        conv.bias.copy_(reference.bias)  # type: ignore[arg-type]
    x = torch.randn(2, 8, 11)
    torch.testing.assert_close(conv(x), reference(x)[..., :11])


def test_layer_wise_gradient_decay_scales_the_input_gradient_once_per_layer() -> None:
    x = audio(1.0)
    grads = []
    for ratio in (1.0, 0.5):
        model = tiny_model(layer_wise_gradient_decay_ratio=ratio, encoder_layerdrop=0.0)
        model(x).sum().backward()
        assert model.patch_embedding.weight.grad is not None
        grads.append(model.patch_embedding.weight.grad)
    torch.testing.assert_close(grads[1], grads[0] * 0.5**2)  # two layers

