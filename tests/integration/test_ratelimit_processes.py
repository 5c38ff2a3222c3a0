"""Cluster limits shared by separate OS processes on a real Redis (no Celery needed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis as redis_lib

from rmq.network.semaphore import ClusterSemaphore

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# argv: url, start_at (epoch), seconds. Hammers one limit; prints the Redis time of every grant.
HAMMER = """
import json, sys, time
import redis
from rmq.network.rate_limiter import ClusterLimiter
from rmq.core.units import parse_rate
url, start_at, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
limiter, rate, grants = ClusterLimiter(redis.Redis.from_url(url)), parse_rate("10/s"), []
time.sleep(max(0.0, start_at - time.time()))
end = time.monotonic() + seconds
while time.monotonic() < end:
    d = limiter.decide({"shared": rate})
    if d.granted:
        grants.append(d.redis_time_us)
    else:
        time.sleep(d.wait_s)  # every process wakes for the same token: maximum contention
print(json.dumps(grants))
"""

# argv: url, start_at, rounds, name. Takes a permit, bumps a shared gauge while holding it.
HOLD = """
import os, sys, time
import redis
from rmq.network.semaphore import ClusterSemaphore
url, start_at, rounds, name = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
client = redis.Redis.from_url(url)
sem = ClusterSemaphore(client, lease_s=30)
time.sleep(max(0.0, start_at - time.time()))
for n in range(rounds):
    holder = f"{os.getpid()}:{n}"
    while not sem.acquire("gpu", 2, holder):
        time.sleep(0.002)
    active = client.incr("active")
    client.rpush("observed", active)
    time.sleep(0.005)
    client.decr("active")
    sem.release("gpu", holder)
"""

# argv: url, lease_s. Holds a permit renewed by a LeaseKeeper until killed.
KEEP = """
import sys, time
import redis
from rmq.network.lease_keeper import LeaseKeeper
from rmq.network.semaphore import ClusterSemaphore
sem = ClusterSemaphore(redis.Redis.from_url(sys.argv[1]), lease_s=float(sys.argv[2]))
assert sem.acquire("gpu", 1, "doomed")
keeper = LeaseKeeper(sem)
keeper.add("gpu", "doomed", 1)
keeper.start()
print("held", flush=True)
time.sleep(600)
"""


def _spawn(code: str, *args: object) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _finish(procs: list[subprocess.Popen], timeout_s: float) -> list[str]:
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            assert p.returncode == 0, err
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def worst_window(stamps_us: list[int], period_us: int) -> int:
    """Most grants in any half-open window [t, t + period)."""
    stamps, worst, j = sorted(stamps_us), 0, 0
    for i, t in enumerate(stamps):
        j = max(j, i)
        while j < len(stamps) and stamps[j] < t + period_us:
            j += 1
        worst = max(worst, j - i)
    return worst


def test_worst_window_counts_half_open_windows():
    assert worst_window([0, 999_999, 1_000_000, 1_500_000], 1_000_000) == 3
    assert worst_window([0, 1_000_000, 2_000_000], 1_000_000) == 1


def test_no_window_exceeds_the_limit_across_processes(redis_url):
    # Given four processes hammering one "10/s" limit for 2.5 s
    seconds = 2.5
    procs = [_spawn(HAMMER, redis_url, time.time() + 1.0, seconds) for _ in range(4)]
    stamps = [t for out in _finish(procs, timeout_s=30) for t in json.loads(out)]
    # Then no one-second window holds more than 10 grants, and the limit was used, not starved
    assert worst_window(stamps, 1_000_000) == 10
    assert len(stamps) >= 10 * seconds - 5


def test_semaphore_never_exceeds_its_limit_across_processes(redis_url):
    # Given four processes each taking a permit of a 2-permit semaphore 15 times
    procs = [_spawn(HOLD, redis_url, time.time() + 1.0, 15, "gpu") for _ in range(4)]
    _finish(procs, timeout_s=60)
    client = redis_lib.Redis.from_url(redis_url)
    observed = [int(v) for v in client.lrange("observed", 0, -1)]
    # Then at most two ever held a permit at once (and two did, so the test can fail)
    assert len(observed) == 60
    assert max(observed) == 2
    assert ClusterSemaphore(client, 30).holders("gpu") == 0


def test_a_sigkilled_holders_permit_lapses_after_its_lease(redis_url):
    client = redis_lib.Redis.from_url(redis_url)
    sem = ClusterSemaphore(client, lease_s=1.0)
    proc = _spawn(KEEP, redis_url, 1.0)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        # While it lives, its keeper renews the permit past the lease
        time.sleep(1.6)
        assert not sem.acquire("gpu", 1, "waiting")
        # When it is SIGKILLed, its permit lapses within one lease
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        killed = time.monotonic()
        deadline = killed + 5
        while not sem.acquire("gpu", 1, "waiting"):
            assert time.monotonic() < deadline, "the dead holder's permit never lapsed"
            time.sleep(0.05)
        assert time.monotonic() - killed <= 1.3
        assert sem.holders("gpu") == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
