#!/usr/bin/env python3
"""Goodput (docs/guarantees.md#p2) under a real memory limit, plain Celery vs rmq on the same workload.

Each run starts a real ``celery -A benchapp worker`` (prefork) INSIDE a fresh memory cgroup (a child of
this process's memory cgroup, ``rmq.testing.cgroups.MemoryCgroup``) and sends it the same tasks: each
really touches ``--mib`` MiB for ``--hold`` s (rmq: declares ``400MiB``). concurrency x per-task memory
exceeds the limit. Runs (``--modes``):

- ``plain``: plain Celery, its defaults (early ack: a task whose process dies fails with WorkerLostError).
- ``careful``: plain Celery with ``task_acks_late`` + ``task_reject_on_worker_lost`` (redelivered instead).
- ``rmq``: the reference app with rmq; its budget comes from the cgroup (default 90 % of the limit).

Printed side by side: tasks succeeded / failed / lost (lost = not in a terminal state in the result
backend by the deadline), kernel OOM kills in the cgroup, peak memory vs limit (the kernel's
``max_usage_in_bytes`` / ``memory.peak``, the working set sampled every 20 ms, the tree sampled every
100 ms), makespan (first send -> last terminal state) vs the ideal. Ideal = N x d / k:
k = floor((admit line - idle worker memory) / declared), the tasks the rmq budget lets run at once
(from the rmq worker's own readings), and d = the mean run time of the task body measured inside the
rmq run's tasks (touching, holding and unmapping the memory). For each rmq run: where the time went
(slot refill = a task's body returns -> the next body starts) and PASS/MISS against the goals.
Exit 1 if the first rmq run misses 100 % succeeded or its peak passes its budget; exit 0 (with the
reason) where no cgroup can be created.

Modes ``rmq+FIX[+FIX]`` run rmq with benchapp's opt-in patches (``BENCH_FIX``, see benchapp.py):
measurements of proposed fixes, labelled as such, never the default.

Usage: scripts/bench/pressure.py [--limit 1.5GiB] [--concurrency 6] [--tasks 24] [--mib 300] [--hold 1.0]
                                  [--modes plain,careful,rmq] [--deadline 180]
Redis: RMQ_BENCH_REDIS_URL, else a private redis-server on a free port (the test suite flushes the
shared server's databases 1-15), else redis://127.0.0.1:6379/12.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from rmq.testing import redis as testing_redis  # noqa: E402
from rmq.testing.cgroups import MemoryCgroup, can_create  # noqa: E402
from rmq.testing.worker import WorkerProcess, wait_until  # noqa: E402

MiB = 1 << 20
TERMINAL = ("SUCCESS", "FAILURE", "REVOKED")
LABELS = {"plain": "plain Celery (defaults)", "careful": "plain Celery (acks_late)", "rmq": "rmq"}


# the key layout of benchapp.KEY_LAYOUT (rmq's): clients and workers must agree on the separator
KEY_LAYOUT = {"sep": ":", "priority_steps": list(range(10)), "queue_order_strategy": "priority"}


@contextlib.contextmanager
def bench_redis() -> Iterator[str]:
    """RMQ_BENCH_REDIS_URL if set, else a private ``redis-server`` on a free port (stopped by PID).

    A private server, because the test suite flushes databases 1-15 of the shared Redis at any time.
    Without a ``redis-server`` binary, falls back to redis://127.0.0.1:6379/12.
    """
    url = os.environ.get("RMQ_BENCH_REDIS_URL")
    if url:
        yield url
        return
    with testing_redis.private_redis("redis://127.0.0.1:6379/12") as url:
        yield url


def client_app(url: str) -> Any:
    """A plain Celery client on the bench's Redis (sends by task name)."""
    from celery import Celery

    app = Celery("bench-client", broker=url, backend=url, set_as_current=False)
    app.conf.update(broker_connection_retry_on_startup=True, broker_transport_options=dict(KEY_LAYOUT))
    return app


def start_worker(app: Any, mode: str, url: str, queue: str, concurrency: int, prefix: list[str] | None = None,
                 fixes: list[str] | tuple[str, ...] = (), app_module: str = "benchapp",
                 env: dict[str, str] | None = None, **rmq: object) -> WorkerProcess:
    """A ``-A benchapp`` worker (or ``-A app_module``, another task app of this folder) in ``mode`` on
    ``queue``, ready (answers a ping).

    ``fixes`` are benchapp's opt-in patches of rmq (``BENCH_FIX``); ``env`` more environment for the
    task app; ``rmq`` are ``RMQ_*`` settings.
    """
    env = {"RMQ_BROKER_URL": url, "RMQ_RESULT_BACKEND": url, "BENCH_MODE": mode, "BENCH_FIX": ",".join(fixes),
           "PYTHONPATH": os.pathsep.join([HERE, ROOT]), **(env or {})}
    env.update({f"RMQ_{k.upper()}": str(v) for k, v in rmq.items()})
    w = WorkerProcess(app=app_module, env=env, queues=[queue], concurrency=concurrency, cwd=ROOT,
                      prefix=prefix or (), loglevel=os.environ.get("BENCH_WORKER_LOGLEVEL", "WARNING"),
                      hostname=f"bench-{mode}-{uuid.uuid4().hex[:6]}@%h")
    w.start()
    try:
        w.wait_ready(app, timeout=90)
    except BaseException:
        stop_worker(w)
        raise
    return w


def stop_worker(w: WorkerProcess) -> None:
    """Stop by PID; with RMQ_KEEP_WORKER_LOGS=DIR (or 1) keep a copy of the log (``WorkerProcess.finish``)."""
    kept = w.finish()
    if kept:
        print(f"  worker log kept: {kept}")


def rmq_stats(app: Any, w: WorkerProcess) -> dict:
    """The ``rmq`` section of ``inspect stats`` (empty when the worker does not answer)."""
    replies = app.control.inspect(destination=[w.node_name], timeout=3).stats() or {}
    return replies.get(w.node_name, {}).get("rmq", {})


def task_states(client: Any, ids: list[str]) -> dict[str, dict]:
    """Result-backend records of ``ids`` (one MGET); missing ones are PENDING."""
    raw = client.mget([f"celery-task-meta-{i}" for i in ids])
    return {i: (json.loads(v) if v else {"status": "PENDING"}) for i, v in zip(ids, raw, strict=True)}


class CgroupSampler(threading.Thread):
    """Samples the cgroup's working set (usage - inactive file) every ``interval_s``; the tree less often."""

    def __init__(self, cg: MemoryCgroup, worker: WorkerProcess, interval_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.cg, self.worker, self.interval_s = cg, worker, interval_s
        self.peak_working_set = self.peak_usage = self.peak_tree = 0
        self._halt = threading.Event()

    def _read(self) -> tuple[int, int]:
        v1 = self.cg.version == 1
        usage = int((self.cg.path / ("memory.usage_in_bytes" if v1 else "memory.current")).read_text())
        inactive = 0
        for line in (self.cg.path / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == ("total_inactive_file" if v1 else "inactive_file"):
                inactive = int(value)
        return usage, max(0, usage - inactive)

    def run(self) -> None:
        n = 0
        while not self._halt.wait(self.interval_s):
            try:
                usage, working_set = self._read()
            except (OSError, ValueError):
                continue
            self.peak_usage = max(self.peak_usage, usage)
            self.peak_working_set = max(self.peak_working_set, working_set)
            n += 1
            if n % 5 == 0:  # main RSS + children USS costs ~1 ms a child
                self.peak_tree = max(self.peak_tree, self.worker.tree_rss())

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


@dataclass
class Run:
    mode: str
    tasks: int
    succeeded: int = 0
    failed: int = 0
    lost: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    oom_kills: int = 0
    limit: int = 0
    peak_kernel: int | None = None
    peak_working_set: int = 0
    peak_tree: int = 0
    makespan_s: float = 0.0
    durations: list[float] = field(default_factory=list)
    max_at_once: int = 0
    worker_died: bool = False
    stats: dict = field(default_factory=dict)
    lost_detail: list[str] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)
    t0: float = 0.0
    traces: dict[str, list] = field(default_factory=dict)
    frees: list[float] = field(default_factory=list)
    bodies: list[tuple[float, float]] = field(default_factory=list)


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """Most spans open at one moment."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def run_mode(mode: str, args: argparse.Namespace, url: str) -> Run:
    import redis as redis_lib

    client = redis_lib.Redis.from_url(url)
    app = client_app(url)
    queue = f"bench.p2.{mode}.{uuid.uuid4().hex[:8]}"
    run = Run(mode, args.tasks, limit=args.limit)
    cg = MemoryCgroup(args.limit)
    w: WorkerProcess | None = None
    ids: list[str] = []
    try:
        base, *fixes = mode.split("+")
        w = start_worker(app, base, url, queue, args.concurrency, cg.wrap(), fixes=fixes)
        if base == "rmq":
            run.stats = wait_until(lambda: (s := rmq_stats(app, w)).get("memory", {}).get("idle_bytes") and s,
                                   30, interval=0.2, what="an idle reading")
        sampler = CgroupSampler(cg, w)
        sampler.start()
        t0 = time.time()
        ids = [app.send_task("bench.touch", (args.mib, args.hold), queue=queue).id for _ in range(args.tasks)]
        deadline = time.monotonic() + args.deadline
        last_change = time.time()
        done: dict[str, dict] = {}
        while len(done) < len(ids) and time.monotonic() < deadline:
            for i, meta in task_states(client, [i for i in ids if i not in done]).items():
                if meta["status"] in TERMINAL:
                    done[i] = meta
                    last_change = time.time()
            if w.proc is not None and w.proc.poll() is not None:
                run.worker_died = True
                break
            time.sleep(0.02)
        run.makespan_s = last_change - t0
        sampler.stop()
        if base == "rmq":
            run.stats = rmq_stats(app, w) or run.stats
        spans = []
        for meta in done.values():
            if meta["status"] == "SUCCESS":
                run.succeeded += 1
                r = meta["result"]
                spans.append((r["started"], r["ended"]))
                run.durations.append(r["freed"] - r["started"])  # the whole body, unmapping included
                run.frees.append(r["freed"] - r["ended"])
                run.bodies.append((r["started"], r["freed"]))
            else:
                run.failed += 1
                exc = (meta.get("result") or {}).get("exc_type", meta["status"])
                run.errors[exc] = run.errors.get(exc, 0) + 1
        run.lost = len(ids) - len(done)
        for i in ids:
            trace = [json.loads(x) for x in client.lrange(f"bench:trace:{i}", 0, -1)]
            if trace:
                meta = done.get(i, {})
                if meta.get("status") == "SUCCESS":
                    trace.append(["body.end", meta["result"]["freed"]])
                run.traces[i] = trace
        for i in ids:
            if i not in done:  # what the backend says, and how often the task started
                meta = task_states(client, [i])[i]
                starts = [json.loads(x) for x in client.lrange(f"bench:starts:{i}", 0, -1)]
                run.lost_detail.append(f"{i}: {meta['status']} {str(meta.get('result'))[:160]}; started "
                                       f"{len(starts)}x at +" + ", +".join(f"{x['t'] - t0:.1f}s" for x in starts))
        run.max_at_once = max_overlap(spans)
        run.spans = sorted(spans)
        run.t0 = t0
        run.oom_kills = cg.oom_kills()
        run.peak_kernel = cg.peak_bytes()
        run.peak_working_set, run.peak_tree = sampler.peak_working_set, sampler.peak_tree
    finally:
        if w is not None:
            stop_worker(w)
        cg.remove()
        if ids:
            client.delete(*[f"celery-task-meta-{i}" for i in ids], *[f"bench:starts:{i}" for i in ids],
                          *[f"bench:trace:{i}" for i in ids])
        client.delete(queue)
        app.close()
    return run


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:.0f} MiB"


def label(mode: str) -> str:
    """Column title of a mode; ``rmq+credit`` is rmq with the bench app's opt-in patches."""
    base, *fixes = mode.split("+")
    return LABELS[base] + (f" +fix {','.join(fixes)}" if fixes else "")


@dataclass
class Ideal:
    k: int
    d: float
    seconds: float
    admit_line: int
    idle: int
    budget: int
    source: str


def ideal_of(run: Run) -> Ideal | None:
    """N x d / k for an rmq run (None without a governor reading or a finished task)."""
    mem = run.stats.get("memory") or {}
    if not mem or not run.durations:
        return None
    k = max(1, (mem["admit_line_bytes"] - mem["idle_bytes"]) // (400 * MiB))
    d = sum(run.durations) / len(run.durations)
    return Ideal(k, d, run.tasks * d / k, mem["admit_line_bytes"], mem["idle_bytes"], mem["budget_bytes"],
                 mem.get("budget_source", "?"))


def refills(run: Run, k: int) -> str:
    """Where an rmq run's time went: a slot's refill = a task's body returns -> the next body starts."""
    if len(run.bodies) <= k:
        return "too few tasks"
    starts = sorted(s for s, _ in run.bodies)
    ends = sorted(e for _, e in run.bodies)
    gaps = sorted(starts[j] - ends[j - k] for j in range(k, len(starts)))
    return (f"first start +{starts[0] - run.t0:.2f} s after sending; slot refill ({len(gaps)} refills) mean "
            f"{sum(gaps) / len(gaps) * 1000:.0f} ms, p95 {gaps[int(0.95 * (len(gaps) - 1))] * 1000:.0f} ms, max "
            f"{gaps[-1] * 1000:.0f} ms; last end -> last terminal state {run.makespan_s - (ends[-1] - run.t0):.2f} s")


def breakdown(run: Run) -> str | None:
    """With ``+trace``: a refill split into the ending task's exit, the waiter's admission, its later guards."""
    releases, waits = [], []
    for trace in run.traces.values():
        last = {event: t for event, t in trace}
        if "admission.exit.done" in last and "body.end" in last:
            releases.append((last["admission.exit.done"], last["admission.exit.done"] - last["body.end"]))
    releases.sort()
    for trace in run.traces.values():
        last = {event: t for event, t in trace}
        firsts = [t for event, t in trace if event == "admission.enter"]
        admitted = last.get("admission.enter.done")
        if not firsts or admitted is None or admitted - firsts[-1] < 0.02 or "body.end" not in last:
            continue  # admitted at once: no refill to explain
        before = [r for r in releases if r[0] <= admitted]
        if not before:
            continue
        rel_at, exit_s = before[-1]
        body = min((t for event, t in trace if event == "hygiene.enter.done"), default=admitted)
        waits.append((exit_s, admitted - rel_at, body - admitted))
    if not waits:
        return None
    steps: dict[str, list[float]] = {}
    for trace in run.traces.values():  # the ending side, step by step
        events = sorted(trace, key=lambda e: e[1])
        ends = [j for j, e in enumerate(events) if e[0] == "body.end"]
        if ends:
            tail = events[ends[0]:]
            for (e1, t1), (e2, t2) in zip(tail, tail[1:], strict=False):
                steps.setdefault(f"{e1} -> {e2}", []).append(t2 - t1)
    detail = "; ".join(f"{k} {sum(v) / len(v) * 1000:.0f} ms" for k, v in steps.items())
    n = len(waits)
    a, b, c = (sum(w[i] for w in waits) / n * 1000 for i in range(3))
    return (f"refill breakdown ({n} waits, means): ending task's body end -> its reservation released {a:.0f} ms "
            f"(guard exits: hygiene, thread caps, session, admission); release -> waiter admitted {b:.0f} ms; "
            f"admitted -> waiter's body starts {c:.0f} ms (later guards)\n  ending side, step by step: {detail}")


def report(runs: list[Run], args: argparse.Namespace) -> int:
    ideals = {id(r): ideal_of(r) for r in runs if r.mode.startswith("rmq")}
    ref = next((ideals[id(r)] for r in runs if ideals.get(id(r))), None)  # for the plain columns
    print(f"\nP2 goodput under a real memory limit: cgroup v{args.cg_version}, "
          f"limit {mib(args.limit)}; {args.tasks} tasks, each touching {args.mib} MiB for {args.hold:.1f} s "
          f"(rmq declares 400 MiB); prefork concurrency {args.concurrency}")
    cols = [label(r.mode) for r in runs]
    width = max(26, *(len(c) + 2 for c in cols))
    print(f"{'':34}" + "".join(f"{c:>{width}}" for c in cols))

    def row(name: str, values: list[str]) -> None:
        print(f"{name:34}" + "".join(f"{v:>{width}}" for v in values))

    def ideal_for(r: Run) -> Ideal | None:
        return ideals.get(id(r)) or ref

    row("tasks succeeded", [f"{r.succeeded}/{r.tasks} ({r.succeeded / r.tasks:.0%})" for r in runs])
    row("tasks failed", [str(r.failed) for r in runs])
    row(f"tasks lost (not terminal by {args.deadline:.0f} s)", [str(r.lost) for r in runs])
    row("kernel OOM kills (cgroup)", [str(r.oom_kills) for r in runs])
    row("worker main process died", ["yes" if r.worker_died else "no" for r in runs])
    row("peak usage, kernel (% of limit)", [f"{mib(r.peak_kernel)} ({(r.peak_kernel or 0) / r.limit:.0%})"
                                             for r in runs])
    row("peak working set, sampled 20 ms", [mib(r.peak_working_set) for r in runs])
    row("peak tree RSS/USS, sampled 100 ms", [mib(r.peak_tree) for r in runs])
    row("rmq budget", [f"{mib(i.budget)} ({i.source})" if (i := ideals.get(id(r))) else "-" for r in runs])
    row("max tasks running at once", [str(r.max_at_once) for r in runs])
    row("mean task run time d (body)", [f"{sum(r.durations) / len(r.durations):.2f} s" if r.durations else "-"
                                 for r in runs])
    row("  of which freeing the memory", [f"{sum(r.frees) / len(r.frees):.2f} s" if r.frees else "-" for r in runs])
    row("makespan (to last terminal state)", [f"{r.makespan_s:.1f} s" + (" *" if r.lost else "") for r in runs])
    row("ideal N x d / k", [f"{i.seconds:.1f} s (k={i.k})" if (i := ideal_for(r)) else "-" for r in runs])
    row("makespan / ideal", [f"{r.makespan_s / i.seconds:.2f}x" + (" *" if r.lost else "")
                             if (i := ideal_for(r)) else "-" for r in runs])
    for r in runs:
        if r.errors:
            print(f"  {label(r.mode)} failures: " + ", ".join(f"{n} x {e}" for e, n in r.errors.items()))
        for line in r.lost_detail:
            print(f"  {label(r.mode)} lost {line}")
    if any(r.lost for r in runs):
        print("  * makespan of a run with lost tasks counts only the tasks that ended")
    if ref is None:
        print("no rmq run with a governor reading and a finished task: no ideal")
        return 1 if any(r.mode.startswith("rmq") for r in runs) else 0
    print(f"\nideal = N x d / k: k = floor((admit line {mib(ref.admit_line)} - idle worker {mib(ref.idle)}) / "
          f"declared 400 MiB) = {ref.k} tasks at once (the rmq worker's own readings); d = the mean task run time "
          f"measured inside that run's tasks (touch, hold, unmap); plain columns use the first rmq run's ideal")
    status = 0
    judged = False
    for r in runs:
        i = ideals.get(id(r))
        if i is None:
            continue
        print(f"\n{label(r.mode)}: {refills(r, i.k)}")
        if (b := breakdown(r)) is not None:
            print(f"  {b}")
        for p in runs:
            if not p.mode.startswith("rmq") and p.makespan_s:
                print(f"  vs {label(p.mode)}: succeeded {r.succeeded} vs {p.succeeded}, OOM kills {r.oom_kills} vs "
                      f"{p.oom_kills}, makespan ratio rmq/plain {r.makespan_s / p.makespan_s:.2f}"
                      + (" (plain lost tasks)" if p.lost else ""))
        peak = max(r.peak_kernel or 0, r.peak_working_set)
        checks = [
            ("succeeded 100 %", r.succeeded == r.tasks),
            (f"peak {mib(peak)} <= budget {mib(i.budget)}", peak <= i.budget),
            (f"makespan {r.makespan_s:.1f} s <= 1.15 x ideal = {1.15 * i.seconds:.1f} s",
             r.makespan_s <= 1.15 * i.seconds),
        ]
        for text, ok in checks:
            print(f"  {'PASS' if ok else 'MISS'}: {text}")
        if not judged:  # the exit status follows the first rmq run (put unpatched rmq first)
            judged = True
            status = 0 if checks[0][1] and checks[1][1] else 1
    return status


def main() -> int:
    from rmq.core.units import parse_size

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--limit", default="1.5GiB", help="the cgroup's memory limit")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--mib", type=int, default=300, help="MiB each task touches")
    parser.add_argument("--hold", type=float, default=1.0, help="seconds each task holds its memory")
    parser.add_argument("--modes", default="plain,careful,rmq",
                        help="comma-separated: plain, careful, rmq, rmq+credit+poll (bench-only patches)")
    parser.add_argument("--deadline", type=float, default=180.0, help="seconds per run before a task counts as lost")
    args = parser.parse_args()
    args.limit = parse_size(args.limit, "--limit")
    why = can_create()
    if why is not None:
        print(f"P2 not measured: {why}. Run as root on a host with a writable memory cgroup hierarchy.")
        return 0
    probe = MemoryCgroup(64 * MiB)
    args.cg_version = probe.version
    probe.remove()
    runs = []
    with bench_redis() as url:
        print(f"Redis: {url}")
        for mode in args.modes.split(","):
            if mode.split("+")[0] not in LABELS:
                parser.error(f"unknown mode {mode!r}: use plain, careful, rmq or rmq+FIX[+FIX] (see benchapp.py)")
            print(f"running {label(mode)} ...", flush=True)
            runs.append(run_mode(mode, args, url))
    return report(runs, args)


if __name__ == "__main__":
    sys.exit(main())
