#!/usr/bin/env python3
"""Runaway reaction (docs/guarantees.md#p3) and a killed task back in a queue (#p4) against a real rmq worker.

P3: a governed task (``bench.runaway``, declares 64 MiB) allocates 2 MiB steps at a steady ``--rate``
MiB/s in a worker with a small configured budget. The crossing: after each step the task itself
computes the worker's memory the way the governor measures it (the governor's last published
reading plus how much the task's own RSS grew since that reading, the only thing changing) and
records, with ``time.time()``, when it first reaches the kill line (``rmq_kill_ratio`` x budget). The
kill: polled from outside every ``--poll-ms`` ms, the first poll that finds the pool process gone, a
zombie, or with its RSS fallen below half its peak (the kernel frees a killed process's memory before
it turns zombie). Reaction = kill - crossing. With ``rmq_memory_kill_retries=1`` each task is killed
twice, so ``--tasks`` tasks give 2 x ``--tasks`` reactions; each ends FAILURE with MemoryBudgetExceeded.

P4: (a) memory kill -> the same task id's next start (its re-run; the task records each start in
Redis with ``time.time()``). This includes rmq's deliberate backoff, ``rmq_kill_backoff`` (default
1 s), printed beside it. (b) A pool process SIGKILLed from outside while it runs ``bench.sleep``
-> the redelivered start.

Goals: P3 p95 <= 300 ms; P4 <= 2 s. Exit 1 when a p95 misses its goal.

Usage: scripts/bench/reaction.py [--tasks 10] [--sigkills 10] [--budget 512MiB] [--rate 200]
Redis: as pressure.py (RMQ_BENCH_REDIS_URL, else a private redis-server).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psutil
from pressure import (
    ROOT,  # noqa: F401  (puts the repo on sys.path)
    bench_redis,
    client_app,
    rmq_stats,
    start_worker,
    stop_worker,
    task_states,
)

from rmq.core.units import parse_duration
from rmq.testing.worker import wait_until

MiB = 1 << 20
P3_GOAL_S = 0.300
P4_GOAL_S = 2.0


class Anomaly(RuntimeError):
    """A run that did not end the way the bench expects (reported, not measured)."""


def starts(client: Any, task_id: str) -> list[dict]:
    return [json.loads(x) for x in client.lrange(f"bench:starts:{task_id}", 0, -1)]


def wait_start(client: Any, task_id: str, n: int, timeout_s: float, poll_s: float) -> dict:
    """The ``n``-th (1-based) start of ``task_id``; :class:`Anomaly` if it does not come."""
    try:
        return wait_until(lambda: (s := starts(client, task_id)) and len(s) >= n and s[n - 1], timeout_s,
                          interval=poll_s, what=f"start {n} of {task_id}")
    except TimeoutError:
        raise Anomaly(f"start {n} never came within {timeout_s:.0f} s (state "
                      f"{task_states(client, [task_id])[task_id]['status']})") from None


def wait_end(client: Any, task_id: str, timeout_s: float) -> str:
    """``task_id``'s terminal state and exception type; :class:`Anomaly` if it does not end."""
    try:
        meta = wait_until(lambda: (m := task_states(client, [task_id])[task_id])["status"] in (
            "SUCCESS", "FAILURE") and m, timeout_s, what="the end")
    except TimeoutError:
        raise Anomaly(f"not terminal within {timeout_s:.0f} s") from None
    return f"{meta['status']} {(meta.get('result') or {}).get('exc_type', '')}".strip()


@dataclass
class Figures:
    reactions: list[float] = field(default_factory=list)
    rerun: list[float] = field(default_factory=list)
    redelivery: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    kill_times: list[tuple[int, float]] = field(default_factory=list)
    crossings: list[tuple[int, float]] = field(default_factory=list)
    decided: list[float] = field(default_factory=list)
    first_kills: list[tuple[str, float]] = field(default_factory=list)
    requeued: list[float] = field(default_factory=list)
    outside_kills: list[tuple[int, float]] = field(default_factory=list)
    noticed: list[float] = field(default_factory=list)
    noticed_outside: list[float] = field(default_factory=list)


def log_times(log: str, pattern: str, key: Any = int) -> dict[Any, float]:
    """``key(group 1)`` (a pid) -> time of the first worker log line matching ``pattern``."""
    found: dict[Any, float] = {}
    for m in re.finditer(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [^\]]+\] " + pattern, log, re.M):
        at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        found.setdefault(key(m.group(2)), at)
    return found


def pool_noticed(log: str, *kills: list[tuple[int, float]]) -> tuple[list[float], ...]:
    """Seconds from each kill to the worker logging the pool process's exit (Celery's WorkerLostError path)."""
    exited = log_times(log, r"Process '[^']+' pid:(\d+) exited")
    return tuple([exited[pid] - t for pid, t in k if pid in exited] for k in kills)


def watch_kill(client: Any, task_id: str, pid: int, poll_s: float, timeout_s: float) -> tuple[float, float]:
    """Poll ``pid`` until it dies; returns (crossing time, kill time).

    The kill time is the first poll that finds the process gone, a zombie, or with its RSS fallen
    below half its peak (the kernel frees a killed process's memory before it turns zombie). The
    crossing time is what the task recorded itself (``bench:cross:<task id>``, see benchapp).
    """
    peak = 0
    deadline = time.time() + timeout_s
    proc = psutil.Process(pid)
    while time.time() < deadline:
        t = time.time()
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                break
            rss = proc.memory_info().rss
        except psutil.Error:
            break
        peak = max(peak, rss)
        if peak > 100 * MiB and rss < peak / 2:
            break
        time.sleep(poll_s)
    else:
        raise TimeoutError(f"pid {pid} still alive after {timeout_s:.0f}s")
    crossings = [json.loads(x) for x in client.lrange(f"bench:cross:{task_id}", 0, -1)]
    crossing = next((c for c in crossings if c["pid"] == pid), None)
    if crossing is None:
        raise Anomaly(f"pid {pid} was killed before its own estimate of the worker's memory reached the kill line")
    return crossing["t"], t


def run(args: argparse.Namespace, url: str) -> Figures:
    import redis as redis_lib

    client = redis_lib.Redis.from_url(url)
    app = client_app(url)
    queue = f"bench.p3.{uuid.uuid4().hex[:8]}"
    fig = Figures()
    poll_s = args.poll_ms / 1000
    fixes = [f for f in args.fixes.split(",") if f]
    w = start_worker(app, "rmq", url, queue, args.concurrency, fixes=fixes, memory_budget=args.budget,
                     memory_kill_retries=1, kill_ratio=args.kill_ratio, kill_backoff=args.kill_backoff)
    ids: list[str] = []
    try:
        mem = wait_until(lambda: (s := rmq_stats(app, w)).get("memory", {}).get("idle_bytes") and s["memory"],
                         30, interval=0.2, what="an idle reading")
        line = int(mem["budget_bytes"] * args.kill_ratio)
        backoff = parse_duration(args.kill_backoff, "--kill-backoff")
        fig.notes.append(f"budget {mem['budget_bytes'] / MiB:.0f} MiB ({mem['budget_source']}), kill line "
                         f"{line / MiB:.0f} MiB, idle worker {mem['idle_bytes'] / MiB:.0f} MiB, "
                         f"concurrency {args.concurrency}, kill backoff {backoff:g} s")
        for i in range(args.tasks):
            r = app.send_task("bench.runaway", (args.rate, 2, 60.0), queue=queue)
            ids.append(r.id)
            try:  # a run the governor killed before the task's own estimate crossed is an anomaly
                first = wait_start(client, r.id, 1, 30, poll_s)
                crossed, killed = watch_kill(client, r.id, first["pid"], poll_s, 60)
                fig.crossings.append((first["pid"], crossed))
                fig.reactions.append(killed - crossed)
                fig.kill_times.append((first["pid"], killed))
                fig.first_kills.append((r.id, killed))
                second = wait_start(client, r.id, 2, 30, poll_s / 2)
                fig.rerun.append(second["t"] - killed)
                crossed, killed = watch_kill(client, r.id, second["pid"], poll_s, 60)
                fig.crossings.append((second["pid"], crossed))
                fig.reactions.append(killed - crossed)
                fig.kill_times.append((second["pid"], killed))
                outcome = wait_end(client, r.id, 30)
                fig.outcomes[outcome] = fig.outcomes.get(outcome, 0) + 1
                print(f"  runaway {i + 1}/{args.tasks}: reactions {fig.reactions[-2] * 1000:.0f} / "
                      f"{fig.reactions[-1] * 1000:.0f} ms, re-run start {fig.rerun[-1] * 1000:.0f} ms after the "
                      f"kill, {outcome}", flush=True)
            except Anomaly as exc:
                fig.anomalies.append(f"runaway {i + 1} ({r.id}): {exc}; starts {starts(client, r.id)}")
                print(f"  runaway {i + 1}/{args.tasks}: ANOMALY {exc}", flush=True)
                with contextlib.suppress(Anomaly):
                    wait_end(client, r.id, 30)
        for i in range(args.sigkills):
            r = app.send_task("bench.sleep", (1.5,), queue=queue)
            ids.append(r.id)
            try:
                first = wait_start(client, r.id, 1, 30, poll_s)
                time.sleep(0.3)
                t_kill = time.time()
                os.kill(first["pid"], signal.SIGKILL)
                fig.outside_kills.append((first["pid"], t_kill))
                second = wait_start(client, r.id, 2, 30, poll_s / 2)
                fig.redelivery.append(second["t"] - t_kill)
                outcome = "sleep " + wait_end(client, r.id, 30)
                fig.outcomes[outcome] = fig.outcomes.get(outcome, 0) + 1
                print(f"  SIGKILL {i + 1}/{args.sigkills}: redelivered start {fig.redelivery[-1] * 1000:.0f} ms "
                      f"after the kill, then {outcome}", flush=True)
            except Anomaly as exc:
                fig.anomalies.append(f"SIGKILL {i + 1} ({r.id}): {exc}; starts {starts(client, r.id)}")
                print(f"  SIGKILL {i + 1}/{args.sigkills}: ANOMALY {exc}", flush=True)
        log = w.log()
        fig.noticed, fig.noticed_outside = pool_noticed(log, fig.kill_times, fig.outside_kills)
        requeued = log_times(log, r"rmq re-queued \S+\[([0-9a-f-]+)\] after memory kill 1", key=str)
        fig.requeued = [requeued[tid] - t for tid, t in fig.first_kills if tid in requeued]
        decided = log_times(log, r"rmq killing \S+ in pid (\d+)")
        fig.decided = [decided[pid] - crossed for pid, crossed in fig.crossings if pid in decided]
    finally:
        stop_worker(w)
        if ids:
            client.delete(*[f"celery-task-meta-{i}" for i in ids], *[f"bench:starts:{i}" for i in ids],
                          *[f"bench:cross:{i}" for i in ids])
        app.close()
    return fig


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """p50, p95 (nearest rank) and max."""
    v = sorted(values)
    rank = lambda q: v[max(0, min(len(v) - 1, round(q * (len(v) - 1))))]  # noqa: E731
    return rank(0.5), rank(0.95), v[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10, help="runaway tasks (each killed twice)")
    parser.add_argument("--sigkills", type=int, default=10, help="pool processes SIGKILLed from outside")
    parser.add_argument("--budget", default="512MiB", help="the worker's rmq_memory_budget")
    parser.add_argument("--rate", type=float, default=200.0, help="runaway allocation rate, MiB/s")
    parser.add_argument("--kill-ratio", type=float, default=0.95)
    parser.add_argument("--kill-backoff", default="1s", help="rmq_kill_backoff (the default is 1s)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--poll-ms", type=float, default=5.0)
    parser.add_argument("--fixes", default="", help="benchapp's opt-in patches of rmq, e.g. credit,poll (bench only)")
    args = parser.parse_args()
    with bench_redis() as url:
        print(f"Redis: {url}")
        fig = run(args, url)
    fixed = f"; bench-only patches: {args.fixes}" if args.fixes else ""
    print(f"\nP3/P4 reaction{fixed} ({'; '.join(fig.notes)}); runaway at {args.rate:g} MiB/s; polled from outside "
          f"every {args.poll_ms:g} ms")
    header = f"{'figure':58}{'n':>4}{'p50':>9}{'p95':>9}{'max':>9}{'goal':>10}"
    print(header)
    print("-" * len(header))
    ok = True
    rows = [
        ("P3 kill line crossed -> pool process gone", fig.reactions, P3_GOAL_S),
        ("   kill line crossed -> governor logs its kill (ms clock)", fig.decided, None),
        ("   memory kill -> Celery logs the pool process's exit", fig.noticed, None),
        ("   outside SIGKILL -> Celery logs the pool process's exit", fig.noticed_outside, None),
        ("P4 memory kill -> re-queued, back in Redis (log, ms clock)", fig.requeued, P4_GOAL_S),
        ("P4 memory kill -> re-run starts (incl. the kill backoff)", fig.rerun, P4_GOAL_S),
        ("P4 pool process SIGKILLed -> redelivered start", fig.redelivery, P4_GOAL_S),
    ]
    for name, values, goal in rows:
        if not values:
            continue
        p50, p95, top = quantiles(values)
        ok &= goal is None or p95 <= goal
        print(f"{name:58}{len(values):>4}{p50 * 1000:>7.0f}ms{p95 * 1000:>7.0f}ms{top * 1000:>7.0f}ms"
              f"{'<= ' + format(goal * 1000, '.0f') + 'ms' if goal else '':>10}")
    for a in fig.anomalies:
        print(f"anomaly: {a}")
    print("outcomes: " + ", ".join(f"{n} x {k}" for k, n in sorted(fig.outcomes.items())))
    ok &= not fig.anomalies
    print("PASS" if ok else "MISS: " + ("a p95 is over its goal" if not fig.anomalies else "see the anomalies"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
