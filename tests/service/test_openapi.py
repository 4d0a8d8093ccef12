"""The OpenAPI document states what the server enforces, and a schema-driven fuzzer finds nothing.

The fuzzer is schemathesis (``--checks all``, a bounded number of examples per operation) against a
live server on loopback, with an admin key.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from sceneprint.cli import app as cli
from sceneprint.service.settings import Settings
from tests.service.live import LiveServer

PROBLEM = {"$ref": "#/components/schemas/Problem"}
UPLOAD_STATUSES = {"400", "401", "403", "408", "413", "415", "422", "503"}


@pytest.fixture
def schema(client: TestClient) -> dict:
    return client.get("/openapi.json").json()


def test_scene_names_are_documented_with_their_pattern_and_length(schema: dict) -> None:
    for path in ["/scenes/{name}/enroll", "/scenes/{name}/clips", "/scenes/{name}"]:
        for operation in schema["paths"][path].values():
            (param,) = [p for p in operation["parameters"] if p["name"] == "name"]
            assert param["schema"]["pattern"] == "^[a-z0-9_-]{1,64}$"
            assert param["schema"]["minLength"] == 1 and param["schema"]["maxLength"] == 64


def test_upload_bodies_state_the_file_counts_and_sizes(schema: dict) -> None:
    def body(path: str) -> dict:
        return schema["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]

    files = body("/scenes/{name}/enroll")["properties"]["files"]
    assert files["minItems"] == files["maxItems"] == 5 and files["items"]["format"] == "binary"
    clips = body("/scenes/{name}/clips")["properties"]["files"]
    assert clips["minItems"] == 1 and clips["maxItems"] == 5
    assert body("/classify")["required"] == ["file"] and body("/classify")["properties"]["file"]["format"] == "binary"
    assert str(16 * 1024 * 1024) in files["items"]["description"]


def test_top_k_is_documented_with_its_range(schema: dict) -> None:
    (top_k,) = [p for p in schema["paths"]["/classify"]["post"]["parameters"] if p["name"] == "top_k"]
    assert top_k["schema"]["minimum"] == 1 and top_k["schema"]["maximum"] == 100


def test_the_bearer_scheme_is_documented_and_required_where_enforced(schema: dict) -> None:
    scheme = schema["components"]["securitySchemes"]["apiKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            public = path in {"/healthz", "/readyz"}
            assert ("security" in operation) != public, (method, path)


def test_every_status_a_route_answers_is_documented_as_problem_json(schema: dict) -> None:
    paths = schema["paths"]
    assert UPLOAD_STATUSES | {"201", "409"} <= set(paths["/scenes/{name}/enroll"]["post"]["responses"])
    assert UPLOAD_STATUSES | {"200", "404", "409"} <= set(paths["/scenes/{name}/clips"]["post"]["responses"])
    assert UPLOAD_STATUSES | {"200"} <= set(paths["/classify"]["post"]["responses"])
    assert {"204", "401", "403", "404", "422", "503"} <= set(paths["/scenes/{name}"]["delete"]["responses"])
    for operations in paths.values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert response["content"]["application/problem+json"]["schema"] == PROBLEM
    problem = schema["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail", "code"} <= set(problem["required"])


def test_405_names_every_allowed_method(client: TestClient) -> None:
    r = client.put("/scenes/kitchen")
    assert r.status_code == 405 and r.headers["content-type"] == "application/problem+json"
    assert set(re.split(r",\s*", r.headers["allow"])) == {"GET", "PATCH", "DELETE"}
    r = client.get("/classify")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_docs_work_offline(client: TestClient) -> None:
    page = client.get("/docs").text
    assets = re.findall(r"""(?:src|href)=["']?([^"' >]+)""", page)
    assert "swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    for url in assets:
        assert not url.startswith(("http:", "https:", "//")), url
        assert client.get(url).status_code == 200, url


@pytest.fixture
def admin_server(tmp_path: Path, tiny_bundle: Path) -> Iterator[tuple[LiveServer, str]]:
    data_dir = tmp_path / "data"
    result = CliRunner().invoke(cli, ["keys", "create", "--data-dir", str(data_dir), "--name", "fuzzer-admin-0d9c7f3a",
                                      "--scope", "admin"])
    assert result.exit_code == 0, result.output
    settings = Settings(data_dir=data_dir, model_path=tiny_bundle, max_upload_bytes=200_000, min_clip_seconds=0.5)
    with LiveServer(settings) as server:
        yield server, result.output.strip().splitlines()[-1]


# Audio validity is content the schema cannot state (any bytes are a schema-valid file): a schema-valid
# upload of noise bytes is rightly refused as undecodable audio (422), and 5 random files of which two are
# equal as duplicates. Everywhere else a schema-valid request must be accepted.
SCHEMATHESIS_CONFIG = """
[[operations]]
include-path-regex = "^/(classify|scenes/.*/(enroll|clips))$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]
"""


def test_schemathesis_with_every_check_finds_nothing(admin_server: tuple[LiveServer, str], tmp_path: Path) -> None:
    server, key = admin_server
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{server.url}/openapi.json",
         "--checks", "all", "--max-examples", "8", "--seed", "1", "--workers", "1", "--generation-database",
         "none", "--request-timeout", "30", "-H", f"Authorization: Bearer {key}",
         "--no-color"],
        capture_output=True, text=True, timeout=540, cwd=tmp_path)  # its caches go there, not into the repository
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
