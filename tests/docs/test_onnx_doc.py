"""docs/onnx.md's example runs, and gives what the service's encoder gives."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from sceneprint.runtime import load_onnx_encoder
from tests import audio_factory as af

DOC = Path(__file__).resolve().parents[2] / "docs" / "onnx.md"


def test_onnx_page_example_embeds_a_clip_as_the_service_does(tiny_bundle: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert code is not None
    clip = af.scene_clip("birds", 0, 4.0)
    (tmp_path / "kitchen.wav").write_bytes(af.wav(clip))
    monkeypatch.chdir(tmp_path)
    source = code.group(1).replace('"models/sceneprint-default"', repr(os.fspath(tiny_bundle)))
    namespace: dict[str, object] = {}
    exec(compile(source, str(DOC), "exec"), namespace)
    embedding = np.asarray(namespace["embedding"])
    served = load_onnx_encoder(tiny_bundle).embed_clip(namespace["clip"].waveform)  # type: ignore[attr-defined]
    assert float(embedding @ served) > 0.9999
