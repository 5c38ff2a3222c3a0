"""Worker-side monitoring: resource alerts every second and the opt-in Prometheus endpoint.

Wired by :class:`MonitoringConcern`. In the worker's main process a daemon thread feeds cheap
readings (memory ratio from the ledger's control block, host CPU from ``psutil.cpu_times``
deltas, disk usage of the session root) to an :class:`~rmq.monitoring.alerts.AlertEngine` whose
sinks are the log, the sinks the Celery layer hands in (the ``rmq.celery.signals.alert`` signal),
the optional webhook and the Celery event ``rmq-alert``. The thread does not depend on the
governor's loop, so a slow tick there never delays an alert and an alert sink never delays a kill.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psutil

from rmq.concern import Concern
from rmq.core.errors import ConfigError
from rmq.core.exits import exit_config_error
from rmq.core.periodic import PeriodicThread
from rmq.core.runtime import Runtime
from rmq.monitoring.alerts import Alert, AlertEngine, Sink, rules_from_config
from rmq.monitoring.sinks import EventSender, default_sinks
from rmq.monitoring.webhook import WebhookSender

__all__ = ["AlertLoop", "CpuProbe", "MonitoringConcern", "WorkerMonitor", "disk_ratio"]

log = logging.getLogger("rmq.monitoring.worker_monitor")

#: seconds between two alert evaluations
ALERT_INTERVAL_S = 1.0
#: where the metrics endpoint listens unless ``rmq_metrics_addr`` says otherwise
DEFAULT_METRICS_ADDR = "127.0.0.1"


class CpuProbe:
    """Host CPU busy percent since the previous call, from ``cpu_times`` deltas.

    Keeps its own baseline: ``psutil.cpu_percent(None)`` shares one module-wide baseline with
    the snapshot, and two callers would shorten each other's interval.

    Args:
        read_times: returns an object with the ``psutil.cpu_times()`` fields (injected in tests).
    """

    def __init__(self, read_times: Callable[[], Any] = psutil.cpu_times) -> None:
        self.read_times = read_times
        self._last: tuple[float, float] | None = None

    def __call__(self) -> float | None:
        """Percent busy (0-100) since the last call; None on the first call or a zero interval."""
        times = self.read_times()
        total = sum(times)
        idle = times.idle + getattr(times, "iowait", 0.0)
        last, self._last = self._last, (total, idle)
        if last is None or total <= last[0]:
            return None
        return round(100.0 * (1.0 - (idle - last[1]) / (total - last[0])), 1)


def disk_ratio(root: str) -> float | None:
    """Used fraction of the filesystem holding ``root`` (its parent if it does not exist yet)."""
    probe = root if os.path.isdir(root) else os.path.dirname(root) or "/"
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return None
    return usage.used / usage.total if usage.total else None


def worker_readings(rt: Runtime, cpu: Callable[[], float | None]) -> Callable[[], dict[str, float | None]]:
    """A reader of ``{"memory": ratio, "cpu": percent, "disk": ratio}`` for one worker."""

    def read() -> dict[str, float | None]:
        control = rt.ledger.read_control()
        memory = None
        if control.budget_bytes > 0 and control.sample_time > 0:  # no sample yet: no opinion
            memory = control.worker_bytes / control.budget_bytes
        return {"memory": memory, "cpu": cpu(), "disk": disk_ratio(rt.config.session_root_path)}

    return read


class AlertLoop:
    """Evaluates an engine on a daemon thread every ``interval_s``.

    Args:
        engine: the alert engine (its sinks run on this thread).
        read: returns the readings for :meth:`AlertEngine.tick`.
        interval_s: seconds between evaluations.
    """

    def __init__(
        self,
        engine: AlertEngine,
        read: Callable[[], Mapping[str, float | None]],
        interval_s: float = ALERT_INTERVAL_S,
    ) -> None:
        self.engine = engine
        self.read = read
        self.interval_s = interval_s
        self.ticks = 0
        self.errors = 0
        self._loop = PeriodicThread("rmq-alerts", self._counted_tick, interval_s, log, "alert evaluation")

    def tick(self) -> list[Alert]:
        """One evaluation; returns the alerts it raised."""
        self.ticks += 1
        return self.engine.tick(self.read())

    def start(self) -> None:
        """Start the thread."""
        self._loop.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread (waits for the current evaluation up to ``timeout_s``)."""
        self._loop.stop(timeout_s)

    def _counted_tick(self) -> None:
        try:
            self.tick()
        except Exception:  # counted, then logged by the loop, which goes on
            self.errors += 1
            raise


class WorkerMonitor:
    """Alerts and the metrics endpoint of one worker (main process).

    Args:
        rt: the worker's runtime.
        hostname: the worker's node name.
        interval_s: seconds between alert evaluations.
        extra_sinks: sinks of the layer above, run after the log and before the webhook.

    Raises:
        ValueError: when ``rmq_alert_webhook`` is not an http(s) URL.
    """

    def __init__(
        self, rt: Runtime, hostname: str, interval_s: float = ALERT_INTERVAL_S, extra_sinks: Iterable[Sink] = ()
    ) -> None:
        self.rt = rt
        self.hostname = hostname
        self.interval_s = interval_s
        self.extra_sinks = tuple(extra_sinks)
        self.engine: AlertEngine | None = None
        self.loop: AlertLoop | None = None
        # made now, so a bad URL stops the worker before it starts; its thread starts on first use
        self.webhook = WebhookSender(rt.config.alert_webhook) if rt.config.alert_webhook else None
        self.events: EventSender | None = None
        self.metrics: dict[str, Any] = {"port": None}
        self._server: Any = None

    def start(self, rt: Runtime) -> None:
        """Main start hook: build the sinks and engine, start the loop and the endpoint."""
        config = rt.config
        self.events = EventSender(rt.app, self.hostname)
        rt.stats.incr("alerts", n=0)  # the key exists before the loop thread touches the dict
        sinks = [self._count, *default_sinks(self.events, self.webhook, self.extra_sinks)]
        self.engine = AlertEngine(rules_from_config(config), sinks, hostname=self.hostname)
        self.loop = AlertLoop(self.engine, worker_readings(rt, CpuProbe()), self.interval_s)
        self.loop.start()
        if config.metrics_port is not None:
            self._start_metrics(rt)

    def stop(self, rt: Runtime) -> None:
        """Main stop hook: stop the loop, let queued webhooks go out briefly, close the endpoint."""
        if self.loop is not None:
            self.loop.stop()
        if self.webhook is not None:
            self.webhook.stop(timeout_s=2.0)
        if self.events is not None:
            self.events.close()
        if self._server is not None:
            from rmq.monitoring.metrics import stop_metrics_server

            stop_metrics_server(self._server)
            self._server = None

    def _count(self, alert: Alert) -> None:
        self.rt.stats.incr("alerts")

    def _start_metrics(self, rt: Runtime) -> None:
        from rmq.monitoring.metrics import start_metrics_server

        addr = getattr(rt.config, "metrics_addr", None) or DEFAULT_METRICS_ADDR
        port = rt.config.metrics_port
        snapshots = rt.snapshots
        try:
            self._server, _, bound = start_metrics_server(port or 0, snapshots.scrape, addr=addr)
        except OSError as exc:  # e.g. the port is taken: the worker runs on without metrics
            self.metrics = {"port": None, "addr": addr, "error": f"cannot listen on {addr}:{port}: {exc}"}
            log.error("rmq metrics endpoint not started: cannot listen on %s:%s: %s", addr, port, exc)
            return
        self.metrics = {"port": bound, "addr": addr, "path": "/metrics"}
        log.info("rmq metrics on http://%s:%d/metrics", addr, bound)

    def active(self) -> list[str]:
        """Names of alerts in effect (the snapshot's ``alerts``)."""
        return self.engine.active() if self.engine is not None else []

    def info(self) -> dict[str, Any]:
        """Alert counters for the snapshot's ``alerting`` section."""
        if self.engine is None:
            return {}
        info: dict[str, Any] = {**self.engine.info(), "interval_s": self.interval_s}
        if self.loop is not None:
            info["evaluations"] = self.loop.ticks
            info["evaluation_errors"] = self.loop.errors
        info["thresholds"] = {name: rule.threshold for name, rule in self.engine.rules.items()}
        if self.webhook is not None:
            info["webhook"] = self.webhook.info()
        return info


class MonitoringConcern(Concern):
    """Alerts and metrics of one worker, in its main process.

    Args:
        extra_sinks: alert sinks of the layer above (the Celery layer gives its signal sink).
    """

    name = "monitoring"

    def __init__(self, extra_sinks: Iterable[Sink] = ()) -> None:
        self.extra_sinks = tuple(extra_sinks)
        self.monitor: WorkerMonitor | None = None

    def worker_boot(self, rt: Runtime, worker: Any) -> None:
        hostname = str(getattr(worker, "hostname", "") or "")
        try:
            monitor = WorkerMonitor(rt, hostname, extra_sinks=self.extra_sinks)
        except ValueError as exc:  # a bad rmq_alert_webhook: refuse to start, like any bad setting
            exit_config_error(ConfigError(f"rmq_alert_webhook: {exc}"))
        self.monitor = monitor
        rt.snapshot_parts["alerts"] = monitor.active
        rt.snapshot_parts["alerting"] = monitor.info
        rt.snapshot_parts["metrics"] = lambda: dict(monitor.metrics)

    def worker_start(self, rt: Runtime) -> None:
        if self.monitor is not None:
            self.monitor.start(rt)

    def worker_stop(self, rt: Runtime) -> None:
        if self.monitor is not None:
            self.monitor.stop(rt)
