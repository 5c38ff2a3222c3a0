"""Prometheus exposition of the governor snapshot (opt-in per worker with ``rmq_metrics_port``).

The collector reads a fresh snapshot on every scrape, so what Prometheus sees is what
``celery inspect stats`` shows under ``rmq``. Every number under ``counters`` becomes a
counter named after its path (``counters.models.hits`` -> ``rmq_models_hits_total``), so new
counters appear without code changes; a few known maps become labels (``deferred`` by
``reason``, ``http`` by ``client``, model ``evictions`` by ``reason``, ``rate_limits`` and
``concurrency`` by ``limit``). Gauges come from the ``memory``, ``cpu``, ``disk`` and
``network`` sections and the per-process gauges the same way.

Labels stay put when pool processes are recycled: per-process gauges carry the pool slot
(``process="0"``, ``"1"``, ...; a replacement takes the slot of the process it replaces), never a
pid, and counters are summed over the worker's processes, dead ones included. The list of metrics:
``docs/operations.md#prometheus``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["SnapshotCollector", "start_metrics_server", "stop_metrics_server"]

logger = logging.getLogger("rmq.monitoring.metrics")

PREFIX = "rmq"
#: Counter paths whose keys are label values rather than name parts.
LABELLED: dict[tuple[str, ...], str] = {
    ("deferred",): "reason",
    ("models", "evictions"): "reason",
    ("http",): "client",
    ("rate_limits",): "limit",
    ("concurrency",): "limit",
    ("hygiene", "recycles"): "reason",
    ("hygiene", "recycled_for"): "task",
    ("rejected",): "resource",
    ("cpu", "by_task"): "task",
}
GAUGE_SECTIONS = ("memory", "cpu", "disk", "network")
ZONES = ("ok", "unload", "pause", "kill")
#: numbers of the gauge sections that only grow: exported as counters (``rmq_memory_oom_kills_total``)
SECTION_COUNTERS = {("memory", "oom_kills"): "Kernel OOM kills in the worker's memory cgroup"}


def _name(*parts: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", "_".join((PREFIX, *parts))).lower()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _slots(snap: Mapping[str, Any]) -> Callable[[Any], str]:
    """pid -> the ``process`` label: the pool slot, or ``pid-N`` when the pool does not tell."""
    known = snap.get("pool_slots") or {}

    def label(pid: Any) -> str:
        slot = known.get(str(pid))
        return str(slot) if slot is not None else f"pid-{pid}"

    return label


class _Families:
    """Samples grouped by family name; a second path mapping onto a taken name is skipped."""

    def __init__(self) -> None:
        self.by_name: dict[str, tuple[str, str, list[str], list[tuple[list[str], float]]]] = {}

    def add(self, kind: str, name: str, doc: str, value: float, labels: Mapping[str, str]) -> None:
        entry = self.by_name.setdefault(name, (kind, doc, list(labels), []))
        if entry[0] == kind and entry[2] == list(labels):  # on a clash keep the first, never fail a scrape
            entry[3].append(([str(v) for v in labels.values()], value))

    def gauge(self, name: str, doc: str, value: float, **labels: str) -> None:
        self.add("gauge", _name(name), doc, float(value), labels)

    def metrics(self) -> Iterator[Metric]:
        for name, (kind, doc, labelnames, samples) in self.by_name.items():
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_type(name, doc, labels=labelnames)
            for labels, value in samples:
                family.add_metric(labels, value)
            yield family


class SnapshotCollector:
    """A prometheus_client collector turning the governor snapshot into ``rmq_*`` metrics.

    Args:
        get_snapshot: returns the current snapshot (:meth:`~rmq.monitoring.snapshot.SnapshotBuilder.build`); called
            once per scrape. If it raises, the scrape still answers, with ``rmq_up 0``.
    """

    def __init__(self, get_snapshot: Callable[[], Mapping[str, Any] | None]) -> None:
        self.get_snapshot = get_snapshot

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families of one snapshot."""
        out = _Families()
        try:
            snap = self.get_snapshot() or {}
            if snap:
                self._gauges(snap, out)
                self._counters(snap.get("counters") or {}, (), {}, out, labelled=False)
        except Exception:  # a scrape must answer even when the governor cannot
            logger.exception("rmq metrics: reading the snapshot failed")
            snap, out = {}, _Families()
        yield GaugeMetricFamily(_name("up"), "1 when the governor snapshot was read", value=1 if snap else 0)
        yield from out.metrics()

    @staticmethod
    def _gauges(snap: Mapping[str, Any], out: _Families) -> None:
        out.gauge(
            "info", "Worker identity", 1, hostname=str(snap.get("hostname", "")), pid=str(snap.get("pid"))
        )
        if (t := _number(snap.get("time"))) is not None:
            out.gauge("snapshot_timestamp_seconds", "When the snapshot was taken", t)
        for section in GAUGE_SECTIONS:
            for key, raw in (snap.get(section) or {}).items():
                if (section, key) in SECTION_COUNTERS:
                    continue
                if (value := _number(raw)) is not None:
                    out.gauge(f"{section}_{key}", f"{section}.{key} from the governor", value)
        memory = snap.get("memory") or {}
        slots = _slots(snap)
        for pid, raw in (memory.get("children") or {}).items():
            if (value := _number(raw)) is not None:
                out.gauge("memory_child_bytes", "Memory of one pool process", value, process=slots(pid))
        if memory.get("budget_source"):
            out.gauge(
                "memory_budget_source", "Where the budget came from", 1, source=str(memory["budget_source"])
            )
        if memory.get("zone"):
            for zone in ZONES:
                out.gauge("memory_zone", "1 for the current pressure zone", memory["zone"] == zone, zone=zone)
        for line, raw in (memory.get("lines") or {}).items():
            if (value := _number(raw)) is not None:
                out.gauge("memory_line_bytes", "A line of the pressure ladder, in bytes", value, line=str(line))
        accounting = memory.get("accounting") or "proc"
        if isinstance(accounting, Mapping):
            accounting = accounting.get("mode") or "proc"
        out.gauge("memory_accounting_info", "1 for how the worker's memory is measured", 1, mode=str(accounting))
        for (section, key), doc in SECTION_COUNTERS.items():
            if (value := _number((snap.get(section) or {}).get(key))) is not None:
                out.add("counter", _name(section, key), doc, value, {})
        if (value := _number(snap.get("paused_seconds"))) is not None:
            out.add("counter", _name("paused_seconds"), "Seconds the worker has spent paused", value, {})
        for q in snap.get("consumed_queues") or ():
            out.gauge("queue_consumer", "1 for each queue the worker consumes (paused ones included)", 1,
                      queue=str(q))
        out.gauge("paused", "1 while the worker has paused its queues", bool(snap.get("paused")))
        for q in snap.get("paused_queues") or ():
            out.gauge("queue_paused", "1 for each paused queue", 1, queue=str(q))
        reservations = [r for r in snap.get("reservations") or () if isinstance(r, Mapping)]
        out.gauge("reservations", "Ledger reservations held", len(reservations))
        for field in ("memory_bytes", "cpu_slots", "disk_bytes"):
            total = sum(_number(r.get(field)) or 0.0 for r in reservations)
            out.gauge(f"reserved_{field}", f"Sum of {field} over ledger reservations", total)
        for name in snap.get("alerts") or ():
            out.gauge("alert_active", "1 for each alert in effect", 1, alert=str(name))
        for pid, gauges in (snap.get("processes") or {}).items():
            process = slots(pid)
            for key, raw in (gauges or {}).items():
                if isinstance(raw, list):  # e.g. the models a pool process holds
                    out.gauge(f"{key}_loaded", f"Entries of {key} in a pool process", len(raw), process=process)
                    sizes = [_number(i.get("size_bytes")) for i in raw if isinstance(i, Mapping)]
                    if any(size is not None for size in sizes):
                        total = sum(size or 0.0 for size in sizes)
                        out.gauge(f"{key}_bytes", f"Bytes of {key} in a pool process", total, process=process)
                elif isinstance(raw, Mapping):  # e.g. hygiene: baseline_bytes, growth_bytes, ...
                    for field, inner in raw.items():
                        if (value := _number(inner)) is not None:
                            out.gauge(
                                f"{key}_{field}", f"{key}.{field} of a pool process", value, process=process
                            )
                elif (value := _number(raw)) is not None:
                    out.gauge(f"process_{key}", f"{key} of a pool process", value, process=process)

    def _counters(
        self,
        node: Mapping[str, Any],
        path: tuple[str, ...],
        labels: dict[str, str],
        out: _Families,
        labelled: bool,
    ) -> None:
        label = None if labelled else LABELLED.get(path)
        for key, raw in node.items():
            if label is not None:
                sub_path, sub_labels = path, {**labels, label: str(key)}
            else:
                sub_path, sub_labels = (*path, str(key)), labels
            if isinstance(raw, Mapping):
                self._counters(raw, sub_path, sub_labels, out, labelled=label is not None)
            elif (value := _number(raw)) is not None and sub_path:
                doc = f"counters.{'.'.join(sub_path)} (pool processes included)"
                out.add("counter", _name(*sub_path).removesuffix("_total"), doc, value, sub_labels)


def start_metrics_server(
    port: int, get_snapshot: Callable[[], Mapping[str, Any] | None], addr: str = "127.0.0.1"
) -> tuple[Any, threading.Thread, int]:
    """Serve ``/metrics`` for ``get_snapshot`` from a daemon thread, on a registry of its own.

    Args:
        port: TCP port; 0 picks a free one.
        get_snapshot: called on each scrape.
        addr: address to bind (loopback by default; use ``"0.0.0.0"`` to expose it).

    Returns:
        ``(server, thread, bound_port)``; pass ``server`` to :func:`stop_metrics_server`.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(get_snapshot))
    server, thread = start_http_server(port, addr=addr, registry=registry)
    thread.name = "rmq-metrics"
    return server, thread, int(server.server_port)


def stop_metrics_server(server: Any) -> None:
    """Stop serving and close the listening socket."""
    server.shutdown()
    server.server_close()
