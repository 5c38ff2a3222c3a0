#!/usr/bin/env python3
"""Issue 10 / SPEC C9: a leaky workload, plain Celery ``worker_max_memory_per_child`` vs rmq.

Both runs start a real ``python -m celery -A leaky_tasks worker`` (prefork, same concurrency,
same broker settings) against Redis and push the same tasks through it: each leaks
``--leak-mib`` MiB for good and leaves ``--frag-mib`` MiB of fragmented garbage behind.

- plain: Celery recycles a child after a task when its RSS passed ``worker_max_memory_per_child``
  (``--limit``).
- rmq: the governed variant; hygiene trims after each task, the leak detector recycles a child
  whose baseline keeps growing (``rmq_leak_slope`` / ``rmq_leak_window``) or would pass
  ``rmq_leak_ceiling`` (``--limit``).

Measured from outside: peak RSS and USS summed over the worker's process tree (sampled every
``--sample-ms``), recycles (distinct pool pids that ran tasks, minus the concurrency), failures,
and throughput. ``--frag-check`` measures RSS after a 50 MiB fragmenting task with no cleanup,
gc.collect alone, and gc.collect + malloc_trim, over ``--runs`` runs in fresh processes.

Usage: scripts/bench/leaky.py [--rounds 2] [--tasks 200] [--leak-mib 30] [--frag-mib 50] [--concurrency 2]
                              [--limit 400MiB] [--modes plain,rmq] [--frag-check]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
MiB = 1 << 20
TASK = {"plain": "bench.leaky.plain", "rmq": "bench.leaky.governed"}


def parse_size(text: str) -> int:
    from rmq.units import parse_size as parse

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
    pids: set[int] = field(default_factory=set)
    concurrency: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def recycles(self) -> int:
        return max(0, len(self.pids) - self.concurrency)

    @property
    def throughput(self) -> float:
        return self.ok / self.makespan_s if self.makespan_s else 0.0


class TreeSampler(threading.Thread):
    """Samples the summed RSS and USS of a process and its children until stopped."""

    def __init__(self, pid: int, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_rss = self.peak_uss = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            rss = uss = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                try:
                    full = p.memory_full_info()
                except psutil.Error:
                    continue
                rss += full.rss
                uss += full.uss
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_uss = max(self.peak_uss, uss)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def log_path(mode: str) -> str:
    """Where the worker of ``mode`` logs (outside the repository)."""
    return os.path.join(tempfile.gettempdir(), f"rmq-bench-leaky-{mode}.log")


def start_worker(
    mode: str, broker: str, queue: str, concurrency: int, limit: int, loglevel: str
) -> subprocess.Popen[bytes]:
    conf: dict[str, object] = {}
    if mode == "plain":
        conf["worker_max_memory_per_child"] = limit // 1024  # KiB
    else:
        conf.update(rmq_leak_ceiling=limit, rmq_leak_slope="8MiB", rmq_leak_window=8, rmq_hygiene_margin="16MiB")
    env = dict(
        os.environ,
        LEAKY_MODE=mode,
        LEAKY_BROKER=broker,
        LEAKY_QUEUE=queue,
        LEAKY_CONF=json.dumps(conf),
        PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
    )
    args = [sys.executable, "-m", "celery", "-A", "leaky_tasks", "worker", "-P", "prefork"]
    args += ["-c", str(concurrency), "-Q", queue, "-n", f"leaky-{mode}-{queue}@%h"]
    args += ["--without-mingle", "--without-gossip", "-l", loglevel]
    log = open(log_path(mode), "wb")  # noqa: SIM115 - the worker owns it
    return subprocess.Popen(args, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def client(mode: str, broker: str, queue: str):  # type: ignore[no-untyped-def]
    """The sending side, configured like the worker (rmq changes the Redis transport options)."""
    from celery import Celery

    app = Celery("leaky-bench-client", broker=broker, backend=broker, set_as_current=False)
    app.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
    if mode == "rmq":
        import rmq

        rmq.install(app)
    return app


def wait_ready(app, name: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"worker exited with {proc.returncode}; see {tempfile.gettempdir()}/rmq-bench-leaky-*.log"
            )
        if app.control.ping(destination=[name], timeout=0.5):
            return
    raise RuntimeError(f"worker {name} did not answer a ping in {timeout_s:.0f}s")


def run_mode(mode: str, args: argparse.Namespace) -> Result:
    queue = f"bench.leaky.{uuid.uuid4().hex[:8]}"
    res = Result(mode=mode, tasks=args.tasks, concurrency=args.concurrency)
    app = client(mode, args.broker, queue)
    proc = start_worker(mode, args.broker, queue, args.concurrency, args.limit, args.loglevel)
    sampler = None
    try:
        wait_ready(app, f"leaky-{mode}-{queue}@{os.uname().nodename}", proc)
        sampler = TreeSampler(proc.pid, args.sample_ms / 1000)
        sampler.start()
        t0 = time.monotonic()
        pending = [app.send_task(TASK[mode], (args.leak_mib, args.frag_mib), queue=queue) for _ in range(args.tasks)]
        deadline = t0 + args.deadline_s
        waiting = dict(enumerate(pending))
        while waiting and time.monotonic() < deadline:
            for i, r in list(waiting.items()):
                if not r.ready():
                    continue
                del waiting[i]
                if r.successful():
                    res.ok += 1
                    res.pids.add(int(r.result["pid"]))
                else:
                    res.failed += 1
                    res.errors.append(f"{r.state}: {r.result!r}"[:200])
            time.sleep(0.2)
        res.failed += len(waiting)
        if waiting:
            res.errors.append(f"{len(waiting)} tasks unfinished after {args.deadline_s:.0f}s")
        res.makespan_s = time.monotonic() - t0
    finally:
        if sampler is not None:
            sampler.stop()
            res.peak_rss, res.peak_uss = sampler.peak_rss, sampler.peak_uss
        stop_worker(proc)
    return res


def frag_check(runs: int, frag_mib: int) -> None:
    print(f"Fragmentation check: a task creates {frag_mib} MiB of small objects in cycles and frees them (keeps 1/256)")
    print(f"{'cleanup':>10} {'start':>7} {'1st task':>9} {'after 1st':>10} {f'after {runs}':>10} {'returned/run':>13}")
    series = []
    for mode in ("none", "gc", "trim"):
        out = subprocess.run(
            [
                sys.executable,
                os.path.join(HERE, "leaky_tasks.py"),
                "--frag-check",
                mode,
                "--runs",
                str(runs),
                "--frag-mib",
                str(frag_mib),
            ],
            cwd=HERE,
            env=dict(os.environ, LEAKY_MODE="plain", PYTHONPATH=ROOT),
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    parser.add_argument("--modes", default="plain,rmq")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all modes")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--sample-ms", type=int, default=100)
    parser.add_argument("--deadline-s", type=float, default=900, help="for all tasks of one run")
    parser.add_argument("--loglevel", default="info", help="worker log level (logs: <tmp>/rmq-bench-leaky-<mode>.log)")
    parser.add_argument("--frag-check", action="store_true", help="only the fragmentation check")
    parser.add_argument("--runs", type=int, default=20, help="runs per process for --frag-check")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the worker is stopped on the way out
    if args.frag_check:
        frag_check(args.runs, args.frag_mib)
        return 0
    modes = args.modes.split(",")
    results: list[Result] = []
    for i in range(args.rounds):  # interleaved, order alternating, so drift hits both modes alike
        for m in modes if i % 2 == 0 else modes[::-1]:
            results.append(run_mode(m, args))
    print(
        f"Leaky workload: {args.tasks} tasks, each leaks {args.leak_mib} MiB and fragments {args.frag_mib} MiB; "
        f"prefork -c {args.concurrency}; per-child limit {args.limit / MiB:.0f} MiB; {args.rounds} round(s)"
    )
    header = f"{'':>8} {'ok':>5} {'failed':>6} {'recycles':>8} {'peak RSS':>9} {'peak USS':>9} {'tasks/s':>8}"
    header += f" {'makespan':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.mode:>8} {r.ok:5d} {r.failed:6d} {r.recycles:8d} {r.peak_rss / MiB:8.0f}M {r.peak_uss / MiB:8.0f}M "
            f"{r.throughput:8.2f} {r.makespan_s:8.1f}s"
        )
        for e in r.errors[:3]:
            print(f"         {e}")
    med = {
        m: {
            k: statistics.median(getattr(r, k) for r in results if r.mode == m)
            for k in ("peak_rss", "peak_uss", "throughput", "recycles")
        }
        for m in modes
    }
    if "plain" in med and "rmq" in med:
        p, q = med["plain"], med["rmq"]
        print(
            f"\nrmq/plain (medians): peak RSS {q['peak_rss'] / max(p['peak_rss'], 1):.2f}x, "
            f"peak USS {q['peak_uss'] / max(p['peak_uss'], 1):.2f}x, "
            f"throughput {q['throughput'] / max(p['throughput'], 1e-9):.2f}x, "
            f"recycles {q['recycles']:.0f} vs {p['recycles']:.0f}"
        )
    return 0 if all(r.failed == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
