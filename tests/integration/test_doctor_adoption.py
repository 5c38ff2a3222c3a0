"""``rmq doctor`` finds the hazards of adopting rmq on an existing deployment, against real brokers:
RabbitMQ queues declared without ``x-max-priority``, messages in Redis lists of another priority
layout, and workers without rmq on the same Redis database."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from kombu import Connection, Queue

from rmq.testing.worker import WorkerProcess

from .conftest import ROOT, TESTS_DIR, worker_env

pytestmark = pytest.mark.integration


def _doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rmq.cli", "doctor", "-A", "workers.app"], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=90)


def _plain_app(broker: str):
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import plainapp

    return plainapp.make_app(broker)


def test_a_rabbitmq_queue_without_x_max_priority_is_a_hazard_with_its_fix(amqp_url, redis_url, unique,
                                                                         start_worker):
    queue, heavy = f"adopt-{unique}", f"adopt-heavy-{unique}"
    env = {**worker_env(amqp_url, redis_url), "RMQ_APP_QUEUE": queue, "RMQ_HEAVY_QUEUE": heavy}
    with Connection(amqp_url) as conn:
        Queue(queue, durable=True)(conn.default_channel).declare()  # as a worker without rmq declared it
        try:
            # When the queue exists without x-max-priority, doctor says so, and how to fix it
            found = _doctor(env)
            assert found.returncode == 1, found.stdout + found.stderr
            assert "HAZARD rabbitmq queues" in found.stdout and repr(queue) in found.stdout
            assert "PRECONDITION_FAILED" in found.stdout and "rmq_priorities = False" in found.stdout
            # and a worker really stops on it
            failing = WorkerProcess(app="workers.app", env=env, queues=[queue], cwd=ROOT).start()
            try:
                failing.proc.wait(60)
            except subprocess.TimeoutExpired:
                pytest.fail("a worker started on a queue declared without x-max-priority")
            finally:
                failing.finish()
            # With the priority mapping off, the old queue is fine and a worker runs its tasks
            off = {**env, "RMQ_PRIORITIES": "false"}
            fine = _doctor(off)
            assert fine.returncode == 0, fine.stdout + fine.stderr
            assert "ok rabbitmq queues" in fine.stdout
            import workers.tasks  # noqa: F401  (registers workers.noop)
            from workers.app import make_app

            os.environ["RMQ_PRIORITIES"] = "false"  # the client app reads it when configured
            try:
                client = make_app(broker=amqp_url, backend=redis_url, queue=queue)
                start_worker(client, app="workers.app", env=off, queues=[queue])
                assert client.tasks["workers.noop"].delay(7).get(timeout=30) == 7
                client.close()
            finally:
                del os.environ["RMQ_PRIORITIES"]
        finally:
            for name in (queue, heavy):
                try:
                    conn.default_channel.queue_delete(name)
                except Exception:
                    pass


def test_messages_under_celerys_default_priority_layout_are_a_hazard_on_redis():
    import redis as redis_lib

    from rmq.testing.redis import private_redis

    with private_redis() as url:
        # Given a deployment without rmq that queued tasks with priorities (kombu's default layout)
        plain = _plain_app(url)
        for priority in (3, 6):
            plain.send_task("plain.sleep", (0,), priority=priority)
        plain.close()
        r = redis_lib.Redis.from_url(url)
        assert r.llen("celery\x06\x163") == 1
        # When rmq doctor looks with rmq's layout
        found = _doctor(worker_env(url))
        assert found.returncode == 1, found.stdout + found.stderr
        assert "HAZARD redis priority lists" in found.stdout
        assert "'celery\\x06\\x163': 1" in found.stdout and "'celery\\x06\\x166': 1" in found.stdout
        assert "LMOVE" in found.stdout
        # and the reverse: rmq's lists, read by a layout without the mapping
        r.delete("celery\x06\x163", "celery\x06\x166")
        r.lpush("celery:6", "{}")  # rmq's list of priorities 3-1 (steps 0, 3, 6, 9)
        assert _doctor(worker_env(url)).returncode == 0
        back = _doctor({**worker_env(url), "RMQ_PRIORITIES": "false"})
        assert back.returncode == 1 and "'celery:6': 1" in back.stdout, back.stdout


def test_a_worker_without_rmq_on_the_same_redis_database_is_a_hazard(start_worker):
    import workers.tasks  # noqa: F401  (registers the reference tasks)
    from rmq.testing.redis import private_redis
    from workers.app import make_app

    with private_redis() as url:  # no other session's workers on this database
        rmq_client, plain_client = make_app(broker=url, backend=url), _plain_app(url)
        try:
            # Given an rmq worker only, nothing is wrong
            start_worker(rmq_client, app="workers.app", env=worker_env(url))
            alone = _doctor(worker_env(url))
            assert alone.returncode == 0, alone.stdout + alone.stderr
            assert "ok workers without rmq: 1 worker(s) answered" in alone.stdout
            # When a worker without rmq shares the database
            plain = start_worker(plain_client, app="plainapp",
                                 env={**worker_env(url), "PYTHONPATH": f"{TESTS_DIR}:{ROOT}"})
            found = _doctor(worker_env(url))
            assert found.returncode == 1, found.stdout + found.stderr
            line = next(x for x in found.stdout.splitlines() if "workers without rmq" in x)
            assert "HAZARD" in line and plain.node_name in line and "20s" in line
            assert "rmq.install(app)" in found.stdout
            # and one without rmq but with rmq's layout set by hand answers inspect stats without an rmq part
            os.environ["PLAIN_RMQ_LAYOUT"] = "1"
            try:
                same_layout_client = _plain_app(url)
            finally:
                del os.environ["PLAIN_RMQ_LAYOUT"]
            same = start_worker(same_layout_client, app="plainapp",
                                env={**worker_env(url), "PYTHONPATH": f"{TESTS_DIR}:{ROOT}", "PLAIN_RMQ_LAYOUT": "1"})
            same_layout_client.close()
            found = _doctor(worker_env(url))
            line = next(x for x in found.stdout.splitlines() if "workers without rmq" in x)
            assert plain.node_name in line and same.node_name in line, found.stdout
        finally:
            rmq_client.close()
            plain_client.close()
