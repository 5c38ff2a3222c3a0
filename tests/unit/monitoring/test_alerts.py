"""Alert rules and the engine."""

from __future__ import annotations

import logging

import pytest

from rmq.core.config import load_config
from rmq.monitoring.alerts import (
    Alert,
    AlertEngine,
    AlertRule,
    rules_from_config,
)


def feed(rule: AlertRule, values: list[float], start: float = 1000.0, step: float = 1.0) -> list[Alert]:
    alerts = []
    for i, value in enumerate(values):
        alert = rule.update(value, start + i * step)
        if alert is not None:
            alerts.append(alert)
    return alerts


# --- rules -------------------------------------------------------------------------------------------


def test_crossing_staying_dipping_within_hysteresis_and_crossing_again_raises_exactly_one_alert():
    rule = AlertRule("memory", threshold=0.85, hysteresis=0.05, cooldown_s=0)

    alerts = feed(rule, [0.50, 0.86, 0.90, 0.88, 0.83, 0.81, 0.87, 0.95])

    assert len(alerts) == 1
    assert (alerts[0].name, alerts[0].value, alerts[0].threshold, alerts[0].level) == (
        "memory",
        0.86,
        0.85,
        "warning",
    )
    assert alerts[0].time == 1001.0
    assert rule.active


def test_hysteresis_rearms_only_below_threshold_minus_hysteresis():
    rule = AlertRule("memory", threshold=0.85, hysteresis=0.05, cooldown_s=0)
    assert len(feed(rule, [0.86])) == 1

    assert feed(rule, [0.79], start=2000) == []
    assert not rule.active  # resolved

    again = feed(rule, [0.86], start=3000)
    assert [a.time for a in again] == [3000.0]
    assert rule.active


def test_crossing_within_cooldown_raises_nothing_then_raises_once_if_still_high_after_it():
    rule = AlertRule("disk", threshold=0.8, hysteresis=0.05, cooldown_s=60)
    assert rule.update(0.9, now=0) is not None
    assert rule.update(0.5, now=10) is None  # re-armed
    assert rule.update(0.9, now=20) is None  # new crossing inside the cool-down
    assert rule.update(0.95, now=59) is None
    assert rule.suppressed == 1
    assert rule.active

    late = rule.update(0.9, now=61)  # cool-down over, condition still in effect
    assert late is not None and late.time == 61
    assert rule.update(0.9, now=200) is None  # and only once


def test_crossing_within_cooldown_that_resolves_is_never_raised():
    rule = AlertRule("disk", threshold=0.8, hysteresis=0.05, cooldown_s=60)
    assert rule.update(0.9, now=0) is not None
    assert rule.update(0.5, now=10) is None
    assert rule.update(0.9, now=20) is None
    assert rule.update(0.5, now=30) is None
    assert rule.update(0.5, now=100) is None
    assert rule.update(0.9, now=110) is not None  # a fresh crossing after the cool-down


def test_rules_from_config_use_settings_and_cpu_hysteresis_in_points():
    config = load_config(
        {"rmq_alert_cpu_percent": 90, "rmq_alert_hysteresis": 0.05, "rmq_alert_cooldown": "0s"}, {}
    )
    rules = {rule.name: rule for rule in rules_from_config(config)}
    assert (rules["memory"].threshold, rules["memory"].hysteresis) == (0.85, 0.05)
    assert (rules["disk"].threshold, rules["disk"].hysteresis) == (0.80, 0.05)
    assert (rules["cpu"].threshold, rules["cpu"].hysteresis) == (90.0, pytest.approx(5.0))

    # 86 % is within 5 points of 90: no re-arm, so the second crossing raises nothing; 84 re-arms.
    alerts = feed(rules["cpu"], [91, 86, 91, 84, 92])
    assert [a.value for a in alerts] == [91, 92]
    assert alerts[0].message == "cpu at 91% (alert at 90%)"


# --- engine --------------------------------------------------------------------------------------


def make_engine(sinks) -> AlertEngine:
    rules = [AlertRule("memory", 0.85, 0.05, 0), AlertRule("cpu", 90, 5, 0)]
    return AlertEngine(rules, sinks, hostname="w1@box", clock=lambda: 5000.0)


def test_engine_dispatches_new_alerts_to_every_sink_and_counts_them(caplog):
    got: list[Alert] = []

    def broken(alert: Alert) -> None:
        raise RuntimeError("sink down")

    engine = make_engine([broken, got.append])
    caplog.set_level(logging.WARNING, logger="rmq.monitoring.alerts")

    first = engine.tick({"memory": 0.9, "cpu": 50, "disk": None})
    engine.tick({"memory": 0.95, "cpu": 95})  # memory stays high: only cpu is new
    engine.tick({"cpu": 10})  # memory reading missing: its rule is untouched

    assert [a.name for a in first] == ["memory"]
    assert [(a.name, a.hostname, a.time) for a in got] == [
        ("memory", "w1@box", 5000.0),
        ("cpu", "w1@box", 5000.0),
    ]
    assert engine.raised == {"memory": 1, "cpu": 1}
    assert engine.total == 2
    assert engine.active() == ["memory"]
    assert engine.sink_errors == 2
    assert engine.info()["active"] == ["memory"]
