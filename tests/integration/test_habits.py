"""Habits of Celery users on real workers: Django-style namespaced settings, a worker
started without ``-Q`` that takes heavy tasks, a light worker that leaves them, status and alert."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, TESTS_DIR

pytestmark = pytest.mark.integration

GiB = 1024**3


def _client(redis_url):
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import habitsapp

    return habitsapp.make_app(redis_url)


def _env(redis_url: str, **extra: str) -> dict[str, str]:
    # no RMQ_* setting in the environment: the settings object is the only source
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMQ_")}
    return {**env, "RMQ_BROKER_URL": redis_url, "PYTHONPATH": f"{TESTS_DIR}:{ROOT}", **extra}


def test_a_namespaced_budget_shows_in_inspect_stats_and_session_arg_applies(redis_url, unique, start_worker,
                                                                            tmp_path):
    # Given a Django-style app: CELERY_RMQ_MEMORY_BUDGET = "1GiB", CELERY_RMQ_SESSION_ARG = "job"
    app = _client(redis_url)
    w = start_worker(app, app="habitsapp", concurrency=1, hostname=f"ns-{unique}@%h",
                     env=_env(redis_url, HABITS_BUDGET="1GiB", HABITS_SESSION_ROOT=str(tmp_path / "s")))
    # When asked with inspect stats, Then the worker's budget is the namespaced one
    stats = app.control.inspect(destination=[w.node_name], timeout=5).stats()
    memory = stats[w.node_name]["rmq"]["memory"]
    assert memory["budget_bytes"] == 1 * GiB and memory["budget_source"] == "configured", memory
    # And a session=True task takes its session id from the argument rmq_session_arg names
    path = app.tasks["habits.session"].delay(job="j42").get(timeout=30)
    assert os.path.basename(path) == "session_j42"


def test_a_heavy_task_runs_on_a_worker_started_without_q(redis_url, unique, start_worker):
    app = _client(redis_url)
    # Given a worker started the usual way: celery -A app worker, no -Q
    w = start_worker(app, app="habitsapp", concurrency=1, hostname=f"noq-{unique}@%h", env=_env(redis_url))
    assert "-Q" not in w.argv()
    # When a heavy=True task (routed to rmq.heavy) and a plain one are sent
    heavy = app.tasks["habits.heavy"].delay()
    light = app.tasks["habits.where"].delay()
    # Then both run
    assert heavy.get(timeout=30)["pid"] in w.pool_pids()
    assert light.get(timeout=30)["pid"] in w.pool_pids()
    queues = app.control.inspect(destination=[w.node_name], timeout=5).active_queues()[w.node_name]
    assert {q["name"] for q in queues} == {"celery", "rmq.heavy"}


def test_a_worker_whose_tasks_never_go_to_the_heavy_queue_polls_the_default_queue_only(redis_url, unique,
                                                                                       start_worker):
    # Given an app whose governed tasks are all light (soakapp's user-rmq mode), started without -Q
    env = _env(redis_url, SOAK_MODE="user-rmq", RMQ_RESULT_BACKEND=redis_url)
    app = _client(redis_url)
    w = start_worker(app, app="soakapp", concurrency=1, hostname=f"lightonly-{unique}@%h", env=env)
    # Then it consumes the default queue only: the heavy queue's lists are not in its BRPOP
    queues = app.control.inspect(destination=[w.node_name], timeout=5).active_queues()[w.node_name]
    assert {q["name"] for q in queues} == {"celery"}
    # And with -Q naming both, it consumes both
    both = start_worker(app, app="soakapp", concurrency=1, hostname=f"both-{unique}@%h", env=env,
                        queues=["celery", "rmq.heavy"])
    queues = app.control.inspect(destination=[both.node_name], timeout=5).active_queues()[both.node_name]
    assert {q["name"] for q in queues} == {"celery", "rmq.heavy"}


def _status(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    rmq = os.path.join(os.path.dirname(sys.executable), "rmq")
    out = subprocess.run([rmq, "status", *args, "-A", "habitsapp"], env=_env(redis_url), cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out


def test_a_light_worker_leaves_heavy_tasks_which_show_in_status_and_raise_the_alert(redis_url, unique,
                                                                                 start_worker):
    app = _client(redis_url)
    # Given only a worker started with rmq worker --profile light
    rmq = os.path.join(os.path.dirname(sys.executable), "rmq")
    argv = subprocess.run([rmq, "worker", "-A", "habitsapp", "--profile", "light", "--dry-run"],
                          env=_env(redis_url), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert argv.returncode == 0, argv.stderr
    flags = argv.stdout.split()[argv.stdout.split().index("worker") + 1:]
    light = start_worker(app, app="habitsapp", concurrency=1, hostname=f"light-{unique}@%h", env=_env(redis_url),
                         extra_args=flags)
    # When a heavy task and a light one are sent
    heavy = app.tasks["habits.heavy"].delay()
    assert app.tasks["habits.where"].delay().get(timeout=30)["pid"] in light.pool_pids()
    # Then the heavy one waits: the light worker does not consume rmq.heavy
    queues = app.control.inspect(destination=[light.node_name], timeout=5).active_queues()[light.node_name]
    assert {q["name"] for q in queues} == {"celery"}
    assert heavy.state == "PENDING"
    # And rmq status (live) shows the backlog with no consumer
    view = json.loads(_status(redis_url, "--json", "--live").stdout)
    assert view["queues"]["rmq.heavy"] == 1 and "rmq.heavy" not in view["consumers"], view
    text = _status(redis_url, "--live").stdout
    line = next(x for x in text.splitlines() if "rmq.heavy" in x)
    assert "none: nothing consumes it" in line, text
    # And the monitor raises queue_unconsumed on its second view in a row
    first = app.send_task("rmq.monitor", kwargs={"timeout": 2.0}).get(timeout=30)
    assert not [a for a in first["alerts"] if a["subject"] == "rmq.heavy"]
    second = app.send_task("rmq.monitor", kwargs={"timeout": 2.0}).get(timeout=30)
    names = [a["name"] for a in second["alerts"] if a["hostname"] == "cluster" and a["subject"] == "rmq.heavy"]
    assert names == ["queue_unconsumed"], second["alerts"]
    # And a worker started without -Q then takes it
    full = start_worker(app, app="habitsapp", concurrency=1, hostname=f"full-{unique}@%h", env=_env(redis_url))
    assert heavy.get(timeout=30)["pid"] in full.pool_pids()


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("pool", ["solo", "threads", "gevent", "eventlet"])
def test_a_worker_with_a_pool_rmq_cannot_govern_refuses_to_start(pool, redis_url, unique, start_worker):
    if pool in ("gevent", "eventlet") and not _importable(pool):
        pytest.skip(f"{pool} is not installed (it is in the dev extras)")
    # Given a worker started with --pool <pool>
    env = _env(redis_url)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env["PYTHONPATH"], os.environ.get("PYTHONPATH")) if p)
    w = start_worker(None, app="habitsapp", pool=pool, concurrency=2, hostname=f"{pool}-{unique}@%h", env=env)
    # Then it stops at once with status 2 and one line naming the pool, and runs nothing
    assert w.proc is not None and w.proc.wait(60) == 2, w.log()[-2000:]
    lines = [x for x in w.log().splitlines() if x.startswith("rmq: ")]
    assert lines == [lines[0]] and lines[0].startswith(f"rmq: the {pool} pool cannot be governed: "), w.log()[-2000:]
    assert "Traceback" not in w.log()


def test_a_prefork_worker_started_by_alias_processes_is_governed(redis_url, unique, start_worker):
    app = _client(redis_url)
    w = start_worker(app, app="habitsapp", pool="processes", concurrency=1, hostname=f"proc-{unique}@%h",
                     env=_env(redis_url))
    assert app.tasks["habits.where"].delay().get(timeout=30)["pid"] in w.pool_pids()
    stats = app.control.inspect(destination=[w.node_name], timeout=5).stats()[w.node_name]
    assert stats["rmq"]["memory"]["budget_bytes"] == 1 * GiB
