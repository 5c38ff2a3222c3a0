"""Refreshing a live worker's unacknowledged messages must never cost a message.

rmq keeps the Redis visibility timeout short (so a dead worker's messages come back in seconds)
and refreshes the timestamps of a live worker's own unacknowledged messages. The refresh must not
run on the connection that carries the consumer's pending BRPOP: it would read the BRPOP's reply
as its own and drop that message.
"""

from __future__ import annotations

import time

import pytest

from .conftest import taskapp_env

pytestmark = pytest.mark.integration


def test_quick_tasks_beside_a_long_one_all_arrive_while_unacked_messages_are_refreshed(
    redis_url, test_app, start_worker
):
    # touch every 0.5 s; the long task outlives the visibility timeout many times over
    w = start_worker(test_app, app="taskapp", env=taskapp_env(redis_url, visibility_timeout="2.5s"),
                     concurrency=2)
    long = test_app.tasks["t.sleep"].delay(10.0)
    quick = []
    for i in range(50):
        quick.append(test_app.tasks["workers.noop"].delay(i))
        time.sleep(0.15)
    assert [r.get(timeout=60) for r in quick] == list(range(50))
    first = long.get(timeout=60)
    # not redelivered while it ran: it ran exactly once, in one process, for its full length
    assert first["ended"] - first["started"] >= 10.0
    received = w.log().count(f"Task t.sleep[{long.id}] received")
    assert received == 1, w.log()[-3000:]
