#!/usr/bin/env python3
"""How soon a started worker counts as ready in the test harness (``rmq.testing.worker``), two ways
side by side in one run, interleaved.

- ``ping``: what the harness did before: a ``control.ping`` (0.5 s reply timeout) every 0.2 s until
  one is answered. A ping sent before the worker listens is lost and costs its whole timeout.
- ``log``: ``WorkerProcess.wait_ready``: watch the worker's log for Celery's ``<node> ready.`` line
  (every 50 ms), then ping; without the line, a ping every second.

Each round starts one worker (``-A drainapp``, 2 pool processes) per way, measures start to ready,
then stops it (warm shutdown, also timed). Printed: the medians, means and the ratio of medians
log/ping. The gain shows on a loaded machine (a lost ping is more likely when the worker starts
slowly); ``--load N`` runs N busy loops meanwhile to show it.

Usage: scripts/bench/worker_start.py [--rounds 10] [--load 0]
Redis: RMQ_BENCH_REDIS_URL, else a private ``redis-server`` on a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TESTS_DIR = os.path.join(ROOT, "tests", "integration")
for _p in (ROOT, TESTS_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from rmq.testing.redis import private_redis  # noqa: E402
from rmq.testing.worker import WorkerProcess, wait_until  # noqa: E402


def ready_by_ping(w: WorkerProcess, app: Any, timeout: float = 60.0) -> None:
    """The harness's former readiness poll: ping until answered."""

    def ready() -> bool:
        if w.proc is not None and w.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {w.proc.returncode}:\n{w.log()[-3000:]}")
        try:
            replies = app.control.ping(destination=[w.node_name], timeout=0.5) or []
        except (OSError, *app.connection_for_write().connection_errors):
            return False
        return bool(replies) and len(w.pool_pids()) >= min(1, w.concurrency)

    wait_until(ready, timeout, interval=0.2, what=f"worker {w.node_name} to answer")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--load", type=int, default=0, help="busy loops to run meanwhile")
    args = parser.parse_args()
    from workers.app import make_app

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    url = os.environ.get("RMQ_BENCH_REDIS_URL")
    try:
        with contextlib.nullcontext(url) if url else private_redis() as broker:
            app = make_app(broker=broker, backend=broker)
            env = {"RMQ_BROKER_URL": broker, "RMQ_RESULT_BACKEND": broker, "PYTHONPATH": f"{TESTS_DIR}:{ROOT}"}
            ready: dict[str, list[float]] = {"ping": [], "log": []}
            stop: dict[str, list[float]] = {"ping": [], "log": []}
            for i in range(args.rounds):
                ways = ("ping", "log") if i % 2 == 0 else ("log", "ping")
                for way in ways:
                    w = WorkerProcess(app="drainapp", env=env, concurrency=2, cwd=ROOT)
                    started = time.monotonic()
                    w.start()
                    try:
                        if way == "ping":
                            ready_by_ping(w, app)
                        else:
                            w.wait_ready(app)
                        ready[way].append(time.monotonic() - started)
                        stopping = time.monotonic()
                        w.stop()
                        stop[way].append(time.monotonic() - stopping)
                    finally:
                        w.finish()
            app.close()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    print(f"{args.rounds} rounds, {args.load} busy loops meanwhile")
    print(f"{'way':6} {'ready median':>13} {'ready mean':>11} {'warm stop median':>17}")
    for way in ("ping", "log"):
        print(f"{way:6} {statistics.median(ready[way]):12.2f}s {statistics.mean(ready[way]):10.2f}s "
              f"{statistics.median(stop[way]):16.2f}s")
    ratio = statistics.median(ready["log"]) / statistics.median(ready["ping"])
    print(f"ratio of medians log/ping: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
