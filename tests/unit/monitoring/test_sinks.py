"""Where alerts go: the log, the sinks the caller hands in, the webhook and the Celery event, in that order."""

from __future__ import annotations

import logging

from celery.events import Event

from rmq.monitoring.alerts import Alert, AlertEngine, AlertRule
from rmq.monitoring.sinks import EventSender, default_sinks, log_sink


def make_engine(sinks) -> AlertEngine:
    return AlertEngine([AlertRule("memory", 0.85, 0.05, 0)], sinks, hostname="w1@box", clock=lambda: 5000.0)


def test_default_sinks_log_then_extra_sinks_then_webhook_then_event(caplog):
    calls: list[tuple[str, object]] = []
    events: list[dict] = []

    def extra(alert: Alert) -> None:
        calls.append(("extra", alert))

    def webhook(alert: Alert) -> None:
        calls.append(("webhook", alert))

    def send_event(fields: dict) -> None:
        calls.append(("event", fields))
        events.append(fields)

    sinks = default_sinks(send_event, webhook, extra_sinks=[extra])
    caplog.set_level(logging.WARNING, logger="rmq.monitoring.alerts")
    make_engine(sinks).tick({"memory": 0.9})

    assert sinks[0] is log_sink
    assert [what for what, _ in calls] == ["extra", "webhook", "event"]  # the broker may be slow: event last
    alert = calls[0][1]
    assert isinstance(alert, Alert) and alert.hostname == "w1@box" and alert.value == 0.9
    assert events == [{k: v for k, v in alert.as_dict().items() if k != "hostname"}]
    # the fields fit Celery's event constructor, which the dispatcher calls with its own hostname
    event = Event("rmq-alert", hostname="w1@box", pid=1, clock=1, utcoffset=0, **events[0])
    assert event["type"] == "rmq-alert" and event["name"] == "memory"
    warnings = [r for r in caplog.records if r.name == "rmq.monitoring.alerts" and r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1 and "memory" in warnings[0].getMessage() and "w1@box" in warnings[0].getMessage()
    )


def test_default_sinks_alone_only_log():
    assert default_sinks() == [log_sink]


def test_event_sender_sends_rmq_alert_on_one_connection_and_releases_it_on_close(events_app):
    app = events_app
    sender = EventSender(app, "w1@box")

    sender({"name": "memory"})
    sender({"name": "cpu"})
    sender.close()

    assert len(app.dispatchers) == 1
    dispatcher = app.dispatchers[0]
    assert dispatcher.hostname == "w1@box"
    assert dispatcher.sent == [("rmq-alert", {"name": "memory"}), ("rmq-alert", {"name": "cpu"})]
    assert dispatcher.closed and dispatcher.connection.released
