"""The ``rmq`` command: worker profiles, doctor, and exit 2 on bad configuration."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from rmq.testing.worker import wait_until

from .conftest import ROOT, worker_env

pytestmark = pytest.mark.integration

RMQ = [sys.executable, "-m", "rmq.cli"]


def _run(args, env, timeout=60):
    return subprocess.run([*RMQ, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


def test_profiles_give_fitting_defaults_and_user_flags_win(redis_url):
    env = worker_env(redis_url)
    heavy = _run(["worker", "-A", "workers.app", "--profile", "heavy", "--dry-run"], env)
    assert heavy.returncode == 0, heavy.stderr
    assert "-Q rmq.heavy" in heavy.stdout and "--prefetch-multiplier 1" in heavy.stdout
    light = _run(["worker", "-A", "workers.app", "--profile", "light", "--dry-run", "-c", "7", "-Q", "mine"], env)
    assert "-c 7" in light.stdout and "-Q mine" in light.stdout
    assert light.stdout.count(" -c ") == 1 and light.stdout.count(" -Q ") == 1
    everything = _run(["worker", "-A", "workers.app", "--profile", "all", "--dry-run"], env)
    assert "-Q celery,rmq.heavy" in everything.stdout


def test_rmq_worker_with_bad_config_exits_2_with_one_line(redis_url):
    out = _run(["worker", "-A", "workers.app", "--profile", "light"], {**worker_env(redis_url),
                                                                        "RMQ_MEMORY_BUDGET": "0"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "rmq: configuration error: RMQ_MEMORY_BUDGET must be a size like '6GiB' or a percentage like '90%', got '0'"
    ]


def test_rmq_worker_runs_a_light_worker_on_the_default_queue(redis_url, redis_app):
    proc = subprocess.Popen([*RMQ, "worker", "-A", "workers.app", "--profile", "light", "-n", "light@%h",
                             "--without-mingle", "--without-gossip"],
                            cwd=ROOT, env={**os.environ, **worker_env(redis_url)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import socket

        node = f"light@{socket.gethostname()}"
        wait_until(lambda: redis_app.control.ping(destination=[node], timeout=0.5), 30, interval=0.3,
                   what="the light worker")
        queues = redis_app.control.inspect(destination=[node], timeout=3).active_queues()[node]
        assert [q["name"] for q in queues] == ["celery"]
        assert redis_app.tasks["workers.noop"].delay(5).get(timeout=20) == 5
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_doctor_reports_limits_and_broker(redis_url):
    ok = _run(["doctor", "-A", "workers.app"], worker_env(redis_url, memory_budget="2GiB", cpu_slots=3))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "memory budget   2.0GiB (configured" in ok.stdout
    assert "cpu slots       3 (configured)" in ok.stdout
    assert "broker          reachable" in ok.stdout
    down = _run(["doctor", "-A", "workers.app"], worker_env("redis://127.0.0.1:1/0"))
    assert down.returncode == 1
    assert "broker          UNREACHABLE" in down.stdout
