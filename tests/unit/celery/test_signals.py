"""The alert signal: its sink sends ``rmq.celery.signals.alert``, and the Celery layer hands that sink to
monitoring, both to the worker's monitoring concern and to the ``rmq.monitor`` beat task's cluster view."""

from __future__ import annotations

from typing import Any

from rmq.celery import beat, signals
from rmq.celery.concerns import default_concerns
from rmq.celery.signals import signal_sink
from rmq.monitoring.alerts import Alert
from rmq.monitoring.worker_monitor import MonitoringConcern


def test_signal_sink_sends_the_alert_signal_with_the_hostname_as_sender():
    received: list[tuple[object, dict]] = []

    def receiver(sender: object, alert: dict, **kwargs: Any) -> None:
        received.append((sender, alert))

    alert = Alert("memory", 0.9, 0.85, "memory at 90% of budget", 1234.5, "w1@box")
    signals.alert.connect(receiver, weak=False)
    try:
        signal_sink(alert)
    finally:
        signals.alert.disconnect(receiver)

    assert received == [("w1@box", alert.as_dict())]


def test_the_worker_monitoring_concern_gets_the_signal_sink():
    [monitoring] = [c for c in default_concerns() if isinstance(c, MonitoringConcern)]
    assert monitoring.extra_sinks == (signal_sink,)


def test_the_monitor_beat_task_gives_the_signal_sink_to_the_cluster_view(monkeypatch):
    from rmq.monitoring import cluster

    calls: list[dict[str, Any]] = []

    def collect(app: Any, timeout: float = 5.0, **kwargs: Any) -> dict[str, Any]:
        calls.append({"timeout": timeout, **kwargs})
        return {"alerts": []}

    monkeypatch.setattr(cluster, "collect_cluster_view", collect)

    assert beat.monitor(timeout=1.5) == {"alerts": []}
    assert calls == [{"timeout": 1.5, "extra_sinks": (signal_sink,)}]
