#!/usr/bin/env python
"""P5: the cluster rate limiter's decision latency, and whether any window ever exceeds the limit.

Part 1 times ``--decisions`` limiter decisions interleaved with the same number of PINGs on the
same connection (the floor for one round trip) and counts the replies read per decision.

Part 2 (``--mode processes``) runs ``--workers`` processes hammering one limit (``--rate``) for
``--seconds``; every grant's Redis timestamp is kept and the busiest half-open window of one
period is counted. Side by side, each process also runs a per-process limiter of the same rate
(what Celery's own ``rate_limit`` gives): its worst window shows what a per-worker limit lets through.

Part 3 (``--mode celery``) starts ``--workers`` real ``celery worker`` subprocesses (prefork,
``--concurrency`` each) of this module's app and sends them rate x seconds tasks at once: a
governed task with ``rate_limits={name: rate}`` that records its grant time (Redis clock), then
the same number of plain Celery tasks with ``rate_limit=rate`` (per worker) for comparison.

Exit status 1 when any window of the cluster limiter exceeded the limit or a task was lost.

    python scripts/bench/ratelimit.py [--mode both] [--seconds 60] [--url redis://127.0.0.1:6379/15]
    python scripts/bench/ratelimit.py --mode celery --seconds 20 --worker-env RMQ_VISIBILITY_TIMEOUT=600s
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import redis

from rmq.core import keys
from rmq.core.units import Rate, parse_rate
from rmq.network.rate_limiter import ClusterLimiter

LATENCY_GOAL_MS = 1.0
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(BENCH_DIR))


class CountingConnection(redis.connection.Connection):
    """Counts replies read: one per round trip."""

    replies = 0

    def read_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        CountingConnection.replies += 1
        return super().read_response(*args, **kwargs)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(url: str, decisions: int) -> dict[str, dict[str, float]]:
    client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, connection_class=CountingConnection))
    limiter = ClusterLimiter(client)
    name = f"bench:{uuid.uuid4().hex[:8]}"
    rate = parse_rate("500/s")  # a busy limit: a log of up to 500 entries, grants and denials
    for _ in range(200):  # warm up: connect, load the script
        limiter.decide({name: rate})
        client.ping()
    rows: dict[str, list[float]] = {"PING (one round trip)": [], "rmq decision": []}
    replies = {"PING (one round trip)": 0, "rmq decision": 0}
    granted = 0
    for _ in range(decisions):
        before = CountingConnection.replies
        t0 = time.perf_counter_ns()
        client.ping()
        t1 = time.perf_counter_ns()
        mid = CountingConnection.replies
        granted += limiter.decide({name: rate}).granted
        t2 = time.perf_counter_ns()
        rows["PING (one round trip)"].append((t1 - t0) / 1e6)
        rows["rmq decision"].append((t2 - t1) / 1e6)
        replies["PING (one round trip)"] += mid - before
        replies["rmq decision"] += CountingConnection.replies - mid
    client.delete(keys.rate_limit(name))
    out = {}
    for label, ms in rows.items():
        out[label] = {"p50": pct(ms, 0.50), "p99": pct(ms, 0.99), "max": max(ms),
                      "mean": statistics.fmean(ms), "trips": replies[label] / decisions}
    out["rmq decision"]["granted"] = granted / decisions
    return out


def local_limiter(rate: Rate, end: float, out: list[int]) -> None:
    """A per-process sliding-window limiter (no sharing), hammered until ``end``."""
    window: collections.deque[float] = collections.deque()
    while (now := time.monotonic()) < end:
        while window and window[0] <= now - rate.period_s:
            window.popleft()
        if len(window) < rate.count:
            window.append(now)
            out.append(time.time_ns() // 1000)
        else:
            time.sleep(window[0] + rate.period_s - now)


def hammer(url: str, name: str, rate_text: str, start_at: float, seconds: float, results: mp.Queue) -> None:
    rate = parse_rate(rate_text)
    limiter = ClusterLimiter(redis.Redis.from_url(url))
    grants: list[int] = []
    local: list[int] = []
    denials = 0
    time.sleep(max(0.0, start_at - time.time()))
    end = time.monotonic() + seconds
    side = threading.Thread(target=local_limiter, args=(rate, end, local), daemon=True)
    side.start()
    while time.monotonic() < end:
        d = limiter.decide({name: rate})
        if d.granted:
            grants.append(d.redis_time_us)
        else:
            denials += 1
            time.sleep(d.wait_s)  # all processes wake for the same token: maximum contention
    side.join()
    results.put({"pid": os.getpid(), "grants": grants, "denials": denials, "local": local})


def worst_window(stamps_us: list[int], period_us: int) -> tuple[int, int]:
    """(most grants in any half-open window [t, t + period), its start)."""
    stamps, worst, start, j = sorted(stamps_us), 0, 0, 0
    for i, t in enumerate(stamps):
        j = max(j, i)
        while j < len(stamps) and stamps[j] < t + period_us:
            j += 1
        if j - i > worst:
            worst, start = j - i, t
    return worst, start


def contention(url: str, rate_text: str, workers: int, seconds: float) -> dict[str, dict[str, float]]:
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    name = f"bench:{uuid.uuid4().hex[:8]}"
    start_at = time.time() + 2.0  # spawn and import first, then start together
    procs = [ctx.Process(target=hammer, args=(url, name, rate_text, start_at, seconds, results))
             for _ in range(workers)]
    for p in procs:
        p.start()
    got = [results.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(10)
    redis.Redis.from_url(url).delete(keys.rate_limit(name))
    rate = parse_rate(rate_text)
    period_us = int(rate.period_s * 1_000_000)
    rows = {}
    for label, field in (("rmq cluster limit", "grants"), (f"per-process limit x{workers}", "local")):
        stamps = [t for r in got for t in r[field]]
        worst, _ = worst_window(stamps, period_us)
        rows[label] = {"grants": len(stamps), "per_s": len(stamps) / seconds, "worst": worst,
                       "limit": rate.count, "ratio": worst / rate.count,
                       "split": "/".join(str(len(r[field])) for r in got)}
    rows["rmq cluster limit"]["denials"] = sum(r["denials"] for r in got)
    return rows


# --- part 3: real Celery workers ------------------------------------------------------------------
GOVERNED, PLAIN = "bench.ratelimit.governed", "bench.ratelimit.plain"


def _build_worker_app() -> Any:
    """The app ``celery -A ratelimit worker`` runs (limit name and rate from the environment)."""
    from celery import current_task

    from rmq import governed_task
    from rmq.celery.task import rmq_headers
    from rmq.core.runtime import current
    from rmq.network.rate_limit_guard import GRANTED_US
    from workers.app import make_app

    app = make_app()
    name, rate = os.environ.get("RMQ_BENCH_LIMIT", "bench"), os.environ.get("RMQ_BENCH_RATE", "5/s")

    def redis_now_us() -> int:
        rt = current()
        seconds, micros = rt.redis().time() if rt is not None else (time.time(), 0)
        return int(seconds) * 1_000_000 + int(micros)

    @governed_task(bind=True, rate_limits={name: rate}, name=GOVERNED)
    def governed(self: Any) -> dict:
        started = redis_now_us()
        ctx = self.rmq_context
        return {"granted_us": ctx.state.get(GRANTED_US) if ctx else None, "started_us": started,
                "worker": self.request.hostname,
                "deferrals": int(rmq_headers(self.request).get("rmq_deferrals", 0) or 0)}

    @app.task(name=PLAIN, rate_limit=rate)
    def plain() -> dict:
        started = redis_now_us()
        return {"granted_us": started, "started_us": started, "worker": current_task.request.hostname,
                "deferrals": 0}

    return app


def __getattr__(attr: str) -> Any:
    # ``celery -A ratelimit`` asks for ``app``: build it then, never when the bench is imported.
    if attr == "app":
        globals()["app"] = _build_worker_app()
        return globals()["app"]
    raise AttributeError(attr)


def _collect(results: list[Any], deadline: float) -> tuple[list[dict], int]:
    from celery.exceptions import TimeoutError as CeleryTimeout

    done, lost = [], 0
    for r in results:
        try:
            value = r.get(timeout=max(0.1, deadline - time.monotonic()), propagate=False)
        except CeleryTimeout:
            lost += 1
            continue
        if isinstance(value, dict):
            done.append(value)
        else:
            lost += 1
            print(f"  task {r.id} ended {r.state}: {value!r}")
    return done, lost


def _row(done: list[dict], lost: int, rate: Rate, nodes: list[str]) -> dict[str, Any]:
    grants = sorted(d["granted_us"] for d in done if d.get("granted_us"))
    span_s = (grants[-1] - grants[0]) / 1e6 if len(grants) > 1 else 0.0
    worst, _ = worst_window(grants, int(rate.period_s * 1_000_000))
    lags = [(d["started_us"] - d["granted_us"]) / 1000 for d in done if d.get("granted_us")]
    by_worker = collections.Counter(d["worker"] for d in done)
    return {"tasks": len(done), "lost": lost, "worst": worst, "limit": rate.count, "ratio": worst / rate.count,
            "per_s": (len(grants) - 1) / span_s if span_s else 0.0, "span_s": span_s,
            "split": "/".join(str(by_worker.get(n, 0)) for n in nodes),
            "deferrals_mean": statistics.fmean(d["deferrals"] for d in done) if done else 0.0,
            "deferrals_max": max((d["deferrals"] for d in done), default=0),
            "lag_p50": pct(lags, 0.50) if lags else 0.0, "lag_p99": pct(lags, 0.99) if lags else 0.0}


def celery_contention(url: str, rate_text: str, workers: int, seconds: float, concurrency: int,
                      extra_env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Real prefork workers: ``rate x seconds`` governed tasks at once, then as many plain ones."""
    from rmq.testing.worker import WorkerProcess
    from workers.app import make_app

    rate = parse_rate(rate_text)
    n = max(1, round(rate.count * seconds / rate.period_s))
    tag = uuid.uuid4().hex[:8]
    queue, name = f"bench-rl-{tag}", f"bench:{tag}"
    env = {"RMQ_BROKER_URL": url, "RMQ_RESULT_BACKEND": url, "RMQ_APP_QUEUE": queue,
           "RMQ_BENCH_LIMIT": name, "RMQ_BENCH_RATE": rate_text, "RMQ_MAX_DEFERRALS": str(max(100, 2 * n)),
           "PYTHONPATH": os.pathsep.join([BENCH_DIR, ROOT]), **extra_env}
    procs = [WorkerProcess(app="ratelimit", env=env, concurrency=concurrency, cwd=ROOT,
                           hostname=f"rl{i}-{tag}@%h").start() for i in range(workers)]
    client = make_app(broker=url, backend=url, queue=queue)
    rows: dict[str, dict[str, Any]] = {}
    failed = False
    try:
        for w in procs:
            w.wait_ready(client, timeout=90)
        nodes = [w.node_name for w in procs]
        for label, task in ((f"rmq rate_limits ({workers} workers)", GOVERNED),
                            (f"celery rate_limit x{workers} workers", PLAIN)):
            started = time.monotonic()
            results = [client.send_task(task, queue=queue) for _ in range(n)]
            done, lost = _collect(results, started + 2 * seconds + 60)
            rows[label] = _row(done, lost, rate, nodes)
            rows[label]["makespan_s"] = time.monotonic() - started
            rows[label]["ideal_s"] = (n - 1) * rate.period_s / rate.count
            failed = failed or lost > 0
    finally:
        for w in procs:
            w.stop()
            if failed:
                print(f"  worker log kept: {w.log_path}")
            else:
                os.unlink(w.log_path)
        client.close()
        r = redis.Redis.from_url(url)
        r.delete(keys.rate_limit(name), f"{keys.PREFIX}rate-turn:{name}")
    return rows


def print_celery(rows: dict[str, dict[str, Any]], rate_text: str) -> bool:
    print(f"{'':34}{'tasks':>6}{'lost':>5}{'by worker':>14}{'makespan s':>11}{'per s':>7}{'worst window':>14}"
          f"{'limit':>6}{'worst/limit':>12}{'defer mean/max':>16}{'lag p50/p99 ms':>16}")
    for label, r in rows.items():
        print(f"{label:34}{r['tasks']:6d}{r['lost']:5d}{r['split']:>14}{r['makespan_s']:11.1f}{r['per_s']:7.2f}"
              f"{r['worst']:14d}{r['limit']:6d}{r['ratio']:12.2f}{r['deferrals_mean']:9.2f}/{r['deferrals_max']:<6d}"
              f"{r['lag_p50']:8.1f}/{r['lag_p99']:<7.1f}")
    cluster = next(iter(rows.values()))
    plain = list(rows.values())[1]
    ok = cluster["worst"] <= cluster["limit"] and cluster["lost"] == 0
    print(f"ratio: worst window / limit = {cluster['ratio']:.2f} with rmq vs {plain['ratio']:.2f} with Celery's "
          f"per-worker rate_limit ({'PASS' if ok else 'FAIL'}: no window over {rate_text}, no task lost); "
          f"rmq makespan {cluster['makespan_s']:.1f}s for an ideal {cluster['ideal_s']:.1f}s "
          f"({cluster['makespan_s'] / cluster['ideal_s']:.2f}x)" if cluster["ideal_s"] else "")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("RMQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of parts 2 and 3; 0 skips them")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rate", default="5/s")
    parser.add_argument("--mode", choices=("processes", "celery", "both"), default="both",
                        help="part 2 (bare processes), part 3 (real Celery workers) or both")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes per Celery worker")
    parser.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the Celery workers (repeatable)")
    args = parser.parse_args(argv)
    info = redis.Redis.from_url(args.url).info("server")
    print(f"rmq rate limiter bench (docs/guarantees.md#p5): {args.url}, Redis {info['redis_version']}, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")

    lat = latency(args.url, args.decisions)
    print(f"\n1. decision latency, {args.decisions} decisions interleaved with PINGs "
          f"({lat['rmq decision']['granted']:.0%} granted)")
    print(f"{'':24}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'mean ms':>9}{'round trips':>13}")
    for label, r in lat.items():
        print(f"{label:24}{r['p50']:9.3f}{r['p99']:9.3f}{r['max']:9.3f}{r['mean']:9.3f}{r['trips']:13.2f}")
    p99 = lat["rmq decision"]["p99"]
    print(f"ratio: decision p99 / PING p99 = {p99 / lat['PING (one round trip)']['p99']:.2f}; "
          f"decision p99 {p99:.3f} ms vs goal {LATENCY_GOAL_MS} ms: {'PASS' if p99 <= LATENCY_GOAL_MS else 'FAIL'}")

    if args.seconds <= 0:
        return 0
    ok = True
    if args.mode in ("processes", "both"):
        print(f"\n2. {args.workers} processes hammering one {args.rate} limit for {args.seconds:g} s")
        rows = contention(args.url, args.rate, args.workers, args.seconds)
        print(f"{'':26}{'grants':>8}{'by process':>14}{'per s':>8}{'worst window':>14}{'limit':>7}"
              f"{'worst/limit':>13}")
        for label, r in rows.items():
            print(f"{label:26}{r['grants']:8d}{r['split']:>14}{r['per_s']:8.2f}{r['worst']:14d}"
                  f"{r['limit']:7d}{r['ratio']:13.2f}")
        cluster = rows["rmq cluster limit"]
        ok = cluster["worst"] <= cluster["limit"]
        ideal = parse_rate(args.rate).count * args.seconds / parse_rate(args.rate).period_s
        print(f"ratio: worst window / limit = {cluster['ratio']:.2f} ({'PASS' if ok else 'FAIL'}: no window may "
              f"exceed the limit); grants / ideal = {cluster['grants'] / ideal:.3f}; "
              f"{cluster['denials']} denials")
    if args.mode in ("celery", "both"):
        extra = dict(item.split("=", 1) for item in args.worker_env)
        n = round(parse_rate(args.rate).count * args.seconds / parse_rate(args.rate).period_s)
        print(f"\n3. {args.workers} real Celery workers (prefork, concurrency {args.concurrency}), {n} tasks "
              f"sent at once, limit {args.rate}{' ' + str(extra) if extra else ''}")
        ok = print_celery(celery_contention(args.url, args.rate, args.workers, args.seconds, args.concurrency,
                                            extra), args.rate) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
