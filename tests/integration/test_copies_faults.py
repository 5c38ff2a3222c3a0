"""A task id's body runs once under broker
connection drops, long runs, memory kills, crashes and outside kills. Real workers, real brokers.

The ``soak.*`` tasks record each run of their body in Redis (``soak:starts:<id>``, ``soak:done:<id>``),
so a test counts bodies, not only successes.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
import redis as redis_lib

from rmq.testing.worker import wait_until

from .conftest import ROOT, TESTS_DIR, ready
from .test_reliability import _rabbitmqctl, close_amqp_connections, outcome, runs, soak, soak_env, wait_terminal

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis(redis_url) -> Iterator[str]:
    """A private redis-server (CLIENT KILL and CLIENT PAUSE must hit no other run), else the test database."""
    with soak.private_redis(fallback=redis_url) as url:
        yield url


def fault_env(broker: str, backend: str | None = None, queue: str | None = None, **rmq: object) -> dict[str, str]:
    return soak_env(broker, backend, queue, **rmq)


def counters(app, w) -> dict:
    for attempt in range(3):  # a client connection the broker dropped fails once, then reconnects
        try:
            stats = app.control.inspect(destination=[w.node_name], timeout=3).stats() or {}
            return stats.get(w.node_name, {}).get("rmq", {}).get("counters", {})
        except (OSError, *app.connection_for_write().connection_errors):
            if attempt == 2:
                raise
    return {}


def bodies(client: redis_lib.Redis, tid: str) -> int:
    return int(client.llen(f"soak:done:{tid}"))


# -- row 3: an original running on one worker, its copy arriving at another ----------------------


def test_a_copy_arriving_at_another_worker_while_the_original_runs_waits_for_it(own_redis, start_worker):
    # Given two workers on two queues, and a long original running on the first
    app = soak.client_app(own_redis, "qa")
    a = start_worker(app, app="soakapp", env=fault_env(own_redis, queue="qa"), concurrency=2, wait=False)
    b = start_worker(app, app="soakapp", env=fault_env(own_redis, queue="qb"), concurrency=2, wait=False)
    ready(app, a, b)
    client = redis_lib.Redis.from_url(own_redis)
    tid = f"orig-{uuid.uuid4().hex[:8]}"
    app.tasks["soak.sleep"].apply_async((4.0,), task_id=tid, queue="qa")
    wait_until(lambda: runs(client, tid), 20, what="the original to start")
    time.sleep(1.0)  # the original has run for a second: what a broker drop re-queues
    # When a copy of it (what a broker connection drop re-queues) reaches the other worker
    app.tasks["soak.sleep"].apply_async((4.0,), task_id=tid, queue="qb", headers={"rmq_deferrals": 0})
    wait_terminal(client, [tid], 30)
    # Then the copy waited and was dropped: the body ran once
    wait_until(lambda: counters(app, b).get("copies", {}).get("dropped") or len(runs(client, tid)) > 1, 30,
               what="the copy to be dropped or to run")
    assert len(runs(client, tid)) == 1 and bodies(client, tid) == 1, soak.diagnose(client, "qa", tid)
    seen = counters(app, b)
    assert seen["deferred"].get("duplicate", 0) >= 1 and seen["copies"]["dropped"] == 1, seen
    assert not client.exists(f"rmq:run:{tid}"), "the original's run claim was not released"
    assert a.proc is not None
    app.close()


# -- row 4: a claim outlives its TTL while the body runs, in a solo pool too ---------------------


def test_a_run_claim_stays_held_for_a_body_longer_than_its_ttl(own_redis, start_worker):
    # Given a worker with one pool process running a copy (it holds the run claim) longer than a
    # claim's TTL (a solo pool is refused: docs/design.md#pools)
    app = soak.client_app(own_redis, "qa")
    env = {"visibility_timeout": "2s"}  # the claim TTL is then its floor, 10 s
    a = start_worker(app, app="soakapp", env=fault_env(own_redis, queue="qa", **env), concurrency=1, wait=False)
    b = start_worker(app, app="soakapp", env=fault_env(own_redis, queue="qb", **env), concurrency=2, wait=False)
    ready(app, a, b)
    client = redis_lib.Redis.from_url(own_redis)
    tid = f"long-{uuid.uuid4().hex[:8]}"
    # (the body ends 2 s after the copy arrives: the copy finds the claim held, waits, and is dropped)
    app.tasks["soak.sleep"].apply_async((13.0,), task_id=tid, queue="qa", headers={"rmq_deferrals": 0})
    started = float(wait_until(lambda: runs(client, tid), 20, what="the copy to start")[0][0])
    # When another copy arrives after the claim's TTL has passed since the run started
    wait_until(lambda: time.time() > started + 11.0, 15, what="11 s of the run")
    assert client.exists(f"rmq:run:{tid}"), "the run claim lapsed while its body runs"
    app.tasks["soak.sleep"].apply_async((15.0,), task_id=tid, queue="qb", headers={"rmq_deferrals": 0})
    wait_terminal(client, [tid], 30)
    # Then it waits for the first run and is dropped: one body
    wait_until(lambda: counters(app, b).get("copies", {}).get("dropped") or len(runs(client, tid)) > 1, 30,
               what="the copy to be dropped or to run")
    assert len(runs(client, tid)) == 1 and bodies(client, tid) == 1, soak.diagnose(client, "qa", tid)
    app.close()


# -- row 6: a memory kill's re-run leaves no phantom active request ------------------------------


def test_a_memory_killed_task_rerun_leaves_no_phantom_in_the_active_requests(own_redis, start_worker):
    # Given a worker that kills a task growing past its declaration, and re-runs it once
    app = soak.client_app(own_redis, "celery")
    env = {**fault_env(own_redis, memory_budget="1GiB", kill_backoff="0.2s")}
    w = start_worker(app, app="faultapp", env=env, concurrency=2)
    client = redis_lib.Redis.from_url(own_redis)
    # When the task is killed once and then succeeds
    tid = app.send_task("fault.grow_once", (20,)).id
    wait_terminal(client, [tid], 60)
    assert outcome(client, [tid]).succeeded == 1
    assert len(runs(client, tid)) == 2, "the task was not killed and re-run"
    # Then the worker lists no active task (Celery's own state, which the autoscaler reads)
    def active() -> list:
        return (app.control.inspect(destination=[w.node_name], timeout=3).active() or {}).get(w.node_name, [])

    with contextlib.suppress(TimeoutError):
        wait_until(lambda: active() == [], 5, what="no active request")
    assert active() == [], "the killed run is still listed as active"
    app.close()


# -- row 7: the lost-process cap holds on RabbitMQ with no Redis ---------------------------------


def test_a_crashing_task_on_rabbitmq_without_redis_fails_after_the_lost_process_cap(amqp_url, unique, tmp_path,
                                                                                    start_worker):
    from workers.app import make_app

    # Given a worker on RabbitMQ with a file result backend: no Redis anywhere for rmq
    queue = f"rmq-lost-{unique}"
    backend = f"file://{tmp_path / 'results'}"
    (tmp_path / "results").mkdir()
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    app = make_app(broker=amqp_url, backend=backend, queue=queue)
    env = {"RMQ_BROKER_URL": amqp_url, "RMQ_RESULT_BACKEND": backend, "RMQ_APP_QUEUE": queue, "SOAK_MODE": "rmq",
           "RMQ_WORKER_LOST_RETRIES": "2", "PYTHONPATH": os.pathsep.join([TESTS_DIR, ROOT])}
    env.pop("RMQ_REDIS_URL", None)
    start_worker(app, app="faultapp", env=env, concurrency=2)
    try:
        # When a task's process dies of SIGSEGV on every run
        result = app.send_task("fault.crash", (str(runs_dir),), queue=queue)
        # Then it ends as FAILURE (TaskProcessLost) after 1 + 2 runs, instead of coming back forever
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: result.state == "FAILURE" or len(os.listdir(runs_dir)) > 6, 45,
                       what="the task to fail")
        n = len(os.listdir(runs_dir))
        assert result.state == "FAILURE", f"{n} runs and still {result.state}"
        assert type(result.result).__name__ == "TaskProcessLost", repr(result.result)
        assert n == 3, f"{n} runs"
    finally:
        with contextlib.suppress(Exception), app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        app.close()


# -- row 15: a pool process killed from outside: its task runs again at once ---------------------


def test_a_task_whose_process_is_killed_from_outside_runs_again_within_half_a_second(own_redis, start_worker):
    # Given a worker with a free pool process
    app = soak.client_app(own_redis, "celery")
    start_worker(app, app="soakapp", env=fault_env(own_redis), concurrency=2)
    client = redis_lib.Redis.from_url(own_redis)
    gaps = []
    for _ in range(5):
        tid = app.tasks["soak.sleep"].apply_async((1.0,)).id
        first = wait_until(lambda: runs(client, tid), 20, what="the task to start")[0]  # noqa: B023
        # When its pool process is SIGKILLed from outside (as the kernel's OOM killer does)
        killed_at = time.time()
        os.kill(int(first[1]), signal.SIGKILL)
        again = wait_until(lambda: len(r := runs(client, tid)) >= 2 and r, 10,  # noqa: B023
                           what="the task to start again")
        gaps.append(float(again[1][0]) - killed_at)
        wait_terminal(client, [tid], 20)
        assert outcome(client, [tid]).succeeded == 1
    gaps.sort()
    p95 = gaps[math.ceil(0.95 * len(gaps)) - 1]
    print(f"\nrow 15: kill -> started again: {', '.join(f'{g:.2f}' for g in gaps)} s (p95 {p95:.2f} s)")
    # Then it runs again within half a second each time (not after the 2 s deferral countdown)
    assert p95 <= 0.5, gaps
    app.close()


# -- acceptance 3: broker connections dropped longer than the visibility timeout -----------------

FAST_RESTORE = {"visibility_timeout": "3s", "unacked_restore_interval": "1s"}


def dropped_copies(app, workers) -> int:
    """Copies that waited for a running original or were dropped after it, over ``workers``."""
    total = 0
    for w in workers:
        c = counters(app, w)
        total += int(c.get("deferred", {}).get("duplicate", 0)) + int(c.get("copies", {}).get("dropped", 0))
    return total


def assert_every_body_ran_once(client: redis_lib.Redis, ids: list[str], queue: str) -> None:
    wait_terminal(client, ids, 90)
    r = outcome(client, ids)
    print("\n" + r.table())
    twice = [i for i in ids if bodies(client, i) != 1 or len(runs(client, i)) != 1]
    assert not twice, "\n".join(soak.diagnose(client, queue, i) for i in twice[:5])
    assert not r.lost and not r.duplicates, "\n".join(soak.diagnose(client, queue, i) for i in r.lost + r.duplicates)
    assert r.succeeded == len(ids), r.failed


def test_redis_connections_of_two_workers_dropped_longer_than_the_visibility_timeout(own_redis, start_worker):
    # Given two workers (visibility timeout 3 s) running long tasks, with free processes for copies
    app = soak.client_app(own_redis, "celery")
    env = fault_env(own_redis, **FAST_RESTORE)
    workers = [start_worker(app, app="soakapp", env=env, concurrency=3, wait=False) for _ in range(2)]
    ready(app, *workers)
    client = redis_lib.Redis.from_url(own_redis)
    ids = [app.tasks["soak.sleep"].apply_async((13.0,)).id for _ in range(4)]
    wait_until(lambda: all(runs(client, i) for i in ids), 30, what="the long tasks to start")
    time.sleep(1.0)
    # When every client connection is killed and the server pauses for longer than the visibility timeout
    admin = redis_lib.Redis.from_url(own_redis)
    killed = int(admin.client_kill_filter(_type="normal", skipme=True))
    admin.execute_command("CLIENT", "PAUSE", 5000, "ALL")
    admin.close()
    assert killed >= 2
    # the test's own connection was killed too; a new one waits out the pause
    client = redis_lib.Redis.from_url(own_redis, socket_timeout=30)
    # Then every long body ran once, every task succeeded once
    assert_every_body_ran_once(client, ids, "celery")
    # (and the drop did re-queue them: copies met the running originals and waited)
    copies = dropped_copies(app, workers)
    print(f"copies that waited or were dropped: {copies}")
    assert copies >= 1, "the drop re-queued nothing: the test proved nothing"
    app.close()


def test_rabbitmq_connections_of_two_workers_closed_while_long_tasks_run(amqp_url, own_redis, unique,
                                                                         start_worker):
    ctl = _rabbitmqctl()
    queue = f"rmq-drop-{unique}"
    import soakapp  # noqa: F401  (the soak.* tasks)

    from workers.app import make_app

    # Given two workers on RabbitMQ running long tasks, with free processes for copies
    app = make_app(broker=amqp_url, backend=own_redis, queue=queue)
    workers = [start_worker(app, app="soakapp", env=soak_env(amqp_url, own_redis, queue), concurrency=3, wait=False)
               for _ in range(2)]
    ready(app, *workers)
    client = redis_lib.Redis.from_url(own_redis)
    try:
        ids = [app.send_task("soak.sleep", (8.0,), queue=queue).id for _ in range(4)]
        wait_until(lambda: all(runs(client, i) for i in ids), 30, what="the long tasks to start")
        time.sleep(1.0)
        # When the broker closes both workers' connections (their unacknowledged messages are re-queued)
        closed = sum(close_amqp_connections(ctl, w.pid) for w in workers)
        assert closed >= 2, "the workers' AMQP connections were not found"
        # Then every long body ran once, every task succeeded once
        assert_every_body_ran_once(client, ids, queue)
        copies = dropped_copies(app, workers)
        print(f"copies that waited or were dropped: {copies}")
        assert copies >= 1, "the drop re-queued nothing: the test proved nothing"
    finally:
        with contextlib.suppress(Exception), app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        app.close()
