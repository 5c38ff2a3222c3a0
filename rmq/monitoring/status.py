"""Rendering for ``rmq status``: a table per worker, then queue depths and cluster alerts.

The input is a cluster view::

    {"time": epoch, "workers": {hostname: snapshot | None}, "queues": {name: depth},
     "alerts": [alert dict or name, ...]}

where each snapshot is what :meth:`~rmq.monitoring.snapshot.SnapshotBuilder.build` returns. Missing
fields render as ``-``; a worker whose snapshot is None is shown as not governed. Gathering the view
is :func:`rmq.monitoring.cluster.load_or_collect`'s job.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from rmq.core.units import format_bytes

__all__ = ["memory_bar", "render_json", "render_plain", "render_table"]

_KNOWN_COUNTERS = ("admitted", "killed", "unloaded", "sessions_cleaned", "alerts")


def memory_bar(ratio: float | None, width: int = 20, *, ascii: bool = False) -> str:
    """A bar ``width`` characters wide, filled in proportion to ``ratio`` (clamped to 0-1).

    ``ascii=True`` draws ``#`` and ``.`` instead of block characters. An unknown ratio
    (None) gives an empty bar.
    """
    fill, empty = ("#", ".") if ascii else ("\u2588", "\u2591")
    filled = 0 if ratio is None else round(min(max(float(ratio), 0.0), 1.0) * width)
    return fill * filled + empty * (width - filled)


def _style(ratio: float | None) -> str:
    if ratio is None:
        return "dim"
    return "green" if ratio < 0.70 else "yellow" if ratio < 0.85 else "bold red"


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{float(ratio):.0%}"


def _num(value: Any, fmt: str = "{:g}") -> str:
    return "-" if value is None else fmt.format(value)


def _bar_text(ratio: float | None, width: int, ascii: bool, detail: str) -> Text:
    text = Text()
    text.append(memory_bar(ratio, width, ascii=ascii), style=_style(ratio))
    text.append(f" {_pct(ratio)}  {detail}")
    return text


def _pairs(mapping: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k.replace('_', ' ')} {v:g}" if isinstance(v, int | float) else f"{k} {v}"
        for k, v in mapping.items()
        if not isinstance(v, Mapping)
    )


def _model_names(models: Any) -> list[str]:
    names = []
    for item in models or ():
        if isinstance(item, Mapping):
            size = item.get("size_bytes", item.get("bytes"))
            label = str(item.get("name", "?"))
            names.append(f"{label} ({format_bytes(size)})" if size is not None else label)
        else:
            names.append(str(item))
    return names


def _counter_rows(counters: Mapping[str, Any]) -> list[tuple[str, str]]:
    main = {k: counters[k] for k in _KNOWN_COUNTERS if k in counters}
    main.update({k: v for k, v in counters.items() if k not in main and isinstance(v, int | float)})
    deferred = counters.get("deferred") or {}
    line = _pairs(main)
    if isinstance(deferred, Mapping) and deferred:
        line += f", deferred {sum(v for v in deferred.values() if isinstance(v, int | float)):g} ({_pairs(deferred)})"
    rows = [("counters", line.strip(", ") or "-")]
    for key, value in counters.items():
        if key == "deferred" or not isinstance(value, Mapping):
            continue
        if all(isinstance(v, Mapping) for v in value.values()) and value:  # e.g. http: {client: {...}}
            for sub, inner in value.items():
                rows.append((f"{key} {sub}", _pairs(inner) or "-"))
        else:
            extra = "; ".join(f"{k} {_pairs(v)}" for k, v in value.items() if isinstance(v, Mapping) and v)
            rows.append((key, "; ".join(p for p in (_pairs(value), extra) if p) or "-"))
    return rows


def _worker_table(host: str, snap: Mapping[str, Any] | None, now: float, ascii: bool, width: int) -> Table:
    table = Table(
        show_header=False, box=box.ASCII if ascii else box.ROUNDED, title_justify="left", expand=False
    )
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value")
    if not isinstance(snap, Mapping):
        table.title = host
        table.add_row("rmq", "no rmq data (worker not governed, or it did not answer)")
        return table
    age = now - float(snap["time"]) if snap.get("time") else None
    table.title = f"{host}  pid {snap.get('pid', '-')}" + (f"  ({age:.0f}s ago)" if age is not None else "")
    mem = snap.get("memory") or {}
    table.add_row(
        "memory",
        _bar_text(
            mem.get("ratio"),
            width,
            ascii,
            f"{format_bytes(mem.get('worker_bytes'))} of {format_bytes(mem.get('budget_bytes'))} budget"
            f" ({mem.get('budget_source', '-')}), zone {mem.get('zone', '-')},"
            f" peak {format_bytes(mem.get('peak_bytes'))}",
        ),
    )
    children = mem.get("children") or {}
    if children:
        table.add_row(
            "pool",
            f"{len(children)} processes: "
            + ", ".join(f"{pid} {format_bytes(b)}" for pid, b in sorted(children.items())),
        )
    if mem.get("host_total_bytes") is not None:
        table.add_row(
            "host",
            f"{format_bytes(mem.get('host_available_bytes'))} available"
            f" of {format_bytes(mem.get('host_total_bytes'))}",
        )
    cpu = snap.get("cpu") or {}
    table.add_row(
        "cpu",
        f"{_num(cpu.get('percent'), '{:.0f}')}%  slots {_num(cpu.get('slots_used'))}"
        f"/{_num(cpu.get('slots'))}  load {_num(cpu.get('load1'), '{:.2f}')}",
    )
    disk = snap.get("disk") or {}
    if disk:
        table.add_row(
            "disk",
            _bar_text(
                disk.get("ratio"),
                width,
                ascii,
                f"{format_bytes(disk.get('used_bytes'))} of {format_bytes(disk.get('total_bytes'))},"
                f" {format_bytes(disk.get('free_bytes'))} free at {disk.get('root', '-')}",
            ),
        )
    net = snap.get("network") or {}
    if net:
        table.add_row(
            "network",
            f"out {format_bytes(net.get('sent_bytes_per_s'))}/s,"
            f" in {format_bytes(net.get('recv_bytes_per_s'))}/s",
        )
    for pid, gauges in sorted((snap.get("processes") or {}).items()):
        names = _model_names((gauges or {}).get("models"))
        if names:
            table.add_row(f"models {pid}", ", ".join(names))
    paused = snap.get("paused_queues") or []
    table.add_row(
        "paused",
        Text(f"yes: {', '.join(paused) or 'all queues'}", style="bold yellow")
        if snap.get("paused")
        else Text("no"),
    )
    reservations = [r for r in snap.get("reservations") or () if isinstance(r, Mapping)]
    reserved = sum(r.get("memory_bytes") or 0 for r in reservations)
    table.add_row("reserved", f"{len(reservations)} reservations, {format_bytes(reserved)}")
    for label, value in _counter_rows(snap.get("counters") or {}):
        table.add_row(label, value)
    alerts = snap.get("alerts") or []
    if alerts:
        table.add_row("alerts", Text(", ".join(map(str, alerts)), style="bold red"))
    metrics = snap.get("metrics") or {}
    if isinstance(metrics, Mapping) and metrics.get("port"):
        table.add_row("metrics", f"port {metrics['port']}{metrics.get('path', '')}")
    elif isinstance(metrics, Mapping) and metrics.get("error"):
        table.add_row("metrics", Text(str(metrics["error"]), style="yellow"))
    return table


def _consumers_cell(hosts: list[str], depth: Any) -> Text:
    """Who consumes a queue; ``none`` in red when messages wait there that no worker will take."""
    if hosts:
        return Text(", ".join(sorted(hosts)))
    return Text("none: nothing consumes it" if depth else "none", style="bold red" if depth else "dim")


def _build(view: Mapping[str, Any], now: float | None, ascii: bool, width: int) -> list[RenderableType]:
    now = time.time() if now is None else now
    workers = view.get("workers") or {}
    queues = view.get("queues") or {}
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(view.get("time") or now)))
    parts: list[RenderableType] = [
        Text(f"rmq status at {when}: {len(workers)} workers, {len(queues)} queues", style="bold")
    ]
    parts += [_worker_table(host, workers[host], now, ascii, width) for host in sorted(workers)]
    qt = Table(title="queues", box=box.ASCII if ascii else box.SIMPLE, title_justify="left")
    qt.add_column("queue")
    qt.add_column("depth", justify="right")
    consumers = view.get("consumers")
    if isinstance(consumers, Mapping):  # a view that knows who consumes what
        qt.add_column("consumers")
    for name in sorted(queues):
        depth = queues[name]
        row: list[RenderableType] = [name, Text("-" if depth is None else str(depth), style="bold" if depth else "dim")]
        if isinstance(consumers, Mapping):
            row.append(_consumers_cell(consumers.get(name) or [], depth))
        qt.add_row(*row)
    parts.append(qt)
    alerts = view.get("alerts") or []
    if alerts:
        at = Table(title="alerts", box=box.ASCII if ascii else box.SIMPLE, title_justify="left")
        for column in ("host", "alert", "message"):
            at.add_column(column)
        for a in alerts:
            if isinstance(a, Mapping):
                what = f"{a.get('name', '?')}" + (f" ({a['subject']})" if a.get("subject") else "")
                at.add_row(
                    str(a.get("hostname", "-")), Text(what, style="bold red"), str(a.get("message", ""))
                )
            else:
                at.add_row("-", Text(str(a), style="bold red"), "")
        parts.append(at)
    return parts


def render_table(
    cluster_view: Mapping[str, Any], now: float | None = None, bar_width: int = 20
) -> RenderableType:
    """A rich renderable of the view (for ``console.print`` or ``rich.live.Live``)."""
    return Group(*_build(cluster_view, now, ascii=False, width=bar_width))


def render_plain(
    cluster_view: Mapping[str, Any], now: float | None = None, bar_width: int = 20, width: int = 120
) -> str:
    """The same content as :func:`render_table` as plain ASCII text, no colours (for pipes and logs)."""
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, force_terminal=False, no_color=True)
    for part in _build(cluster_view, now, ascii=True, width=bar_width):
        console.print(part)
    return out.getvalue()


def render_json(cluster_view: Mapping[str, Any]) -> str:
    """The view as indented JSON (``rmq status --json``); ``json.loads`` gives it back."""
    return json.dumps(cluster_view, indent=2, sort_keys=True, default=str)
