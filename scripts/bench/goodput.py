#!/usr/bin/env python3
"""Goodput under a real memory limit, case by case: plain Celery beside rmq, as a new user runs them.

Every run starts ``celery -A goodput_tasks worker --pool prefork -c 6`` inside its own fresh memory
cgroup (``rmq.testing.cgroups.MemoryCgroup``, ``--limit`` 1.5 GiB, no swap; removed afterwards) on the
bench's Redis (broker and result backend), sends the case's tasks and waits, with a deadline, for
each to reach one terminal state. The task app is ``goodput_tasks.py``: plain Celery is a bare app
with ``@app.task(acks_late=True, reject_on_worker_lost=True)``; rmq is the same app with
``rmq.install(app)`` and ``@governed_task``s (``--set rmq_key=value`` adds settings to its workers).

Sides (``--sides``): ``rmq`` with nothing learned of the case's task (its learned peaks are deleted
first: the first batch after a deploy); ``warm``, rmq again right after, with the peaks that batch
taught (every later batch); ``plain``; and ``fit``, an oracle: plain Celery started with ``-c fit``,
the concurrency that fits (below), which runs that many tasks at a time from the first, at the speed
they really have side by side on this machine. Each run's makespan is printed against the oracle's
of its kind of task (in-process or in a subprocess) too.

Cases (``--rows``), each ``--tasks`` (24) tasks touching ``--task-mib`` (300) MiB for ``--hold`` (1) s:

- ``honest``: rmq's task declares 4/3 of what it touches (400 MiB);
- ``none``: no declaration;
- ``lying``: declares 1/3 of it (100 MiB; rmq only: plain Celery has no declarations);
- ``subprocess``: the memory lives in a ``python -c`` child the task runs and waits for (an encoder,
  ffmpeg-style), no declaration;
- ``unbounded``: ONE task whose child grows by ``--grow-mib`` (50) MiB every ``--grow-every`` (0.05) s
  without end, no declaration. Printed: its final state, whether any child it started (each run
  notes its child's pid and start time in Redis) is alive when the state is terminal, and how long
  after that the last one was seen alive (polled every 10 ms for up to 5 s).

Measured from outside, per run: succeeded / failed (exception types) / lost (not terminal by
``--deadline``); tasks whose terminal state changed later or that ran again after succeeding; task
runs (starts, redeliveries and re-runs included); kernel OOM kills (the cgroup's ``oom_kill``
counter); makespan (first send -> last terminal state); the kernel's peak usage of the cgroup
(``memory.max_usage_in_bytes`` / ``memory.peak``); most task bodies running at once; processes left
in the cgroup once the worker stopped (the bench SIGKILLs them by pid); rmq's accounting mode
(``inspect stats``: ``rmq.memory.accounting``, ``-`` where the worker does not report one).

The physical ideal: how many tasks fit at once in the limit minus the idle worker, times the task
time. Footprint and task time are measured once: a plain worker idles in a fresh cgroup, runs an
in-process task alone three times and then a subprocess task alone three times; footprint = the
cgroup's peak minus its usage just before (the kernel's peak restarted there, first run); task time
= start to memory freed (median of the three). Each run's idle worker is its own worker's cgroup
usage (``memory.usage_in_bytes``, page cache included) once it answers (rmq: once it has an idle
reading), before any task. fit = min(concurrency, floor((limit - idle) / footprint)); ideal =
ceil(N / fit) x task time. The hold ideal (x the hold, 1 s, instead of the task time) is printed
beside it: touching and freeing 300 MiB or starting a child add about 0.15-0.25 s to every task, so
even a perfect scheduler stays at about 1.15-1.25x of it.

Goals (rmq runs): every case N/N succeeded with 0 kernel OOM kills; makespan <= 1.15x the ideal for
``honest``, ``none`` and ``subprocess`` (no declaration), <= 1.3x for ``lying``; the unbounded task ends
as ``MemoryBudgetExceeded`` with no process of its tree alive 1 s after its terminal state, and 0 kernel
OOM kills.
Exit 0 when every rmq goal is met, 1 when one is missed, 2 when nothing could be measured (not root,
or no writable memory cgroup hierarchy).

Usage: scripts/bench/goodput.py [--rows honest,none,lying,subprocess,unbounded] [--sides rmq,warm,plain,fit]
           [--tasks 24] [--concurrency 6] [--limit 1.5GiB] [--task-mib 300] [--hold 1.0]
           [--set rmq_key=value ...] [--json out.json]
Redis: as pressure.py (RMQ_BENCH_REDIS_URL, else a private redis-server on a free port).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
from pressure import (
    ROOT,  # noqa: F401  (puts the repo on sys.path)
    bench_redis,
    client_app,
    max_overlap,
    rmq_stats,
    start_worker,
    stop_worker,
    task_states,
)

from rmq.core import keys
from rmq.testing.cgroups import MemoryCgroup, can_create
from rmq.testing.worker import WorkerProcess, wait_until

MiB = 1 << 20
TERMINAL = ("SUCCESS", "FAILURE", "REVOKED")
ROWS = ("honest", "none", "lying", "subprocess", "unbounded")
SIDES = ("rmq", "warm", "plain", "fit")
SIDE_LABELS = {"rmq": "rmq", "warm": "rmq, peaks learned", "plain": "plain Celery", "fit": "plain Celery at -c fit"}
#: the sides that run rmq: ``rmq`` with nothing learned of the case's task (its learned peaks deleted
#: first: a first batch after a deploy), ``warm`` right after it, with the peaks that batch taught
RMQ_SIDES = ("rmq", "warm")
#: cases plain Celery runs: without declarations, ``lying`` would be the same run as ``none``
PLAIN_ROWS = ("honest", "none", "subprocess", "unbounded")
#: the oracle (side ``fit``): plain Celery told how many tasks fit, for each kind of task: the in-process
#: cases all run the same body on plain Celery
ORACLE_OF = {"honest": "honest", "none": "honest", "lying": "honest", "subprocess": "subprocess"}
#: runs of one task alone whose median is the task time of the ideal
SOLO_RUNS = 3
#: makespan goals (x the physical ideal) of rmq's runs
MAKESPAN_GOALS = {"honest": 1.15, "none": 1.15, "subprocess": 1.15, "lying": 1.3}
#: the unbounded child gives up after this long (exit 3): nothing a crashed bench leaves lives for long
GIVE_UP_S = 120.0
#: how long the unbounded task's children are watched after its terminal state, and the goal
TREE_WATCH_S = 5.0
TREE_GOAL_S = 1.0


def case_title(row: str, args: argparse.Namespace) -> str:
    return {
        "honest": f"honest declarations ({args.honest_mib} MiB declared)",
        "none": "no declarations",
        "lying": f"declarations that lie ({args.lying_mib} MiB declared, {args.task_mib} used)",
        "subprocess": f"the {args.task_mib} MiB lives in a subprocess the task runs, no declaration",
        "unbounded": "a subprocess that grows without bound (1 task)",
    }[row]


@dataclass
class Run:
    row: str
    side: str
    tasks: int
    succeeded: int = 0
    failed: int = 0
    lost: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    runs: int = 0
    oom_kills: int = 0
    makespan_s: float | None = None
    peak_bytes: int | None = None
    idle_bytes: int = 0
    idle_working_set_bytes: int | None = None
    idle_after_bytes: int = 0  # the worker's cgroup usage once every task ended (warmed up, idle again)
    fit: int = 0
    ideal_s: float | None = None  # fit at a time, each taking the task time alone
    hold_ideal_s: float | None = None  # fit at a time, each taking the hold only
    max_at_once: int = 0
    accounting: str = "-"
    worker_died: bool = False
    left_behind: list[int] = field(default_factory=list)
    lost_detail: list[str] = field(default_factory=list)
    changed: int = 0  # tasks whose terminal state changed later
    reran: int = 0  # succeeded tasks that started again after their successful run
    final_state: str = ""
    children: list[int] = field(default_factory=list)
    alive_at_end: list[int] = field(default_factory=list)
    alive_after_watch: list[int] = field(default_factory=list)
    tree_gone_after_s: float | None = None
    wall_s: float = 0.0
    #: each success's start, end and memory freed, in s after the first send (for timelines in --json)
    spans: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def x_ideal(self) -> float | None:
        if self.makespan_s is None or not self.ideal_s:
            return None
        return self.makespan_s / self.ideal_s

    @property
    def x_hold_ideal(self) -> float | None:
        if self.makespan_s is None or not self.hold_ideal_s:
            return None
        return self.makespan_s / self.hold_ideal_s


def worker_env(side: str, args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """(task app environment, rmq settings as ``start_worker`` keywords) of a worker of ``side``."""
    env = {"BENCH_HONEST_MIB": str(args.honest_mib), "BENCH_LYING_MIB": str(args.lying_mib)}
    return env, (dict(args.settings) if side in RMQ_SIDES else {})


def plain_client(url: str) -> Any:
    """A bare Celery client (Celery's own Redis key layout, as the plain workers use it)."""
    from celery import Celery

    return Celery("goodput-client", broker=url, backend=url, set_as_current=False)


def oracle_fit(row: str, args: argparse.Namespace, fp: Footprints) -> int:
    """How many tasks of ``row`` the oracle runs at once: what fits beside the idle plain worker of
    the footprint's measure, by the footprint."""
    footprint = fp.subprocess if row == "subprocess" else fp.in_process
    return max(1, min(args.concurrency, (args.limit - fp.idle) // footprint))


def client_for(side: str, url: str) -> Any:
    return client_app(url) if side in RMQ_SIDES else plain_client(url)


def start(side: str, app: Any, url: str, queue: str, cg: MemoryCgroup, args: argparse.Namespace,
          concurrency: int | None = None) -> WorkerProcess:
    env, settings = worker_env(side, args)
    mode = "rmq" if side in RMQ_SIDES else "plain"
    return start_worker(app, mode, url, queue, concurrency or args.concurrency, cg.wrap(), app_module="goodput_tasks",
                        env=env, **settings)


def finish(w: WorkerProcess | None, cg: MemoryCgroup) -> list[int]:
    """Stop the worker by pid, SIGKILL whatever is left in its cgroup (pids returned), remove the cgroup."""
    if w is not None:
        stop_worker(w)
    left = cg.pids()
    cg.remove(grace=0)  # ends what is left at once
    return left


def wait_terminal(client: Any, task_id: str, timeout_s: float) -> dict:
    return wait_until(lambda: (m := task_states(client, [task_id])[task_id])["status"] in TERMINAL and m,
                      timeout_s, interval=0.05, what=f"task {task_id}")


@dataclass
class Footprints:
    in_process: int
    subprocess: int
    idle: int
    peak_restarted: bool
    #: how long one task alone took, start to memory freed (row -> seconds, the median of
    #: ``SOLO_RUNS``): the hold plus touching, freeing and starting a child, which no scheduler can save
    task_s: dict[str, float] = field(default_factory=dict)


def measure_footprints(args: argparse.Namespace, url: str) -> Footprints:
    """One task alone, then one subprocess task alone, in an idle plain worker: the cgroup's peak growth
    (of the first run) and the task time (the median of ``SOLO_RUNS`` runs one after the other)."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(url)
    app = plain_client(url)
    queue = f"bench.goodput.footprint.{uuid.uuid4().hex[:8]}"
    cg = MemoryCgroup(args.limit)
    w = None
    grown: dict[str, int] = {}
    took: dict[str, float] = {}
    restarted = True
    idle = 0
    try:
        w = start("plain", app, url, queue, cg, args)
        idle = cg.usage_bytes() or 0
        for row in ("honest", "subprocess"):
            times = []
            for i in range(SOLO_RUNS):
                before = cg.usage_bytes() or 0
                if i == 0:
                    restarted &= cg.reset_peak()
                r = app.send_task(f"goodput.{row}", (args.task_mib, args.hold), queue=queue)
                meta = wait_terminal(client, r.id, 60)
                if meta["status"] != "SUCCESS":
                    raise RuntimeError(f"the footprint's {row} task ended {meta['status']}: {meta.get('result')}")
                if i == 0:
                    grown[row] = (cg.peak_bytes() or 0) - before
                result = meta.get("result") or {}
                if isinstance(result, dict) and "started" in result:
                    times.append(float(result["freed"]) - float(result["started"]))
                client.delete(f"celery-task-meta-{r.id}", f"goodput:starts:{r.id}", f"goodput:children:{r.id}")
            if times:
                took[row] = statistics.median(times)
    finally:
        finish(w, cg)
        client.delete(queue)
        app.close()
    return Footprints(grown["honest"], grown["subprocess"], idle, restarted, took)


def alive(children: list[dict]) -> list[int]:
    """Pids of ``children`` (``{"pid", "created"}``) still running: not gone, not a zombie, not a new process."""
    found = []
    for child in children:
        try:
            p = psutil.Process(child["pid"])
            if child["created"] is not None and abs(p.create_time() - child["created"]) > 0.05:
                continue  # the pid was reused
            if p.status() != psutil.STATUS_ZOMBIE:
                found.append(child["pid"])
        except psutil.Error:
            pass
    return found


def accounting_of(stats: dict) -> str:
    value = (stats.get("memory") or {}).get("accounting")
    if value is None or value == "":
        return "-"
    if isinstance(value, dict):  # rmq's own: the mode, its wake-ups, whether bursts are held, its wakes
        woken = ", ".join(f"{k} {v}" for k, v in (value.get("woken") or {}).items()) or "none"
        hold = "OOM hold" if value.get("oom_hold") else "no OOM hold"
        return f"{value.get('mode')} / {value.get('wakeups')} / {hold} / woken: {woken}"
    return str(value)


def run_case(row: str, side: str, args: argparse.Namespace, url: str, fp: Footprints | None) -> Run:
    import redis as redis_lib

    client = redis_lib.Redis.from_url(url)
    app = client_for(side, url)
    queue = f"bench.goodput.{row}.{side}.{uuid.uuid4().hex[:8]}"
    n = 1 if row == "unbounded" else args.tasks
    run = Run(row, side, n)
    began = time.monotonic()
    if side == "rmq":  # nothing learned: the first batch after a deploy (a ``warm`` run keeps what it taught)
        client.delete(keys.learned_peaks(f"goodput.{row}"))
    cg = MemoryCgroup(args.limit)
    w: WorkerProcess | None = None
    ids: list[str] = []
    try:
        w = start(side, app, url, queue, cg, args, oracle_fit(row, args, fp) if side == "fit" and fp else None)
        stats: dict = {}
        if side in RMQ_SIDES:
            stats = wait_until(lambda: (s := rmq_stats(app, w)).get("memory", {}).get("idle_bytes") and s,
                               30, interval=0.2, what="rmq's idle reading")
        run.idle_bytes = cg.usage_bytes() or 0
        run.idle_working_set_bytes = cg.working_set_bytes()
        if fp is not None and row != "unbounded":
            footprint = fp.subprocess if row == "subprocess" else fp.in_process
            run.fit = min(args.concurrency, max(0, (args.limit - run.idle_bytes) // footprint))
            task_s = fp.task_s.get("subprocess" if row == "subprocess" else "honest", args.hold)
            run.ideal_s = math.ceil(n / run.fit) * task_s if run.fit else None
            run.hold_ideal_s = math.ceil(n / run.fit) * args.hold if run.fit else None
        task_args = (args.grow_mib, args.grow_every, GIVE_UP_S) if row == "unbounded" else (args.task_mib, args.hold)
        t0 = time.time()
        ids = [app.send_task(f"goodput.{row}", task_args, queue=queue).id for _ in range(n)]
        deadline = time.monotonic() + args.deadline
        done: dict[str, dict] = {}
        last = None
        while len(done) < n and time.monotonic() < deadline:
            for i, meta in task_states(client, [i for i in ids if i not in done]).items():
                if meta["status"] in TERMINAL:
                    done[i] = meta
                    last = time.time()
            if w.proc is not None and w.proc.poll() is not None:
                run.worker_died = True
                break
            time.sleep(0.02)
        if row == "unbounded":
            children = [json.loads(x) for x in client.lrange(f"goodput:children:{ids[0]}", 0, -1)]
            run.children = [c["pid"] for c in children]
            ended = time.monotonic()
            run.alive_at_end = alive(children)
            still = run.alive_at_end
            while still and time.monotonic() - ended < TREE_WATCH_S:
                time.sleep(0.01)
                still = alive(children)
            run.alive_after_watch = still
            run.tree_gone_after_s = None if still else time.monotonic() - ended
        run.makespan_s = None if last is None else last - t0
        run.oom_kills = cg.oom_kills()
        run.idle_after_bytes = cg.usage_bytes() or 0
        run.peak_bytes = cg.peak_bytes()
        if side in RMQ_SIDES:
            stats = rmq_stats(app, w) or stats
            run.accounting = accounting_of(stats)
        spans = []
        for meta in done.values():
            result = meta.get("result")
            if meta["status"] == "SUCCESS":
                run.succeeded += 1
                spans.append((result["started"], result["ended"]))
                run.spans.append((result["started"] - t0, result["ended"] - t0, result["freed"] - t0))
            else:
                run.failed += 1
                exc = (result or {}).get("exc_type", meta["status"]) if isinstance(result, dict) else meta["status"]
                run.errors[exc] = run.errors.get(exc, 0) + 1
        if row == "unbounded" and done:
            meta = next(iter(done.values()))
            result = meta.get("result")
            run.final_state = meta["status"] + (f" {result.get('exc_type', '')}" if isinstance(result, dict)
                                                and meta["status"] != "SUCCESS" else "")
        elif row == "unbounded":
            run.final_state = f"not terminal after {args.deadline:.0f} s"
        run.max_at_once = max_overlap(spans)
        run.lost = n - len(done)
        run.runs = sum(client.llen(f"goodput:starts:{i}") for i in ids)
        # exactly one terminal state: none changes afterwards, no success is followed by another run
        for i, meta in task_states(client, list(done)).items():
            if meta["status"] != done[i]["status"]:
                run.changed += 1
            elif meta["status"] == "SUCCESS":
                starts = [json.loads(x)["t"] for x in client.lrange(f"goodput:starts:{i}", 0, -1)]
                run.reran += any(t > meta["result"]["started"] for t in starts)
        for i in ids:
            if i not in done:
                meta = task_states(client, [i])[i]
                run.lost_detail.append(f"{i}: {meta['status']}, started {client.llen(f'goodput:starts:{i}')}x")
    finally:
        run.left_behind = finish(w, cg)
        if ids:
            client.delete(*[f"celery-task-meta-{i}" for i in ids], *[f"goodput:starts:{i}" for i in ids],
                          *[f"goodput:children:{i}" for i in ids])
        client.delete(queue)
        app.close()
    run.wall_s = time.monotonic() - began
    return run


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.0f}"


def goals(run: Run) -> list[tuple[str, bool]]:
    """rmq's goals for one run: (what, met)."""
    checks = [(f"0 kernel OOM kills ({run.oom_kills})", run.oom_kills == 0)]
    if run.row == "unbounded":
        checks.insert(0, (f"ends as MemoryBudgetExceeded ({run.final_state})",
                          run.final_state == "FAILURE MemoryBudgetExceeded"))
        gone = run.tree_gone_after_s
        checks.append((f"no process of its tree alive {TREE_GOAL_S:g} s after its terminal state ("
                       + (f"still alive after {TREE_WATCH_S:g} s" if gone is None else f"gone after {gone:.2f} s")
                       + ")", gone is not None and gone <= TREE_GOAL_S))
        return checks
    checks.insert(0, (f"{run.tasks}/{run.tasks} succeeded ({run.succeeded})", run.succeeded == run.tasks))
    goal = MAKESPAN_GOALS[run.row]
    x = run.x_ideal
    checks.append((f"makespan <= {goal}x the ideal ({'-' if x is None else f'{x:.2f}x'})",
                   x is not None and x <= goal and not run.lost))
    return checks


def print_ideals(runs: list[Run], fp: Footprints, args: argparse.Namespace) -> None:
    """How each run's physical ideal was worked out."""
    print(f"\nPhysical ideal: per-task footprint measured once (an idle plain worker in a fresh cgroup, idle "
          f"{mib(fp.idle)} MiB; one task alone, the cgroup's peak minus its usage just before"
          f"{'' if fp.peak_restarted else ', the peak NOT restartable here: counted from the worker start'}): "
          f"in-process {mib(fp.in_process)} MiB, in a subprocess {mib(fp.subprocess)} MiB. Per run: idle = the "
          f"run's own worker's cgroup usage once ready, before any task; fit = min(-c {args.concurrency}, "
          f"floor(({mib(args.limit)} - idle) / footprint)); ideal = ceil({args.tasks} / fit) x the task time, "
          f"the time one task alone took from start to memory freed (median of {SOLO_RUNS}): "
          + (", ".join(f"{row} {s:.2f} s" for row, s in fp.task_s.items()) or "not measured, the hold")
          + f"; the hold ideal is ceil({args.tasks} / fit) x the hold ({args.hold:g} s), which no scheduler reaches.")
    for r in runs:
        if r.row == "unbounded":
            continue
        fpt = fp.subprocess if r.row == "subprocess" else fp.in_process
        ideal = "-" if r.ideal_s is None else f"{r.ideal_s:.1f} s"
        print(f"- {r.row}, {SIDE_LABELS[r.side]}: idle {mib(r.idle_bytes)} MiB (working set "
              f"{mib(r.idle_working_set_bytes)}; {mib(r.idle_after_bytes)} once the tasks ended), fit "
              f"floor(({mib(args.limit)} - {mib(r.idle_bytes)}) / {mib(fpt)}) -> {r.fit}, ideal {ideal}; "
              f"run took {r.wall_s:.0f} s with the worker's start and stop")


def print_unbounded(runs: list[Run]) -> None:
    """The unbounded task's end: its state, and when the last process of its tree was seen."""
    for r in runs:
        if r.row != "unbounded":
            continue
        if not r.alive_at_end:
            after = ""
        elif r.tree_gone_after_s is None:
            after = f"; still alive {TREE_WATCH_S:g} s later: {', '.join(map(str, r.alive_after_watch))}"
        else:
            after = f"; all gone {r.tree_gone_after_s:.2f} s later"
        print(f"\nUnbounded subprocess, {SIDE_LABELS[r.side]}: {r.final_state}; {len(r.children)} child(ren) "
              f"started ({', '.join(map(str, r.children)) or '-'}); alive when the task's state was terminal: "
              f"{', '.join(map(str, r.alive_at_end)) or 'none'}{after}; kernel OOM kills {r.oom_kills}")


def report(runs: list[Run], fp: Footprints | None, args: argparse.Namespace) -> int:
    settings = ", ".join(f"rmq_{k}={v}" for k, v in args.settings.items()) or "none"
    print(f"\n## Goodput under a real memory limit\n\ncgroup v{args.cg_version}, a fresh {mib(args.limit)} MiB cgroup "
          f"per worker (no swap); prefork -c {args.concurrency}; {args.tasks} tasks touching {args.task_mib} MiB for "
          f"{args.hold:g} s; plain Celery: acks_late + reject_on_worker_lost; extra rmq settings: {settings}\n")
    print(f"| case | side | ok/{args.tasks} | kernel OOM kills | makespan s | x ideal | x hold ideal | x oracle "
          f"| peak MiB | accounting | runs | most at once / fit | failures |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    oracles = {r.row: r for r in runs if r.side == "fit" and r.succeeded == r.tasks and r.makespan_s}
    for r in runs:
        oracle = oracles.get(ORACLE_OF.get(r.row, ""))
        x_oracle = "-" if oracle is None or r.makespan_s is None or r.succeeded < r.tasks else \
            f"{r.makespan_s / oracle.makespan_s:.2f}x"
        x = r.x_ideal
        failures = ", ".join(f"{k} x{v}" for k, v in r.errors.items())
        if r.lost:
            failures += (", " if failures else "") + f"{r.lost} lost"
        for count, what in ((r.changed, "changed state after a terminal one"), (r.reran, "ran again after success"),
                            (int(r.worker_died), "worker died")):
            if count:
                failures += (", " if failures else "") + f"{count} {what}"
        if r.row == "unbounded":
            ok, at_once = r.final_state, "-"
        else:
            ok, at_once = f"{r.succeeded}/{r.tasks}", f"{r.max_at_once} / {r.fit}"
        makespan = "-" if r.makespan_s is None else f"{r.makespan_s:.1f}" + ("*" if r.lost else "")
        ratio, hold_ratio = ("-" if v is None else f"{v:.2f}x" if r.succeeded == r.tasks else f"({v:.2f}x)"
                             for v in (x, r.x_hold_ideal))
        print(f"| {case_title(r.row, args)} | {SIDE_LABELS[r.side]} | {ok} | {r.oom_kills} | {makespan} | "
              f"{ratio} | {hold_ratio} | {x_oracle} | {mib(r.peak_bytes)} | {r.accounting if r.side == 'rmq' else '-'} "
              f"| {r.runs} | {at_once} | {failures or '-'} |")
    if any(r.lost for r in runs):
        print("\n\\* a run with lost tasks: its makespan counts the tasks that ended only")
    if any(r.succeeded < r.tasks and r.x_ideal is not None for r in runs if r.row != "unbounded"):
        print("\n(x) in brackets: not every task succeeded, so the run did less work than the ideal assumes")
    if oracles:
        print("\nx oracle: the makespan against plain Celery's at -c fit (side `fit`) in the same run, the same "
              "fresh cgroup: a worker told beforehand how many tasks fit, which runs them that many at a time "
              "from the first, at the speed they really have side by side on this machine ("
              + ", ".join(f"{row}: -c {r.fit}, {r.makespan_s:.1f} s" for row, r in oracles.items()) + ")")
    if fp is not None:
        print_ideals(runs, fp, args)
    print_unbounded(runs)
    for r in runs:
        if r.left_behind:
            print(f"{r.row}, {SIDE_LABELS[r.side]}: {len(r.left_behind)} process(es) left in the cgroup after the "
                  f"worker stopped (SIGKILLed by the bench): {', '.join(map(str, r.left_behind))}")
        for line in r.lost_detail:
            print(f"{r.row}, {SIDE_LABELS[r.side]}: lost {line}")
    status = 0
    rmq_runs = [r for r in runs if r.side in RMQ_SIDES]
    if rmq_runs:
        print("\nGoals (rmq):")
    for r in rmq_runs:
        for text, met in goals(r):
            status |= 0 if met else 1
            print(f"- {r.row}: {'PASS' if met else 'MISS'} {text}")
    return status


def parse_settings(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """``rmq_key=value`` pairs -> {key: value}, checked as rmq checks its configuration."""
    from rmq.core.config import load_config
    from rmq.core.errors import ConfigError

    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            parser.error(f"--set takes rmq_key=value, got {pair!r}")
        key = key.strip().lower()
        settings[key[4:] if key.startswith("rmq_") else key] = value.strip()
    try:
        load_config({f"rmq_{k}": v for k, v in settings.items()}, environ={})
    except ConfigError as exc:
        parser.error(f"--set: {exc}")
    return settings


def main() -> int:
    from rmq.core.units import parse_size

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated cases: {', '.join(ROWS)}")
    parser.add_argument("--sides", default=",".join(SIDES),
                        help="comma-separated: rmq, plain, fit (plain Celery at the concurrency that fits: an oracle)")
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--limit", default="1.5GiB", help="each worker's cgroup memory limit")
    parser.add_argument("--task-mib", type=int, default=300, help="MiB each task touches")
    parser.add_argument("--hold", type=float, default=1.0, help="seconds each task holds its memory")
    parser.add_argument("--grow-mib", type=int, default=50, help="the unbounded child's step, MiB")
    parser.add_argument("--grow-every", type=float, default=0.05, help="the unbounded child's pause, s")
    parser.add_argument("--deadline", type=float, default=90.0, help="seconds per run before a task counts as lost")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="rmq_key=value",
                        help="an extra rmq setting for the rmq workers (repeatable)")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not rows or any(r not in ROWS for r in rows):
        parser.error(f"--rows: use some of {', '.join(ROWS)}")
    if not sides or any(s not in SIDES for s in sides):
        parser.error(f"--sides: use some of {', '.join(SIDES)}")
    if args.tasks < 1 or args.concurrency < 1 or args.task_mib < 1 or args.hold < 0 or args.grow_mib < 1:
        parser.error("--tasks, --concurrency, --task-mib and --grow-mib must be positive, --hold not negative")
    args.limit = parse_size(args.limit, "--limit")
    args.settings = parse_settings(args.settings, parser)
    args.honest_mib, args.lying_mib = math.ceil(args.task_mib * 4 / 3), max(1, args.task_mib // 3)
    why = can_create()
    if why is not None:
        print(f"goodput not measured: {why}. Run it as root on a host with a writable memory cgroup hierarchy.",
              file=sys.stderr)
        return 2
    probe = MemoryCgroup(64 * MiB)
    args.cg_version = probe.version
    probe.remove()
    plan = [(row, side) for row in rows for side in sides
            if side == "rmq" or (side == "plain" and row in PLAIN_ROWS) or (side == "warm" and row in ORACLE_OF)]
    if "fit" in sides:
        plan += [(row, "fit") for row in dict.fromkeys(ORACLE_OF[r] for r in rows if r in ORACLE_OF)]
    runs: list[Run] = []
    began = time.monotonic()
    with bench_redis() as url:
        print(f"Redis: {url}", flush=True)
        fp = None
        if any(row != "unbounded" for row in rows):
            print("measuring the per-task footprint ...", flush=True)
            fp = measure_footprints(args, url)
        for row, side in plan:
            print(f"running {row} on {SIDE_LABELS[side]} ...", flush=True)
            runs.append(run_case(row, side, args, url, fp))
            r = runs[-1]
            print(f"  {r.succeeded}/{r.tasks} ok, {r.oom_kills} kernel OOM kills, makespan "
                  f"{'-' if r.makespan_s is None else f'{r.makespan_s:.1f} s'} ({r.wall_s:.0f} s in all)", flush=True)
    status = report(runs, fp, args)
    print(f"\n(one run of the bench: {time.monotonic() - began:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "json"},
                       "footprints": asdict(fp) if fp else None,
                       "runs": [{**asdict(r), "x_ideal": r.x_ideal} for r in runs]}, fh, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
