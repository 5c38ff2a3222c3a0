#!/usr/bin/env python3
"""Celery's default autoscaler vs rmq's, same MIN/MAX, budget and workload (docs/design.md#autoscaling).

Both runs start a real governed ``python -m celery -A autoscale worker --autoscale=MAX,MIN``
(this file is also the worker's app; ``AS_BENCH_AUTOSCALER=celery`` selects Celery's
``Autoscaler``) against Redis and push the same bursty mixed workload: bursts of light tasks
(16 MiB declared; each pool process builds ``--warm-mib`` of state once, like imports and
tables, and optionally loads a ``--model-mib`` unpinned model; then they sleep) and a stream
of heavy ones (declared ``--heavy-mib``, touching three quarters of it). Admission and the
model cache (docs/design.md#admission, docs/design.md#models) run in both; only the autoscaler differs.

Measured from outside: makespan, peak memory of the worker's tree (main RSS + children USS)
against the budget, process-seconds (live pool processes integrated from the first task until
the pool is back at MIN), peak processes; from the worker's snapshot: tasks deferred, model loads.

Usage: scripts/bench/autoscale.py [--rounds 3] [--autoscale 6,1] [--budget 1.5GiB] [--keepalive 5]
                                  [--heavy 16] [--bursts 2] [--burst-size 30] [--trickle-s 20]
                                  [--warm-mib 40] [--model-mib 0] [--modes celery,rmq]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
MiB = 1 << 20

from celery.worker.autoscale import Autoscaler  # noqa: E402

from rmq import governed_task  # noqa: E402

HEAVY_MIB = int(os.environ.get("AS_BENCH_HEAVY_MIB", "400"))
MODEL_MIB = int(os.environ.get("AS_BENCH_MODEL_MIB", "0"))
WARM_MIB = int(os.environ.get("AS_BENCH_WARM_MIB", "40"))
_warm: list[bytearray] = []  # per-process state a light task builds once (imports, tables, caches)

if MODEL_MIB:
    from rmq import models
    from rmq.testing.synthetic_models import synthetic_loader

    models.register("bench.as.vocab", loader=synthetic_loader("bench.as.vocab", f"{MODEL_MIB}MiB"))


class CeleryAutoscaler(Autoscaler):
    """Celery's default autoscaler under another name (``rmq.install`` replaces the default name)."""


def _touch(n: int) -> bytearray:
    block = bytearray(n)
    block[:: 4096] = b"\x01" * len(range(0, n, 4096))
    return block


@governed_task(memory="16MiB", name="bench.as.light")
def light(seconds: float) -> int:
    """Light work: builds per-process warm state once (``AS_BENCH_WARM_MIB``), may use a small model
    (``AS_BENCH_MODEL_MIB``, loaded once per process), sleeps."""
    if WARM_MIB and not _warm:
        _warm.append(_touch(WARM_MIB * MiB))
    if MODEL_MIB:
        models.get("bench.as.vocab")
    time.sleep(seconds)
    return os.getpid()


@governed_task(memory=f"{HEAVY_MIB}MiB", name="bench.as.heavy")
def heavy(seconds: float, touch_mib: int) -> int:
    """Heavy work: touches ``touch_mib`` MiB and holds it for ``seconds``."""
    block = _touch(touch_mib * MiB)
    time.sleep(seconds)
    del block
    return os.getpid()


if __name__ != "__main__":  # imported by the worker: ``-A autoscale``
    from workers.app import make_app

    app = make_app()
    if os.environ.get("AS_BENCH_AUTOSCALER") == "celery":
        app.conf.worker_autoscaler = "autoscale:CeleryAutoscaler"


@dataclass
class Result:
    mode: str
    sent: int = 0
    ok: int = 0
    failed: int = 0
    unfinished: int = 0
    makespan_s: float = 0.0
    peak_bytes: int = 0
    budget_bytes: int = 0
    process_seconds: float = 0.0
    peak_procs: int = 0
    back_to_min_s: float | None = None
    deferred: int = 0
    model_loads: int = 0
    autoscaler: dict[str, Any] = field(default_factory=dict)


class Sampler(threading.Thread):
    """Every ``interval_s``: the tree's memory and the live pool processes, integrated over time."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_bytes = self.peak_procs = self.procs = 0
        self.process_seconds = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        last = time.monotonic()
        while not self._stop_event.wait(self.interval_s):
            try:
                total, kids = self.root.memory_info().rss, self.root.children()
            except psutil.Error:
                return
            live = 0
            for p in kids:
                try:
                    if p.status() == psutil.STATUS_ZOMBIE:
                        continue
                    total += p.memory_full_info().uss
                    live += 1
                except psutil.Error:
                    continue
            now = time.monotonic()
            self.process_seconds += live * (now - last)
            last = now
            self.procs = live
            self.peak_procs = max(self.peak_procs, live)
            self.peak_bytes = max(self.peak_bytes, total)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def start_worker(mode: str, args: argparse.Namespace, queue: str, name: str) -> subprocess.Popen[bytes]:
    low = args.autoscale.split(",")[1]
    env = dict(
        os.environ,
        AS_BENCH_AUTOSCALER=mode,
        AS_BENCH_HEAVY_MIB=str(args.heavy_mib),
        AS_BENCH_MODEL_MIB=str(args.model_mib),
        AS_BENCH_WARM_MIB=str(args.warm_mib),
        RMQ_BROKER_URL=args.broker,
        RMQ_RESULT_BACKEND=args.broker,
        RMQ_APP_QUEUE=queue,
        RMQ_MEMORY_BUDGET=args.budget,
        RMQ_AUTOSCALE_KEEPALIVE=f"{args.keepalive}s",
        AUTOSCALE_KEEPALIVE=str(args.keepalive),
        PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
    )
    argv = [sys.executable, "-m", "celery", "-A", "autoscale", "worker", "-P", "prefork", "-c", low,
            f"--autoscale={args.autoscale}", "-Q", queue, "-n", name, "--without-mingle", "--without-gossip",
            "-l", args.loglevel]
    log = open(os.path.join(HERE, f".autoscale-{mode}.log"), "wb")  # noqa: SIM115 - the worker owns it
    return subprocess.Popen(argv, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_ready(client: Any, name: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}; see scripts/bench/.autoscale-*.log")
        if client.control.ping(destination=[name], timeout=0.5):
            return
    raise RuntimeError(f"worker {name} did not answer a ping in {timeout_s:.0f}s")


def send_workload(client: Any, args: argparse.Namespace) -> list[Any]:
    """Bursts of light tasks every ``--burst-every`` seconds, a heavy task every ``--heavy-every``."""
    plan = [(args.burst_start + i * args.burst_every, "burst") for i in range(args.bursts)]
    plan += [(i * args.heavy_every, "heavy") for i in range(args.heavy)]
    trickle_start = args.burst_start + max(0, args.bursts - 1) * args.burst_every + args.burst_every
    plan += [(trickle_start + k * args.trickle_every, "light")
             for k in range(int(args.trickle_s / args.trickle_every) if args.trickle_every else 0)]
    plan.sort()
    results, t0 = [], time.monotonic()
    for at, kind in plan:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        if kind == "heavy":
            results.append(client.tasks["bench.as.heavy"].delay(args.heavy_s, int(args.heavy_mib * 0.75)))
        else:
            n = args.burst_size if kind == "burst" else 1
            results += [client.tasks["bench.as.light"].delay(args.light_s) for _ in range(n)]
    return results


def run_mode(mode: str, args: argparse.Namespace) -> Result:
    from rmq.core.units import parse_size
    from workers.app import make_app

    queue = f"bench.as.{uuid.uuid4().hex[:8]}"
    name = f"as-{mode}-{queue}@{os.uname().nodename}"
    client = make_app(broker=args.broker, backend=args.broker, queue=queue)
    res = Result(mode=mode, budget_bytes=parse_size(args.budget, "--budget"))
    proc = start_worker(mode, args, queue, name)
    sampler = None
    try:
        wait_ready(client, name, proc)
        sampler = Sampler(proc.pid)
        sampler.start()
        t0 = time.monotonic()
        pending = send_workload(client, args)
        res.sent = len(pending)
        deadline, last_done = t0 + args.deadline_s, t0
        while pending and time.monotonic() < deadline:
            done = [r for r in pending if r.ready()]
            for r in done:
                pending.remove(r)
                res.ok += r.successful()
                res.failed += not r.successful()
            if done:
                last_done = time.monotonic()
            time.sleep(0.1)
        res.unfinished = len(pending)
        res.makespan_s = last_done - t0
        low = int(args.autoscale.split(",")[1])
        end = time.monotonic() + 3 * args.keepalive + 5
        while sampler.procs > max(1, low) and time.monotonic() < end:
            time.sleep(0.1)
        if sampler.procs <= max(1, low):
            res.back_to_min_s = max(0.0, time.monotonic() - t0 - res.makespan_s)
        stats = client.control.inspect(destination=[name], timeout=5).stats() or {}
        snap = stats.get(name, {})
        counters = snap.get("rmq", {}).get("counters", {})
        res.deferred = int(sum((counters.get("deferred") or {}).values()))
        res.model_loads = int((counters.get("models") or {}).get("loads", 0))
        res.autoscaler = snap.get("autoscaler", {})
    finally:
        if sampler is not None:
            sampler.stop()
            res.peak_bytes, res.peak_procs = sampler.peak_bytes, sampler.peak_procs
            res.process_seconds = sampler.process_seconds
        stop_worker(proc)
        client.close()
    return res


def report(results: list[Result], args: argparse.Namespace) -> None:
    print(f"\nautoscale={args.autoscale} budget={args.budget} keepalive={args.keepalive}s; "
          f"{args.heavy} heavy ({args.heavy_mib} MiB declared, {args.heavy_s}s) every {args.heavy_every}s; "
          f"from {args.burst_start}s {args.bursts} bursts x {args.burst_size} light ({args.light_s}s, "
          f"{args.warm_mib} MiB warm state + {args.model_mib} MiB model per process) every {args.burst_every}s, "
          f"then a light one every {args.trickle_every}s for {args.trickle_s}s")
    rows = [
        ("tasks ok / sent", lambda r: f"{r.ok:g}/{r.sent:g}"),
        ("failed / unfinished", lambda r: f"{r.failed} / {r.unfinished}"),
        ("makespan (finished)", lambda r: f"{r.makespan_s:.1f} s"),
        ("peak memory", lambda r: f"{r.peak_bytes / MiB:.0f} MiB ({r.peak_bytes / r.budget_bytes:.0%} of budget)"),
        ("process-seconds", lambda r: f"{r.process_seconds:.1f}"),
        ("peak processes", lambda r: f"{r.peak_procs:g}"),
        ("back at MIN after", lambda r: "never" if r.back_to_min_s is None else f"{r.back_to_min_s:.1f} s"),
        ("tasks deferred", lambda r: f"{r.deferred:g}"),
        ("model loads", lambda r: f"{r.model_loads:g}"),
    ]
    print(f"{'':22}" + "".join(f"{r.mode:>28}" for r in results))
    for label, fmt in rows:
        print(f"{label:22}" + "".join(f"{fmt(r):>28}" for r in results))
    by = {r.mode: r for r in results}
    if "celery" in by and "rmq" in by:
        c, m = by["celery"], by["rmq"]

        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}" if b else "n/a"

        print(f"ratio rmq/celery: makespan {ratio(m.makespan_s, c.makespan_s)}, peak memory "
              f"{ratio(m.peak_bytes, c.peak_bytes)}, process-seconds {ratio(m.process_seconds, c.process_seconds)}, "
              f"deferred {m.deferred:g} vs {c.deferred:g}")
    for r in results:
        last = r.autoscaler.get("last_change") or {}
        if last:
            print(f"{r.mode} autoscaler's last change: {last.get('action')} ({last.get('reason')})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default=os.environ.get("RMQ_BENCH_BROKER", "redis://127.0.0.1:6379/0"))
    p.add_argument("--autoscale", default="6,1")
    p.add_argument("--budget", default="1.5GiB")
    p.add_argument("--keepalive", type=float, default=5.0)
    p.add_argument("--bursts", type=int, default=2)
    p.add_argument("--burst-start", type=float, default=8.0, help="seconds into the heavy stream")
    p.add_argument("--burst-size", type=int, default=30)
    p.add_argument("--burst-every", type=float, default=8.0)
    p.add_argument("--trickle-every", type=float, default=1.5, help="then one light task every N s (0: none)")
    p.add_argument("--trickle-s", type=float, default=20.0)
    p.add_argument("--light-s", type=float, default=0.4)
    p.add_argument("--warm-mib", type=int, default=WARM_MIB, help="per-process state light tasks build once")
    p.add_argument("--model-mib", type=int, default=MODEL_MIB, help="model each light task uses (0: none)")
    p.add_argument("--heavy", type=int, default=16)
    p.add_argument("--heavy-every", type=float, default=1.0)
    p.add_argument("--heavy-s", type=float, default=3.0)
    p.add_argument("--heavy-mib", type=int, default=HEAVY_MIB)
    p.add_argument("--modes", default="celery,rmq")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are reported")
    p.add_argument("--deadline-s", type=float, default=180.0)
    p.add_argument("--loglevel", default="INFO")
    args = p.parse_args()
    modes = args.modes.split(",")
    rounds: list[list[Result]] = []
    for i in range(args.rounds):  # interleaved, so load from elsewhere hits both alike
        rounds.append([run_mode(mode, args) for mode in (modes if i % 2 == 0 else modes[::-1])])
        rounds[-1].sort(key=lambda r: modes.index(r.mode))
        if args.rounds > 1:
            print(f"round {i + 1}: " + ", ".join(
                f"{r.mode} makespan {r.makespan_s:.1f}s process-s {r.process_seconds:.0f} deferred {r.deferred}"
                for r in rounds[-1]), flush=True)
    report([median_result([rnd[k] for rnd in rounds]) for k in range(len(modes))], args)
    return 0 if all(r.failed == r.unfinished == 0 for rnd in rounds for r in rnd) else 1


def median_result(results: list[Result]) -> Result:
    """Per-metric medians over rounds (counts of failures summed)."""
    def med(name: str) -> Any:
        return statistics.median(getattr(r, name) for r in results)

    out = Result(mode=results[0].mode, budget_bytes=results[0].budget_bytes, autoscaler=results[-1].autoscaler)
    for name in ("sent", "ok", "makespan_s", "peak_bytes", "process_seconds", "peak_procs", "deferred", "model_loads"):
        setattr(out, name, med(name))
    out.failed = sum(r.failed for r in results)
    out.unfinished = sum(r.unfinished for r in results)
    backs = [r.back_to_min_s for r in results if r.back_to_min_s is not None]
    out.back_to_min_s = statistics.median(backs) if len(backs) == len(results) else None
    return out


if __name__ == "__main__":
    sys.exit(main())
