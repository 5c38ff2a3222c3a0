"""The cluster view's alerts reach the log, the sinks its caller hands in, and the ``rmq-alert`` event."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rmq.core.config import load_config
from rmq.monitoring import cluster
from rmq.monitoring.alerts import Alert


class FakeRedis:
    def __init__(self, stored: dict[str, Any] | None) -> None:
        self.stored = None if stored is None else json.dumps(stored)
        self.closed = False

    def get(self, key: str) -> str | None:
        return self.stored

    def set(self, key: str, value: str, ex: int) -> None:
        self.stored = value

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def monitored(monkeypatch, events_app):
    """An app whose one worker consumes ``celery``, while ``orphan`` held messages one view ago too."""
    events_app._rmq_config = load_config({}, {})
    previous = {"history": {"depths": {"orphan": [5]}, "unconsumed": {"orphan": 1}, "active": {}, "raised_at": {}}}
    redis = FakeRedis(previous)
    monkeypatch.setattr(cluster, "_redis", lambda app: redis)
    monkeypatch.setattr(cluster, "_gather", lambda app, timeout: ({"w1@box": {}}, {"celery": ["w1@box"]}))
    monkeypatch.setattr(cluster, "queue_depths", lambda app, names, discover=False: {"celery": 0, "orphan": 4})
    return events_app, redis


def test_cluster_alerts_go_to_the_extra_sinks_and_the_event(monitored):
    app, redis = monitored
    got: list[Alert] = []

    view = cluster.collect_cluster_view(app, timeout=0.1, hostname="beat@box", extra_sinks=[got.append])

    assert [(a.name, a.subject, a.hostname) for a in got] == [("queue_unconsumed", "orphan", "cluster")]
    assert [(name, fields["subject"]) for name, fields in app.sent()] == [("rmq-alert", "orphan")]
    assert app.dispatchers[0].hostname == "beat@box" and app.dispatchers[0].closed
    assert [a["subject"] for a in view["alerts"]] == ["orphan"]
    assert json.loads(redis.stored)["alerts"] == view["alerts"] and redis.closed


def test_cluster_alerts_without_extra_sinks_still_go_to_the_event(monitored):
    app, _ = monitored

    cluster.collect_cluster_view(app, timeout=0.1, hostname="beat@box")

    assert [name for name, _ in app.sent()] == ["rmq-alert"]
