"""Fixtures for tests that start real worker subprocesses."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator

import pytest

from rmq.testing.worker import WorkerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.integration


def _finish(workers: list[WorkerProcess]) -> None:
    for w in workers:
        kept = w.finish()
        if w.stop_timed_out:  # in the warnings summary: a slow warm shutdown is a finding, not noise
            warnings.warn(f"worker {w.node_name} did not stop within 15 s of SIGTERM and was killed; log: {kept}",
                          stacklevel=1)
        elif kept:
            print(f"  worker log kept: {kept}")


@pytest.fixture(scope="session")
def _stopping_workers() -> Iterator[list[WorkerProcess]]:
    """Workers asked to stop at the end of the previous test that used ``start_worker``."""
    stopping: list[WorkerProcess] = []
    yield stopping
    _finish(stopping)


@pytest.fixture
def start_worker(_stopping_workers: list[WorkerProcess]) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``WorkerProcess``es that are stopped (by PID) when the test ends.

    A warm shutdown takes an idle worker about 1.5 s (each pool process lingers a second after it
    exits), so the test's workers are only sent SIGTERM when it ends, side by side, and waited for
    (``finish``: SIGKILL after 15 s, leftover children, runtime directories, logs) when the next
    test that starts workers ends, or at the end of the session. They stop consuming at once, and
    each test has its own Redis database or RabbitMQ queue.
    """
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
        w.request_stop()
    previous = list(_stopping_workers)  # they had this whole test to stop
    _stopping_workers[:] = started
    _finish(previous)


def ready(client_app, *workers: WorkerProcess) -> None:
    """Wait for workers started with ``wait=False``: they start (import, fork) side by side."""
    for w in workers:
        w.wait_ready(client_app)


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
