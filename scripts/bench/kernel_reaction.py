#!/usr/bin/env python3
"""Reaction to memory, measured by the kernel's own count: the kill line crossed -> the process gone.

Each case starts ``celery -A goodput_tasks worker -c 6`` (rmq) inside its own fresh memory cgroup
(``--limit``, 1.5 GiB) on the bench's Redis, flushed before each case so that no learned peak carries
over. A sampler thread in this process, outside the worker, reads the cgroup's
``memory.usage_in_bytes`` (one ``pread`` on a kept descriptor) and the worker's pool processes (its
main thread's ``children`` file, each one's state: a zombie counts as gone) about every millisecond.

Cases:

- ``runaway-1g`` / ``runaway-3g``: one task whose subprocess grows without bound at 1 or 3 GiB/s
  (10 or 30 MiB every 10 ms), no declaration; each run is killed (3 runs: the default 2 re-runs);
- ``burst``: five tasks that declare 100 MiB and each touch 300 MiB at once from the ok zone (1750 MiB
  together in a 1536 MiB cgroup), as fast as the machine touches pages.

For each kill rmq reports (``inspect stats``: ``memory.recent_kills``: the pool pid, when, and the
governor's reading of the worker then): the reaction is from the sample where the kernel's count
first reached the kill line (the line the worker reports, ``budget x kill ratio``, less 2 MiB: with
the kernel holding the pools at the line the count stops there) to the first sample without that
pool process. The gap is the governor's reading at its kill against the kernel's count at that
moment (negative: the governor saw less than the kernel; a kill before the line shows as a gap the
size of the shortfall).

Modes (``--modes``): ``kernel`` (kernel accounting with its wake-ups and OOM hold, the default) and
``polling`` (``rmq_kernel_accounting=false``: /proc trees sampled every 250 ms, the polling lines).
Goal: kernel mode p95 <= 20 ms, 0 kernel OOM kills, no kill before the line.

Usage: scripts/bench/kernel_reaction.py [--modes kernel,polling] [--cases runaway-1g,runaway-3g,burst]
           [--repeat 3] [--limit 1.5GiB] [--json out.json]
Redis: as pressure.py (RMQ_BENCH_REDIS_URL, else a private redis-server on a free port).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from pressure import ROOT, bench_redis, rmq_stats, start_worker, stop_worker  # noqa: F401  (ROOT: sys.path)

from rmq.core.units import format_bytes, parse_size
from rmq.memory.admission import percentile
from rmq.testing.cgroups import MemoryCgroup, can_create
from rmq.testing.worker import wait_until

MiB = 1 << 20
GOAL_S = 0.020
CASES = ("runaway-1g", "runaway-3g", "burst")
#: the kernel may hold the count a page short of the line: "reached" is within this of it
AT_LINE = 2 * MiB


def _running(pid: int) -> bool:
    """Alive and not a zombie: a killed process's memory is gone once it is a zombie, before its
    parent reaps it."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Sampler(threading.Thread):
    """Samples the cgroup's usage and the worker's pool pids about every millisecond."""

    def __init__(self, cg: MemoryCgroup, main_pid: int) -> None:
        super().__init__(daemon=True, name="kernel-sampler")
        self.fd = os.open(cg.path / "memory.usage_in_bytes", os.O_RDONLY)
        self.children = f"/proc/{main_pid}/task/{main_pid}/children"
        self.samples: list[tuple[float, int, frozenset[int]]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            t = time.time()
            usage = int(os.pread(self.fd, 32, 0))
            try:
                with open(self.children) as fh:
                    pids = frozenset(p for p in map(int, fh.read().split()) if _running(p))
            except OSError:
                pids = frozenset()
            self.samples.append((t, usage, pids))
            time.sleep(0.001)

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)
        os.close(self.fd)


@dataclass
class Kill:
    pid: int
    reaction_s: float | None
    gap_bytes: int | None
    crossed: bool


@dataclass
class CaseRun:
    mode: str
    case: str
    kills: list[Kill] = field(default_factory=list)
    oom_kills: int = 0
    states: dict[str, int] = field(default_factory=dict)
    accounting: str = "-"
    kill_line: int = 0
    sample_ms: float = 0.0
    peak_bytes: int = 0


def analyse(samples: list[tuple[float, int, frozenset[int]]], recent: list[dict], line: int) -> list[Kill]:
    kills = []
    previous = float("-inf")
    for k in sorted(recent, key=lambda k: float(k["time"])):
        pid, at = int(k["pid"]), float(k["time"])
        # the process gone: the first sample after the kill record without it
        gone = next((t for t, _, pids in samples if t >= at - 0.05 and pid not in pids), None)
        # the crossing: the last time before the kill, and since the previous kill, the count went
        # from under the line to on it (a crossing of an earlier episode is not this kill's)
        crossed_at = None
        below = previous == float("-inf")  # after a kill, the count must first be seen under the line
        for t, usage, _ in samples:
            if t <= previous:
                continue
            if t > at:
                break
            if usage >= line - AT_LINE:
                if below:
                    crossed_at = t
                below = False
            else:
                below = True
        near = min(samples, key=lambda s: abs(s[0] - at)) if samples else None
        gap = int(k["worker_bytes"]) - near[1] if near is not None and k.get("worker_bytes") is not None else None
        reaction = gone - crossed_at if gone is not None and crossed_at is not None else None
        kills.append(Kill(pid, reaction, gap, crossed_at is not None))
        previous = at
    return kills


def run_case(mode: str, case: str, args: argparse.Namespace, url: str) -> CaseRun:
    import redis as redis_lib
    from goodput_tasks import app as client

    redis_lib.Redis.from_url(url).flushdb()
    run = CaseRun(mode, case)
    cg = MemoryCgroup(args.limit)
    settings = {} if mode == "kernel" else {"kernel_accounting": "false"}
    w = None
    sampler = None
    try:
        w = start_worker(client, "rmq", url, "bench.kernel", 6, prefix=cg.wrap(), app_module="goodput_tasks",
                         env={"BENCH_MODE": "rmq"}, **settings)
        stats = wait_until(lambda: (s := rmq_stats(client, w)).get("memory", {}).get("idle_bytes") and s, 30,
                           interval=0.2, what="rmq's idle reading")
        memory = stats["memory"]
        run.kill_line = int(memory["budget_bytes"] * memory["line_ratios"]["kill"])
        acc = memory.get("accounting") or {}
        hold = "OOM hold" if acc.get("oom_hold") else "no hold"
        run.accounting = f"{acc.get('mode')} / {acc.get('wakeups')} / {hold}"
        sampler = Sampler(cg, w.pid)
        sampler.start()
        if case == "burst":
            ids = [client.send_task("goodput.lying", (300, 1.0), queue="bench.kernel").id for _ in range(5)]
        else:
            step = 10 if case == "runaway-1g" else 30
            ids = [client.send_task("goodput.unbounded", (step, 0.01, 60), queue="bench.kernel").id]
        store = redis_lib.Redis.from_url(url)

        def ended() -> bool:
            raw = store.mget([f"celery-task-meta-{i}" for i in ids])
            return all(v and json.loads(v)["status"] in ("SUCCESS", "FAILURE") for v in raw)

        wait_until(ended, 120, interval=0.1, what=f"the {case} tasks to end")
        for v in store.mget([f"celery-task-meta-{i}" for i in ids]):
            meta = json.loads(v)
            label = meta["status"] + ("" if meta["status"] == "SUCCESS" else f" {meta['result'].get('exc_type')}")
            run.states[label] = run.states.get(label, 0) + 1
        time.sleep(0.3)
        recent = rmq_stats(client, w).get("memory", {}).get("recent_kills", [])
        sampler.stop()
        samples, sampler = sampler.samples, None
        run.sample_ms = 1000 * (samples[-1][0] - samples[0][0]) / max(1, len(samples) - 1)
        run.peak_bytes = max(u for _, u, _ in samples)
        run.kills = analyse(samples, recent, run.kill_line)
        run.oom_kills = cg.oom_kills()
    finally:
        if sampler is not None:
            sampler.stop()
        if w is not None:
            stop_worker(w)
        cg.remove()
    return run


def report(runs: list[CaseRun]) -> bool:
    print("\n## Reaction by the kernel's count (cgroup usage sampled from outside)\n")
    print("| mode | case | accounting | kills | reaction p50 / p95 / max ms | kills before the line "
          "| governor - kernel at the kill, MiB (median, range) | kernel OOM kills | outcomes | sample ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for mode in dict.fromkeys(r.mode for r in runs):
        for case in dict.fromkeys(r.case for r in runs if r.mode == mode):
            group = [r for r in runs if r.mode == mode and r.case == case]
            kills = [k for r in group for k in r.kills]
            reactions = [k.reaction_s for k in kills if k.reaction_s is not None]
            gaps = [k.gap_bytes / MiB for k in kills if k.gap_bytes is not None]
            early = sum(1 for k in kills if not k.crossed)
            oom = sum(r.oom_kills for r in group)
            outcomes: dict[str, int] = {}
            for r in group:
                for s, n in r.states.items():
                    outcomes[s] = outcomes.get(s, 0) + n
            react = "-" if not reactions else " / ".join(
                f"{1000 * v:.1f}" for v in (percentile(reactions, 0.5), percentile(reactions, 0.95), max(reactions)))
            gap = "-" if not gaps else f"{percentile(gaps, 0.5):+.0f} ({min(gaps):+.0f} .. {max(gaps):+.0f})"
            print(f"| {mode} | {case} | {group[0].accounting} | {len(kills)} | {react} | {early} | {gap} | {oom} | "
                  f"{', '.join(f'{k} x{v}' for k, v in outcomes.items())} | "
                  f"{sum(r.sample_ms for r in group) / len(group):.2f} |")
            if mode == "kernel":
                ok &= bool(reactions) and percentile(reactions, 0.95) <= GOAL_S and oom == 0 and early == 0
    line = runs[0].kill_line if runs else 0
    print(f"\nKill line (kernel mode): {format_bytes(line)}; 'reached' = within {AT_LINE // MiB} MiB of it.")
    print(f"Goal (kernel mode): p95 <= {1000 * GOAL_S:.0f} ms, 0 kernel OOM kills, no kill before the line: "
          f"{'MET' if ok else 'MISSED'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--modes", default="kernel,polling")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--limit", default="1.5GiB")
    parser.add_argument("--json")
    args = parser.parse_args()
    args.limit = parse_size(args.limit)
    why = can_create()
    if why is not None:
        print(f"kernel_reaction: cannot measure here: {why}", file=sys.stderr)
        return 2
    runs: list[CaseRun] = []
    with bench_redis() as url:
        os.environ["RMQ_BROKER_URL"] = url
        os.environ["RMQ_RESULT_BACKEND"] = url
        for _ in range(args.repeat):
            for mode in args.modes.split(","):
                for case in args.cases.split(","):
                    print(f"running {case} in {mode} mode ...", flush=True)
                    runs.append(run_case(mode, case, args, url))
    ok = report(runs)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in runs], fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
