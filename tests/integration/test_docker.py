"""The compose file is valid (``docker-compose config``)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from .conftest import ROOT

pytestmark = pytest.mark.integration

COMPOSE = os.path.join(ROOT, "docker", "compose.yml")


def _docker_compose() -> str | None:
    found = shutil.which("docker-compose")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    # root on a Debian machine: install Debian's docker-compose (about 25 s)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", "docker-compose"], env=env, capture_output=True,
                   timeout=600)
    return shutil.which("docker-compose")


def test_compose_file_passes_docker_compose_config():
    tool = _docker_compose()
    if tool is None:
        pytest.skip("docker-compose is not installed and could not be installed here (needs root and apt)")
    env = {**os.environ, "REDIS_PASSWORD": "test-only", "FLOWER_USER": "u", "FLOWER_PASSWORD": "p"}
    out = subprocess.run([tool, "-f", COMPOSE, "config"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    services = config["services"]
    assert {"redis", "worker-light", "worker-heavy", "beat", "flower"} <= set(services)
    assert "ports" not in services["redis"]  # Redis is not published
    assert "--requirepass" in services["redis"]["command"]
    assert services["worker-heavy"]["mem_limit"]  # so rmq's cgroup detection is exercised
    assert any("--basic-auth=u:p" in part for part in services["flower"]["command"])


def test_compose_refuses_to_run_without_passwords():
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD")}
    out = subprocess.run([tool, "-f", COMPOSE, "config"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "REDIS_PASSWORD" in out.stderr


def test_dockerfile_runs_as_a_non_root_user():
    text = open(os.path.join(ROOT, "docker", "Dockerfile")).read()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
