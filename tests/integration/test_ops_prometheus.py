"""The operations package against a real Prometheus (Debian's) scraping two real workers and the exporter:
every dashboard query returns series, and the shipped backlog and memory rules fire when their
condition is produced for real (a queue nobody consumes; a worker held in the pause zone).

The rules are loaded as shipped except their ``for:`` durations (2 s instead of minutes), and the
server scrapes and evaluates every second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import yaml

from rmq.testing.prometheus import PrometheusServer, ensure_prometheus
from rmq.testing.redis import free_port
from rmq.testing.worker import wait_until

from .conftest import ROOT, TESTS_DIR, taskapp_env

pytestmark = pytest.mark.integration

RULES = os.path.join(ROOT, "deploy", "prometheus", "rules.yml")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "rmq.json")
MiB = 1024 * 1024
#: the heavy worker's budget: memory_phases grows its task until the worker is at PAUSE_AT of it
HEAVY_BUDGET = "400MiB"
PAUSE_AT = 0.87  # above the pause line (0.85); the growth overshoots by a step or two, short of the kill line (0.95)


@pytest.fixture(scope="module")
def prometheus_ok() -> None:
    found = ensure_prometheus(os.path.join(ROOT, "scripts", "install_prometheus"))
    if isinstance(found, str):
        pytest.skip(found)


def _client(redis_url, queue):
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import opsapp  # noqa: F401  (registers the test tasks)

    from workers.app import make_app

    return make_app(broker=redis_url, backend=redis_url, queue=queue)


def _fast_rules(directory: str) -> str:
    """rules.yml with every ``for:`` at 2 s (the expressions as shipped)."""
    with open(RULES) as fh:
        rules = yaml.safe_load(fh)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    path = os.path.join(directory, "rules-fast.yml")
    with open(path, "w") as fh:
        yaml.safe_dump(rules, fh)
    return path


class _Exporter:
    """``rmq exporter`` on a free loopback port, stopped by PID."""

    def __init__(self, redis_url: str, port: int) -> None:
        env = {**os.environ, **taskapp_env(redis_url)}
        fd, self.log_path = tempfile.mkstemp(prefix="rmq-exporter-", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rmq.cli", "exporter", "-A", "opsapp", f"--port={port}"],
            env=env, cwd=ROOT, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        os.close(fd)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        os.unlink(self.log_path)


def _firing(prom: PrometheusServer, alertname: str, **labels: str) -> dict | None:
    for alert in prom.alerts():
        if alert["labels"].get("alertname") == alertname and alert["state"] == "firing" and all(
            alert["labels"].get(k) == v for k, v in labels.items()
        ):
            return alert
    return None


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel, expr) of the committed dashboard, its variables set to 'all' and the rate window to 30 s."""
    with open(DASHBOARD) as fh:
        board = json.load(fh)
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets") or ():
            expr = target["expr"].replace("$instance", ".+").replace("$queue", ".+")
            out.append((panel["title"], expr.replace("$__rate_interval", "30s")))
    return out


def test_dashboard_queries_return_series_and_rules_fire_on_real_workers(
    redis_url, start_worker, prometheus_ok, tmp_path
):
    uid = uuid.uuid4().hex[:6]
    light_q, heavy_q, orphan_q = f"ops-light-{uid}", f"ops-heavy-{uid}", f"ops-orphan-{uid}"
    app = _client(redis_url, light_q)
    light_port, heavy_port, exporter_port = free_port(), free_port(), free_port()
    common = {"session_root": str(tmp_path / "sessions"), "throttle_max_wait": "2s"}
    # Given two real workers with their metrics endpoints: a light one and a heavy one with a small budget
    light = start_worker(app="opsapp", queues=[light_q], concurrency=2, wait=False,
                         env={**taskapp_env(redis_url, memory_budget="600MiB", metrics_port=light_port, **common),
                              "RMQ_APP_QUEUE": light_q})
    heavy = start_worker(app="opsapp", queues=[heavy_q], concurrency=1, wait=False,
                         env=taskapp_env(redis_url, memory_budget=HEAVY_BUDGET, metrics_port=heavy_port, **common))
    # and the exporter, and Prometheus scraping all three every second with the shipped rules
    exporter = _Exporter(redis_url, exporter_port)
    prom = PrometheusServer(
        {"rmq-workers": [f"127.0.0.1:{light_port}", f"127.0.0.1:{heavy_port}"],
         "rmq-exporter": [f"127.0.0.1:{exporter_port}"]},
        rule_files=[_fast_rules(str(tmp_path))],
    )
    started = time.time()
    try:
        prom.start()
        light.wait_ready(app)
        heavy.wait_ready(app)
        wait_until(lambda: all(prom.targets_up().values()) and len(prom.targets_up()) == 3, 30, interval=0.5,
                   what=f"the three targets up: {prom.targets_up()}")

        # When tasks run: admissions, models, rate-limit waits and a deferral, sessions
        results = [app.tasks["ops.noop"].delay(i) for i in range(6)]
        results += [app.tasks["ops.models"].delay(), app.tasks["ops.throttled"].delay(),
                    app.tasks["ops.session"].delay(f"s-{uid}"), app.tasks["ops.denied"].delay()]
        for r in results:
            r.get(timeout=60)
        app.tasks["ops.denied"].delay()  # no token left this hour: deferred
        # and tasks wait in a queue nobody consumes, at two priorities
        for priority in (0, 0, 9, 9, 9):
            app.tasks["ops.noop"].apply_async((0,), queue=orphan_q, priority=priority)
        # and the heavy worker is held in the pause zone by a task of its own
        png = os.environ.get("RMQ_DASHBOARD_PNG")
        phases = [[PAUSE_AT, 30]] if not png else [[PAUSE_AT, 30], [0.5, 120]]  # the picture shows a resume too
        held = app.tasks["m.memory_phases"].apply_async((phases,), queue=heavy_q)

        # Then the backlog rule fires for the queue without consumer (and not for the consumed ones)
        alert = wait_until(lambda: _firing(prom, "RmqQueueWithoutConsumer", queue=orphan_q), 30, interval=0.5,
                           what="RmqQueueWithoutConsumer firing for the orphan queue")
        assert alert["value"] in ("5", "5e+00"), alert
        assert not _firing(prom, "RmqQueueWithoutConsumer", queue=light_q)
        # the exporter counted the messages of each priority list, not only the base list's
        by_priority = {r["metric"]["priority"]: float(r["value"][1])
                       for r in prom.query(f'rmq_queue_messages{{queue="{orphan_q}"}}') if float(r["value"][1])}
        assert sum(by_priority.values()) == 5 and len(by_priority) == 2, by_priority

        # and the memory rules fire for the heavy worker held above its pause line, not for the light one
        heavy_instance = f"127.0.0.1:{heavy_port}"
        for name in ("RmqMemoryNearKillLine", "RmqPausedTooLong"):
            wait_until(lambda name=name: _firing(prom, name, instance=heavy_instance), 40, interval=0.5,
                       what=f"{name} firing for the heavy worker")
        assert not _firing(prom, "RmqMemoryNearKillLine", instance=f"127.0.0.1:{light_port}")
        assert prom.query(f'rmq_memory_zone{{instance="{heavy_instance}", zone="pause"}} == 1')
        wait_until(lambda: prom.query(f'rmq_paused_seconds_total{{instance="{heavy_instance}"}} > 1'), 10,
                   interval=0.5, what="the heavy worker's paused seconds counting")

        # And every query of the dashboard returns series from these scrapes
        def empty() -> list[str]:
            return [f"{title}: {expr}" for title, expr in _dashboard_queries() if not prom.query(expr)]

        missing = empty()
        if missing:  # counters a pool process flushed a moment ago reach Prometheus within a scrape or two
            deadline = time.monotonic() + 15
            while missing and time.monotonic() < deadline:
                time.sleep(1)
                missing = empty()
        assert missing == [], "dashboard queries without series:\n" + "\n".join(missing)
        assert held.state in ("PENDING", "STARTED")  # still holding: the figures above were taken under it
        if png:  # a minute more of traffic, then draw the main panels
            _traffic(app, orphan_q, float(os.environ.get("RMQ_DASHBOARD_SECONDS", "60")))
            _render_png(prom, png, heavy_instance, started)
    finally:
        heavy.kill()  # ends the held task at once (the fixture then ends its pool process)
        prom.stop()
        exporter.stop()


def _traffic(app, orphan_q: str, seconds: float) -> None:
    """Waves of tasks for the picture: admissions every second, models and rate-limit waits every few,
    and a backlog growing in the queue nobody consumes."""
    deadline = time.monotonic() + seconds
    tick = 0
    while time.monotonic() < deadline:
        pending = [app.tasks["ops.noop"].delay(i) for i in range(2 + tick % 6)]
        if tick % 5 == 0:
            pending += [app.tasks["ops.models"].delay(), app.tasks["ops.throttled"].delay(4, "2/s")]
            app.tasks["ops.denied"].delay()  # the hour's token is gone: deferred
        if tick % 3 == 0:
            app.tasks["ops.noop"].apply_async((0,), queue=orphan_q, priority=tick % 10)
        for r in pending:
            r.get(timeout=30)
        tick += 1
        time.sleep(1)


def _render_png(prom: PrometheusServer, path: str, heavy_instance: str, started: float) -> None:
    """The main panels, from the live query API, drawn with matplotlib (docs/operations-dashboard.png)."""
    script = os.path.join(ROOT, "scripts", "render_dashboard.py")
    spec = importlib.util.spec_from_file_location("render_dashboard", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.render(prom.url, path, highlight=heavy_instance, seconds=time.time() - started)


def _scrape(port: int) -> dict[str, dict[tuple, float]]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple, float]] = {}
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_per_process_series_keep_their_labels_when_pool_processes_are_recycled(redis_url, start_worker):
    queue = f"ops-recycle-{uuid.uuid4().hex[:6]}"
    app = _client(redis_url, queue)
    port = free_port()
    # Given a worker whose pool processes are replaced after every task
    w = start_worker(app, app="opsapp", queues=[queue], concurrency=2, extra_args=["--max-tasks-per-child=1"],
                     env={**taskapp_env(redis_url, memory_budget="600MiB", metrics_port=port), "RMQ_APP_QUEUE": queue})
    first = set(w.pool_pids())
    # When six tasks run, so that every pool process is replaced several times
    for i in range(6):
        assert app.tasks["ops.noop"].delay(i).get(timeout=30) == i
    wait_until(lambda: w.pool_pids() and not set(w.pool_pids()) & first, 20, what="every pool process replaced")

    # Then the per-process series are still those of slots 0 and 1, and the counters kept every task
    def settled() -> dict | None:
        m = _scrape(port)
        slots = {dict(labels)["process"] for labels in m.get("rmq_memory_child_bytes", {})}
        return m if slots == {"0", "1"} and m["rmq_admitted_total"][()] == 6 else None

    m = wait_until(settled, 15, interval=0.3, what="slot labels 0 and 1 and 6 admissions")
    assert not any("pid" in dict(labels) for name, series in m.items() if name != "rmq_info" for labels in series)
