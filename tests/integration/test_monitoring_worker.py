"""Flower, Prometheus, alerts, the beat monitor and ``rmq status`` on real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import redis as redis_lib
from kombu import Exchange, Queue
from prometheus_client.parser import text_string_to_metric_families

from rmq.monitoring.cluster import collect_cluster_view, load_or_collect, tracked_queues
from rmq.monitoring.worker_monitor import CpuProbe
from rmq.testing.redis import free_port
from rmq.testing.worker import wait_until

from .conftest import ROOT, TESTS_DIR, ready, taskapp_env

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
BUDGET = "600MiB"


def _app(redis_url):
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import monitorapp  # noqa: F401  (registers the test tasks)

    from workers.app import make_app

    return make_app(broker=redis_url, backend=redis_url)


def _rmq(app, w) -> dict:
    replies = app.control.inspect(destination=[w.node_name], timeout=3).stats() or {}
    return replies[w.node_name]["rmq"]


def _samples(text: str) -> dict[str, float]:
    """``{sample name: value}`` of unlabelled samples in a Prometheus exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                out[sample.name] = sample.value
    return out


class _Flower:
    """``celery flower`` on a free loopback port, stopped by PID."""

    def __init__(self, broker: str) -> None:
        self.port = free_port()
        env = {**os.environ, "RMQ_BROKER_URL": broker, "RMQ_RESULT_BACKEND": broker,
               "FLOWER_UNAUTHENTICATED_API": "true"}
        fd, self.log_path = tempfile.mkstemp(prefix="rmq-flower-", suffix=".log")
        argv = [sys.executable, "-m", "celery", "-A", "workers.app", "flower",
                f"--port={self.port}", "--address=127.0.0.1"]
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=fd, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        os.close(fd)

    def workers(self) -> dict:
        if self.proc.poll() is not None:
            with open(self.log_path) as fh:
                raise RuntimeError(f"flower exited {self.proc.returncode}:\n{fh.read()[-2000:]}")
        try:
            r = httpx.get(f"http://127.0.0.1:{self.port}/api/workers?refresh=1", timeout=10)
        except httpx.TransportError:
            return {}  # not listening yet
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        os.unlink(self.log_path)


def test_flower_and_prometheus_show_the_counters_of_tasks_run_in_pool_children(redis_url, start_worker):
    app = _app(redis_url)
    n = 6
    # Given a governed worker with the metrics endpoint on a port of its choosing
    w = start_worker(app, app="monitorapp", concurrency=2,
                     env=taskapp_env(redis_url, memory_budget=BUDGET, metrics_port=0))
    port = wait_until(lambda: _rmq(app, w)["metrics"]["port"], 10, what="the metrics port in the snapshot")
    before = _samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
    assert before["rmq_up"] == 1 and before["rmq_admitted_total"] == 0
    assert before["rmq_memory_budget_bytes"] == 600 * MiB

    # When N governed tasks run in its pool processes
    results = [app.tasks["m.noop"].delay(i).get(timeout=30) for i in range(n)]
    assert {r["pid"] for r in results} <= set(w.pool_pids()) and w.pid not in {r["pid"] for r in results}

    # Then a Prometheus scrape counts them (children flush their counters within about a second)
    def scraped() -> dict | None:
        s = _samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
        return s if s.get("rmq_admitted_total") == n else None

    samples = wait_until(scraped, 10, interval=0.2, what=f"rmq_admitted_total == {n}")
    assert samples["rmq_memory_worker_bytes"] > 0

    # And Flower's API shows the same snapshot under stats.rmq
    flower = _Flower(redis_url)
    try:
        def flower_rmq() -> dict | None:
            rmq = ((flower.workers().get(w.node_name) or {}).get("stats") or {}).get("rmq") or {}
            return rmq if (rmq.get("counters") or {}).get("admitted") == n else None

        rmq = wait_until(flower_rmq, 30, interval=0.5, what="Flower to show the admitted tasks")
    finally:
        flower.stop()
    assert rmq["hostname"] == w.node_name
    assert rmq["memory"]["budget_bytes"] == 600 * MiB and rmq["memory"]["budget_source"] == "configured"
    assert 0 < rmq["memory"]["worker_bytes"] < 600 * MiB
    assert set(rmq["memory"]["children"]) == {str(p) for p in w.pool_pids()}
    assert rmq["counters"]["deferred"] == {} and rmq["metrics"]["port"] == port


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802  (http.server's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.bodies.append(json.loads(body))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


class _Events:
    """Captures ``rmq-alert`` events with ``celery.events.EventReceiver`` on a thread."""

    def __init__(self, app) -> None:
        self.app = app
        self.alerts: list[dict] = []
        self.seen_any = threading.Event()
        self.receiver = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(
                conn, handlers={"rmq-alert": self.alerts.append, "*": lambda e: self.seen_any.set()}
            )
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(5)


def test_memory_alert_is_raised_once_per_crossing_to_log_event_webhook_and_signal(
    redis_url, start_worker, tmp_path
):
    app = _app(redis_url)
    signal_file = tmp_path / "signals.jsonl"
    hook = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    hook.bodies = []  # type: ignore[attr-defined]
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    events = _Events(app)
    try:
        # Given a worker alerting at 50 % of its budget, re-arming below 40 %, with a 1 s cool-down
        # (a governor reading every 100 ms: the task reaches each level in a few readings)
        env = taskapp_env(redis_url, memory_budget=BUDGET, alert_memory_ratio=0.5, alert_hysteresis=0.1,
                          alert_cooldown="1s", alert_webhook=f"http://127.0.0.1:{hook.server_port}/hook",
                          monitor_interval="100ms")
        w = start_worker(app, app="monitorapp", concurrency=1,
                         env={**env, "MONITOR_SIGNAL_FILE": str(signal_file)})
        assert events.seen_any.wait(15), "the event receiver saw no worker event"
        assert _rmq(app, w)["memory"]["ratio"] < 0.35
        phases = app.tasks["m.memory_phases"]

        def evaluations() -> int:
            return _rmq(app, w)["alerting"]["evaluations"]

        # When memory crosses 50 %, stays, dips to 46 % (within the hysteresis) and crosses again
        # (each phase holds for 2 s: at least one evaluation, one a second, of a reading inside it)
        reached = phases.delay([[0.56, 2.0], [0.46, 2.0], [0.56, 2.0]]).get(timeout=90)
        assert reached[0] >= 0.56 and 0.40 < reached[1] <= 0.46 and reached[2] >= 0.56, reached
        done = evaluations()
        wait_until(lambda: evaluations() >= done + 2, 10, what="two more alert evaluations")

        # Then exactly one memory alert went to each destination
        def memory(items: list[dict]) -> list[dict]:  # this worker's memory alerts (the Redis is shared)
            return [a for a in items if a.get("name") == "memory" and a.get("hostname") == w.node_name]

        def signals() -> list[dict]:  # what the receiver in the worker's main process got
            lines = signal_file.read_text().splitlines() if signal_file.exists() else []
            return [json.loads(line) for line in lines]

        wait_until(lambda: memory(hook.bodies), 10, what="the webhook")  # type: ignore[attr-defined]
        assert len(memory(events.alerts)) == 1, events.alerts
        assert len(memory(hook.bodies)) == 1, hook.bodies  # type: ignore[attr-defined]
        assert len(memory([s["alert"] for s in signals()])) == 1
        assert _rmq(app, w)["alerting"]["raised"]["memory"] == 1
        event = memory(events.alerts)[0]
        assert event["threshold"] == 0.5 and event["value"] >= 0.5 and event["level"] == "warning"
        assert [s["sender"] for s in signals() if s["alert"]["name"] == "memory"] == [w.node_name]
        assert w.log().count("rmq alert memory on") == 1

        # When memory fell below 40 % (the task ended) and crosses again, a second alert is raised
        result = phases.delay([[0.56, 3.0]])

        def alerting() -> dict | None:
            snap = _rmq(app, w)
            return snap if "memory" in snap["alerts"] else None

        snap = wait_until(alerting, 30, interval=0.2, what="the memory alert in the snapshot")
        assert snap["counters"]["alerts"] >= 2
        result.get(timeout=60)
        wait_until(lambda: len(memory(events.alerts)) == 2, 10, what="a second rmq-alert event")
        wait_until(lambda: len(memory(hook.bodies)) == 2, 10, what="a second webhook")  # type: ignore[attr-defined]
        assert len(memory([s["alert"] for s in signals()])) == 2
        assert _rmq(app, w)["alerting"]["webhook"]["sent"] >= 2
    finally:
        events.stop()
        hook.shutdown()
        hook.server_close()


def _status(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RMQ_BROKER_URL": redis_url, "RMQ_RESULT_BACKEND": redis_url}
    rmq = os.path.join(os.path.dirname(sys.executable), "rmq")
    out = subprocess.run([rmq, "status", *args, "-A", "workers.app"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out


def test_rmq_status_after_the_monitor_lists_live_workers_and_queue_depths(redis_url, unique, start_worker):
    app = _app(redis_url)
    extra = f"mon-{unique}"
    env = taskapp_env(redis_url, memory_budget=BUDGET)
    a = start_worker(app, app="monitorapp", concurrency=1, env=env, queues=["celery"],
                     hostname=f"mon-a-{unique}@%h", wait=False)
    b = start_worker(app, app="monitorapp", concurrency=1, env=env, queues=["celery", extra],
                     hostname=f"mon-b-{unique}@%h", wait=False)
    ready(app, a, b)
    # Given a beat monitor run (the rmq.monitor task, run by a worker)
    app.send_task("rmq.monitor", kwargs={"timeout": 2.0}).get(timeout=30)
    # Then rmq status --json lists both workers and the queues they consume
    # (the machine is shared: other sessions' workers may use the same Redis database)
    view = json.loads(_status(redis_url, "--json").stdout)
    assert view["source"] == "monitor"
    assert {a.node_name, b.node_name} <= set(view["workers"])
    assert view["workers"][a.node_name]["memory"]["budget_bytes"] == 600 * MiB
    assert view["queues"][extra] == 0 and {"celery", "rmq.heavy"} <= set(view["queues"])
    assert view["consumers"][extra] == [b.node_name]
    assert a.node_name in view["consumers"]["celery"] and b.node_name in view["consumers"]["celery"]

    # When b stops and its queue fills up
    b.stop()
    for i in range(3):
        app.tasks["m.noop"].apply_async((i,), queue=extra)
    app.send_task("rmq.monitor", kwargs={"timeout": 2.0}).get(timeout=30)
    # Then the next view has only a, and the backlog b left behind
    view = json.loads(_status(redis_url, "--json").stdout)
    assert a.node_name in view["workers"] and b.node_name not in view["workers"]
    brief = {k: v for k, v in view.items() if k != "workers"}
    assert view["queues"].get(extra) == 3 and extra not in view["consumers"], brief
    # And one more run raises the cluster alert: a queue with messages that nobody consumes
    stored = app.send_task("rmq.monitor", kwargs={"timeout": 2.0}).get(timeout=30)
    cluster = [x["name"] for x in stored["alerts"] if x["hostname"] == "cluster" and x["subject"] == extra]
    assert cluster == ["queue_unconsumed"]

    # And the table form renders (plain text when stdout is not a terminal)
    text = _status(redis_url).stdout
    assert a.node_name in text and b.node_name not in text
    assert "memory" in text and "600.0MiB budget" in text
    assert extra in text and "queue_unconsumed" in text


def test_status_reads_the_stored_view_or_asks_the_broker_live(redis_url, unique):
    import workers.tasks  # noqa: F401
    from workers.app import make_app

    queue = f"mon-{unique}"
    app = make_app(broker=redis_url, backend=redis_url, queue=queue)
    client = redis_lib.Redis.from_url(redis_url)
    for i in range(2):
        app.tasks["workers.noop"].delay(i)
    app.tasks["workers.noop"].apply_async((9,), queue=f"lost-{unique}")  # routed where nobody listens
    with app.connection_for_write() as conn:  # declared and bound, but empty
        Queue(f"empty-{unique}", Exchange(f"empty-{unique}"), f"empty-{unique}")(conn.default_channel).declare()
    # With no stored view, status collects live (and stores nothing)
    view = load_or_collect(app, timeout=0.5)
    assert view["source"] == "live"
    assert view["queues"][queue] == 2 and view["queues"]["rmq.heavy"] == 0
    # a queue found on the broker shows when it holds messages
    assert view["queues"][f"lost-{unique}"] == 1 and f"empty-{unique}" not in view["queues"]
    assert client.get("rmq:cluster") is None
    # With a stored view, status shows it, without the monitor's bookkeeping
    collect_cluster_view(app, timeout=0.5)
    assert client.ttl("rmq:cluster") >= 120
    view = load_or_collect(app, timeout=0.5)
    assert view["source"] == "monitor" and "history" not in view
    assert load_or_collect(app, live=True, timeout=0.5)["source"] == "live"


def test_tracked_queues_keep_a_backlog_left_behind_until_it_drains():
    previous = {"queues": {"left": 3, "drained": 0, "was_consumed": 0}, "consumers": {"was_consumed": ["w2"]}}
    names = tracked_queues({"a": ["w1"]}, ["celery", "rmq.heavy"], ["paused"], previous)
    assert names == ["a", "celery", "left", "paused", "rmq.heavy", "was_consumed"]


def test_cpu_probe_gives_busy_percent_between_calls():
    from collections import namedtuple

    Times = namedtuple("Times", "user system idle iowait")
    readings = iter([Times(10, 0, 90, 0), Times(45, 15, 130, 10)])
    probe = CpuProbe(lambda: next(readings))
    assert probe() is None  # no interval yet
    assert probe() == 50.0  # 50 busy of 100 seconds (iowait counts as idle)


def test_a_worker_with_a_bad_alert_webhook_exits_2_with_one_line(redis_url):
    env = {**os.environ, **taskapp_env(redis_url, alert_webhook="ftp://example.invalid/hook")}
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-c", "1", "--without-mingle"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("rmq:")]
    assert len(lines) == 1 and "rmq_alert_webhook" in lines[0].lower() and "ftp://" in lines[0], out.stderr
    assert "Traceback" not in out.stderr
