"""Cluster checks on consecutive cluster views: a growing backlog, a queue nobody consumes."""

from __future__ import annotations

import json

from rmq.monitoring.alerts import Alert
from rmq.monitoring.cluster_checks import active_cluster_alerts, cluster_alerts


def run_views(views: list[dict], **kwargs) -> list[list[Alert]]:
    """Feed views in order, passing each stored (JSON round-tripped) view as the previous one."""
    previous, out = None, []
    for view in views:
        out.append(cluster_alerts(previous, view, **kwargs))
        previous = json.loads(json.dumps(view))
    return out


def test_backlog_growing_raises_once_while_it_grows_and_again_after_it_recovers():
    depths = [1, 3, 7, 9, 5, 6, 8, 11]
    views = [{"time": 100.0 * i, "workers": {}, "queues": {"celery": d}} for i, d in enumerate(depths)]

    results = run_views(views, growth_views=3)

    raised = [(i, a.name, a.subject, a.value) for i, alerts in enumerate(results) for a in alerts]
    assert raised == [(2, "backlog_growing", "celery", 7), (6, "backlog_growing", "celery", 8)]
    assert "1 -> 3 -> 7" in results[2][0].message
    assert results[2][0].hostname == "cluster"
    assert [a["subject"] for a in active_cluster_alerts(views[3])] == ["celery"]
    assert active_cluster_alerts(views[4]) == []


def test_backlog_growing_respects_cooldown():
    depths = [1, 2, 3, 1, 2, 3, 4]
    views = [{"time": 10.0 * i, "queues": {"q": d}} for i, d in enumerate(depths)]
    results = run_views(views, growth_views=3, cooldown_s=1000)
    assert [len(r) for r in results] == [0, 0, 1, 0, 0, 0, 0]


def test_queue_without_a_live_consumer_raises_after_two_views():
    def view(t: float, depth: int) -> dict:
        return {
            "time": t,
            "workers": {"w1": {"paused_queues": ["heavy"]}, "w2": None},
            "queues": {"celery": depth, "orphan": depth, "ghost": depth, "heavy": depth, "empty": 0},
            # "ghost" is consumed only by a worker that is no longer alive
            "consumers": {"celery": ["w1"], "ghost": ["w9"]},
        }

    results = run_views([view(0, 5), view(60, 5), view(120, 4)], growth_views=5)

    assert results[0] == []
    assert sorted((a.name, a.subject) for a in results[1]) == [
        ("queue_unconsumed", "ghost"),
        ("queue_unconsumed", "orphan"),
    ]
    assert results[2] == []  # still true, already raised


def test_no_consumer_information_means_no_unconsumed_check():
    views = [{"time": t, "workers": {}, "queues": {"q": 5}} for t in (0, 60, 120)]
    assert run_views(views) == [[], [], []]
