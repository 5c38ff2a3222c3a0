"""Nothing is lost (docs/guarantees.md#r1 to #r3) and nothing succeeds twice under pool kills, worker crashes
and broker connection drops. Real workers (``-A soakapp``), real Redis and RabbitMQ.

Every ``soak.*`` task records each run (``soak:starts:<id>``) and each finished body
(``soak:done:<id>``); ``scripts/soak.py`` reads them back with the result backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest
import redis as redis_lib

from rmq.testing.worker import wait_until

from .conftest import ROOT, TESTS_DIR

SCRIPTS = os.path.join(ROOT, "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

import soak  # noqa: E402  (scripts/soak.py)

pytestmark = pytest.mark.integration


def soak_env(broker: str, backend: str | None = None, queue: str | None = None, **rmq: object) -> dict[str, str]:
    """Environment of a governed ``-A soakapp`` worker."""
    env = {"RMQ_BROKER_URL": broker, "RMQ_RESULT_BACKEND": backend or broker, "SOAK_MODE": "rmq",
           "PYTHONPATH": os.pathsep.join([TESTS_DIR, ROOT])}
    if backend:
        env["SOAK_MARK_URL"] = backend
    if queue:
        env["RMQ_APP_QUEUE"] = queue
    env.update({f"RMQ_{k.upper()}": str(v) for k, v in rmq.items()})
    return env


def runs(client: redis_lib.Redis, task_id: str) -> list[list[str]]:
    """The recorded runs of a task: ``[time, pid, redelivered, hostname, deferrals]`` each."""
    return [r.decode().split("|") for r in client.lrange(f"soak:starts:{task_id}", 0, -1)]


def outcome(client: redis_lib.Redis, ids: list[str]) -> soak.SoakResult:
    """What happened to ``ids`` (lost, duplicates, failures) according to the backend and the markers."""
    result = soak.SoakResult(len(ids))
    soak.collect(client, ids, result)
    return result


def wait_terminal(client: redis_lib.Redis, ids: list[str], timeout: float) -> None:
    """Wait until every task has a terminal state (or the deadline: the caller reports the rest)."""
    def done() -> bool:
        metas = client.mget([soak.META + i for i in ids])
        return all(m and json.loads(m)["status"] in soak.TERMINAL for m in metas)

    with contextlib.suppress(TimeoutError):
        wait_until(done, timeout, interval=0.25, what="every task to end")


@pytest.fixture
def own_redis(redis_url) -> Iterator[str]:
    """A private redis-server, else the test database: other test runs on this machine flush the
    shared server's databases at any time, and CLIENT KILL must hit no other run."""
    with soak.private_redis(fallback=redis_url) as url:
        yield url


# -- R1 -----------------------------------------------------------------------------------------


def test_short_soak_with_random_pool_kills_loses_nothing_and_runs_nothing_twice(own_redis):
    # Given 2 governed workers and a killer SIGKILLing a random pool process every 0.2-0.5 s
    r = soak.run_soak(own_redis, tasks=500, workers=2, concurrency=3, seed=7, kill_every=(0.2, 0.5),
                      deadline_s=120, stall_s=45)
    print("\n" + r.table())
    # Then every task reached exactly one terminal state and none succeeded twice
    assert not r.lost, "\n".join(r.diagnoses)
    assert not r.duplicates, "\n".join(r.diagnoses)
    assert not r.success_without_body, "\n".join(r.diagnoses)
    assert r.kills >= 5, "the killer did not kill enough to prove anything"
    assert r.redeliveries >= 1, "no kill hit a running task"
    assert r.succeeded + sum(r.failed.values()) == r.tasks
    # a task may fail only as "lost too often" (the same task killed more than rmq_worker_lost_retries)
    assert set(r.failed) <= {"TaskProcessLost"}, r.failed


def test_a_deferral_cut_short_by_a_kill_still_succeeds_once(own_redis, start_worker):
    # Given tasks that defer themselves and die before their worker acknowledges the message:
    # the deferred copy is already queued and the original message comes back (redelivered)
    app = soak.client_app(own_redis, "celery")
    start_worker(app, app="soakapp", env=soak_env(own_redis), concurrency=2)
    client = redis_lib.Redis.from_url(own_redis)
    ids = [app.tasks["soak.defer_then_die"].apply_async().id for _ in range(3)]
    wait_terminal(client, ids, 30)
    # the copy that runs second must see the first one's success and not run the body again
    wait_until(lambda: all(len(runs(client, i)) >= 2 for i in ids), 10, what="both copies to be handled")
    time.sleep(1.0)  # the later copy (deferred by 0.3 s) has had its chance to run
    r = outcome(client, ids)
    assert r.succeeded == 3 and not r.lost
    assert not r.duplicates, "\n".join(soak.diagnose(client, "celery", i) for i in r.duplicates)
    app.close()


def test_two_copies_of_a_task_arriving_together_run_the_body_once(own_redis, start_worker):
    # Given two free pool processes and two copies of one task (same id, both marked as rmq copies:
    # a deferred one beside a redelivered original) that arrive at the same moment
    app = soak.client_app(own_redis, "celery")
    w = start_worker(app, app="soakapp", env=soak_env(own_redis), concurrency=2)
    client = redis_lib.Redis.from_url(own_redis)
    tid = f"twin-{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        app.tasks["soak.sleep"].apply_async((1.5,), task_id=tid, headers={"rmq_deferrals": 1})
    # When both are delivered, one runs and the other waits for its run claim
    assert_ran_once_and_the_copy_was_dropped(app, w, client, tid)


def test_a_copy_arriving_while_the_original_runs_in_the_same_worker_waits_for_it(own_redis, start_worker):
    # Given an original delivery running (it takes no run claim) and a copy of it arriving at a free
    # pool process of the same worker (what a broker connection drop does to an unacknowledged task)
    app = soak.client_app(own_redis, "celery")
    w = start_worker(app, app="soakapp", env=soak_env(own_redis), concurrency=2)
    client = redis_lib.Redis.from_url(own_redis)
    tid = f"orig-{uuid.uuid4().hex[:8]}"
    app.tasks["soak.sleep"].apply_async((2.0,), task_id=tid)
    wait_until(lambda: runs(client, tid), 20, what="the original to start")
    app.tasks["soak.sleep"].apply_async((2.0,), task_id=tid, headers={"rmq_deferrals": 0})
    # Then the copy sees the original's reservation in the worker's ledger and waits
    assert_ran_once_and_the_copy_was_dropped(app, w, client, tid)


def assert_ran_once_and_the_copy_was_dropped(app, w, client: redis_lib.Redis, tid: str) -> None:
    wait_terminal(client, [tid], 30)

    def counters() -> dict:
        stats = app.control.inspect(destination=[w.node_name], timeout=3).stats() or {}
        return stats.get(w.node_name, {}).get("rmq", {}).get("counters", {})

    # (the waiting copy comes back after the deferral countdown, finds the task ended and is dropped)
    seen = wait_until(lambda: (c := counters()).get("copies", {}).get("dropped") and c, 30,
                      what="the second copy to be dropped")
    assert seen["deferred"].get("duplicate", 0) >= 1, seen
    # Then the body ran once and the task succeeded once
    assert len(runs(client, tid)) == 1, soak.diagnose(client, "celery", tid)
    r = outcome(client, [tid])
    assert r.succeeded == 1 and not r.duplicates
    assert not client.exists(f"rmq:run:{tid}"), "the run claim was not released"
    app.close()


# -- R2 -----------------------------------------------------------------------------------------

FAST_RESTORE = {"visibility_timeout": "2s", "unacked_restore_interval": "1s"}


def test_unacknowledged_tasks_of_a_killed_worker_run_again_within_seconds_of_a_restart(own_redis, start_worker):
    app = soak.client_app(own_redis, "celery")
    env = soak_env(own_redis, **FAST_RESTORE)
    w = start_worker(app, app="soakapp", env=env, concurrency=2)
    client = redis_lib.Redis.from_url(own_redis)
    # Given two tasks running on a worker
    ids = [app.tasks["soak.sleep"].apply_async((2.0,)).id for _ in range(2)]
    wait_until(lambda: all(runs(client, i) for i in ids), 20, what="both tasks to start")
    # When the whole worker is SIGKILLed (and its orphaned pool processes are ended by PID)
    w.kill()
    killed_at = time.time()
    assert w.runtime_dirs(), "a SIGKILLed worker leaves its runtime directory"
    w.stop()
    assert not w.runtime_dirs(), "stop() ends what the killed worker left: its runtime directory too"
    # Then, after a restart, both run again within seconds
    restarted_at = time.time()
    start_worker(app, app="soakapp", env=env, concurrency=2)
    wait_until(lambda: all(len(runs(client, i)) >= 2 for i in ids), 40, what="the re-runs")
    rerun_at = max(float(runs(client, i)[1][0]) for i in ids)
    print(f"\nR2: re-run {rerun_at - restarted_at:.1f} s after the restart, {rerun_at - killed_at:.1f} s after "
          f"the kill (visibility timeout 2 s, restore every 1 s)")
    assert rerun_at - killed_at < 20, "unacknowledged tasks took too long to come back"
    wait_terminal(client, ids, 20)
    r = outcome(client, ids)
    assert r.succeeded == 2 and not r.duplicates, "\n".join(soak.diagnose(client, "celery", i) for i in ids)
    assert all(runs(client, i)[1][2] == "1" for i in ids), "the second run was not a redelivery"
    app.close()


def test_a_task_longer_than_the_visibility_timeout_runs_once_on_a_live_worker(own_redis, start_worker):
    # Given a 2 s visibility timeout and a free pool process that could take a redelivered copy
    app = soak.client_app(own_redis, "celery")
    start_worker(app, app="soakapp", env=soak_env(own_redis, **FAST_RESTORE), concurrency=2)
    client = redis_lib.Redis.from_url(own_redis)
    # When a task runs for three visibility timeouts
    tid = app.tasks["soak.sleep"].apply_async((6.0,)).id
    wait_terminal(client, [tid], 40)
    # Then it ran exactly once: the live worker kept its unacknowledged message fresh
    assert len(runs(client, tid)) == 1, soak.diagnose(client, "celery", tid)
    assert outcome(client, [tid]).succeeded == 1
    app.close()


# -- R3 -----------------------------------------------------------------------------------------


PATIENT_PUBLISH = {"max_retries": 20, "interval_start": 0.1, "interval_step": 0.25, "interval_max": 1.0}


def stream(app, n: int, per_s: float, during=None, at: int = 0) -> list[str]:
    """Send ``n`` short sleeps at ``per_s`` a second, calling ``during()`` after task ``at``."""
    ids = []
    for i in range(n):
        if during is not None and i == at:
            during()
        # a client that rides out a broker drop: Celery's publish retry, a little more patient than its default
        ids.append(app.tasks["soak.sleep"].apply_async((0.05 + 0.1 * (i % 3),), retry=True,
                                                        retry_policy=PATIENT_PUBLISH).id)
        time.sleep(1.0 / per_s)
    return ids


def assert_exactly_once(client: redis_lib.Redis, ids: list[str], queue: str) -> soak.SoakResult:
    wait_terminal(client, ids, 60)
    r = outcome(client, ids)
    print("\n" + r.table())
    odd = r.lost + r.duplicates + r.success_without_body
    assert not odd, "\n".join(soak.diagnose(client, queue, i) for i in odd[:10])
    assert r.succeeded == len(ids), r.failed
    return r


def test_redis_connections_killed_while_tasks_flow_lose_nothing(own_redis, start_worker):
    app = soak.client_app(own_redis, "celery")
    w = start_worker(app, app="soakapp", env=soak_env(own_redis), concurrency=3)
    client = redis_lib.Redis.from_url(own_redis)
    port = int(own_redis.rsplit(":", 1)[1].split("/")[0])
    before = broker_ports(w.pid, port)
    killed: list[int] = []

    def kill_connections() -> None:
        admin = redis_lib.Redis.from_url(own_redis)
        killed.append(int(admin.client_kill_filter(_type="normal", skipme=True)))
        admin.close()

    # When every normal client connection of the server is killed while tasks flow
    ids = stream(app, 90, per_s=20, during=kill_connections, at=30)
    assert killed and killed[0] >= 1, "CLIENT KILL killed nothing"
    # Then the worker reconnects and every task (before, during, after) succeeds exactly once
    assert_exactly_once(client, ids, "celery")
    after = broker_ports(w.pid, port)  # its pub/sub connection (not a "normal" client) survives
    assert before - after and after - before, "the worker's connections were not replaced"
    app.close()


def _rabbitmqctl() -> str:
    path = shutil.which("rabbitmqctl")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("rabbitmqctl is not callable and CI is set: the RabbitMQ drop test must run")
        pytest.skip("no rabbitmqctl on PATH")
    return path


def broker_ports(pid: int, server_port: int) -> set[int]:
    """Local ports of the established TCP connections from ``pid`` to ``server_port``."""
    return {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
            if c.raddr and c.raddr.port == server_port and c.status == psutil.CONN_ESTABLISHED}


def close_amqp_connections(ctl: str, pid: int) -> int:
    """Close (server side) every AMQP connection the process ``pid`` holds; returns how many."""
    ports = broker_ports(pid, 5672)
    out = subprocess.run([ctl, "-q", "list_connections", "peer_port", "pid"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    closed = 0
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in ports:
            subprocess.run([ctl, "-q", "close_connection", parts[1], "rmq R3 test"], capture_output=True,
                           timeout=60, check=True)
            closed += 1
    return closed


def test_rabbitmq_connection_closed_while_tasks_flow_loses_nothing(amqp_url, own_redis, unique, start_worker):
    ctl = _rabbitmqctl()
    queue = f"rmq-r3-{unique}"
    import soakapp  # noqa: F401  (the soak.* tasks)

    from workers.app import make_app

    app = make_app(broker=amqp_url, backend=own_redis, queue=queue)
    w = start_worker(app, app="soakapp", env=soak_env(amqp_url, own_redis, queue), concurrency=3)
    client = redis_lib.Redis.from_url(own_redis)
    closed: list[int] = []
    closer = threading.Thread(target=lambda: closed.append(close_amqp_connections(ctl, w.pid)))
    try:
        # When the worker's AMQP connection is closed by the broker while tasks flow
        ids = stream(app, 90, per_s=20, during=closer.start, at=30)
        closer.join(60)
        assert closed and closed[0] >= 1, "no AMQP connection of the worker was found to close"
        # Then it reconnects and every task succeeds exactly once
        assert_exactly_once(client, ids, queue)
    finally:
        with contextlib.suppress(Exception), app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        app.close()
