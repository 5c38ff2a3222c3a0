"""Fixtures for tests that start real worker subprocesses."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from rmq.testing.worker import WorkerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.integration


@pytest.fixture
def start_worker() -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``WorkerProcess``es that are stopped (by PID) when the test ends."""
    started: list[WorkerProcess] = []

    def start(client_app=None, wait: bool = True, **kwargs) -> WorkerProcess:
        kwargs.setdefault("cwd", ROOT)
        w = WorkerProcess(**kwargs).start()
        started.append(w)
        if wait and client_app is not None:
            w.wait_ready(client_app)
        return w

    yield start
    for w in started:
        kept = w.finish()
        if kept:
            print(f"  worker log kept: {kept}")


TESTS_DIR = os.path.join(ROOT, "tests", "integration")


@pytest.fixture
def test_app(redis_url):
    """A client of ``taskapp`` (reference tasks plus governor-provoking ones) on the test's Redis."""
    import sys

    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import taskapp  # noqa: F401  (registers its shared tasks)

    from workers.app import make_app

    app = make_app(broker=redis_url, backend=redis_url)
    yield app
    app.close()


def taskapp_env(broker: str, **rmq: object) -> dict[str, str]:
    """Environment for a ``-A taskapp`` worker."""
    return {**worker_env(broker, **rmq), "PYTHONPATH": f"{TESTS_DIR}:{ROOT}"}


@pytest.fixture
def redis_app(redis_url):
    """A client app of the reference application on the test's Redis database."""
    import workers.tasks  # noqa: F401  (registers the shared tasks)
    from workers.app import make_app

    app = make_app(broker=redis_url, backend=redis_url)
    yield app
    app.close()


def worker_env(broker: str, backend: str | None = None, **rmq: object) -> dict[str, str]:
    """Environment for a reference-app worker: broker, backend and ``RMQ_*`` settings."""
    env = {"RMQ_BROKER_URL": broker, "RMQ_RESULT_BACKEND": backend or broker}
    for key, value in rmq.items():
        env[f"RMQ_{key.upper()}"] = str(value)
    return env


@pytest.fixture
def tree_app(redis_url):
    """A client of ``treeapp`` (tasks whose memory lives in subprocesses) on the test's Redis."""
    import sys

    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import treeapp  # noqa: F401  (registers its shared tasks)

    from workers.app import make_app

    app = make_app(broker=redis_url, backend=redis_url)
    yield app
    app.close()


def rmq_stats_of(app, w) -> dict:
    """The ``rmq`` part of worker ``w``'s ``inspect stats``."""
    replies = app.control.inspect(destination=[w.node_name], timeout=3).stats() or {}
    return replies[w.node_name]["rmq"]


def pids_in(path) -> list[int]:
    """The pids a task wrote to ``path``, one per line (none when it wrote nothing yet)."""
    try:
        return [int(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
