"""A warm shutdown drains each running task once.

rmq keeps the Redis visibility timeout short, and refreshes the timestamps of a live worker's
unacknowledged messages so another worker never gets them while their tasks run. A worker that
drains (warm shutdown) must keep doing so, and keep its governor, until its pool has finished.
"""

from __future__ import annotations

import signal
import time

import pytest
import redis as redis_lib

from rmq.testing.worker import wait_until

from .conftest import taskapp_env

pytestmark = pytest.mark.integration


@pytest.fixture
def drain_app(redis_url):
    import drainapp  # noqa: F401  (registers its tasks; tests/integration is on sys.path via test_app)

    from workers.app import make_app

    app = make_app(broker=redis_url, backend=redis_url)
    yield app
    app.close()


def _env(broker: str, backend: str, **rmq: object) -> dict[str, str]:
    env = taskapp_env(broker, **rmq)
    env["RMQ_RESULT_BACKEND"] = backend
    return env


def _nothing_left_to_deliver(r: redis_lib.Redis) -> bool:
    """No task message waits in a queue of the default queue or among the unacknowledged ones
    (which a restore sweep would put back after the visibility timeout)."""
    queues = [k for k in r.scan_iter("celery*") if r.type(k) == b"list"]
    return r.hlen("unacked") == 0 and all(r.llen(k) == 0 for k in queues)


def _drain_once(app, start_worker, broker: str, backend: str, stop: str) -> None:
    r = redis_lib.Redis.from_url(backend)
    env = _env(broker, backend, visibility_timeout="2s", unacked_restore_interval="1s")
    a = start_worker(app, app="drainapp", env=env, concurrency=1)
    result = app.tasks["d.long"].delay(7.0)
    wait_until(lambda: r.get(f"bodies:{result.id}"), 30, what="the body to start on the first worker")
    b = start_worker(app, app="drainapp", env=env, concurrency=1)
    # When the first worker is asked to stop while the body runs (for more than a visibility timeout
    # plus a restore sweep after this)
    if stop == "sigterm":
        a.proc.send_signal(signal.SIGTERM)
    else:
        app.control.shutdown(destination=[a.node_name])
    # Then it drains: the task ends once, on it, and is not run by the second worker meanwhile
    outcome = result.get(timeout=60)
    assert outcome["ended"] - outcome["started"] >= 7.0
    a.proc.wait(30)
    assert a.proc.returncode == 0, a.log()[-3000:]
    # and its message was acknowledged: nothing is left that a restore sweep could hand out later
    assert _nothing_left_to_deliver(r), (r.hgetall("unacked"), b.log()[-3000:])
    assert int(r.get(f"bodies:{result.id}")) == 1, (r.lrange(f"ran_on:{result.id}", 0, -1), b.log()[-3000:])
    assert f"d.long[{result.id}] received" not in b.log()
    assert result.state == "SUCCESS"
    assert "rmq governor stopped after the pool drained" in a.log(), a.log()[-3000:]


def test_sigterm_drains_a_long_task_once_with_a_second_worker_up(redis_url, test_app, drain_app, start_worker):
    _drain_once(drain_app, start_worker, redis_url, redis_url, "sigterm")


def test_control_shutdown_drains_a_long_task_once(redis_url, test_app, drain_app, start_worker):
    _drain_once(drain_app, start_worker, redis_url, redis_url, "control")


def test_sigterm_on_rabbitmq_keeps_the_connection_until_the_task_ends(amqp_url, redis_url, test_app, unique,
                                                                     start_worker):
    import drainapp  # noqa: F401

    from workers.app import make_app

    queue = f"drain-{unique}"
    app = make_app(broker=amqp_url, backend=redis_url, queue=queue)
    try:
        r = redis_lib.Redis.from_url(redis_url)
        env = {**_env(amqp_url, redis_url), "RMQ_APP_QUEUE": queue}
        a = start_worker(app, app="drainapp", env=env, concurrency=1)
        result = app.tasks["d.long"].delay(5.0)
        wait_until(lambda: r.get(f"bodies:{result.id}"), 30, what="the body to start")
        b = start_worker(app, app="drainapp", env=env, concurrency=1)
        a.proc.send_signal(signal.SIGTERM)
        assert result.get(timeout=60)["ended"] > 0
        a.proc.wait(30)
        time.sleep(2.0)  # a message re-queued as the connection closed would reach the idle second worker
        assert int(r.get(f"bodies:{result.id}")) == 1, b.log()[-3000:]
        assert f"d.long[{result.id}] received" not in b.log()
    finally:
        app.close()


def test_the_kill_rung_still_acts_while_the_pool_drains(redis_url, test_app, drain_app, start_worker):
    r = redis_lib.Redis.from_url(redis_url)
    env = _env(redis_url, redis_url, memory_budget="1GiB", memory_kill_retries=0)
    w = start_worker(drain_app, app="drainapp", env=env, concurrency=1)
    # Given a task that will outgrow the budget a second after it starts
    result = drain_app.tasks["d.balloon"].delay(1500, 10.0)
    wait_until(lambda: r.get(f"balloon:{result.id}"), 30, what="the task to start")
    # When the worker is asked to stop before it grows
    w.proc.send_signal(signal.SIGTERM)
    # Then the governor, still running while the pool drains, ends it for memory
    with pytest.raises(Exception, match="MemoryBudgetExceeded|killed"):
        result.get(timeout=60)
    w.proc.wait(30)
    log = w.log()
    assert log.index("rmq keeps governing until the pool has drained") < log.index("rmq killing"), log[-3000:]


def test_a_cold_shutdown_after_the_soft_shutdown_timeout_still_hands_the_task_over(redis_url, test_app, drain_app,
                                                                                   start_worker):
    # Celery's meaning: SIGQUIT waits worker_soft_shutdown_timeout, then cancels the running task, whose
    # message goes back to the queue for another worker
    r = redis_lib.Redis.from_url(redis_url)
    env = {**_env(redis_url, redis_url, visibility_timeout="4s", unacked_restore_interval="1s"),
           "DRAIN_SOFT_SHUTDOWN_TIMEOUT": "3"}
    a = start_worker(drain_app, app="drainapp", env=env, concurrency=1)
    result = drain_app.tasks["d.long"].delay(8.0, 0.5)  # the second body, on the second worker, is short
    wait_until(lambda: r.get(f"bodies:{result.id}"), 30, what="the body to start on the first worker")
    b = start_worker(drain_app, app="drainapp", env=env, concurrency=1)
    quit_at = time.monotonic()
    a.proc.send_signal(signal.SIGQUIT)
    a.proc.wait(30)
    assert 3.0 <= time.monotonic() - quit_at < 8.0, a.log()[-3000:]  # the soft timeout, not the whole task
    assert result.get(timeout=60)["ended"] > 0
    assert int(r.get(f"bodies:{result.id}")) == 2 and f"d.long[{result.id}] received" in b.log()


@pytest.mark.parametrize("how", ["max_tasks_per_child", "rmq"])
def test_a_recycled_pool_process_drains_its_long_task_once(how, redis_url, test_app, drain_app, unique,
                                                           start_worker):
    # A recycled pool process (Celery's --max-tasks-per-child, or rmq's recycling of a leaking process,
    # rmq/celery/recycle.py) leaves only after its task; the worker keeps its message fresh meanwhile
    r = redis_lib.Redis.from_url(redis_url)
    env = _env(redis_url, redis_url, visibility_timeout="2s", unacked_restore_interval="1s")
    ask = how == "rmq"
    extra = ["--max-tasks-per-child", "1"] if how == "max_tasks_per_child" else []
    own = f"own-{unique}"  # tasks for the first worker only
    a = start_worker(drain_app, app="drainapp", env=env, concurrency=2, queues=["celery", own], extra_args=extra)
    # Given a long task on a process that will be recycled after it, on the queue a second worker consumes
    long = drain_app.tasks["d.recycled"].delay(6.0, ask)
    wait_until(lambda: r.get(f"bodies:{long.id}"), 30, what="the long body to start")
    b = start_worker(drain_app, app="drainapp", env=env, concurrency=1)
    # When the worker's other process is recycled after each of two short tasks meanwhile
    shorts = [drain_app.tasks["d.recycled"].apply_async((0.1, ask), queue=own).get(timeout=30) for _ in range(2)]
    # Then the long task ends once, on its process, more than a visibility timeout after it started
    first = long.get(timeout=60)
    assert first["requested"] is ask
    assert int(r.get(f"bodies:{long.id}")) == 1
    assert f"d.recycled[{long.id}] received" not in b.log(), b.log()[-3000:]
    assert len({s["pid"] for s in shorts} | {first["pid"]}) == 3  # each short task had a fresh process
    # And the long task's process is replaced: a new process takes the next task
    wait_until(lambda: first["pid"] not in a.pool_pids() and len(a.pool_pids()) == 2, 30,
               what="the long task's process to be replaced")
    following = drain_app.tasks["d.recycled"].apply_async((0.0, False), queue=own).get(timeout=30)
    assert following["pid"] in a.pool_pids() and following["pid"] not in {first["pid"], *(s["pid"] for s in shorts)}
    assert "WorkerLostError" not in a.log() and "exited prematurely" not in a.log(), a.log()[-3000:]
    assert int(r.get(f"bodies:{long.id}")) == 1 and f"d.recycled[{long.id}] received" not in b.log()
    # the last task's message is acknowledged after its result is stored (acks_late): a moment later
    wait_until(lambda: _nothing_left_to_deliver(r), 5, what="every message acknowledged")
