"""rmq exporter's collector: real scrapes of its endpoint, the broker stood in by a function."""

from __future__ import annotations

import urllib.request

import fakeredis
from prometheus_client.parser import text_string_to_metric_families

from rmq.monitoring.exporter import QueueCollector, start_exporter
from rmq.monitoring.metrics import stop_metrics_server
from rmq.monitoring.queues import redis_priority_depths, redis_queue_depth


def _scrape(port: int) -> dict[str, dict[tuple, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_depths_per_priority_and_queues_seen_once_keep_reporting_and_a_broker_outage_says_so():
    broker = {"celery": {"0": 3, "9": 2}, "orphan": {"0": 1}}
    asked: list[list[str]] = []

    def read(names: list[str]) -> dict:
        asked.append(names)
        if broker is None:
            raise ConnectionError("broker down")
        return {q: depths for q, depths in broker.items() if q in names or sum(depths.values())}

    server, thread, port = start_exporter(QueueCollector(read, lambda: ["celery"]), 0)
    try:
        m = _scrape(port)
        assert m["rmq_queue_messages"] == {
            (("priority", "0"), ("queue", "celery")): 3, (("priority", "9"), ("queue", "celery")): 2,
            (("priority", "0"), ("queue", "orphan")): 1,
        }
        assert m["rmq_exporter_broker_up"][()] == 1
        # a queue found once (orphan) is asked for again after it drains, and reports 0
        broker["orphan"] = {"0": 0}
        m = _scrape(port)
        assert asked[-1] == ["celery", "orphan"]
        assert m["rmq_queue_messages"][(("priority", "0"), ("queue", "orphan"))] == 0
        # the broker down: the scrape answers, without depths
        broker = None
        m = _scrape(port)
        assert m["rmq_exporter_broker_up"][()] == 0 and "rmq_queue_messages" not in m
    finally:
        stop_metrics_server(server)
        thread.join(5)


def test_redis_depth_counts_every_priority_list():
    client = fakeredis.FakeRedis()
    sep = "\x06\x16"
    client.lpush("q", "a", "b")
    client.lpush(f"q{sep}3", "c")
    client.lpush(f"q{sep}9", "d", "e", "f")
    assert redis_priority_depths(client, "q", sep, [0, 3, 6, 9]) == {0: 2, 3: 1, 6: 0, 9: 3}
    assert redis_queue_depth(client, "q", sep, [0, 3, 6, 9]) == 6
