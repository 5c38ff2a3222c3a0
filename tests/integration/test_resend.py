"""A deferral, a re-run after a memory kill and a lost-process redelivery are the same message: the
custom headers, ids, links, expiry, time limits, priority and tracing context of the one sent."""

from __future__ import annotations

import json
import os
import signal

import pytest
import redis as redis_lib

from rmq.testing.worker import wait_until

from .conftest import taskapp_env

pytestmark = pytest.mark.integration

SENT = {"parent_id": "parent-1", "root_id": "root-1", "expires": 600, "time_limit": 100, "soft_time_limit": 90,
        "priority": 7}
#: the tracing context of an instrumented client that sent the task (W3C trace context)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
def drain_app(redis_url, test_app):
    import drainapp  # noqa: F401  (tests/integration is on sys.path through test_app)

    from workers.app import make_app

    app = make_app(broker=redis_url, backend=redis_url)
    yield app
    app.close()


def _runs(r: redis_lib.Redis, task_id: str) -> list[dict]:
    return [json.loads(x) for x in r.lrange(f"seen:{task_id}", 0, -1)]


def _send(app, name: str, args: tuple, key: str):
    headers = {"x_trace": "trace-me", "traceparent": TRACEPARENT}
    return app.tasks[name].apply_async(args, headers=headers, link=app.tasks["d.mark"].s(key), **SENT)


def _assert_same_message(run: dict, task_id: str, reply_to: str, wire_priority: int) -> None:
    assert run["x_trace"] == "trace-me"
    assert (run["root_id"], run["parent_id"]) == ("root-1", "parent-1")
    assert run["correlation_id"] == task_id and run["reply_to"] == reply_to
    assert run["expires"] and run["timelimit"] == [100, 90]
    assert run["callbacks"] == 1
    assert run["priority"] == wire_priority  # priority 7 as sent: 7 on RabbitMQ, 9 - 7 on Redis


def _otel_env(redis_url: str, **rmq: object) -> dict[str, str]:
    return {**taskapp_env(redis_url, **rmq), "RMQ_TEST_OTEL": "1"}


def _deferral_keeps_the_message(app, start_worker, redis_url: str, env: dict[str, str], wire: str) -> None:
    r = redis_lib.Redis.from_url(redis_url)
    start_worker(app, app="drainapp", env=env, concurrency=2)
    # Given the task's one permit is held by a running task
    holder = app.tasks["d.permit"].delay(3.0)
    wait_until(lambda: r.llen(f"seen:{holder.id}"), 30, what="the holder to run")
    # When a task sent with a custom header, ids, a link, limits and a priority finds it busy
    res = _send(app, "d.permit", (0.1,), f"marks:{holder.id}")
    assert res.get(timeout=60)["pid"] > 0
    # Then it was deferred, and its run saw the message as it was sent
    runs = _runs(r, res.id)
    assert len(runs) == 1
    _assert_same_message(runs[0], res.id, app.thread_oid, 7 if wire == "amqp" else 2)
    wait_until(lambda: r.get(f"marks:{holder.id}"), 10, what="the link callback")
    traces = wait_until(lambda: r.lrange(f"otel:{res.id}", 0, -1) if r.llen(f"otel:{res.id}") >= 2 else None,
                        10, what="both runs' spans")
    assert {t.decode() for t in traces} == {TRACE_ID}  # the deferred attempt and the run: the sender's trace
    assert int(r.get(f"marks:{holder.id}")) == 1  # the callback fired once


def test_a_deferred_task_keeps_its_headers_links_and_trace(redis_url, drain_app, start_worker):
    _deferral_keeps_the_message(drain_app, start_worker, redis_url, _otel_env(redis_url, defer_countdown="0.5s"),
                                "redis")


def test_a_deferred_task_on_rabbitmq_keeps_its_headers_links_and_trace(amqp_url, redis_url, drain_app, unique,
                                                                      start_worker):
    from workers.app import make_app

    queue = f"resend-{unique}"
    app = make_app(broker=amqp_url, backend=redis_url, queue=queue)
    try:
        env = {**_otel_env(redis_url, defer_countdown="0.5s"), "RMQ_BROKER_URL": amqp_url,
               "RMQ_RESULT_BACKEND": redis_url, "RMQ_APP_QUEUE": queue}
        _deferral_keeps_the_message(app, start_worker, redis_url, env, "amqp")
    finally:
        app.close()


@pytest.mark.parametrize("instrumented", ["1", "main"])  # pool processes only, or the main process too
def test_a_task_re_run_after_a_memory_kill_keeps_its_headers_links_and_trace(redis_url, drain_app, start_worker,
                                                                            instrumented):
    r = redis_lib.Redis.from_url(redis_url)
    env = {**_otel_env(redis_url, memory_budget="700MiB", kill_backoff="0.2s"), "RMQ_TEST_OTEL": instrumented}
    w = start_worker(drain_app, app="drainapp", env=env, concurrency=1)
    # When a task that grows far over its declaration on its first run is killed for memory
    res = _send(drain_app, "d.grow", (900, 0.5), "marks:grow")
    assert res.get(timeout=60)["pid"] > 0
    assert "after memory kill 1" in w.log(), w.log()[-3000:]
    # Then the re-run saw the message as it was sent
    runs = _runs(r, res.id)
    assert len(runs) == 2
    for run in runs:
        _assert_same_message(run, res.id, drain_app.thread_oid, 2)
    wait_until(lambda: r.get("marks:grow"), 10, what="the link callback")
    traces = wait_until(lambda: r.lrange(f"otel:{res.id}", 0, -1), 10, what="the re-run's span")
    assert {t.decode() for t in traces} == {TRACE_ID}  # the re-run (the killed run never ended its span)
    assert int(r.get("marks:grow")) == 1


def test_a_task_re_run_after_a_memory_kill_on_rabbitmq_keeps_its_headers_links_and_trace(
        amqp_url, redis_url, drain_app, unique, start_worker):
    from workers.app import make_app

    r = redis_lib.Redis.from_url(redis_url)
    queue = f"rerun-{unique}"
    app = make_app(broker=amqp_url, backend=redis_url, queue=queue)
    try:
        env = {**_otel_env(redis_url, memory_budget="700MiB", kill_backoff="0.2s"), "RMQ_BROKER_URL": amqp_url,
               "RMQ_RESULT_BACKEND": redis_url, "RMQ_APP_QUEUE": queue}
        w = start_worker(app, app="drainapp", env=env, concurrency=1)
        # When a task that grows far over its declaration on its first run is killed for memory
        res = _send(app, "d.grow", (900, 0.5), f"marks:{queue}")
        assert res.get(timeout=60)["pid"] > 0
        assert "after memory kill 1" in w.log(), w.log()[-3000:]
        # Then the re-run, published to RabbitMQ again, saw the message as it was sent
        runs = _runs(r, res.id)
        assert len(runs) == 2
        for run in runs:
            _assert_same_message(run, res.id, app.thread_oid, 7)
        wait_until(lambda: r.get(f"marks:{queue}"), 10, what="the link callback")
        traces = wait_until(lambda: r.lrange(f"otel:{res.id}", 0, -1), 10, what="the re-run's span")
        assert {t.decode() for t in traces} == {TRACE_ID}
        assert int(r.get(f"marks:{queue}")) == 1
    finally:
        app.close()


def test_a_redelivery_after_a_lost_process_keeps_its_headers(redis_url, drain_app, start_worker):
    r = redis_lib.Redis.from_url(redis_url)
    # the killed run's permit is freed when its lease lapses (rmq_concurrency_lease, 30 s by default)
    start_worker(drain_app, app="drainapp", env=taskapp_env(redis_url, concurrency_lease="2s"), concurrency=1)
    res = _send(drain_app, "d.permit", (3.0,), "marks:lost")
    wait_until(lambda: r.llen(f"seen:{res.id}"), 30, what="the first run")
    os.kill(_runs(r, res.id)[0]["pid"], signal.SIGKILL)  # from outside: not a memory kill
    res.get(timeout=60)
    runs = _runs(r, res.id)
    assert len(runs) == 2
    for run in runs:
        _assert_same_message(run, res.id, drain_app.thread_oid, 2)
