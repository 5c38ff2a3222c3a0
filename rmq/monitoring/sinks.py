"""Where alerts go: the log, the Celery event ``rmq-alert``, and the default list of sinks.

A sink is any callable taking an :class:`~rmq.monitoring.alerts.Alert`; the engine calls each in
turn and counts a failing one without stopping the others. The webhook is a sink too
(:class:`~rmq.monitoring.webhook.WebhookSender`). Sinks that belong to the layer above, such as
the in-process signal the Celery layer sends (``rmq.celery.signals.signal_sink``), are handed in
by that layer as ``extra_sinks``: monitoring does not import it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from rmq.monitoring.alerts import Alert, Sink

__all__ = ["EventSender", "default_sinks", "event_sink", "log_sink"]

#: the logger of every alert delivery, so one name covers all of them in a logging config
logger = logging.getLogger("rmq.monitoring.alerts")

#: a failing broker delays one event by at most about a second
_EVENT_RETRY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.5, "interval_max": 0.5}


def log_sink(alert: Alert) -> None:
    """Log the alert at WARNING on logger ``rmq.monitoring.alerts``."""
    where = f"{alert.hostname}/{alert.subject}" if alert.subject else alert.hostname or "-"
    logger.warning("rmq alert %s on %s: %s", alert.name, where, alert.message)


def event_sink(send_event: Callable[[dict[str, Any]], Any]) -> Sink:
    """Wrap ``send_event(fields)`` (one that sends Celery event ``rmq-alert``) as a sink.

    ``fields`` is ``alert.as_dict()`` without ``hostname``: Celery's event dispatcher stamps its
    own and refuses a second one.
    """

    def sink(alert: Alert) -> None:
        fields = alert.as_dict()
        del fields["hostname"]
        send_event(fields)

    return sink


class EventSender:
    """Sends the Celery event ``rmq-alert`` on a connection of its own.

    Its own dispatcher (enabled, no group filter) sends even on workers started without
    ``-E``, and it never shares a connection with the worker's event loop.

    Args:
        app: the Celery app.
        hostname: the worker's node name, stamped on each event by Celery.
    """

    def __init__(self, app: Any, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self._dispatcher: Any = None
        self._lock = threading.Lock()

    def __call__(self, fields: dict[str, Any]) -> None:
        """Send one event with ``fields``; on a broker error reconnect next time and re-raise."""
        with self._lock:
            if self._dispatcher is None:
                self._dispatcher = self.app.events.Dispatcher(
                    self.app.connection_for_write(), hostname=self.hostname, enabled=True,
                    buffer_while_offline=False,
                )
            try:
                self._dispatcher.send("rmq-alert", retry=True, retry_policy=_EVENT_RETRY, **fields)
            except Exception:
                self._close()
                raise

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            connection = dispatcher.connection
            dispatcher.close()
            with contextlib.suppress(*connection.connection_errors, *connection.channel_errors):
                connection.release()


def default_sinks(
    send_event: Callable[[dict[str, Any]], Any] | None = None,
    webhook: Sink | None = None,
    extra_sinks: Iterable[Sink] = (),
) -> list[Sink]:
    """The sinks in the order they run: the log, ``extra_sinks``, then, when given, the webhook and
    the Celery event callable (wrapped by :func:`event_sink`).

    The webhook only queues, while sending the event may wait on the broker, so the event goes last
    and a slow broker delays no other sink.
    """
    sinks: list[Sink] = [log_sink, *extra_sinks]
    if webhook is not None:
        sinks.append(webhook)
    if send_event is not None:
        sinks.append(event_sink(send_event))
    return sinks
