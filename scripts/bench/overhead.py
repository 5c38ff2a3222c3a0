#!/usr/bin/env python3
"""What rmq costs (docs/guarantees.md#p1 and #p6). Plain Celery and rmq side by side in one run, interleaved.

P1 as users see it (``--compare install``): a plain app against the same app with ``rmq.install(app)``,
nothing else given to either (``tests/integration/soakapp.py`` ``user_app``: a broker, a backend and
the prefetch multiplier), so that everything ``install()`` changes counts: Redis priority lists, the
heavy queue, the visibility timeout and its restore loop, ``acks_late``, the router. ``plain`` has
``@app.task`` no-ops (``noop``) and 5 ms busy loops (``cpu5``), ``rmq`` the same functions as
``@governed_task()`` (no declaration); ``--install-only`` adds ``installed``, ``install()`` with the
plain ``@app.task`` tasks (what ``install()`` costs without the governed path), and ``--variant``
sides price one setting (``--variant 'steps10={"conf": {"broker_transport_options": {"priority_steps":
[0,1,2,3,4,5,6,7,8,9]}}}'``, ``--variant 'heavy={"queues": ["celery", "rmq.heavy"]}'``; ``env`` prices one
part of the governed path with ``tests/integration/pathstubs.py``: ``--variant 'nopeak={"mode": "rmq",
"env": {"SOAK_IMPORT": "pathstubs", "PATHSTUBS": "peak"}}'``); ``--aa`` adds a second plain side,
plain Celery against itself in the same run: the noise every ratio of that run carries. Every
``--concurrency`` x ``--prefetch`` x ``--kinds`` cell (lists), rounds interleaved across cells and
sides. A round fills the default queue from the side's own app (its ``apply_async``: router,
priorities), then starts a fresh worker as users start it (``celery -A app worker``, no ``-Q``), and
measures from the tenth result on (first imports and first tasks left out) to the last: throughput
((N - 1 - skipped) / (last - first counted ``date_done``)), CPU per task of the worker's main process,
its pool and the Redis server, and Redis commands per task (``INFO commandstats`` after ``CONFIG
RESETSTAT``, the bench's result polling left out). One worker runs at a time. Printed: every round,
the medians, each side's ratio to plain (of medians, and the median of paired rounds; floor 0.95),
and where the difference goes.

The governed task path alone (the default, ``--compare path``): two real ``celery worker``
subprocesses on the same Redis, with the same settings (``tests/integration/soakapp.py``
``bench_conf``: prefork, ``--concurrency``, prefetch multiplier, ``acks_late`` + reject on worker
lost, the broker transport options rmq sets, no events) run the same tasks: ``bench-plain`` as
plain ``app.task``s, ``bench-rmq`` with ``rmq.install(app)`` and
``@governed_task(memory="16MiB")`` (declared, so no learning read). Each round fills a fresh queue
with ``--tasks`` messages while no worker consumes it, then tells one worker to consume it
(``add_consumer``) and waits for every result. Throughput per round = (N - 1) / (last - first
``date_done`` the worker stored): worker-side time, no client polling in it. Rounds alternate
plain, rmq, rmq, plain, ... so drift on this shared machine hits both, and every round runs on
freshly started (and warmed up) workers: one worker instance can be 10 % faster or slower than the
next for its whole life here (hash seeds, memory layout, core placement), which must not decide a
run. Eleven rounds of 3000 tasks rather than fewer, longer ones: a round's ratio varies by about
+-7 % here with 3000 or 4000 tasks alike (the worker instances' luck), so the medians need rounds, not tasks.
Printed: every round, the medians, the ratio of medians rmq/plain and the median of per-round
paired ratios (goal >= 0.95), and the CPU time per task of the worker's main process and its pool
(psutil), which load from other processes disturbs far less than throughput.

The prefetch multiplier defaults to 4: Celery's default, and what ``rmq worker --profile light`` (the
profile for short tasks like these) sets. With ``--prefetch 1`` (the heavy profile) each pool process
waits for its ack round trip before the next message, so every microsecond rmq adds in the pool is on
the critical path of a no-op. On this 2-core machine plain Celery's own rounds vary by +-10 %, and a
worker's main process is the bottleneck for no-ops (about 1 ms of CPU per task against 0.6 ms in the
pool): read the medians and the paired ratio together, and the CPU per task beside them.

P6 (governor cost): both workers idle for ``--idle`` s; CPU time of each worker's main process (user
+ system, psutil) over that window as a percent of one core, and of its pool processes (goal: rmq
minus plain, main and pool together, <= 2 %); also the governor's own accounting (``governor.ticks``,
``tick_seconds`` from ``inspect stats``): ms per tick at the default interval.

Usage: scripts/bench/overhead.py [--tasks 3000] [--rounds 11] [--concurrency 8] [--prefetch 4]
                                 [--kinds noop,cpu5,sleep5] [--idle 30]
       scripts/bench/overhead.py --compare install [--install-only] [--aa] [--variant NAME=JSON]
                                 --concurrency 2,8 --prefetch 1,4 --kinds noop,cpu5 [--rounds 6]
Redis: RMQ_BENCH_REDIS_URL, else a private ``redis-server`` on a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from datetime import datetime
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TESTS_DIR = os.path.join(ROOT, "tests", "integration")
for _p in (ROOT, TESTS_DIR, os.path.dirname(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import psutil  # noqa: E402
import redis as redis_lib  # noqa: E402

from rmq.core.units import parse_size  # noqa: E402
from rmq.testing.cgroups import MemoryCgroup, can_create  # noqa: E402
from rmq.testing.worker import WorkerProcess, wait_until  # noqa: E402

MODES = ("plain", "rmq")
KINDS = {"noop": ("ovh.noop", ()), "cpu5": ("ovh.cpu", (5.0,)), "sleep5": ("ovh.sleep", (5.0,))}
META = "celery-task-meta-"


def start_worker(url: str, mode: str, concurrency: int, prefetch: int, transport: dict[str, Any],
                 client: Any) -> WorkerProcess:
    """A ``-A soakapp`` worker in ``bench-<mode>``, consuming only its idle queue, ready."""
    env = {"RMQ_BROKER_URL": url, "RMQ_RESULT_BACKEND": url, "SOAK_MODE": f"bench-{mode}",
           "SOAK_PREFETCH": str(prefetch), "SOAK_TRANSPORT": json.dumps(transport),
           "PYTHONPATH": os.pathsep.join([TESTS_DIR, ROOT])}
    w = WorkerProcess(app="soakapp", env=env, queues=[f"ovh.idle.{mode}.{uuid.uuid4().hex[:6]}"],
                      concurrency=concurrency, cwd=ROOT, loglevel="WARNING",
                      hostname=f"ovh-{mode}-{uuid.uuid4().hex[:6]}@%h")
    w.start()
    w.wait_ready(client, timeout=90)
    wait_until(lambda: len(w.pool_pids()) >= concurrency, 60, what="the whole pool")
    return w


def _date(raw: bytes) -> float:
    return datetime.fromisoformat(json.loads(raw)["date_done"]).timestamp()


def run_round(client: Any, rc: redis_lib.Redis, w: WorkerProcess, kind: str, n: int,
              timeout_s: float = 300.0) -> dict[str, float]:
    """Fill a fresh queue with ``n`` tasks, let ``w`` consume it, return its throughput figures."""
    name, args = KINDS[kind]
    queue = f"ovh.q.{uuid.uuid4().hex[:8]}"
    with client.producer_or_acquire() as producer:
        ids = [client.send_task(name, args, queue=queue, producer=producer).id for _ in range(n)]
    keys = [META + i for i in ids]
    cpu0 = cpu_seconds(w.pid)
    t0 = time.time()
    client.control.add_consumer(queue, destination=[w.node_name], reply=True, timeout=5)
    deadline = time.monotonic() + timeout_s
    # Poll the last few sent (they end near the end) before the whole round: an EXISTS of thousands
    # of keys every 50 ms costs Redis and this client CPU that both workers need.
    tail = keys[-16:]
    while rc.exists(*tail) < len(tail) or rc.exists(*keys) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{kind} round on {w.node_name}: {rc.exists(*keys)}/{n} done")
        time.sleep(0.05)
    wall = time.time() - t0
    cpu1 = cpu_seconds(w.pid)
    client.control.cancel_consumer(queue, destination=[w.node_name], reply=True, timeout=5)
    dates = sorted(_date(raw) for raw in rc.mget(keys))
    statuses = {json.loads(raw)["status"] for raw in rc.mget(keys[:50])}
    rc.delete(*keys)
    if statuses != {"SUCCESS"}:
        raise RuntimeError(f"{kind} round on {w.node_name} ended with {statuses}")
    span = dates[-1] - dates[0]
    return {"worker": (n - 1) / span if span > 0 else float("nan"), "wall": n / wall,
            "main_ms": 1000 * (cpu1[0] - cpu0[0]) / n, "pool_ms": 1000 * (cpu1[1] - cpu0[1]) / n}


def rmq_governor(client: Any, w: WorkerProcess) -> dict[str, Any]:
    """``inspect stats`` ``rmq.memory.governor`` of ``w``."""
    replies = client.control.inspect(destination=[w.node_name], timeout=5).stats() or {}
    return replies.get(w.node_name, {}).get("rmq", {}).get("governor", {})


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(main process, its children) CPU seconds, user + system."""
    main = psutil.Process(pid)
    t = main.cpu_times()
    kids = 0.0
    for c in main.children():
        with contextlib.suppress(psutil.Error):
            ct = c.cpu_times()
            kids += ct.user + ct.system
    return t.user + t.system, kids


def idle_cost(client: Any, workers: dict[str, WorkerProcess], idle_s: float) -> dict[str, Any]:
    """CPU of each idle worker over ``idle_s`` seconds, and the governor's own tick accounting."""
    time.sleep(3)  # let the last round's pool work settle
    g0 = rmq_governor(client, workers["rmq"])
    c0 = {m: cpu_seconds(w.pid) for m, w in workers.items()}
    t0 = time.monotonic()
    time.sleep(idle_s)
    c1 = {m: cpu_seconds(w.pid) for m, w in workers.items()}
    dt = time.monotonic() - t0
    g1 = rmq_governor(client, workers["rmq"])
    out: dict[str, Any] = {"window_s": dt}
    for m in workers:
        out[m] = {"main_pct": 100 * (c1[m][0] - c0[m][0]) / dt, "pool_pct": 100 * (c1[m][1] - c0[m][1]) / dt}
    ticks = (g1.get("ticks", 0) - g0.get("ticks", 0))
    spent = g1.get("tick_seconds", 0.0) - g0.get("tick_seconds", 0.0)
    out["ticks"] = ticks
    out["ms_per_tick"] = 1000 * spent / ticks if ticks else float("nan")
    out["tick_pct"] = 100 * spent / dt
    out["interval_s"] = g1.get("interval_s")
    return out


# --compare install: plain app against the same app with install(), as users compare them
USER_KINDS = {"noop": ("soakapp.noop", []), "cpu5": ("soakapp.cpu", [5.0])}
#: commands the bench itself sends while a round is measured (its result polling), left out of the counts
BENCH_COMMANDS = ("exists", "info", "config|resetstat", "config")


def redis_commands(rc: redis_lib.Redis) -> dict[str, int]:
    """``INFO commandstats``: command -> calls since the last ``CONFIG RESETSTAT``."""
    out = {}
    for key, value in rc.info("commandstats").items():
        name = key.removeprefix("cmdstat_")
        calls = value["calls"] if isinstance(value, dict) else int(str(value).split("calls=")[1].split(",")[0])
        out[name] = calls
    return out


def redis_cpu(rc: redis_lib.Redis) -> float:
    """CPU seconds the Redis server used so far (``INFO cpu``, user + system)."""
    info = rc.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def user_round(url: str, rc: redis_lib.Redis, side: str, kind: str, n: int, concurrency: int, prefetch: int,
               skip: int, timeout_s: float = 300.0, extra_env: dict[str, str] | None = None,
               queues: list[str] | None = None, memory_limit: int | None = None) -> dict[str, Any]:
    """One round of ``--compare install``: fill the default queue with ``n`` tasks from the side's
    own app (its ``apply_async``: router, priorities), start a fresh worker as a user starts it
    (no ``-Q``; with ``memory_limit``, in a fresh memory cgroup of that limit, as in a container,
    removed after the round), measure from the ``skip``-th result (first imports and pool processes'
    first tasks left out) to the last: throughput, CPU per task of the main process and the pool, and
    Redis commands per task (``INFO commandstats``, the bench's own polling left out)."""
    import subprocess

    name, args = USER_KINDS[kind]
    prefix = f"ovh{uuid.uuid4().hex[:10]}"
    env = {"RMQ_BROKER_URL": url, "RMQ_RESULT_BACKEND": url, "SOAK_MODE": f"user-{side}",
           "SOAK_PREFETCH": str(prefetch), "PYTHONPATH": os.pathsep.join([TESTS_DIR, ROOT]), **(extra_env or {})}
    subprocess.run([sys.executable, "-c", "import soakapp; soakapp.fill_main()"], check=True, cwd=ROOT,
                   env={**os.environ, **env, "SOAK_FILL_N": str(n), "SOAK_FILL_PREFIX": prefix,
                        "SOAK_FILL_TASK": name, "SOAK_FILL_ARGS": json.dumps(args)})
    keys = [f"{META}{prefix}-{i}" for i in range(n)]
    cg = MemoryCgroup(memory_limit) if memory_limit else None
    w = WorkerProcess(app="soakapp", env=env, concurrency=concurrency, cwd=ROOT, loglevel="WARNING", queues=queues,
                      hostname=f"ovh-{side}-{uuid.uuid4().hex[:6]}@%h", prefix=cg.wrap() if cg else ())
    polls = 0
    try:
        w.start()
        deadline = time.monotonic() + timeout_s

        def wait_for(key_set: list[str]) -> None:
            nonlocal polls
            while rc.exists(*key_set) < len(key_set):
                polls += 1
                if w.proc is not None and w.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {w.proc.returncode}:\n{w.log()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{side} {kind} round: {rc.exists(*keys)}/{n} done")
                time.sleep(0.02)

        wait_for([keys[skip]])
        rc.config_resetstat()
        polls = 0
        t_snap = time.time()
        cpu0, redis0 = cpu_seconds(w.pid), redis_cpu(rc)
        wait_for(keys[-16:])
        wait_for(keys)
        cpu1, redis1 = cpu_seconds(w.pid), redis_cpu(rc)
        commands = redis_commands(rc)
    finally:
        w.finish()
        if cg is not None:
            cg.remove()
    commands["exists"] = commands.get("exists", 0) - polls
    for c in BENCH_COMMANDS[1:]:
        commands.pop(c, None)
    raws = rc.mget(keys)
    dates = sorted(_date(raw) for raw in raws)
    statuses = {json.loads(raw)["status"] for raw in raws}
    rc.delete(*keys)
    if statuses != {"SUCCESS"}:
        raise RuntimeError(f"{side} {kind} round ended with {statuses}")
    after = sum(1 for d in dates if d > t_snap)  # tasks done inside the CPU and command window
    span = dates[-1] - dates[skip]
    return {"worker": (n - 1 - skip) / span if span > 0 else float("nan"),
            "main_ms": 1000 * (cpu1[0] - cpu0[0]) / max(after, 1),
            "pool_ms": 1000 * (cpu1[1] - cpu0[1]) / max(after, 1),
            "redis_ms": 1000 * (redis1 - redis0) / max(after, 1),  # the bench's polling is in it too
            "commands": {c: v / max(after, 1) for c, v in commands.items() if v > 0}}


#: --compare install sides: what each worker's app is (soakapp ``SOAK_MODE=user-<side>``)
SIDES = {"plain": "@app.task, no rmq", "installed": "rmq.install(app) with @app.task (install() alone)",
         "rmq": "rmq.install(app) with @governed_task()"}


def _cell(c: int, p: int, kind: str) -> str:
    return f"-c {c} pf {p} {kind}"


#: ``--aa``: the name of the second plain side
AA = "plainB"


def aa_spread(plain: list[dict[str, Any]], again: list[dict[str, Any]]) -> str:
    """Plain Celery against itself over paired rounds: the ratio of medians, the median paired ratio
    and the range of single rounds, which bound what a ratio of this run can tell apart from 1."""
    med = statistics.median
    singles = [b["worker"] / a["worker"] for a, b in zip(plain, again, strict=True)]
    ratio = med(x["worker"] for x in again) / med(x["worker"] for x in plain)
    return (f"of medians {ratio:.3f}, paired {med(singles):.3f}, single rounds {min(singles):.3f}-"
            f"{max(singles):.3f} ({len(singles)} rounds)")


def compare_install(url: str, args: argparse.Namespace) -> int:
    """``--compare install``: every (concurrency, prefetch, kind) cell, rounds interleaved across cells
    and sides, a fresh worker per round; prints each round, then the summary and where the difference goes."""
    kinds = [k for k in args.kinds.split(",") if k]
    concs = [int(c) for c in str(args.concurrency).split(",")]
    prefetches = [int(p) for p in str(args.prefetch).split(",")]
    sides = ["plain", *(["installed"] if args.install_only else []), "rmq"]
    # --variant NAME=JSON: another side, an app of ``mode`` (default: installed) with ``conf`` added to its
    # Celery config and started with -Q ``queues``: the price of one setting, side by side with the rest
    variants: dict[str, dict[str, Any]] = {}
    if args.aa:  # plain Celery against itself: how far apart two sides with the same code land in this run
        variants[AA] = {"mode": "plain"}
        sides.append(AA)
    for spec in args.variant or ():
        name, _, raw = spec.partition("=")
        variants[name] = json.loads(raw or "{}")
        sides.append(name)
    describe = {**SIDES, **{k: f"{v.get('mode', 'installed')} + {json.dumps({x: v[x] for x in v if x != 'mode'})}"
                            for k, v in variants.items()}}
    if args.aa:
        describe[AA] = "@app.task, no rmq, a second plain side (A/A: the bench's own noise in this run)"

    def run(side: str, kind: str, n: int, c: int, p: int) -> dict[str, Any]:
        v = variants.get(side)
        if v is None:
            return user_round(url, rc, side, kind, n, c, p, skip, memory_limit=limit)
        env = {"SOAK_USER_CONF": json.dumps(v["conf"])} if v.get("conf") else {}
        env.update(v.get("env", {}))  # a profiling aid, e.g. {"SOAK_IMPORT": "pathstubs", "PATHSTUBS": "peak"}
        return user_round(url, rc, v.get("mode", "installed"), kind, n, c, p, skip, extra_env=env,
                          queues=v.get("queues"), memory_limit=limit)

    limit = parse_size(args.memory_limit, "--memory-limit") if args.memory_limit else None
    if limit is not None and (why := can_create()) is not None:
        print(f"--memory-limit: no memory cgroup can be made here ({why})", file=sys.stderr)
        return 2
    others = sides[1:]
    cells = [(c, p, k) for k in kinds for c in concs for p in prefetches]
    rc = redis_lib.Redis.from_url(url)
    results: dict[tuple, dict[str, list[dict[str, Any]]]] = {cell: {s: [] for s in sides} for cell in cells}
    skip = max(100, args.tasks // 10)
    print(f"P1 as users see it: a plain app against the same app with rmq.install(app), nothing else given to "
          f"either; a fresh worker per round, started without -Q, prefork; {args.tasks} tasks per round "
          f"(cpu5: {max(args.tasks // 2, 4 * skip)}), the first {skip} left out; {args.rounds} rounds, cells and "
          f"sides interleaved; Redis {url}" +
          (f"; each worker in a fresh memory cgroup of {args.memory_limit} (kernel accounting)" if limit else ""),
          flush=True)
    for side in sides:
        print(f"  {side}: {describe[side]}")
    print(f"  {'cell':>16}  {'round':>5}  " + "  ".join(f"{s + '/s':>10}" for s in sides) + "  " +
          "  ".join(f"{s + '/plain':>15}" for s in others) + "  CPU ms/task main+pool, Redis commands/task")
    for r in range(args.rounds):
        for cell in cells:
            c, p, kind = cell
            n = args.tasks if kind == "noop" else max(args.tasks // 2, 4 * skip)
            order = sides if r % 2 == 0 else sides[::-1]
            got = {s: run(s, kind, n, c, p) for s in order}
            for s in sides:
                results[cell][s].append(got[s])
            print(f"  {_cell(*cell):>16}  {r + 1:>5}  " + "  ".join(f"{got[s]['worker']:>10.0f}" for s in sides) +
                  "  " + "  ".join(f"{got[s]['worker'] / got['plain']['worker']:>15.3f}" for s in others) + "  " +
                  ", ".join(f"{s} {got[s]['main_ms']:.2f}+{got[s]['pool_ms']:.2f} {got[s]['redis_ms']:.2f} "
                            f"{sum(got[s]['commands'].values()):.1f}" for s in sides), flush=True)
    med = statistics.median
    print("\nP1 summary, install() as users see it (floor: every ratio rmq/plain >= 0.95, aim 0.98)")
    print(f"  {'cell':>16}  " + "  ".join(f"{s + ' median/s':>16}" for s in sides) + "  " +
          "  ".join(f"{s + '/plain: of medians, paired':>32}" for s in others))
    ok = True
    for cell in cells:
        res = results[cell]
        line = f"  {_cell(*cell):>16}  " + "  ".join(f"{med(x['worker'] for x in res[s]):>16.0f}" for s in sides)
        for s in others:
            ratio = med(x["worker"] for x in res[s]) / med(x["worker"] for x in res["plain"])
            paired = med(b["worker"] / a["worker"] for a, b in zip(res["plain"], res[s], strict=True))
            line += f"  {ratio:>23.3f}, {paired:>6.3f}"
            if s == "rmq":
                ok = ok and ratio >= 0.95
        print(line)
    if args.aa:
        print(f"\nA/A, plain against plain ({AA}/plain), the noise any ratio above carries in this run:")
        for cell in cells:
            print(f"  {_cell(*cell):>16}  {aa_spread(results[cell]['plain'], results[cell][AA])}")
    print("\nWhere the difference goes, per task (medians over rounds): CPU ms of the worker's main process and of "
          "its pool, CPU ms of the Redis server, Redis commands (INFO commandstats, the bench's polling left out)")
    for cell in cells:
        res = results[cell]
        names = sorted({k for s in sides for x in res[s] for k in x["commands"]})
        print(f"  {_cell(*cell)}")
        for s in sides:
            cmds = {k: med(x["commands"].get(k, 0.0) for x in res[s]) for k in names}
            detail = ", ".join(f"{k} {v:.2f}" for k, v in cmds.items() if v >= 0.005)
            main, pool = med(x["main_ms"] for x in res[s]), med(x["pool_ms"] for x in res[s])
            # in units of the Redis server's CPU per task: the same 14 commands on every side, so it
            # gauges how fast the machine ran that round (up to 40 % apart between rounds here)
            units = med(x["pool_ms"] / x["redis_ms"] for x in res[s] if x["redis_ms"] > 0) if res[s] else 0.0
            print(f"    {s:>9}: main {main:.3f}, pool {pool:.3f}, Redis {med(x['redis_ms'] for x in res[s]):.3f} ms "
                  f"(pool {units:.2f} Redis units); {sum(cmds.values()):.2f} commands: {detail}")
    print("\nPASS" if ok else "\nMISS: see the figures above")
    return 0 if ok else 1


def main() -> int:
    from soak import private_redis  # scripts/soak.py

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000, help="tasks per round")
    parser.add_argument("--rounds", type=int, default=11, help="rounds per mode and kind")
    parser.add_argument("--concurrency", default="8", help="with --compare install, a list: 2,8")
    parser.add_argument("--prefetch", default="4",
                        help="worker_prefetch_multiplier of both (4: Celery's default and rmq's light profile); "
                             "with --compare install, a list: 1,4")
    parser.add_argument("--kinds", default="noop,cpu5")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of the idle CPU window (P6); 0 skips")
    parser.add_argument("--compare", choices=("path", "install"), default="path",
                        help="path (default): the governed task path alone, same broker settings on both sides; "
                             "install: a plain app against the same app with install(), nothing else given")
    parser.add_argument("--install-only", action="store_true",
                        help="with --compare install, a third side: install() with plain @app.task tasks")
    parser.add_argument("--aa", action="store_true",
                        help="with --compare install, a second plain side: prints plain against plain (A/A), "
                             "the noise of every ratio in the same run")
    parser.add_argument("--variant", action="append", metavar="NAME=JSON",
                        help='with --compare install, another side: {"mode": "installed" (default), "rmq" or '
                             '"plain", "conf": {Celery settings added}, "queues": [-Q], "env": {worker environment}}; '
                             'repeatable')
    parser.add_argument("--memory-limit", metavar="SIZE",
                        help="with --compare install, each worker in a fresh memory cgroup of this limit (as in a "
                             "container: rmq then counts memory with the kernel, docs/design.md#kernel-accounting)")
    args = parser.parse_args()
    if args.compare == "install":
        url = os.environ.get("RMQ_BENCH_REDIS_URL")
        with contextlib.nullcontext(url) if url else private_redis() as url:
            return compare_install(url, args)
    args.concurrency, args.prefetch = int(args.concurrency), int(args.prefetch)
    kinds = [k for k in args.kinds.split(",") if k]
    import soakapp

    url = os.environ.get("RMQ_BENCH_REDIS_URL")
    with contextlib.nullcontext(url) if url else private_redis() as url:
        transport = soakapp.rmq_transport_conf(url)
        clients = {m: soakapp.bench_app(m == "rmq", url, prefetch=args.prefetch, transport=transport)
                   for m in MODES}
        rc = redis_lib.Redis.from_url(url)
        workers: dict[str, WorkerProcess] = {}
        print(f"P1/P6 overhead: plain Celery vs rmq, prefork -c {args.concurrency}, prefetch multiplier "
              f"{args.prefetch}, acks_late, same transport options, Redis {url}; {args.tasks} tasks per round, "
              f"{args.rounds} rounds per mode, interleaved", flush=True)
        try:

            def fresh(m: str, kind: str) -> WorkerProcess:
                """A new worker for ``m``, warmed up (first imports, pool processes' first tasks)."""
                old = workers.pop(m, None)
                if old is not None:
                    old.finish()
                workers[m] = start_worker(url, m, args.concurrency, args.prefetch, transport, clients[m])
                run_round(clients[m], rc, workers[m], kind, min(200, args.tasks))
                return workers[m]

            results: dict[str, dict[str, list[dict[str, float]]]] = {k: {m: [] for m in MODES} for k in kinds}
            for kind in kinds:
                print(f"\n{kind}: tasks/s per round (worker-side: (N-1) / (last - first date_done); wall: "
                      f"N / (consume start -> all results))", flush=True)
                print(f"  {'round':>5}  {'plain':>8}  {'rmq':>8}  {'rmq/plain':>9}  {'wall plain/rmq':>14}  "
                      f"{'CPU ms/task main+pool: plain':>28}  {'rmq':>11}")
                for r in range(args.rounds):
                    order = MODES if r % 2 == 0 else MODES[::-1]
                    # every round on new workers: one instance's luck (hash seeds, memory layout,
                    # core placement), worth +-10 % here, must not bias a whole run
                    got = {m: run_round(clients[m], rc, fresh(m, kind), kind, args.tasks) for m in order}
                    for m in MODES:
                        results[kind][m].append(got[m])
                    p, g = got["plain"], got["rmq"]
                    print(f"  {r + 1:>5}  {p['worker']:>8.0f}  {g['worker']:>8.0f}  {g['worker'] / p['worker']:>9.3f}  "
                          f"{p['wall']:>6.0f} / {g['wall']:<5.0f}  {p['main_ms']:>20.2f} + {p['pool_ms']:<5.2f}  "
                          f"{g['main_ms']:>5.2f} + {g['pool_ms']:<5.2f}", flush=True)
            print("\nP1 summary (goal: rmq/plain >= 0.95)")
            print(f"  {'kind':>6}  {'plain median':>12}  {'rmq median':>10}  {'ratio of medians':>16}  "
                  f"{'median paired ratio':>19}  {'wall ratio':>10}  {'CPU ms/task plain':>17}  {'rmq':>5}")
            ok = True
            for kind in kinds:
                p = [x["worker"] for x in results[kind]["plain"]]
                g = [x["worker"] for x in results[kind]["rmq"]]
                pw = statistics.median(x["wall"] for x in results[kind]["plain"])
                gw = statistics.median(x["wall"] for x in results[kind]["rmq"])
                ratio = statistics.median(g) / statistics.median(p)
                paired = statistics.median(a / b for a, b in zip(g, p, strict=True))
                ok = ok and ratio >= 0.95
                pc = statistics.median(x["main_ms"] + x["pool_ms"] for x in results[kind]["plain"])
                gc = statistics.median(x["main_ms"] + x["pool_ms"] for x in results[kind]["rmq"])
                print(f"  {kind:>6}  {statistics.median(p):>12.0f}  {statistics.median(g):>10.0f}  "
                      f"{ratio:>16.3f}  {paired:>19.3f}  {gw / pw:>10.3f}  {pc:>17.2f}  {gc:>5.2f}")
            if args.idle > 0:
                for m in MODES:
                    if m not in workers:
                        fresh(m, kinds[0])
                idle = idle_cost(clients["rmq"], workers, args.idle)
                print(f"\nP6 idle cost over {idle['window_s']:.0f} s, -c {args.concurrency}, governor interval "
                      f"{idle['interval_s']} s (goal: governor <= 2 % of one core)")
                print(f"  {'':28}{'plain':>10}{'rmq':>10}{'rmq - plain':>14}")
                for part, label in (("main_pct", "main process, % of a core"),
                                    ("pool_pct", "pool processes, % of a core")):
                    a, b = idle["plain"][part], idle["rmq"][part]
                    print(f"  {label:28}{a:>10.2f}{b:>10.2f}{b - a:>14.2f}")
                print(f"  governor ticks: {idle['ticks']} ({idle['ticks'] / idle['window_s']:.1f}/s), "
                      f"{idle['ms_per_tick']:.2f} ms per tick = {idle['tick_pct']:.2f} % of a core")
                # rmq's whole idle cost: the governor (main process) and the pool processes' watchers
                extra = sum(idle["rmq"][k] - idle["plain"][k] for k in ("main_pct", "pool_pct"))
                print(f"  rmq's idle cost, main + pool: {extra:.2f} % of a core")
                ok = ok and extra <= 2.0
            print("\nPASS" if ok else "\nMISS: see the figures above")
            return 0 if ok else 1
        finally:
            for w in workers.values():
                kept = w.finish()
                if kept:
                    print(f"  worker log kept: {kept}")
            for c in clients.values():
                c.close()


if __name__ == "__main__":
    sys.exit(main())
