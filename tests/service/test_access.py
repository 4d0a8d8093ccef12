"""API keys: scopes, hashing, revocation without a restart, and the open service on loopback only."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx2
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from sceneprint.cli import app as cli
from sceneprint.service import keys as keys_module
from sceneprint.service.settings import Settings
from tests import audio_factory as af
from tests.conftest import ClientFactory, clip_files
from tests.service.live import LiveServer

GOOD = af.wav(af.scene_clip("hum", 1))


def create_key(data_dir: Path, name: str, scope: str) -> str:
    result = CliRunner().invoke(cli, ["keys", "create", "--data-dir", str(data_dir), "--name", name, "--scope", scope])
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-1]  # the key is the last line


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def problem(r, status: int, code: str) -> dict:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == code
    return r.json()


@pytest.fixture
def keyed(client_factory: ClientFactory, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A client on a data dir that has one key of each scope (made with the CLI before the service starts)."""
    data_dir = tmp_path / "data"
    made = {scope: create_key(data_dir, f"{scope}-key", scope) for scope in ("classify", "enroll", "admin")}
    with client_factory(allow_open=False, key_refresh_s=0.05) as client:
        yield client, made


def test_every_route_but_the_health_checks_needs_a_key(keyed) -> None:  # type: ignore[no-untyped-def]
    client, _ = keyed
    for method, path in [("get", "/scenes"), ("get", "/scenes/x"), ("delete", "/scenes/x"), ("get", "/model"),
                         ("get", "/keys"), ("post", "/classify"), ("post", "/scenes/x/enroll")]:
        r = getattr(client, method)(path)
        problem(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["access"] == "keys"


def test_a_wrong_or_malformed_key_is_401(keyed) -> None:  # type: ignore[no-untyped-def]
    client, made = keyed
    wrong_secret = made["admin"][:-4] + ("aaaa" if not made["admin"].endswith("aaaa") else "bbbb")
    for key in [wrong_secret, "sp_nothing", "x" * 500, made["admin"] + "x"]:
        problem(client.get("/scenes", headers=bearer(key)), 401, "unauthorized")
    problem(client.get("/scenes", headers={"Authorization": f"Basic {made['admin']}"}), 401, "unauthorized")


def test_scopes_classify_enroll_admin(keyed) -> None:  # type: ignore[no-untyped-def]
    client, made = keyed
    c, e, a = (bearer(made[s]) for s in ("classify", "enroll", "admin"))
    assert client.post("/classify", files={"file": ("q.wav", GOOD)}, headers=c).status_code == 200
    assert client.get("/scenes", headers=c).status_code == 200
    assert client.get("/model", headers=c).status_code == 200
    body = problem(client.post("/scenes/kitchen/enroll", files=clip_files(), headers=c), 403, "forbidden")
    assert body["scope"] == "classify" and body["needed"] == "enroll"
    problem(client.delete("/scenes/kitchen", headers=c), 403, "forbidden")
    assert client.post("/scenes/kitchen/enroll", files=clip_files(), headers=e).status_code == 201
    assert client.post("/scenes/kitchen/clips", files=clip_files(n=1, seed=40), headers=e).status_code == 200
    problem(client.get("/keys", headers=e), 403, "forbidden")
    assert client.delete("/scenes/kitchen", headers=e).status_code == 204
    assert {k["name"] for k in client.get("/keys", headers=a).json()} == {"classify-key", "enroll-key", "admin-key"}
    assert client.post("/scenes/den/enroll", files=clip_files(seed=60), headers=a).status_code == 201


def test_keys_are_stored_hashed_never_in_clear(keyed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, made = keyed
    dump = "\n".join(sqlite3.connect(tmp_path / "data" / "sceneprint.db").iterdump())
    for key in made.values():
        secret = key.split("_", 2)[2]  # sp_<hex key id>_<secret>: the secret itself may hold "_"
        assert len(secret) >= 40 and key not in dump and secret not in dump


def test_the_secret_is_compared_in_constant_time(keyed, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    client, made = keyed
    compared: list[tuple[str, str]] = []
    real = keys_module.hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", spy)
    assert client.get("/scenes", headers=bearer(made["classify"])).status_code == 200
    key = made["classify"]
    wrong = key[:-1] + ("B" if key.endswith("A") else "A")  # one character off (never the key itself)
    assert client.get("/scenes", headers=bearer(wrong)).status_code == 401
    assert len(compared) == 2


def test_keys_created_and_revoked_while_the_service_runs_take_effect_without_a_restart(
        keyed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, made = keyed
    late = create_key(tmp_path / "data", "late", "classify")  # by the CLI, another process's way in
    assert _eventually(client, late, 200)
    result = CliRunner().invoke(cli, ["keys", "revoke", "late", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    assert _eventually(client, late, 401)
    # Through the API the change is in force for the very next request.
    created = client.post("/keys", json={"name": "api-made", "scope": "enroll"}, headers=bearer(made["admin"]))
    assert created.status_code == 201 and created.json()["key"].startswith("sp_")
    assert client.get("/scenes", headers=bearer(created.json()["key"])).status_code == 200
    revoked = client.delete("/keys/api-made", headers=bearer(made["admin"]))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    problem(client.get("/scenes", headers=bearer(created.json()["key"])), 401, "unauthorized")


def _eventually(client: TestClient, key: str, status: int) -> bool:
    """Poll (bounded) until a request with ``key`` gets ``status``: the key ring re-reads every 0.05 s here."""
    return any(client.get("/scenes", headers=bearer(key)).status_code == status for _ in range(400))


def test_cli_keys_list_shows_names_and_scopes_never_keys(tmp_path: Path) -> None:
    key = create_key(tmp_path / "data", "ci", "enroll")
    listed = CliRunner().invoke(cli, ["keys", "list", "--data-dir", str(tmp_path / "data")])
    assert listed.exit_code == 0 and "ci\tenroll" in listed.output and "active" in listed.output
    assert key not in listed.output
    again = CliRunner().invoke(cli, ["keys", "create", "--data-dir", str(tmp_path / "data"), "--name", "ci",
                                     "--scope", "admin"])
    assert again.exit_code != 0 and "exists" in again.output
    bad = CliRunner().invoke(cli, ["keys", "create", "--data-dir", str(tmp_path / "data"), "--name", "x",
                                   "--scope", "root"])
    assert bad.exit_code != 0


def test_without_keys_the_service_is_open_on_loopback_only_and_says_so(client_factory: ClientFactory,
                                                                       tmp_path: Path, tiny_bundle: Path) -> None:
    with client_factory(allow_open=False) as client:
        # TestClient's server address is not loopback: a keyless service refuses it, whatever the Host header.
        problem(client.get("/scenes", headers={"host": "127.0.0.1"}), 401, "unauthorized")
        assert client.get("/readyz").json()["access"] == "open"
    with client_factory(allow_open=True) as client:
        assert client.get("/scenes").status_code == 200
    settings = Settings(data_dir=tmp_path / "live", model_path=tiny_bundle)
    with LiveServer(settings) as server:
        assert httpx2.get(f"{server.url}/scenes", timeout=10).status_code == 200  # a newcomer's curl just works


class WouldServe(Exception):
    pass


@pytest.fixture
def no_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` stops where it would start the server (so a failing test cannot leave one listening)."""
    from sceneprint.service import connections

    def refuse(*_a: object, **_k: object) -> None:
        raise WouldServe

    monkeypatch.setattr(connections, "make_server", refuse)


def test_serve_refuses_a_non_loopback_address_while_no_key_exists(tmp_path: Path, no_serving: None) -> None:
    data_dir = str(tmp_path / "data")
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--data-dir", data_dir])
    assert result.exit_code == 2 and "--allow-open" in result.output
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--data-dir", data_dir, "--allow-open"])
    assert isinstance(result.exception, WouldServe)
    create_key(tmp_path / "data", "ops", "admin")
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--data-dir", data_dir])
    assert isinstance(result.exception, WouldServe)
