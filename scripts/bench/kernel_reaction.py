#!/usr/bin/env python3
"""Reaction to memory, measured by the kernel's own count: the kill line crossed -> the process gone.

Each case starts ``celery -A goodput_tasks worker -c 6`` (rmq) inside its own fresh memory cgroup
(``--limit``, 1.5 GiB) on the bench's Redis, flushed before each case so that no learned peak carries
over. A sampler thread in this process, outside the worker, reads the cgroup's
``memory.usage_in_bytes`` (one ``pread`` on a kept descriptor), the worker's pool processes (its
main thread's ``children`` file) and their children (a task's subprocesses), and whether each runs,
about every millisecond. A process is gone once every thread of it has exited: its last thread frees
its memory on the way out, and its main thread shows as a zombie before that when another thread
(a pool process has rmq's) is still freeing.

Cases:

- ``runaway-1g`` / ``runaway-3g``: one task whose subprocess grows without bound at 1 or 3 GiB/s
  (10 or 30 MiB every 10 ms), no declaration; each run is killed (3 runs: the default 2 re-runs);
- ``burst``: five tasks that declare 100 MiB and each touch 300 MiB at once from the ok zone (1750 MiB
  together in a 1536 MiB cgroup), as fast as the machine touches pages.

For each kill rmq reports (``inspect stats``: ``memory.recent_kills``: the pool pid, when, and the
governor's reading of the worker then): the reaction is from the sample where the kernel's count
first reached the kill line (the line the worker reports, ``budget x kill ratio``, less 2 MiB: with
the kernel holding the pools at the line the count stops there) to the first sample without that
pool process or any child it had. A crossing between the last sample and the kill counts from that
last sample when the governor's own reading at the kill was on the line (a working set, never above
the kernel's count): an upper bound; otherwise the kill came before the line. Of the reaction, "to
the kill" ends at rmq's kill record (taken just after its signal): the governor's part; the rest is
the kernel freeing the victim's memory. The physics row measures that rest alone: a lone process
that touched the victims' median size, in a fresh cgroup, SIGKILLed with nothing else running,
watched the same way (``--floor-runs`` times). The gap is the governor's reading at its kill against
the kernel's count at that moment (negative: the governor saw less than the kernel; a kill before
the line shows as a gap the size of the shortfall).

Modes (``--modes``): ``kernel`` (kernel accounting with its wake-ups and OOM hold, the default) and
``polling`` (``rmq_kernel_accounting=false``: /proc trees sampled every 250 ms, the polling lines).
Goal: kernel mode p95 <= 20 ms, 0 kernel OOM kills, no kill before the line. A 300 MiB process takes
35-65 ms to exit on this two-core machine with nothing else running (the physics row), so the
goal is printed for the governor's part too: the line -> the kill.

Usage: scripts/bench/kernel_reaction.py [--modes kernel,polling] [--cases runaway-1g,runaway-3g,burst]
           [--repeat 3] [--limit 1.5GiB] [--floor-runs 5] [--json out.json]
Redis: as pressure.py (RMQ_BENCH_REDIS_URL, else a private redis-server on a free port).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
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


def _state(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def _running(pid: int) -> bool:
    """Some thread of it has not exited. A killed process's memory is gone once its last thread has
    exited (that thread frees it on its way out), before its parent reaps it. Its main thread alone
    shows as a zombie as soon as it has exited itself, while another thread (a pool process has
    rmq's) may still be freeing the memory: the other threads are read only then."""
    if _state(f"/proc/{pid}/stat") not in ("Z", "X"):
        return True
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(_state(f"/proc/{pid}/task/{t}/stat") not in ("Z", "X") for t in threads if t != str(pid))


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except (OSError, ValueError):
        return []


class Sampler(threading.Thread):
    """Samples the cgroup's usage, and which of the worker's pool processes and their children (a
    task's subprocesses) run, about every millisecond."""

    def __init__(self, cg: MemoryCgroup, main_pid: int) -> None:
        super().__init__(daemon=True, name="kernel-sampler")
        self.fd = os.open(cg.path / "memory.usage_in_bytes", os.O_RDONLY)
        self.main_pid = main_pid
        self.samples: list[tuple[float, int, frozenset[int]]] = []
        #: child -> the pool process it was seen under: a killed pool process's tree
        self.parents: dict[int, int] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            t = time.time()
            usage = int(os.pread(self.fd, 32, 0))
            running = set()
            for pool in _children(self.main_pid):
                if _running(pool):
                    running.add(pool)
                for child in _children(pool):
                    self.parents.setdefault(child, pool)
                    if _running(child):
                        running.add(child)
            self.samples.append((t, usage, frozenset(running)))
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
    #: of the reaction, the line crossed -> rmq's kill record (taken just after its signal), and the
    #: rest: that record -> the process gone (its exit, beside its neighbours)
    to_kill_s: float | None = None
    #: the victim's whole tree in the kernel's count when rmq killed it
    observed_bytes: int = 0


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


def analyse(samples: list[tuple[float, int, frozenset[int]]], recent: list[dict], line: int,
            parents: dict[int, int] | None = None) -> list[Kill]:
    kills = []
    previous = float("-inf")
    for k in sorted(recent, key=lambda k: float(k["time"])):
        pid, at = int(k["pid"]), float(k["time"])
        # the process gone: the first sample after the kill record without it, nor any child it had
        tree = {pid} | {c for c, p in (parents or {}).items() if p == pid}
        gone = next((t for t, _, pids in samples if t >= at - 0.05 and not tree & pids), None)
        # the crossing: the last time before the kill, and since the previous kill, the count went
        # from under the line to on it (a crossing of an earlier episode is not this kill's)
        crossed_at = last = None
        below = previous == float("-inf")  # after a kill, the count must first be seen under the line
        for t, usage, _ in samples:
            if t <= previous:
                continue
            if t > at:
                break
            last = t
            if usage >= line - AT_LINE:
                if below:
                    crossed_at = t
                below = False
            else:
                below = True
        if crossed_at is None and below and last is not None and int(k.get("worker_bytes") or 0) >= line - AT_LINE:
            # crossed between the last sample and the kill: the governor's reading at its kill, a working
            # set (never more than the kernel's count), was on the line. Timed from that last sample
            # under it, an upper bound.
            crossed_at = last
        near = min(samples, key=lambda s: abs(s[0] - at)) if samples else None
        gap = int(k["worker_bytes"]) - near[1] if near is not None and k.get("worker_bytes") is not None else None
        reaction = gone - crossed_at if gone is not None and crossed_at is not None else None
        to_kill = at - crossed_at if crossed_at is not None else None
        kills.append(Kill(pid, reaction, gap, crossed_at is not None, to_kill, int(k.get("observed_bytes") or 0)))
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
        samples, parents, sampler = sampler.samples, sampler.parents, None
        run.sample_ms = 1000 * (samples[-1][0] - samples[0][0]) / max(1, len(samples) - 1)
        run.peak_bytes = max(u for _, u, _ in samples)
        run.kills = analyse(samples, recent, run.kill_line, parents)
        run.oom_kills = cg.oom_kills()
    finally:
        if sampler is not None:
            sampler.stop()
        if w is not None:
            stop_worker(w)
        cg.remove()
    return run


def exit_floor(size: int, limit: int, runs: int) -> list[float]:
    """SIGKILL -> gone, as the sampler tells it (:func:`_running`, every millisecond), of a lone process
    that touched ``size`` bytes, in a fresh cgroup of ``limit``, with nothing else running: how long
    this machine's kernel takes to free that much. No governor's reaction can be shorter."""
    code = (f"import mmap, time\nm = mmap.mmap(-1, {size})\nfor i in range(0, {size}, 4096):\n    m[i] = 1\n"
            "print('ready', flush=True)\ntime.sleep(60)")
    took = []
    for _ in range(runs):
        cg = MemoryCgroup(limit)
        try:
            with subprocess.Popen([*cg.wrap(), sys.executable, "-c", code], stdout=subprocess.PIPE) as p:
                assert p.stdout is not None
                p.stdout.readline()
                t = time.time()
                os.kill(p.pid, signal.SIGKILL)
                while _running(p.pid):
                    time.sleep(0.001)
                took.append(time.time() - t)
        finally:
            cg.remove()
    return took


def report(runs: list[CaseRun], floors: dict[str, tuple[int, list[float]]]) -> bool:
    print("\n## Reaction by the kernel's count (cgroup usage sampled from outside)\n")
    print("| mode | case | accounting | kills | reaction p50 / p95 / max ms | of which to the kill, p50 / p95 ms "
          "| kills before the line "
          "| governor - kernel at the kill, MiB (median, range) | kernel OOM kills | outcomes | sample ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ok = own_ok = True
    for mode in dict.fromkeys(r.mode for r in runs):
        for case in dict.fromkeys(r.case for r in runs if r.mode == mode):
            group = [r for r in runs if r.mode == mode and r.case == case]
            kills = [k for r in group for k in r.kills]
            reactions = [k.reaction_s for k in kills if k.reaction_s is not None]
            decide = [k.to_kill_s for k in kills if k.to_kill_s is not None and k.reaction_s is not None]
            gaps = [k.gap_bytes / MiB for k in kills if k.gap_bytes is not None]
            early = sum(1 for k in kills if not k.crossed)
            oom = sum(r.oom_kills for r in group)
            outcomes: dict[str, int] = {}
            for r in group:
                for s, n in r.states.items():
                    outcomes[s] = outcomes.get(s, 0) + n
            react = "-" if not reactions else " / ".join(
                f"{1000 * v:.1f}" for v in (percentile(reactions, 0.5), percentile(reactions, 0.95), max(reactions)))
            to_kill = "-" if not decide else " / ".join(
                f"{1000 * v:.1f}" for v in (percentile(decide, 0.5), percentile(decide, 0.95)))
            gap = "-" if not gaps else f"{percentile(gaps, 0.5):+.0f} ({min(gaps):+.0f} .. {max(gaps):+.0f})"
            print(f"| {mode} | {case} | {group[0].accounting} | {len(kills)} | {react} | {to_kill} | {early} | {gap} "
                  f"| {oom} | "
                  f"{', '.join(f'{k} x{v}' for k, v in outcomes.items())} | "
                  f"{sum(r.sample_ms for r in group) / len(group):.2f} |")
            if mode == "kernel":
                ok &= bool(reactions) and percentile(reactions, 0.95) <= GOAL_S and oom == 0 and early == 0
                own_ok &= bool(decide) and percentile(decide, 0.95) <= GOAL_S and oom == 0 and early == 0
    for case, (size, took) in floors.items():
        spread = " / ".join(f"{1000 * v:.1f}" for v in (percentile(took, 0.5), percentile(took, 0.95), max(took)))
        print(f"| physics | {case} | a lone process of {format_bytes(size)} (the victims' median), SIGKILL -> gone "
              f"| {len(took)} | {spread} | - | - | - | - | - | - |")
    line = runs[0].kill_line if runs else 0
    print(f"\nKill line (kernel mode): {format_bytes(line)}; 'reached' = within {AT_LINE // MiB} MiB of it.")
    print(f"Goal (kernel mode): p95 <= {1000 * GOAL_S:.0f} ms, 0 kernel OOM kills, no kill before the line: "
          f"{'MET' if ok else 'MISSED'}")
    print(f"The governor's part (kernel mode): the line -> the kill p95 <= {1000 * GOAL_S:.0f} ms, 0 kernel OOM kills, "
          f"no kill before the line: {'MET' if own_ok else 'MISSED'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--modes", default="kernel,polling")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--limit", default="1.5GiB")
    parser.add_argument("--floor-runs", type=int, default=5,
                        help="runs of the physical floor per case (a lone process of the victims' size killed)")
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
    floors: dict[str, tuple[int, list[float]]] = {}
    for case in dict.fromkeys(r.case for r in runs):
        sizes = [k.observed_bytes for r in runs if r.case == case and r.mode == "kernel" for k in r.kills
                 if k.observed_bytes > 0]
        if sizes and args.floor_runs > 0:
            size = int(statistics.median(sizes))
            print(f"measuring the floor of {case}: a lone process of {format_bytes(size)} killed ...", flush=True)
            floors[case] = (size, exit_floor(size, args.limit, args.floor_runs))
    ok = report(runs, floors)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"runs": [asdict(r) for r in runs],
                       "floors": {case: {"bytes": size, "seconds": took} for case, (size, took) in floors.items()}},
                      fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
