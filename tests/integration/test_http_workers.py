"""HTTP clients on real Celery workers: rate, connection reuse and bytes per client name."""

from __future__ import annotations

import pytest

from rmq.testing.worker import wait_until
from workers.fake_api import start_in_thread

from .conftest import ready, taskapp_env

pytestmark = pytest.mark.integration


def test_two_workers_share_one_rate_reuse_connections_and_count_bytes(redis_url, start_worker):
    import sys

    from .conftest import TESTS_DIR

    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import httpapp  # noqa: F401  (registers h.call)

    from workers.app import make_app

    api = start_in_thread()  # no server-side limit: it only counts
    app = make_app(broker=redis_url, backend=redis_url)
    try:
        env = {**taskapp_env(redis_url, max_deferrals=100), "HTTPAPP_URL": api.url}
        workers = [start_worker(app, app="httpapp", env=env, concurrency=2, wait=False) for _ in range(2)]
        ready(app, *workers)
        results = [app.tasks["h.call"].delay(i) for i in range(20)]
        done = [r.get(timeout=120) for r in results]
        assert [d["translation"] for d in done] == [f"hello {i}"[::-1] for i in range(20)]
        assert len({d["pid"] for d in done}) >= 2  # more than one process really called
        seen = api.stats()
        assert seen["requests"] == 20 and seen["status_429"] == 0
        assert seen["max_in_any_1s"] <= 5, seen["windows"]
        assert seen["connections_opened"] <= 8  # one pooled client per pool process, reused

        def counted() -> tuple[int, int]:
            totals = [0, 0]
            for w in workers:
                stats = app.control.inspect(destination=[w.node_name], timeout=3).stats()[w.node_name]["rmq"]
                per_name = (stats["counters"].get("http") or {}).get("api", {})
                totals[0] += int(per_name.get("sent_bytes", 0))
                totals[1] += int(per_name.get("recv_bytes", 0))
            return totals[0], totals[1]

        sent, recv = wait_until(lambda: (c := counted())[0] >= seen["bytes_received"] * 0.95 and c, 10,
                                what="the workers' byte counters")
        assert abs(sent - seen["bytes_received"]) <= 0.05 * seen["bytes_received"]
        assert abs(recv - seen["bytes_sent"]) <= 0.05 * seen["bytes_sent"]
    finally:
        app.close()
        api.stop()
