"""The images: their Dockerfiles lint clean and install as the README does; their commands run outside Docker."""

from __future__ import annotations

import http.server
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sceneprint.cli import app as cli
from sceneprint.service.settings import Settings
from tests.deploy.tools import COMPOSE_FILE, DOCKER, ROOT, hadolint
from tests.service.live import LiveServer

SERVE_IMAGE = DOCKER / "Dockerfile"
TRAINER_IMAGE = DOCKER / "trainer.Dockerfile"
HEALTHCHECK = DOCKER / "healthcheck.py"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                         if not line.lstrip().startswith("#")))
    return [(parts[0].upper(), parts[1].strip() if len(parts) > 1 else "")
            for parts in (line.strip().split(None, 1) for line in text.splitlines() if line.strip())]


def exec_form(dockerfile: Path, instruction: str) -> list[str]:
    import json

    ((_, argument),) = [(i, a) for i, a in instructions(dockerfile) if i == instruction]
    parsed: list[str] = json.loads(argument[argument.index("["):])
    return parsed


@pytest.mark.parametrize("dockerfile", sorted(DOCKER.glob("*Dockerfile")), ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    result = subprocess.run([str(hadolint()), "--no-color", str(dockerfile)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_serve_image_installs_dependencies_first_then_the_code_as_the_readme_does() -> None:
    steps = instructions(SERVE_IMAGE)
    runs = [a for i, a in steps if i == "RUN"]
    copy_code = steps.index(("COPY", ". ."))
    dependencies = steps.index(next(s for s in steps if s[0] == "RUN" and "-r requirements.txt" in s[1]))
    assert dependencies < copy_code  # a code change does not reinstall the dependencies
    install = next(a for a in runs if a.endswith("pip install ."))
    readme_install = re.search(r"\.venv/bin/(pip install [^&`]*?) &&", (ROOT / "README.md").read_text())
    assert readme_install is not None and install.endswith(readme_install[1].strip()) and "[" not in install
    assert not any(word in argument.lower() for _, argument in steps for word in ("torch", "cuda"))
    assert len([s for s in steps if s[0] == "FROM"]) == 2  # build stage, then a runtime stage without pip caches
    (user,) = [a for i, a in steps if i == "USER"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user)  # numeric, not root: runAsNonRoot can check it
    assert exec_form(SERVE_IMAGE, "HEALTHCHECK") == ["python", "/opt/sceneprint/healthcheck.py"]
    assert ("COPY", "docker/healthcheck.py /opt/sceneprint/healthcheck.py") in steps


def test_the_trainer_image_takes_torch_from_pytorchs_cpu_index_unless_told() -> None:
    steps = instructions(TRAINER_IMAGE)
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in steps
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert 'pip install --index-url "${TORCH_INDEX_URL}" -r torch.txt' in runs
    assert "pip install '.[teacher,train]'" in runs
    (user,) = [a for i, a in steps if i == "USER"]
    assert user == next(a for i, a in instructions(SERVE_IMAGE) if i == "USER")  # one owner of the models volume


def test_dockerignore_keeps_environments_runs_and_data_out_of_the_build() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", "cache", "data", ".env"} <= ignored


def requirements(tmp_path: Path, *args: str) -> list[str]:
    """docker/requirements.py as the images run it: beside a copy of pyproject.toml, nothing installed."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(DOCKER / "requirements.py", tmp_path / "requirements.py")
    result = subprocess.run([sys.executable, "-I", "requirements.py", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_dependency_layer_is_read_from_pyproject(tmp_path: Path) -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert requirements(tmp_path) == project["dependencies"]
    trainer = requirements(tmp_path, "teacher", "train")
    assert set(trainer) == set(project["dependencies"]) | set(extras["teacher"]) | set(extras["train"])
    assert requirements(tmp_path, "--only", "torch,torchaudio", "teacher", "train") == [
        r for r in extras["train"] if r.startswith(("torch==", "torchaudio=="))]
    assert not any(r.startswith("sceneprint") for r in requirements(tmp_path, "dev"))  # own extras are expanded


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthcheck(url: str) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, with its URL pointed at ``url``."""
    command = exec_form(SERVE_IMAGE, "HEALTHCHECK")
    command = [sys.executable if command[0] == "python" else command[0], str(HEALTHCHECK), *command[2:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "HEALTHCHECK_URL": url})


class _Loading(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.end_headers()
        self.wfile.write(b'{"status":"loading"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def loading_server() -> Iterator[str]:
    """A server that answers every request 503, like /readyz while the model loads."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Loading)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/readyz"
    finally:
        server.shutdown()
        server.server_close()


def test_the_healthcheck_passes_on_a_ready_service_and_fails_otherwise(tmp_path: Path, tiny_bundle: Path,
                                                                       loading_server: str, free_port: int) -> None:
    with LiveServer(Settings(data_dir=tmp_path / "data", model_path=tiny_bundle)) as server:
        ready = healthcheck(f"{server.url}/readyz")
    assert ready.returncode == 0, ready.stderr
    loading = healthcheck(loading_server)
    assert loading.returncode == 1 and "answered 503" in loading.stderr
    down = healthcheck(f"http://127.0.0.1:{free_port}/readyz")
    assert down.returncode == 1 and "not ready" in down.stderr
    assert f"DEFAULT_URL = \"http://127.0.0.1:{exec_form(SERVE_IMAGE, 'CMD')[-1]}/readyz\"" in HEALTHCHECK.read_text()


class WouldServe(Exception):
    pass


def compose_environment() -> dict[str, str]:
    """The service's environment as docker-compose.yml gives it when nothing is set: every setting, empty."""
    names = re.findall(r"(?m)^  (SCENEPRINT_[A-Z0-9_]+): \$\{SCENEPRINT_[A-Z0-9_]+:-\}$", COMPOSE_FILE.read_text())
    assert names
    return dict.fromkeys(names, "")


def test_the_images_commands_run_as_compose_runs_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sceneprint.service import connections

    def would_serve(*_args: object, **_kwargs: object) -> None:
        raise WouldServe

    monkeypatch.setattr(connections, "make_server", would_serve)  # stop where the server would start listening
    for name, value in {**compose_environment(), "SCENEPRINT_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(name, value)
    assert exec_form(SERVE_IMAGE, "ENTRYPOINT") == ["sceneprint"]
    serve = exec_form(SERVE_IMAGE, "CMD")
    assert serve == ["serve", "--host", "0.0.0.0", "--port", "8000"]

    migrated = CliRunner().invoke(cli, ["migrate"])  # the one-shot migrate service
    assert migrated.exit_code == 0 and "database at revision" in migrated.output, migrated.output
    refused = CliRunner().invoke(cli, serve)  # no key yet: a container must not serve the network open
    assert refused.exit_code == 2 and "keys create" in refused.output
    created = CliRunner().invoke(cli, shlex.split("keys create --name ops --scope admin"))
    assert created.exit_code == 0, created.output
    assert isinstance(CliRunner().invoke(cli, serve).exception, WouldServe)
