"""The worker's alert wiring: the sinks a layer above hands to ``MonitoringConcern`` receive its alerts."""

from __future__ import annotations

from types import SimpleNamespace

from rmq.core.config import load_config
from rmq.monitoring.alerts import Alert
from rmq.monitoring.sinks import log_sink
from rmq.monitoring.worker_monitor import MonitoringConcern


class Stats:
    def __init__(self) -> None:
        self.counters: dict[str, int] = {}

    def incr(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n


def test_monitoring_concern_runs_the_extra_sinks_after_the_log_and_before_the_event(events_app):
    got: list[Alert] = []

    def extra(alert: Alert) -> None:
        got.append(alert)

    rt = SimpleNamespace(config=load_config({}, {}), app=events_app, stats=Stats(), snapshot_parts={})
    concern = MonitoringConcern(extra_sinks=[extra])
    concern.worker_boot(rt, SimpleNamespace(hostname="w1@box"))
    concern.worker_start(rt)
    try:
        engine = concern.monitor.engine
        alert = Alert("memory", 0.9, 0.85, "memory at 90% of budget", 1234.5, "w1@box")
        engine.dispatch([alert])
    finally:
        concern.worker_stop(rt)

    assert engine.sinks[1:3] == [log_sink, extra]
    assert got == [alert]
    assert events_app.sent() == [("rmq-alert", {k: v for k, v in alert.as_dict().items() if k != "hostname"})]
    assert rt.stats.counters["alerts"] == 1
    assert engine.sink_errors == 0
    assert rt.snapshot_parts["alerting"]()["raised"] == {"memory": 1}


def test_monitoring_concern_without_extra_sinks_sends_log_and_event_only(events_app):
    rt = SimpleNamespace(config=load_config({}, {}), app=events_app, stats=Stats(), snapshot_parts={})
    concern = MonitoringConcern()
    concern.worker_boot(rt, SimpleNamespace(hostname="w1@box"))
    concern.worker_start(rt)
    try:
        concern.monitor.engine.dispatch([Alert("cpu", 95.0, 90.0, "cpu at 95%", 1.0, "w1@box")])
    finally:
        concern.worker_stop(rt)

    assert len(concern.monitor.engine.sinks) == 3  # count, log, event
    assert [name for name, _ in events_app.sent()] == ["rmq-alert"]
