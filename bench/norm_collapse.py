"""How alike a freshly initialised CP-Mobile makes all clips: mean pairwise cosine of embeddings at init.

With BatchNorm the embeddings of different clips are unrelated at initialisation (mean cosine ~0);
with channel-wise LayerNorm (and with GroupNorm(1)) they nearly coincide (~0.99): the ReLU features
carry an input-independent component that per-position normalisation never removes, and global
average pooling keeps it. This is why the LayerNorm student barely trains with the plain CE recipe
(see docs/research-notes.md).

    python -m bench.norm_collapse            # needs $SCENEPRINT_DEV_DATA
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sceneprint.cpmobile import ChannelLayerNorm, CPMobile, Norm, build, preset
from sceneprint.frontend import LogMelConfig
from sceneprint.training.data import cached_logmels, dev_data_root, load_meta


def mean_pairwise_cosine(model: CPMobile, x: torch.Tensor) -> float:
    with torch.no_grad():
        emb = F.normalize(model.forward_features(x), dim=1)  # (B, D)
    cos = emb @ emb.T
    n = len(emb)
    return float((cos.sum() - n) / (n * n - n))


def main() -> None:
    torch.set_num_threads(1)
    root = dev_data_root()
    meta = load_meta(root)
    feats = cached_logmels(root, meta, LogMelConfig(), Path("cache"))
    x = torch.from_numpy(feats[::50, :, :101].astype(np.float32)).unsqueeze(1)  # (32, 1, F, 1 s)
    print(f"{len(x)} clips (every 50th of sceneprint-dev), first second; cpmobile_60k at initialisation, seed 0")
    norms: list[tuple[str, Norm]] = [("BatchNorm (train mode)", "batch"), ("channel LayerNorm", "layer")]
    for label, norm in norms:
        torch.manual_seed(0)
        print(f"  {label:<28} mean pairwise cosine {mean_pairwise_cosine(build(preset('cpmobile_60k', norm)), x):+.4f}")
    torch.manual_seed(0)
    gn = build(preset("cpmobile_60k", "layer"))
    for module in list(gn.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ChannelLayerNorm):
                setattr(module, child_name, nn.GroupNorm(1, child.weight.shape[0]))
    print(f"  {'GroupNorm(1) (LN over C,F,T)':<28} mean pairwise cosine {mean_pairwise_cosine(gn, x):+.4f}")


if __name__ == "__main__":
    main()
