"""The Prometheus endpoint: on loopback by default, and a scrape changes nothing in the worker."""

from __future__ import annotations

import fcntl
import json
import os
import types
from pathlib import Path

import httpx
import pytest

from rmq.core.config import load_config
from rmq.core.ledger import Entry, Ledger
from rmq.core.runtime import Runtime
from rmq.monitoring.snapshot import SnapshotBuilder
from rmq.monitoring.worker_monitor import WorkerMonitor

DEAD_PID = 4_000_000  # above pid_max: no live process has it


class _Governor:
    """What the snapshot reads of the governor, with one live pool process (this one)."""

    counters = {"killed": 0, "unload_requests": 0, "pauses": 0, "dead_released": 0}
    cpu_slots, paused, ticks, tick_seconds = 2, False, 5, 0.001

    def __init__(self) -> None:
        self.actuator = types.SimpleNamespace(pool_pids=lambda: [os.getpid()])

    def memory_snapshot(self) -> dict:
        return {"worker_bytes": 1, "budget_bytes": 2, "zone": "ok"}


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def worker(tmp_path):
    rt_dir = tmp_path / "rt"
    rt_dir.mkdir()
    ledger = Ledger(str(rt_dir), create=True)
    ledger.try_add(Entry(kind=1, pid=os.getpid(), memory_bytes=1 << 20, task_id="t-1", name="app.task"),
                   lambda reserved: True)
    config = load_config({"rmq_metrics_port": 0}, environ={})
    rt = Runtime(config, None, str(rt_dir), ledger, redis_url=None)
    rt.snapshots = SnapshotBuilder(rt, _Governor(), "w1")  # type: ignore[arg-type]
    # a pool process that has died left its counters behind
    (rt_dir / f"proc-{DEAD_PID}.json").write_text(
        json.dumps({"pid": DEAD_PID, "counters": {"admitted": 7}, "gauges": {}}))
    monitor = WorkerMonitor(rt, "w1")
    yield rt, monitor, rt_dir
    monitor.stop(rt)
    ledger.close()


def test_metrics_listen_on_loopback_by_default(worker):
    # Given a worker with rmq_metrics_port set and no rmq_metrics_addr
    rt, monitor, _ = worker
    # When its endpoint starts
    monitor._start_metrics(rt)
    # Then it listens on 127.0.0.1 only
    assert monitor.metrics["addr"] == "127.0.0.1"
    assert monitor._server.server_address[0] == "127.0.0.1"


def test_a_scrape_changes_nothing_and_takes_no_ledger_lock(worker):
    # Given a worker whose ledger lock another process holds (a long admission, say)
    rt, monitor, rt_dir = worker
    monitor._start_metrics(rt)
    before = _tree(rt_dir)
    holder = os.open(rt_dir / "ledger.lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        # When Prometheus scrapes twice
        url = f"http://127.0.0.1:{monitor.metrics['port']}/metrics"
        bodies = [httpx.get(url, timeout=3.0).text for _ in range(2)]
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    # Then both answered at once, with the reservation and the dead process's counters
    for body in bodies:
        assert "rmq_up 1.0" in body
        assert "rmq_reservations 1.0" in body
        assert "rmq_admitted_total 7.0" in body
    # and the runtime directory (ledger, counter files) is exactly as it was
    assert _tree(rt_dir) == before
    # and a stats request still folds the dead process's counters in, as before
    snap = rt.snapshots.build()
    assert snap["counters"]["admitted"] == 7 and f"proc-{DEAD_PID}.json" not in _tree(rt_dir)
    assert "rmq_admitted_total 7.0" in httpx.get(url, timeout=3.0).text
