"""Alerts: threshold rules with hysteresis and cool-down, and the engine that hands alerts to sinks.

A rule raises once per crossing: when its value reaches the threshold it raises, and it re-arms
only after the value falls below ``threshold - hysteresis``. A crossing within ``cooldown_s`` of
the last raise stays pending and is raised when the cool-down ends if the value is still at or
above the threshold, so a flapping reading never floods and a lasting one is never hidden.

The engine is pure: readings and the clock come in as arguments, and what it raises goes to the
sinks its caller gives (:mod:`rmq.monitoring.sinks`, :mod:`rmq.monitoring.webhook`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Alert",
    "AlertEngine",
    "AlertRule",
    "Sink",
    "rules_from_config",
]

logger = logging.getLogger("rmq.monitoring.alerts")


@dataclass(frozen=True)
class Alert:
    """One raised alert.

    Attributes:
        name: rule name (``"memory"``, ``"cpu"``, ``"disk"``, ``"backlog_growing"``, ...).
        value: the reading that raised it (ratio, percent or queue depth).
        threshold: the threshold it crossed.
        message: one line for people.
        time: epoch seconds when raised.
        hostname: worker hostname (``"cluster"`` for cluster-level alerts).
        level: always ``"warning"`` for now.
        subject: what the alert is about beyond the host, e.g. the queue name.
    """

    name: str
    value: float
    threshold: float
    message: str
    time: float
    hostname: str = ""
    level: str = "warning"
    subject: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the webhook body, the signal's ``alert`` and the event fields)."""
        return dataclasses.asdict(self)


Sink = Callable[[Alert], Any]


class AlertRule:
    """A threshold on one reading, raised once per crossing.

    Args:
        name: reading name, also the alert name.
        threshold: raise when the value is >= this.
        hysteresis: re-arm only when the value is < ``threshold - hysteresis`` (same unit).
        cooldown_s: minimum seconds between two raises of this rule.
        message: ``str.format`` template with ``name``, ``value`` and ``threshold``.

    Attributes:
        active: True from a crossing until the value falls below the re-arm line (the
            condition is in effect, whether or not the cool-down let it be reported).
        last_raised: epoch seconds of the last raise, or None.
        suppressed: crossings that fell within the cool-down.
    """

    def __init__(
        self,
        name: str,
        threshold: float,
        hysteresis: float = 0.0,
        cooldown_s: float = 0.0,
        message: str = "{name} at {value:.3g} (alert at {threshold:.3g})",
    ) -> None:
        if hysteresis < 0 or cooldown_s < 0:
            raise ValueError(f"alert rule {name!r}: hysteresis and cooldown_s must be >= 0")
        self.name = name
        self.threshold = float(threshold)
        self.hysteresis = float(hysteresis)
        self.cooldown_s = float(cooldown_s)
        self.message = message
        self.active = False
        self.last_raised: float | None = None
        self.suppressed = 0
        self._armed = True
        self._pending = False

    def update(self, value: float, now: float) -> Alert | None:
        """Feed one reading taken at ``now`` (epoch s); return an Alert when one is raised."""
        if value >= self.threshold:
            if self._armed:
                self._armed = False
                self.active = True
                self._pending = True
                if self.last_raised is not None and now - self.last_raised < self.cooldown_s:
                    self.suppressed += 1
            if self._pending and (self.last_raised is None or now - self.last_raised >= self.cooldown_s):
                self._pending = False
                self.last_raised = now
                text = self.message.format(name=self.name, value=value, threshold=self.threshold)
                return Alert(self.name, value, self.threshold, text, now)
        elif value < self.threshold - self.hysteresis:
            self._armed = True
            self._pending = False
            self.active = False
        return None


class AlertEngine:
    """Evaluates rules on every tick and hands new alerts to every sink.

    Args:
        rules: the rules, one per reading name.
        sinks: callables taking an :class:`Alert`; one failing sink does not stop the others.
        hostname: stamped on every alert this engine raises.
        clock: epoch-seconds clock used when ``tick`` gets no ``now``.
    """

    def __init__(
        self,
        rules: Iterable[AlertRule],
        sinks: Iterable[Sink] = (),
        hostname: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rules = {rule.name: rule for rule in rules}
        self.sinks = list(sinks)
        self.hostname = hostname
        self.clock = clock
        self.raised: dict[str, int] = {}
        self.sink_errors = 0

    def tick(self, readings: Mapping[str, float | None], now: float | None = None) -> list[Alert]:
        """Evaluate ``{"memory": ratio, "cpu": percent, "disk": ratio}``; dispatch and return new alerts.

        Readings that are missing or None leave their rule untouched.
        """
        now = self.clock() if now is None else now
        new = []
        for name, rule in self.rules.items():
            value = readings.get(name)
            if value is None:
                continue
            alert = rule.update(float(value), now)
            if alert is not None:
                new.append(dataclasses.replace(alert, hostname=self.hostname))
        self.dispatch(new)
        return new

    def dispatch(self, alerts: Iterable[Alert]) -> None:
        """Count ``alerts`` and send each to every sink (also used for cluster-level alerts)."""
        for alert in alerts:
            self.raised[alert.name] = self.raised.get(alert.name, 0) + 1
            for sink in self.sinks:
                try:
                    sink(alert)
                except Exception:
                    self.sink_errors += 1
                    logger.exception("rmq alert sink %r failed for alert %s", sink, alert.name)

    @property
    def total(self) -> int:
        """Alerts raised so far, all rules together (the snapshot's ``counters.alerts``)."""
        return sum(self.raised.values())

    def active(self) -> list[str]:
        """Names of rules whose condition is in effect now (the snapshot's ``alerts``)."""
        return sorted(name for name, rule in self.rules.items() if rule.active)

    def info(self) -> dict[str, Any]:
        """Counters for the snapshot: raised by name, total, active, suppressed, sink errors."""
        return {
            "raised": dict(self.raised),
            "total": self.total,
            "active": self.active(),
            "suppressed": {name: rule.suppressed for name, rule in self.rules.items()},
            "sink_errors": self.sink_errors,
        }


def rules_from_config(config: Any) -> list[AlertRule]:
    """The memory, cpu and disk rules from ``rmq_alert_*`` settings (an RmqConfig).

    ``alert_hysteresis`` is a fraction: used as-is for the memory and disk ratios and as
    percentage points (x 100) for cpu.
    """
    hysteresis = float(config.alert_hysteresis)
    cooldown_s = float(config.alert_cooldown)
    memory = "memory at {value:.0%} of budget (alert at {threshold:.0%})"
    cpu = "cpu at {value:.0f}% (alert at {threshold:.0f}%)"
    disk = "disk at {value:.0%} used (alert at {threshold:.0%})"
    return [
        AlertRule("memory", config.alert_memory_ratio, hysteresis, cooldown_s, memory),
        AlertRule("cpu", config.alert_cpu_percent, hysteresis * 100, cooldown_s, cpu),
        AlertRule("disk", config.alert_disk_ratio, hysteresis, cooldown_s, disk),
    ]
