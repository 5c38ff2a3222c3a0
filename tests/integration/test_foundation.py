"""Governed tasks on real workers, routing, priorities, stats, cgroups, bad config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis as redis_lib

from rmq.monitoring.queues import redis_queue_depth
from rmq.testing.cgroups import MemoryCgroup, can_create

from .conftest import ROOT, worker_env

pytestmark = pytest.mark.integration


def test_governed_tasks_run_and_heavy_tasks_wait_for_a_heavy_worker(redis_url, redis_app, start_worker):
    # Given a worker that consumes only the default queue
    start_worker(redis_app, env=worker_env(redis_url), queues=["celery"], concurrency=2)
    light = [redis_app.tasks["workers.noop"].delay(i) for i in range(4)]
    heavy = redis_app.tasks["workers.heavy_record"].delay("h")
    # Then light tasks run, the heavy one stays in the heavy queue
    assert [r.get(timeout=20) for r in light] == [0, 1, 2, 3]
    client = redis_lib.Redis.from_url(redis_url)
    assert redis_queue_depth(client, "rmq.heavy") == 1, "the heavy task was not routed to rmq.heavy"
    assert heavy.state == "PENDING"
    # When a heavy worker starts, it runs it
    start_worker(redis_app, env=worker_env(redis_url), queues=["rmq.heavy"], concurrency=1)
    assert heavy.get(timeout=20)["label"] == "h"


def _priority_order(app, start_worker, env) -> list[str]:
    record = app.tasks["workers.record"]
    sent = [record.apply_async(("low",), priority="low") for _ in range(20)]
    sent += [record.apply_async(("none",)) for _ in range(5)]
    sent += [record.apply_async(("high",), priority="high")]
    start_worker(app, env=env, concurrency=1, extra_args=["--prefetch-multiplier=1"])
    results = [r.get(timeout=60) for r in sent]
    return [r["label"] for r in sorted(results, key=lambda r: r["started"])]


def test_priorities_on_redis(redis_url, redis_app, start_worker):
    order = _priority_order(redis_app, start_worker, worker_env(redis_url))
    assert order == ["high"] + ["none"] * 5 + ["low"] * 20


def test_priorities_on_rabbitmq(amqp_url, redis_url, unique, start_worker):
    import workers.tasks  # noqa: F401
    from workers.app import make_app

    queue = f"rmq-prio-{unique}"
    app = make_app(broker=amqp_url, backend=redis_url, queue=queue)
    env = {**worker_env(amqp_url, redis_url), "RMQ_APP_QUEUE": queue}
    try:
        order = _priority_order(app, start_worker, env)
        assert order == ["high"] + ["none"] * 5 + ["low"] * 20
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        app.close()


def test_inspect_stats_shows_the_governor(redis_url, redis_app, start_worker):
    w = start_worker(redis_app, env=worker_env(redis_url, memory_budget="3GiB", cpu_slots=3), concurrency=2)
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "inspect", "stats", "--json",
         "-d", w.node_name, "--timeout", "5"],
        env={**os.environ, **worker_env(redis_url)}, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])[w.node_name]["rmq"]
    assert stats["memory"]["budget_bytes"] == 3 * 1024**3
    assert stats["memory"]["budget_source"] == "configured"
    assert stats["cpu"]["slots"] == 3
    # the tree: main process plus its two pool processes
    assert len(stats["memory"]["children"]) == 2
    assert stats["memory"]["worker_bytes"] >= stats["memory"]["main_bytes"] > 10 * 1024**2


def test_worker_inside_a_memory_cgroup_sees_the_cgroup_limit(redis_url, redis_app, start_worker):
    reason = can_create()
    if reason:
        pytest.skip(reason)
    cg = MemoryCgroup(1536 * 1024**2)
    w = None
    try:
        w = start_worker(redis_app, env=worker_env(redis_url), concurrency=1, prefix=cg.wrap())
        stats = redis_app.control.inspect(destination=[w.node_name], timeout=5).stats()[w.node_name]["rmq"]
        mem = stats["memory"]
        assert mem["budget_source"] == f"cgroup-v{cg.version}"
        assert mem["limit_bytes"] == 1536 * 1024**2
        # counted by the kernel and woken by it, the worker's budget is the whole limit (its kill line
        # sits 48 MiB under it on a worker this small, 1.5 % on larger ones); the polling default,
        # 90 %, is for workers without kernel accounting
        assert mem["accounting"]["mode"] == f"cgroup-v{cg.version}"
        assert mem["budget_bytes"] == 1536 * 1024**2
        assert mem["lines_source"].startswith("kernel wake-up defaults")
        assert mem["line_ratios"]["kill"] == pytest.approx(1 - 48 / 1536)
        assert mem["cgroup_working_set_bytes"] is not None
    finally:
        if w is not None:  # stopped here, not by the fixture, so that its cgroup can go too
            w.stop()
        cg.remove()


@pytest.mark.parametrize(
    ("setting", "value", "needle"),
    [
        ("RMQ_MEMORY_BUDGET", "0", "rmq_memory_budget"),
        ("RMQ_PAUSE_RATIO", "0.99", "out of order"),
    ],
)
def test_bad_config_makes_celery_worker_exit_2_with_one_line(redis_url, setting, value, needle):
    env = {**os.environ, **worker_env(redis_url), setting: value}
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-c", "1", "--without-mingle"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("rmq:")]
    assert len(lines) == 1 and needle in lines[0].lower(), out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_rmq_key_makes_the_worker_exit_2(redis_url, tmp_path):
    app_module = tmp_path / "badapp.py"
    app_module.write_text(
        "from workers.app import make_app\n"
        "app = make_app()\n"
        "app.conf.rmq_memory_budgett = '1GiB'\n"
    )
    env = {**os.environ, **worker_env(redis_url), "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "badapp", "worker", "-c", "1", "--without-mingle"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "unknown rmq setting 'rmq_memory_budgett'" in out.stderr
    assert "Traceback" not in out.stderr


def test_declared_memory_at_the_threshold_routes_to_the_heavy_queue(redis_url, monkeypatch):
    import workers.tasks  # noqa: F401
    from workers.app import make_app

    monkeypatch.setenv("RMQ_HEAVY_MEMORY_THRESHOLD", "64MiB")
    app = make_app(broker=redis_url, backend=redis_url)
    client = redis_lib.Redis.from_url(redis_url)
    app.tasks["workers.noop"].delay(1)  # declares 64MiB
    app.tasks["workers.touch"].delay(1, 0.0)  # declares nothing
    heavy = redis_queue_depth(client, "rmq.heavy")
    default = redis_queue_depth(client, "celery")
    assert (heavy, default) == (1, 1)
    app.close()
