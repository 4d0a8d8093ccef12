"""CP-Mobile: size presets, normalisation choice, shapes and embeddings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sceneprint.cpmobile import PRESETS, ChannelLayerNorm, CPMobileConfig, build, parameter_count, preset

# (lower, upper) parameter bounds for each preset: the DCASE task 1 budgets they stand for.
SIZE_BOUNDS = {"cpmobile_6k": (5_000, 7_000), "cpmobile_60k": (55_000, 65_000), "cpmobile_110k": (100_000, 128_000)}


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_every_preset_has_its_parameter_budget_and_embeds(name: str, norm: str) -> None:
    model = build(preset(name, norm))  # type: ignore[arg-type]
    low, high = SIZE_BOUNDS[name]
    assert low <= parameter_count(model) <= high
    model.eval()
    out = model(torch.randn(3, 1, 128, 101))  # (B, 1, F, T)
    assert out.shape == (3, model.config.embedding_dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_preset_names_are_checked() -> None:
    with pytest.raises(ValueError, match="cpmobile_60k"):
        preset("cpmobile_1m")


def test_layer_norm_variant_has_no_batchnorm_and_vice_versa() -> None:
    ln = build(preset("cpmobile_60k", "layer"))
    bn = build(preset("cpmobile_60k", "batch"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ln.modules())
    assert any(isinstance(m, ChannelLayerNorm) for m in ln.modules())
    assert not any(isinstance(m, ChannelLayerNorm) for m in bn.modules())


def test_layer_norm_embedding_does_not_depend_on_the_rest_of_the_batch() -> None:
    model = build(preset("cpmobile_6k", "layer")).train()  # even in training mode
    x = torch.randn(4, 1, 128, 101)
    torch.testing.assert_close(model(x)[:1], model(x[:1]))


def test_channel_layer_norm_normalises_over_channels_only() -> None:
    norm = ChannelLayerNorm(8)
    y = norm(torch.randn(2, 8, 5, 7) * 3 + 1)
    torch.testing.assert_close(y.mean(dim=1), torch.zeros(2, 5, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=1, unbiased=False), torch.ones(2, 5, 7), atol=1e-3, rtol=0)


def test_network_accepts_any_clip_length() -> None:
    model = build(preset("cpmobile_6k")).eval()
    assert model(torch.randn(1, 1, 128, 37)).shape == model(torch.randn(1, 1, 128, 3001)).shape


def test_config_refuses_strides_that_do_not_match_the_blocks() -> None:
    with pytest.raises(ValueError, match="strides"):
        CPMobileConfig(n_blocks=(1, 1), strides=((1, 1),))
