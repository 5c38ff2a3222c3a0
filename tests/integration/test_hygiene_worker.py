"""Memory hygiene (docs/design.md#hygiene) in real Celery workers on real Redis.

1. A task that leaves 50 MiB of fragmented small objects behind each run: hygiene gives most of
   it back and the pool process's baseline stays flat over 20 runs; the same body with
   ``hygiene=False``, run side by side in a second worker, keeps the garbage.
2. A task that really leaks 30 MiB per run: its pool process is recycled before it passes
   ``rmq_leak_ceiling``, only between tasks; every task succeeds and runs exactly once; the
   log and ``inspect stats`` name the task.

Memory is read both from outside (psutil RSS of the pool process that ran the task, right
after its result is stored: hygiene runs before the result is sent) and from the per-process
``hygiene`` gauges in ``inspect stats`` (``rmq.processes.<pid>.hygiene``).
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
from typing import Any

import psutil
import pytest
import redis as redis_lib

from rmq.testing.worker import WorkerProcess, wait_until

from .conftest import TESTS_DIR, taskapp_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MiB = 1 << 20


@pytest.fixture
def hy_app(redis_url: str):  # type: ignore[no-untyped-def]
    """A client of ``hygieneapp`` on the test's Redis database."""
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import hygieneapp  # noqa: F401  (registers the hy.* tasks)

    from workers.app import make_app

    app = make_app(broker=redis_url, backend=redis_url)
    yield app
    app.close()


def _rmq_stats(app: Any, w: WorkerProcess) -> dict[str, Any]:
    replies = app.control.inspect(destination=[w.node_name], timeout=3).stats() or {}
    return replies[w.node_name]["rmq"] if w.node_name in replies else {}


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _start(start_worker, app, redis_url: str, queue: str, **rmq: object) -> WorkerProcess:  # type: ignore[no-untyped-def]
    return start_worker(
        app, wait=False, app="hygieneapp", env=taskapp_env(redis_url, **rmq), queues=[queue], concurrency=1
    )


class _PeakSampler:
    """Samples the RSS of a worker's pool processes from outside every 20 ms; keeps each pid's peak."""

    def __init__(self, w: WorkerProcess) -> None:
        self.w = w
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for pid in self.w.pool_pids():
                try:
                    rss = _rss(pid)
                except psutil.Error:
                    continue
                self.peaks[pid] = max(self.peaks.get(pid, 0), rss)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


def test_hygiene_returns_fragmented_garbage_and_the_baseline_stays_flat(
    redis_url: str, hy_app: Any, start_worker: Any, unique: str
) -> None:
    # Given two workers with one pool process each: one runs the task with hygiene, one without
    q_on, q_off = f"hy.on.{unique}", f"hy.off.{unique}"
    w_on = _start(start_worker, hy_app, redis_url, q_on)
    w_off = _start(start_worker, hy_app, redis_url, q_off)
    w_on.wait_ready(hy_app, timeout=60)
    w_off.wait_ready(hy_app, timeout=60)
    on, off = hy_app.tasks["hy.fragment"], hy_app.tasks["hy.fragment_raw"]

    # When each runs the 50 MiB fragmenting task 20 times, one at a time, side by side
    rows = []
    for _ in range(20):
        r_on, r_off = on.apply_async((50,), queue=q_on), off.apply_async((50,), queue=q_off)
        a, b = r_on.get(timeout=60), r_off.get(timeout=60)
        rows.append(
            {
                "on_pid": a["pid"],
                "on_task": a["rss"],
                "on_after": _rss(a["pid"]),
                "off_pid": b["pid"],
                "off_task": b["rss"],
                "off_after": _rss(b["pid"]),
            }
        )

    # And the hygiene gauges of the process that ran them are published
    pid = rows[0]["on_pid"]
    gauges = wait_until(
        lambda: (
            (_rmq_stats(hy_app, w_on).get("processes", {}).get(str(pid), {}).get("hygiene") or {}).get("tasks") == 20
            and _rmq_stats(hy_app, w_on)["processes"][str(pid)]["hygiene"]
        ),
        20,
        interval=0.3,
        what="the hygiene gauges after 20 tasks",
    )
    counters = _rmq_stats(hy_app, w_on)["counters"].get("hygiene", {})

    on_after = [r["on_after"] for r in rows]
    off_after = [r["off_after"] for r in rows]
    returned_per_run = [r["on_task"] - r["on_after"] for r in rows]
    print("\nrun  hygiene: end of body -> after (MiB)   hygiene=False: end of body -> after (MiB)")
    for i, r in enumerate(rows, 1):
        print(
            f"{i:3d}  {r['on_task'] / MiB:8.1f} -> {r['on_after'] / MiB:6.1f}"
            f"                  {r['off_task'] / MiB:8.1f} -> {r['off_after'] / MiB:6.1f}"
        )
    print(
        f"hygiene gauges: baseline {gauges['baseline_bytes'] / MiB:.1f} MiB, growth "
        f"{gauges['growth_bytes'] / MiB:.1f} MiB, returned {gauges['returned_bytes'] / MiB:.1f} MiB over "
        f"{gauges['tasks']} tasks; counters {counters}"
    )
    print(
        f"baseline over runs 2..20: hygiene {min(on_after[1:]) / MiB:.1f}..{max(on_after[1:]) / MiB:.1f} MiB, "
        f"hygiene=False {min(off_after[1:]) / MiB:.1f}..{max(off_after[1:]) / MiB:.1f} MiB; "
        f"median difference {(statistics.median(off_after) - statistics.median(on_after)) / MiB:.1f} MiB; "
        f"returned per run median {statistics.median(returned_per_run) / MiB:.1f} MiB"
    )

    # Then every run ran in the same process of each worker (nothing was recycled)
    assert {r["on_pid"] for r in rows} == {pid} and len({r["off_pid"] for r in rows}) == 1
    # And hygiene gave most of each run's 50 MiB back (the body's RSS minus the RSS after hygiene)
    assert statistics.median(returned_per_run) >= 30 * MiB, returned_per_run
    assert counters["runs"] == 20 and counters["bytes_returned"] >= 20 * 30 * MiB, counters
    assert gauges["returned_bytes"] == counters["bytes_returned"]
    # And the baseline after hygiene stayed flat: over 20 runs it rose by less than a third of
    # one run's garbage (pymalloc arenas pinned by a few live objects, about 1 MiB a run at
    # first), and not at all over the last 8 runs
    mib = [round(x / MiB, 1) for x in on_after]
    assert max(on_after) - on_after[0] <= 18 * MiB, mib
    assert max(on_after[-8:]) - min(on_after[-8:]) <= 6 * MiB, mib
    assert gauges["growth_bytes"] <= 18 * MiB, gauges
    assert gauges["recycling"] is None and gauges["suspect_task"] in (None, "hy.fragment")
    # And without hygiene the process keeps far more: the difference is the garbage it holds
    assert statistics.median(off_after) - statistics.median(on_after) >= 30 * MiB


def test_leaking_process_is_recycled_between_tasks_before_the_ceiling(
    redis_url: str, hy_app: Any, start_worker: Any, unique: str
) -> None:
    # Given a worker with one pool process, a 400 MiB leak ceiling and a slope rule that cannot
    # fire first (its window is longer than the ceiling takes)
    ceiling = 400 * MiB
    queue = f"hy.leak.{unique}"
    w = _start(start_worker, hy_app, redis_url, queue, leak_ceiling="400MiB", leak_window=30)
    w.wait_ready(hy_app, timeout=60)
    runs_key = f"hy:runs:{unique}"
    leak = hy_app.tasks["hy.leak"]

    # When 26 tasks that each leak 30 MiB are queued at once
    with _PeakSampler(w) as sampler:
        pending = [leak.apply_async((30, runs_key), queue=queue) for _ in range(26)]
        results = [r.get(timeout=90) for r in pending]  # raises if any task failed
    stats = _rmq_stats(hy_app, w)
    log = w.log()

    # Then every task succeeded and ran exactly once (no process died under a task)
    runs = [json.loads(x) for x in redis_lib.Redis.from_url(redis_url).lrange(runs_key, 0, -1)]
    assert len(runs) == 26
    results.sort(key=lambda r: r["started"])
    pids = [r["pid"] for r in results]
    order = list(dict.fromkeys(pids))
    leaked = [r["leaked_bytes"] // MiB for r in results]
    print(f"\npids in run order: {[order.index(p) for p in pids]}")
    print(f"leaked MiB held at the end of each task: {leaked}")
    print(
        "peak RSS per pool process (sampled from outside every 20 ms): "
        + ", ".join(f"{pid}: {sampler.peaks.get(pid, 0) / MiB:.0f} MiB" for pid in order)
    )
    print(f"RSS at the end of each task (MiB): {[round(r['rss'] / MiB) for r in results]}")
    gaps = [
        cur["started"] - prev["ended"]
        for prev, cur in zip(results, results[1:], strict=False)
        if cur["pid"] != prev["pid"]
    ]
    print(f"replacement gaps (last task of a process -> first task of the next): {[round(g, 1) for g in gaps]} s")
    hygiene_counters = stats["counters"].get("hygiene", {})
    print(f"stats counters.hygiene: {hygiene_counters}")
    live = {p: g.get("hygiene") for p, g in stats["processes"].items()}
    print(f"stats processes.<pid>.hygiene: {live}")
    lines = [ln for ln in log.splitlines() if "recycling pool process" in ln]
    print("worker log:\n" + "\n".join(lines))

    # And the process changed only between tasks: each pid's tasks are one contiguous run, and a
    # new process starts counting its leak from scratch
    assert len(order) >= 3, "26 x 30 MiB must recycle at least twice under a 400 MiB ceiling"
    assert [p for i, p in enumerate(pids) if i == 0 or p != pids[i - 1]] == order
    for prev, cur in zip(results, results[1:], strict=False):
        if cur["pid"] != prev["pid"]:
            assert cur["leaked_bytes"] == 30 * MiB and cur["started"] >= prev["ended"]
        else:
            assert cur["leaked_bytes"] == prev["leaked_bytes"] + 30 * MiB
    # And no process ever passed the ceiling, not even at a task's end (measured inside and out)
    assert max(r["rss"] for r in results) < ceiling
    assert max(sampler.peaks.values()) < ceiling, sampler.peaks
    # And the recycles are counted by reason and by the task that grew, and the log names it
    recycles = len(order) - 1
    assert hygiene_counters["recycles"] == {"ceiling": recycles}, hygiene_counters
    assert hygiene_counters["recycled_for"] == {"hy.leak": recycles}, hygiene_counters
    assert len(lines) == recycles and all("suspect task hy.leak" in ln for ln in lines), lines
    # And the live process's gauges name the suspect too, once it has grown over two tasks
    current = live.get(str(order[-1])) or {}
    if current.get("tasks", 0) >= 2:
        assert current["suspect_task"] == "hy.leak", current
