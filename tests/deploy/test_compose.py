"""docker-compose.yml: Compose accepts it for every profile, refuses it without its secret, and says what it should."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sceneprint.service.settings import Settings
from tests.deploy.tools import COMPOSE_FILE, ENV_EXAMPLE, NGINX_CONF, ROOT, compose

SECRETS = {"POSTGRES_PASSWORD": "0123abcdef"}
DEFAULT_SET = {"migrate", "service"}
PROFILES = {"trainer": {"trainer"}, "scale": {"postgres", "migrate-postgres", "replica", "proxy"}}
# Set by the containers themselves, not from the environment: the data directory is the volume's mount point.
FIXED_SETTINGS = {"SCENEPRINT_DATA_DIR"}


def run_compose(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                env_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Compose on the repository's file, in an environment of only ``env`` (a developer's .env is not read)."""
    if env_file is None:
        env_file = tmp_path / "empty.env"
        env_file.write_text("")
    command = [str(compose()), "--file", str(COMPOSE_FILE), "--project-directory", str(ROOT),
               "--env-file", str(env_file), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **(env or {})})


def config(tmp_path: Path, *profiles: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    flags = [flag for profile in profiles for flag in ("--profile", profile)]
    result = run_compose(tmp_path, *flags, "config", "--format", "json", env={**SECRETS, **(env or {})})
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


@pytest.mark.parametrize("profiles", [(), ("trainer",), ("scale",), ("scale", "trainer")])
def test_compose_accepts_the_default_set_and_each_profile(tmp_path: Path, profiles: tuple[str, ...]) -> None:
    services = set(config(tmp_path, *profiles)["services"])
    assert services == DEFAULT_SET.union(*(PROFILES[p] for p in profiles))


@pytest.mark.parametrize("profiles", [(), ("scale",)])
def test_a_missing_secret_stops_compose_and_says_where_to_set_it(tmp_path: Path, profiles: tuple[str, ...]) -> None:
    flags = [flag for profile in profiles for flag in ("--profile", profile)]
    result = run_compose(tmp_path, *flags, "config", "--quiet")
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr and ".env.example" in result.stderr
    # .env.example as shipped leaves it empty, which Compose refuses too; filled in, the file is accepted.
    assert run_compose(tmp_path, "config", "--quiet", env_file=ENV_EXAMPLE).returncode != 0
    filled = tmp_path / "filled.env"
    filled.write_text(re.sub(r"(?m)^POSTGRES_PASSWORD=$", "POSTGRES_PASSWORD=0123abcdef", ENV_EXAMPLE.read_text()))
    result = run_compose(tmp_path, *flags, "config", "--quiet", env_file=filled)
    assert result.returncode == 0, result.stderr


def test_the_service_waits_for_its_migration_and_is_health_checked(tmp_path: Path) -> None:
    services = config(tmp_path)["services"]
    service, migrate = services["service"], services["migrate"]
    assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert migrate["command"] == ["migrate"] and migrate.get("restart") == "no"
    assert service["command"][:1] == ["serve"]
    assert service["healthcheck"]["test"] == ["CMD", "python", "/opt/sceneprint/healthcheck.py"]
    assert [(p["target"], p["published"]) for p in service["ports"]] == [(8000, "8000")]
    mounts = {v["target"]: (v["source"], v.get("read_only", False)) for v in service["volumes"]}
    assert mounts == {"/data": ("data", False), "/models": ("models", False)}  # the registry, seeded on first start
    assert service["environment"]["SCENEPRINT_REGISTRY"] == "/models"
    for container in (service, migrate):
        assert container["read_only"] is True and any(t.startswith("/tmp") for t in container["tmpfs"])
        assert container["cap_drop"] == ["ALL"] and container["image"] == "sceneprint:latest"
        assert container["build"]["dockerfile"] == "docker/Dockerfile"


def test_every_setting_reaches_the_containers_from_the_environment(tmp_path: Path) -> None:
    settings = {f"SCENEPRINT_{name.upper()}" for name in Settings.model_fields} - FIXED_SETTINGS
    services = config(tmp_path, env={"SCENEPRINT_MAX_SCENES": "7"})["services"]
    for name in ("service", "migrate"):
        environment = services[name]["environment"]
        assert set(environment) == settings, name
        assert environment["SCENEPRINT_MAX_SCENES"] == "7"
        assert environment["SCENEPRINT_UNKNOWN_THRESHOLD"] == ""  # unset: empty, which the service reads as unset


def test_env_example_lists_every_variable_the_compose_file_reads(tmp_path: Path) -> None:
    listed = re.findall(r"(?m)^([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text())
    assert len(listed) == len(set(listed))
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    assert set(listed) == read


def test_the_scale_profile_runs_replicas_on_postgres_behind_the_proxy(tmp_path: Path) -> None:
    services = config(tmp_path, "scale")["services"]
    replica, proxy, postgres = services["replica"], services["proxy"], services["postgres"]
    assert replica["deploy"]["replicas"] >= 2 and "ports" not in replica  # reached through the proxy only
    url = replica["environment"]["SCENEPRINT_DATABASE_URL"]
    assert url == f"postgresql+psycopg://sceneprint:{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/sceneprint"
    assert services["migrate-postgres"]["environment"]["SCENEPRINT_DATABASE_URL"] == url
    assert postgres["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    assert replica["depends_on"]["migrate-postgres"]["condition"] == "service_completed_successfully"
    assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert proxy["depends_on"]["replica"]["condition"] == "service_healthy"
    # Every replica shares one clip store; the single service keeps its own (its sweep must not see theirs).
    stores = {name: next(v["source"] for v in services[name]["volumes"] if v["target"] == "/data")
              for name in ("replica", "migrate-postgres", "service")}
    assert stores == {"replica": "scale-data", "migrate-postgres": "scale-data", "service": "data"}
    (conf,) = proxy["volumes"]
    assert (Path(conf["source"]), conf["target"]) == (NGINX_CONF, "/etc/nginx/conf.d/default.conf")
    assert "server replica:8000 " in NGINX_CONF.read_text()  # the upstream is this service, on its port
    assert [p["target"] for p in proxy["ports"]] == [8080] and "listen 8080;" in NGINX_CONF.read_text()


def test_the_trainer_profile_retrains_into_the_models_volume_the_service_reads(tmp_path: Path) -> None:
    services = config(tmp_path, "trainer")["services"]
    trainer = services["trainer"]
    # `sceneprint retrain CONFIG --registry DIR` publishes to the registry that the service follows.
    assert trainer["command"] == ["retrain", "training/configs/student-default.json", "--registry", "/models"]
    assert trainer["build"]["dockerfile"] == "docker/trainer.Dockerfile"
    assert trainer["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    mounts = {v["target"]: v["source"] for v in trainer["volumes"]}
    assert mounts["/models"] == "models" == next(v["source"] for v in services["service"]["volumes"]
                                                  if v["target"] == "/models")
    assert trainer["environment"]["SCENEPRINT_DEV_DATA"] == "/train-data" and "/train-data" in mounts
