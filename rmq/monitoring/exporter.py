"""The cluster's Prometheus metrics: queue depths per queue and priority, read from the broker.

A worker's endpoint shows that worker; what belongs to no worker (messages waiting in a queue,
including one nobody consumes) comes from here, served by ``rmq exporter`` (one replica per
cluster). On Redis every priority step is a list of its own, and the depth counts them all: an
exporter that reads only the queue's base list misses every message sent with a priority, and a
scaler fed by it under-scales.

The queues: the app's configured ones, those named on the command line, those the monitor's
stored view lists, and on Redis every queue the broker has bindings for that holds messages. A
queue once seen keeps answering (0 when drained), so a dashboard shows it empty rather than gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

__all__ = ["QueueCollector", "start_exporter"]

log = logging.getLogger("rmq.monitoring.exporter")


class QueueCollector:
    """A prometheus_client collector of queue depths.

    Args:
        read_depths: ``names -> {queue: {priority: messages}}`` (for an app:
            :func:`rmq.monitoring.cluster.queue_depths_by_priority` with ``discover=True``); raises when the
            broker cannot be reached.
        queues: returns the queue names to read on each scrape (besides those seen before).
    """

    def __init__(
        self,
        read_depths: Callable[[list[str]], Mapping[str, Mapping[str, int]]],
        queues: Callable[[], Iterable[str]],
    ) -> None:
        self.read_depths = read_depths
        self.queues = queues
        self.seen: set[str] = set()
        self._lock = threading.Lock()  # two scrapes at once share the set of queues seen

    def collect(self) -> Iterator[Metric]:
        """Yield the queue depths of one read of the broker."""
        started = time.perf_counter()
        messages = GaugeMetricFamily(
            "rmq_queue_messages", "Messages waiting in a queue, per priority step (Redis) or in all (RabbitMQ)",
            labels=["queue", "priority"],
        )
        up = 1
        try:
            with self._lock:
                names = sorted(self.seen | set(self.queues()))
                depths = self.read_depths(names)
                self.seen |= set(depths)
            for queue, by_priority in sorted(depths.items()):
                for priority, count in sorted(by_priority.items()):
                    messages.add_metric([queue, str(priority)], float(count))
        except Exception:  # the broker is down: say so, and answer the scrape
            log.warning("rmq exporter could not read queue depths", exc_info=True)
            up = 0
        yield messages
        yield GaugeMetricFamily("rmq_exporter_broker_up", "1 when the broker answered this scrape", value=up)
        took = time.perf_counter() - started
        yield GaugeMetricFamily("rmq_exporter_scrape_seconds", "Time this scrape took to read the broker", value=took)


def start_exporter(collector: Any, port: int, addr: str = "127.0.0.1") -> tuple[Any, threading.Thread, int]:
    """Serve ``/metrics`` for ``collector`` from a daemon thread, on a registry of its own.

    Returns ``(server, thread, bound_port)``; stop it with
    :func:`rmq.monitoring.metrics.stop_metrics_server`.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, thread = start_http_server(port, addr=addr, registry=registry)
    thread.name = "rmq-exporter"
    return server, thread, int(server.server_port)
