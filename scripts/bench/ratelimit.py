#!/usr/bin/env python
"""P5: the cluster rate limiter's decision latency, and whether any window ever exceeds the limit.

Part 1 times ``--decisions`` limiter decisions interleaved with the same number of PINGs on the
same connection (the floor for one round trip) and counts the replies read per decision.
Part 2 runs ``--workers`` processes hammering one limit (``--rate``) for ``--seconds``; every
grant's Redis timestamp is kept and the busiest half-open window of one period is counted.
Side by side, each process also runs a per-process limiter of the same rate (what Celery's own
``rate_limit`` gives): its worst window shows what a per-worker limit lets through.

Exit status 1 when any window of the cluster limiter exceeded the limit.

    python scripts/bench/ratelimit.py [--seconds 60] [--url redis://127.0.0.1:6379/15]
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import redis

from rmq import keys
from rmq.ratelimit import ClusterLimiter
from rmq.units import Rate, parse_rate

LATENCY_GOAL_MS = 1.0


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("RMQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=60.0, help="contention run; 0 skips it")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rate", default="5/s")
    args = parser.parse_args(argv)
    info = redis.Redis.from_url(args.url).info("server")
    print(f"rmq rate limiter bench (SPEC P5): {args.url}, Redis {info['redis_version']}, "
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
    print(f"\n2. {args.workers} processes hammering one {args.rate} limit for {args.seconds:g} s")
    rows = contention(args.url, args.rate, args.workers, args.seconds)
    print(f"{'':26}{'grants':>8}{'by process':>14}{'per s':>8}{'worst window':>14}{'limit':>7}{'worst/limit':>13}")
    for label, r in rows.items():
        print(f"{label:26}{r['grants']:8d}{r['split']:>14}{r['per_s']:8.2f}{r['worst']:14d}"
              f"{r['limit']:7d}{r['ratio']:13.2f}")
    cluster = rows["rmq cluster limit"]
    ok = cluster["worst"] <= cluster["limit"]
    ideal = parse_rate(args.rate).count * args.seconds / parse_rate(args.rate).period_s
    print(f"ratio: worst window / limit = {cluster['ratio']:.2f} ({'PASS' if ok else 'FAIL'}: no window may "
          f"exceed the limit); grants / ideal = {cluster['grants'] / ideal:.3f}; "
          f"{cluster['denials']} denials")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
