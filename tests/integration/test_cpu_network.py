"""CPU slots, thread caps, cluster-wide rate and concurrency limits.

Real worker subprocesses (prefork) on the real Redis; tasks live in ``cpunetapp``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest
import redis as redis_lib

from rmq.core import keys
from rmq.core.units import parse_rate
from rmq.network.rate_limiter import ClusterLimiter
from rmq.testing.worker import wait_until

from .conftest import TESTS_DIR, taskapp_env

pytestmark = pytest.mark.integration

APP = "cpunetapp"


@pytest.fixture
def cn_queue(unique) -> str:
    """A queue of this test's own: a worker of another test run that picked the same Redis
    database must not take (and drop as unregistered) these tasks."""
    return f"cn-{unique}"


@pytest.fixture
def cn_app(redis_url, cn_queue) -> Iterator:
    """A client of ``cpunetapp`` on the test's Redis database and queue."""
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import cpunetapp  # noqa: F401  (registers its shared tasks)

    from workers.app import make_app

    app = make_app(broker=redis_url, backend=redis_url, queue=cn_queue)
    yield app
    app.close()


@pytest.fixture(autouse=True)
def db_not_shared(redis_url) -> Iterator[None]:
    """Errors at teardown when the test's Redis database was flushed meanwhile: another test
    session picked the same database, and whatever failed here may be its doing."""
    client = redis_lib.Redis.from_url(redis_url)
    client.set("cn:sentinel", 1)
    yield
    intact = client.exists("cn:sentinel")
    client.close()
    assert intact, f"{redis_url} was flushed during the test by another test session"


@pytest.fixture
def cn_env(redis_url, cn_queue):
    """``cn_env(**rmq_settings)``: the environment of a ``cpunetapp`` worker on this test's queue."""
    return lambda **rmq: {**taskapp_env(redis_url, **rmq), "RMQ_APP_QUEUE": cn_queue}


def _overlap(spans: list[tuple[float, float]]) -> int:
    """Most spans open at one instant (an end at t closes before a start at t opens)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def _worst_window(stamps_us: list[int], period_us: int) -> int:
    """Most stamps in any half-open window ``[t, t + period)``."""
    stamps, worst, j = sorted(stamps_us), 0, 0
    for i, t in enumerate(stamps):
        j = max(j, i)
        while j < len(stamps) and stamps[j] < t + period_us:
            j += 1
        worst = max(worst, j - i)
    return worst


# 1 ------------------------------------------------------------------------------------------------
def test_cpu2_tasks_never_overlap_on_two_slots_while_light_tasks_run_beside_them(cn_app, cn_env, start_worker):
    # Given a worker with 4 pool processes and 2 CPU slots
    start_worker(cn_app, app=APP, concurrency=4,
                 env=cn_env(cpu_slots=2, admission_wait="300ms", defer_countdown="300ms"))
    # When 4 tasks declaring cpu=2 and 8 light tasks are sent together
    heavy = [cn_app.tasks["cn.heavy"].delay(1.0) for _ in range(4)]
    light = []
    for _ in range(4):
        light += [cn_app.tasks["cn.light"].delay(0.3) for _ in range(2)]
    heavy_done = [r.get(timeout=60) for r in heavy]
    light_done = [r.get(timeout=60) for r in light]

    # Then no two cpu=2 tasks ever ran at the same time
    heavy_spans = [(h["started"], h["ended"]) for h in heavy_done]
    assert _overlap(heavy_spans) == 1, sorted(heavy_spans)
    # and light tasks ran beside them: every light task finished before the heavy ones did,
    # most of them while a heavy task was running
    last_heavy_end = max(e for _, e in heavy_spans)
    assert all(x["ended"] < last_heavy_end for x in light_done), (light_done, heavy_spans)
    beside = [x for x in light_done
              if any(s < x["ended"] and x["started"] < e for s, e in heavy_spans)]
    assert len(beside) >= len(light_done) // 2, (light_done, heavy_spans)


# 2 ------------------------------------------------------------------------------------------------
def test_cpu1_task_caps_blas_and_subprocess_threads_then_the_process_is_back_to_its_defaults(
    cn_app, cn_env, start_worker
):
    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        pytest.skip("one CPU: BLAS's default is one thread too, nothing to tell apart")
    # Given one pool process whose environment sets MKL_NUM_THREADS (and not OMP_NUM_THREADS)
    env = {**cn_env(), "MKL_NUM_THREADS": "7"}
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = ""  # the worker inherits ours otherwise; empty means "not set" to the libraries
    start_worker(cn_app, app=APP, concurrency=1, env=env)
    # When a cpu=1 task runs (loading numpy itself), then the same report without cpu=
    capped = cn_app.tasks["cn.threads_capped"].delay().get(timeout=60)
    after = cn_app.tasks["cn.threads_free"].delay().get(timeout=60)

    assert capped["pid"] == after["pid"]
    # Then inside the task BLAS has one thread and a subprocess sees the caps
    assert capped["blas_threads"] and set(capped["blas_threads"]) == {1}, capped
    assert capped["child_env"] == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    # and afterwards the process is back to its defaults: BLAS as many threads as CPUs, the
    # variables as they were
    assert set(after["blas_threads"]) == {cpus}, (after, cpus)
    assert after["child_env"] == {"OMP_NUM_THREADS": "", "MKL_NUM_THREADS": "7", "OPENBLAS_NUM_THREADS": ""}


def _start_all(start_worker, client_app, n: int, **kwargs) -> list:
    """Start ``n`` workers at once (they import in parallel), then wait until each answers."""
    workers = [start_worker(app=APP, wait=False, hostname=f"cn{i}-{os.getpid()}@%h", **kwargs) for i in range(n)]
    for w in workers:
        w.wait_ready(client_app, timeout=60)
    return workers


# 3 ------------------------------------------------------------------------------------------------
def test_rate_limit_holds_across_three_workers_without_holding_pool_slots(cn_app, cn_env, start_worker):
    # Given three separate workers (2 pool processes each) sharing the limit "x" = 5/s
    workers = _start_all(start_worker, cn_app, 3, concurrency=2, env=cn_env(max_deferrals=100))
    # When 40 limited tasks are sent, then 12 unlimited ones
    sent = time.time()
    limited = [cn_app.tasks["cn.limited"].delay() for _ in range(40)]
    free = [cn_app.tasks["cn.unlimited"].delay(0.1) for _ in range(12)]
    free_done = [r.get(timeout=30) for r in free]
    done = [r.get(timeout=60) for r in limited]

    # Then no one-second window holds more than 5 grants (Redis clock), and the limit was used
    grants = [d["granted_us"] for d in done]
    assert all(isinstance(g, int) for g in grants), done[:3]
    assert _worst_window(grants, 1_000_000) == 5, [(g - min(grants)) / 1e6 for g in sorted(grants)]
    # each task's body ran right after its own grant (the rest of the guard chain in between)
    lags = [d["started_us"] - d["granted_us"] for d in done]
    assert all(0 <= lag < 1_000_000 for lag in lags), sorted(lags)[-5:]
    # all three workers took part
    assert {d["worker"] for d in done} == {w.node_name for w in workers}
    # and the waiting tasks held no pool slot: the unlimited ones, sent last, were done long before
    batch_s = max(grants) / 1e6 - sent
    free_s = max(f["ended"] for f in free_done) - sent
    assert batch_s > 6.5  # 40 at 5/s
    assert free_s < batch_s / 2, (free_s, batch_s)
    print(f"\nrate limit, 3 workers: worst window {_worst_window(grants, 1_000_000)}/5 grants "
          f"({_worst_window([d['started_us'] for d in done], 1_000_000)} task starts), max lag "
          f"{max(lags) / 1000:.1f} ms, unlimited done after {free_s:.2f}s, limited batch {batch_s:.2f}s, "
          f"deferrals max {max(d['deferrals'] for d in done)} total {sum(d['deferrals'] for d in done)}")


def test_denied_callers_get_turns_one_per_token_and_keep_their_place(redis_url):
    # Given a full 5/s limit (the cluster limiter alone, on the real Redis)
    limiter = ClusterLimiter(redis_lib.Redis.from_url(redis_url))
    rate = parse_rate("5/s")
    assert all(limiter.acquire("t", rate, f"g{i}") == 0.0 for i in range(5))
    # When 10 callers are denied, each is told a turn 1/rate after the previous one
    turns = [limiter.acquire("t", rate, f"w{i}") for i in range(10)]
    told_at = time.monotonic()
    gaps = [b - a for a, b in zip(turns, turns[1:], strict=False)]
    assert 0.8 < turns[0] <= 1.0 and all(0.15 < g <= 0.201 for g in gaps), turns
    # and asking again before its turn keeps the turn instead of queueing behind the others
    again = limiter.acquire("t", rate, "w3")
    assert abs(again - (turns[3] - (time.monotonic() - told_at))) < 0.05, (again, turns[3])
    # Then at its turn the first caller gets its token
    time.sleep(limiter.acquire("t", rate, "w0"))
    assert limiter.acquire("t", rate, "w0") == 0.0


# 4 ------------------------------------------------------------------------------------------------
def test_concurrency_limit_across_two_workers_and_a_killed_holder_frees_its_permit(
    redis_url, cn_app, cn_env, start_worker
):
    lease_s = 2.0
    env = cn_env(concurrency_lease=f"{lease_s}s", worker_lost_retries=0)
    _start_all(start_worker, cn_app, 2, concurrency=2, env=env)
    client = redis_lib.Redis.from_url(redis_url)

    # Given 4 pool processes on two workers, when 8 tasks share concurrency={"api": 2}
    done = [r.get(timeout=60) for r in [cn_app.tasks["cn.api"].delay(0.4) for _ in range(8)]]
    # Then never more than 2 ran at once (and 2 did)
    assert _overlap([(d["started"], d["ended"]) for d in done]) == 2, sorted((d["started"], d["ended"]) for d in done)

    # Given two holders of both permits
    holders = {tag: cn_app.tasks["cn.api_hold"].delay(tag) for tag in ("a", "b")}

    def holder_pids() -> list[int] | None:
        pids = [client.get(f"cn:pid:{tag}") for tag in holders]
        return [int(p) for p in pids] if all(pids) else None

    pid_a, pid_b = wait_until(holder_pids, 30, what="both holders to run")
    key = keys.semaphore("api")

    def live() -> list[str]:
        now_s, now_us = client.time()
        return [m.decode() for m in client.zrangebyscore(key, int(now_s) * 1_000_000 + int(now_us), "+inf")]

    assert len(live()) == 2
    # When the pool process holding one is killed with SIGKILL
    killed_at = time.time()
    os.kill(pid_a, signal.SIGKILL)
    third = cn_app.tasks["cn.api_hold"].delay("c")
    # Then its permit lapses within the lease
    wait_until(lambda: not any(f":{pid_a}:" in m for m in live()), lease_s + 3, what="the dead holder's lease")
    freed_after = time.time() - killed_at
    assert freed_after <= lease_s + 0.5, freed_after
    # and the survivor, holding for longer than a lease, is still renewed
    assert any(f":{pid_b}:" in m for m in live())
    # and a task waiting for a permit gets it
    wait_until(lambda: client.get("cn:pid:c"), lease_s + 10, what="the third holder to run")
    client.set("cn:release", 1)
    assert holders["b"].get(timeout=30)["pid"] == pid_b
    third.get(timeout=30)
    print(f"\nkilled holder's permit freed {freed_after:.2f}s after SIGKILL (lease {lease_s}s)")


# 5 ------------------------------------------------------------------------------------------------
def test_unreachable_limiter_redis_defers_uncounted_beyond_max_deferrals(redis_url, cn_app, cn_env, start_worker):
    # Given a worker whose limiter Redis is a closed port (the broker is the real Redis), allowing
    # one counted deferral
    env = cn_env(redis_url="redis://127.0.0.1:1/0", max_deferrals=1, defer_countdown="200ms")
    w = start_worker(cn_app, app=APP, concurrency=1, env=env)
    # When a rate-limited task is sent
    result = cn_app.tasks["cn.limited_marker"].delay("t5")
    # Then it is deferred again and again, well past rmq_max_deferrals: an outage is not the task's
    # fault (it ends after rmq_limiter_outage_max, 1 h by default)
    log = wait_until(lambda: w.log() if w.log().count("failing closed") >= 4 else None, 30,
                     what="four deferrals")
    assert result.state != "FAILURE" and "ResourceUnavailable" not in log
    assert redis_lib.Redis.from_url(redis_url).get("cn:ran:t5") is None  # and it never ran unchecked
    # and the worker log says why
    line = next(x for x in log.splitlines() if "failing closed" in x)
    assert "cn.limited_marker" in line and "redis://127.0.0.1:1/0" in line and "['y']" in line, line


def test_a_limiter_outage_longer_than_rmq_limiter_outage_max_ends_the_task(redis_url, cn_app, cn_env, start_worker):
    # Given a worker whose limiter Redis stays unreachable, with a short outage limit
    env = cn_env(redis_url="redis://127.0.0.1:1/0", defer_countdown="200ms", limiter_outage_max="1500ms")
    w = start_worker(cn_app, app=APP, concurrency=1, env=env)
    # When a rate-limited task is sent
    result = cn_app.tasks["cn.limited_marker"].delay("t6")
    # Then it is deferred while the outage lasts, and ends once it has lasted longer than the limit
    wait_until(lambda: result.state == "FAILURE" or None, 30, what="the task to give up")
    assert "ResourceUnavailable" in repr(result.result) and w.log().count("failing closed") >= 2
    assert redis_lib.Redis.from_url(redis_url).get("cn:ran:t6") is None  # it never ran unchecked
