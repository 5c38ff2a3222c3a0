"""Prometheus exposition: real scrapes of start_metrics_server, parsed with prometheus_client's parser."""

from __future__ import annotations

import copy
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rmq.monitoring.metrics import start_metrics_server, stop_metrics_server

SNAPSHOT: dict[str, Any] = {
    "hostname": "w1@box",
    "pid": 4242,
    "time": 1_700_000_000.0,
    "memory": {
        "budget_bytes": 4 << 30,
        "budget_source": "cgroup-v2",
        "worker_bytes": 3 << 30,
        "children": {"101": 1 << 30, "102": 2 << 30},
        "cgroup_working_set_bytes": None,
        "ratio": 0.75,
        "zone": "unload",
        "lines": {"unload": 3 << 30, "kill": 4 << 30},
        "oom_kills": 2,
        "accounting": "cgroup",
    },
    "cpu": {"slots": 4, "slots_used": 3, "percent": 71.5, "load1": 2.5},
    "disk": {"root": "/srv/sessions", "total_bytes": 100, "used_bytes": 50, "free_bytes": 50, "ratio": 0.5},
    "network": {"sent_bytes_per_s": 1024, "recv_bytes_per_s": 2048},
    "paused": True,
    "paused_queues": ["heavy"],
    "consumed_queues": ["heavy"],
    "paused_seconds": 12.5,
    "pool_slots": {"101": 0, "102": 1},
    "reservations": [{"pid": 101, "task_id": "t1", "memory_bytes": 512, "cpu_slots": 1, "disk_bytes": 0}],
    "processes": {
        "101": {"models": [{"name": "bert", "size_bytes": 400}], "hygiene": {"baseline_bytes": 5000}}
    },
    "counters": {
        "admitted": 120,
        "deferred": {"memory": 3, "cpu": 1},
        "killed": 1,
        "unloaded": 2,
        "sessions_cleaned": 5,
        "alerts": 1,
        "models": {"hits": 10, "misses": 2, "loads": 2, "evictions": {"pressure": 1, "lru": 2}},
        "http": {"api": {"requests": 7, "errors": 1}},
        "hygiene": {"runs": 9},
        "rate_limits": {"api": {"granted": 4}},
    },
    "alerts": ["memory"],
}


@pytest.fixture
def served() -> Iterator[tuple[dict[str, Any], int]]:
    """A metrics server on a free port serving a snapshot the test may change between scrapes."""
    holder = {"snapshot": copy.deepcopy(SNAPSHOT)}
    server, thread, port = start_metrics_server(0, lambda: holder["snapshot"])
    try:
        yield holder, port
    finally:
        stop_metrics_server(server)
        thread.join(5)


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_scrape_shows_snapshot_counters_and_gauges(served):
    _holder, port = served
    assert port > 0

    m = scrape(port)

    assert m["rmq_up"][()] == 1
    assert m["rmq_admitted_total"][()] == 120
    assert m["rmq_deferred_total"] == {(("reason", "memory"),): 3, (("reason", "cpu"),): 1}
    assert m["rmq_killed_total"][()] == 1
    assert m["rmq_unloaded_total"][()] == 2
    assert m["rmq_sessions_cleaned_total"][()] == 5
    assert m["rmq_alerts_total"][()] == 1
    assert m["rmq_models_hits_total"][()] == 10
    assert m["rmq_models_evictions_total"] == {(("reason", "lru"),): 2, (("reason", "pressure"),): 1}
    assert m["rmq_http_requests_total"] == {(("client", "api"),): 7}
    assert m["rmq_hygiene_runs_total"][()] == 9
    assert m["rmq_memory_budget_bytes"][()] == 4 << 30
    assert m["rmq_memory_worker_bytes"][()] == 3 << 30
    assert m["rmq_memory_ratio"][()] == 0.75
    # per-process gauges carry the pool slot, which a recycled process's replacement keeps
    assert m["rmq_memory_child_bytes"] == {(("process", "0"),): 1 << 30, (("process", "1"),): 2 << 30}
    assert m["rmq_memory_line_bytes"] == {(("line", "unload"),): 3 << 30, (("line", "kill"),): 4 << 30}
    assert m["rmq_memory_oom_kills_total"][()] == 2 and "rmq_memory_oom_kills" not in m
    assert m["rmq_memory_accounting_info"] == {(("mode", "cgroup"),): 1}
    assert m["rmq_paused_seconds_total"][()] == 12.5
    assert m["rmq_queue_consumer"] == {(("queue", "heavy"),): 1}
    assert m["rmq_memory_zone"][(("zone", "unload"),)] == 1
    assert m["rmq_memory_zone"][(("zone", "ok"),)] == 0
    assert "rmq_memory_cgroup_working_set_bytes" not in m  # None is absent, not 0
    assert m["rmq_cpu_slots"][()] == 4
    assert m["rmq_cpu_slots_used"][()] == 3
    assert m["rmq_cpu_percent"][()] == 71.5
    assert m["rmq_disk_ratio"][()] == 0.5
    assert m["rmq_network_recv_bytes_per_s"][()] == 2048
    assert m["rmq_paused"][()] == 1
    assert m["rmq_reservations"][()] == 1
    assert m["rmq_alert_active"] == {(("alert", "memory"),): 1}
    assert m["rmq_models_loaded"] == {(("process", "0"),): 1}
    assert m["rmq_models_bytes"] == {(("process", "0"),): 400}
    assert m["rmq_hygiene_baseline_bytes"] == {(("process", "0"),): 5000}
    assert m["rmq_rate_limits_granted_total"] == {(("limit", "api"),): 4}
    assert m["rmq_reserved_memory_bytes"][()] == 512


def test_a_replacement_process_keeps_the_slot_label_and_unknown_slots_fall_back_to_the_pid(served):
    holder, port = served
    # Given the process in slot 0 was recycled: pid 103 replaced pid 101 in the same slot
    snap = holder["snapshot"]
    snap["memory"]["children"] = {"103": 5 << 20, "102": 2 << 30, "104": 1 << 20}
    snap["pool_slots"] = {"103": 0, "102": 1}
    snap["processes"] = {"103": {"models": []}}

    m = scrape(port)

    # Then the series of slot 0 goes on under the same label; a process the pool does not list shows its pid
    assert m["rmq_memory_child_bytes"] == {
        (("process", "0"),): 5 << 20, (("process", "1"),): 2 << 30, (("process", "pid-104"),): 1 << 20
    }
    assert m["rmq_models_loaded"] == {(("process", "0"),): 0}
    # and a snapshot without an accounting mode reports /proc accounting
    del snap["memory"]["accounting"]
    assert scrape(port)["rmq_memory_accounting_info"] == {(("mode", "proc"),): 1}


def test_each_scrape_reads_a_fresh_snapshot_and_new_counters_appear_without_code(served):
    holder, port = served
    assert scrape(port)["rmq_admitted_total"][()] == 120

    snap = copy.deepcopy(SNAPSHOT)
    snap["counters"]["admitted"] = 121
    snap["counters"]["widgets"] = {"spun": 3, "by_colour": {"red": 2}, "name": "not a number"}
    holder["snapshot"] = snap
    m = scrape(port)

    assert m["rmq_admitted_total"][()] == 121
    assert m["rmq_widgets_spun_total"][()] == 3
    assert m["rmq_widgets_by_colour_red_total"][()] == 2


def test_a_failing_snapshot_still_answers_with_up_zero():
    def broken() -> dict:
        raise RuntimeError("governor gone")

    server, thread, port = start_metrics_server(0, broken)
    try:
        m = scrape(port)
    finally:
        stop_metrics_server(server)
        thread.join(5)
    assert m["rmq_up"][()] == 0
    assert "rmq_admitted_total" not in m


def test_a_malformed_snapshot_answers_with_up_zero(served):
    holder, port = served
    holder["snapshot"]["memory"] = "garbage"
    m = scrape(port)
    assert m["rmq_up"][()] == 0
    assert "rmq_admitted_total" not in m


def test_name_clash_between_a_counter_and_a_gauge_does_not_break_the_scrape(served):
    holder, port = served
    holder["snapshot"]["counters"]["memory"] = {"ratio": 7}  # would be family rmq_memory_ratio too
    m = scrape(port)
    assert m["rmq_memory_ratio"][()] == 0.75
    assert m["rmq_admitted_total"][()] == 120


def test_uses_its_own_registry_and_stops():
    server, thread, port = start_metrics_server(0, lambda: SNAPSHOT)
    try:
        assert scrape(port)["rmq_admitted_total"][()] == 120
        global_names = {f.name for f in prometheus_client.REGISTRY.collect()}
        assert not any(name.startswith("rmq_") for name in global_names)
    finally:
        stop_metrics_server(server)
        thread.join(5)
    assert not thread.is_alive()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
