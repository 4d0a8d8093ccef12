"""Shared fixtures: a tiny encoder bundle made on the fly, app clients on a temporary data dir."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from sceneprint.bundle import save_bundle
from sceneprint.cpmobile import preset
from sceneprint.encoder import Encoder, WindowConfig
from sceneprint.export import add_onnx
from sceneprint.frontend import LogMelConfig
from sceneprint.service.app import create_app
from sceneprint.service.settings import Settings
from tests import audio_factory as af


def make_bundle(directory: Path, *, model_version: str = "test-tiny-v1", seed: int = 0, graph: bool = True,
                **network: Any) -> Path:
    """Save a freshly initialised 6K encoder as a bundle (fast; for tests that need no trained model).

    With ``graph`` (the default) the bundle also gets its ONNX graph, which the service needs.
    """
    torch.manual_seed(seed)
    config = preset("cpmobile_6k")
    if network:
        from dataclasses import replace

        config = replace(config, **network)
    encoder = Encoder(LogMelConfig(), config, WindowConfig()).eval()
    save_bundle(directory, encoder, model_version=model_version, training={"recipe": "none (random init)"},
                evaluation={})
    if graph:
        add_onnx(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


ClientFactory = Callable[..., AbstractContextManager[TestClient]]


@pytest.fixture
def client_factory(tmp_path: Path, tiny_bundle: Path) -> ClientFactory:
    """``with client_factory(**settings) as client``: an app on ``tmp_path/data``, lifespan run."""

    @contextmanager
    def factory(**overrides: Any) -> Iterator[TestClient]:
        # TestClient's server is not a loopback address: a keyless app must be told to run open.
        values: dict[str, Any] = {"data_dir": tmp_path / "data", "model_path": tiny_bundle, "min_clip_seconds": 0.5,
                                  "max_clip_seconds": 30.0, "allow_open": True}
        values.update(overrides)
        app = create_app(Settings(**values))
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client

    return factory


@pytest.fixture
def client(client_factory: ClientFactory) -> Iterator[TestClient]:
    with client_factory() as c:
        yield c


FileField = tuple[str, tuple[str, bytes, str]]


def clip_files(kind: str = "hum", n: int = 5, seed: int = 0, seconds: float = 2.0) -> list[FileField]:
    """Multipart ``files`` entries of ``n`` distinct synthetic clips."""
    return [("files", (f"{kind}-{i}.wav", af.wav(af.scene_clip(kind, seed + i, seconds)), "audio/wav"))
            for i in range(n)]


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A private PostgreSQL server for the session (skipped, with the reason, where none can be started)."""
    from tests.postgres import postgres_server, server_binaries

    if server_binaries() is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian: apt-get install postgresql; .ci/run does)")
    with postgres_server() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_admin_url: str, request: pytest.FixtureRequest) -> str:
    """An empty database of its own for one test."""
    from tests.postgres import fresh_database

    name = "t_" + "".join(ch if ch.isalnum() else "_" for ch in request.node.name.lower())[:50]
    return fresh_database(postgres_admin_url, name)


@pytest.fixture(scope="session")
def dev_root() -> Path:
    """The real recordings of sceneprint-dev, read in place; tests that need them skip, saying why, without."""
    from sceneprint.training.data import dev_data_root

    try:
        return dev_data_root()
    except FileNotFoundError:
        pytest.skip("sceneprint-dev not found: set SCENEPRINT_DEV_DATA to ../shared/data/sceneprint-dev")
