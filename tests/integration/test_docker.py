"""The compose file is valid (``docker-compose config``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

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
    redis = services["redis"]
    assert "ports" not in redis  # Redis is not published
    # the password reaches Redis through its environment and a config file, not its command line
    assert redis["environment"]["REDIS_PASSWORD"] == "test-only"
    assert not any("test-only" in part or "--requirepass" in part for part in redis["command"])
    # its data lives on a named volume, so queued tasks survive a restart
    mounts = [v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in redis["volumes"]]
    assert any(m.startswith("redis-data:/data") for m in mounts), mounts
    assert "redis-data" in config["volumes"]
    assert services["worker-heavy"]["mem_limit"] and services["worker-light"]["mem_limit"]  # budgets from cgroups
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "u:p"
    assert not any("basic-auth" in part for part in services["flower"]["command"])
    assert services["exporter"]["command"][:2] == ["rmq", "exporter"]


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


def _redis_start_script() -> str:
    """The shell script compose runs as the Redis container's command (compose's ``$$`` unescaped)."""
    with open(COMPOSE) as fh:
        command = yaml.safe_load(fh)["services"]["redis"]["command"]
    assert command[:2] == ["sh", "-c"]
    return command[2].replace("$$", "$")


def test_compose_redis_keeps_its_data_across_a_crash_and_its_password_off_the_command_line(tmp_path):
    """Compose's Redis command and docker/redis.conf, run with the machine's redis-server (docker has
    no daemon here): the config's paths point into a temporary directory, the rest is as shipped."""
    import redis as redis_lib

    from rmq.testing.redis import free_port

    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server on this machine")
    port, password = free_port(), "s3cret-test-only"
    conf_in, conf_out, data = tmp_path / "redis.conf", tmp_path / "private.conf", tmp_path / "data"
    data.mkdir()
    shipped = open(os.path.join(ROOT, "docker", "redis.conf")).read()
    assert "\ndir /data\n" in shipped
    conf_in.write_text(shipped.replace("\ndir /data\n", f"\ndir {data}\n") + f"port {port}\nbind 127.0.0.1\n")
    script = (_redis_start_script().replace("/usr/local/etc/redis/redis.conf", str(conf_in))
              .replace("/tmp/redis.conf", str(conf_out)))

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(["sh", "-c", script], env={**os.environ, "REDIS_PASSWORD": password},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis_lib.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return proc
            except redis_lib.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise
                time.sleep(0.05)

    proc = start()
    try:
        # the password is neither in redis-server's argv nor in its environment, and its file is private
        with open(f"/proc/{proc.pid}/cmdline", "rb") as fh:
            argv = fh.read()
        with open(f"/proc/{proc.pid}/environ", "rb") as fh:
            environ = fh.read()
        assert argv.startswith(b"redis-server") and password.encode() not in argv
        assert b"REDIS_PASSWORD" not in environ and password.encode() not in environ
        assert oct(conf_out.stat().st_mode & 0o777) == "0o600"
        with pytest.raises(redis_lib.AuthenticationError):
            redis_lib.Redis(host="127.0.0.1", port=port, password="wrong").ping()
        # When tasks are queued and Redis dies (SIGKILL: no shutdown save) after its fsync second
        client = redis_lib.Redis(host="127.0.0.1", port=port, password=password)
        client.lpush("celery", *[f"task-{i}" for i in range(5)])
        time.sleep(1.5)
        proc.kill()
        proc.wait(5)
        # Then a restarted Redis still holds them
        proc = start()
        assert redis_lib.Redis(host="127.0.0.1", port=port, password=password).llen("celery") == 5
    finally:
        proc.kill()
        proc.wait(5)
