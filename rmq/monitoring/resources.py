"""The Resources view: what Flower's Resources page shows, built from ``inspect stats`` replies.

Pure: it takes the replies (``{hostname: stats reply}``, each governed worker's snapshot under
``rmq``) and the time, and returns the rows the page renders, one per worker that answered, so a
worker that stops leaves the view with its next poll. The page itself (rmq/celery/flower/) only
draws these rows; the fields are those of the snapshot (``docs/operations.md#snapshot``)::

    {"time": epoch, "workers": [row, ...], "errors": [str, ...]}

A row: ``hostname``, ``governed`` (False for a worker without rmq, with ``note`` saying why),
``age_s`` (of its snapshot), ``memory`` (bytes against the budget, ``ratio``, ``zone``, the
``lines`` of the ladder as fractions of the budget), ``paused`` / ``paused_queues``, ``cpu``
(slots in use), ``disk`` (of the session root), ``models`` (resident per pool process),
``counters`` (admitted, deferred by reason, killed, kernel OOM kills), ``reservations`` and
``recent_kills``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["resources_view", "worker_row"]

#: the ladder's lines drawn on the memory bar, in the order they are crossed
LINES = ("admit", "unload", "pause", "kill")


def _number(value: Any) -> float | int | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _memory(mem: Mapping[str, Any]) -> dict[str, Any]:
    ratios = _mapping(mem.get("line_ratios"))
    lines = {name: _number(ratios.get(name)) for name in LINES if _number(ratios.get(name)) is not None}
    budget = _number(mem.get("budget_bytes"))
    if "admit" not in lines and budget and _number(mem.get("admit_line_bytes")) is not None:
        lines["admit"] = round(mem["admit_line_bytes"] / budget, 4)  # a worker older than line_ratios
    return {
        "worker_bytes": _number(mem.get("worker_bytes")),
        "budget_bytes": budget,
        "budget_source": mem.get("budget_source"),
        "peak_bytes": _number(mem.get("peak_bytes")),
        "ratio": _number(mem.get("ratio")),
        "zone": mem.get("zone") if isinstance(mem.get("zone"), str) else None,
        "lines": lines,
    }


def _models(processes: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Pool processes that hold models: ``[{"pid": "123", "models": [{"name", "size_bytes"}]}]``."""
    out = []
    for pid, gauges in sorted(processes.items(), key=lambda item: str(item[0])):
        models = [
            {"name": str(m.get("name", "?")), "size_bytes": _number(m.get("size_bytes")),
             "pinned": bool(m.get("pinned")), "leased": bool(m.get("leased"))}
            for m in _mapping(gauges).get("models") or () if isinstance(m, Mapping)
        ]
        if models:
            out.append({"pid": str(pid), "models": models})
    return out


def _counters(counters: Mapping[str, Any], oom_kills: Any) -> dict[str, Any]:
    deferred = {str(k): v for k, v in _mapping(counters.get("deferred")).items() if _number(v) is not None}
    return {
        "admitted": _number(counters.get("admitted")) or 0,
        "deferred": deferred,
        "deferred_total": sum(deferred.values()),
        "killed": _number(counters.get("killed")) or 0,
        "oom_kills": _number(oom_kills),
    }


def _reservations(entries: Any) -> list[dict[str, Any]]:
    return [
        {"task_name": r.get("task_name"), "task_id": r.get("task_id"), "kind": r.get("kind"), "pid": r.get("pid"),
         "declared_bytes": _number(r.get("memory_bytes")), "used_bytes": _number(r.get("used_bytes")),
         "cpu_slots": _number(r.get("cpu_slots")), "disk_bytes": _number(r.get("disk_bytes"))}
        for r in entries or () if isinstance(r, Mapping)
    ]


def _kills(kills: Any, now: float) -> list[dict[str, Any]]:
    """Newest first, each with how long ago it happened."""
    out = []
    for k in reversed(list(kills or ())):
        if not isinstance(k, Mapping):
            continue
        when = _number(k.get("time"))
        out.append({
            "task_name": k.get("task_name"), "task_id": k.get("task_id"), "pid": k.get("pid"),
            "observed_bytes": _number(k.get("observed_bytes")), "declared_bytes": _number(k.get("declared_bytes")),
            "budget_bytes": _number(k.get("budget_bytes")), "worker_bytes": _number(k.get("worker_bytes")),
            "time": when, "ago_s": round(max(0.0, now - when), 1) if when is not None else None,
        })
    return out


def worker_row(hostname: str, reply: Any, now: float) -> dict[str, Any]:
    """One worker's row from its ``inspect stats`` reply."""
    snap = _mapping(reply).get("rmq") if isinstance(reply, Mapping) else None
    if not isinstance(snap, Mapping) or "memory" not in snap:
        why = (f"rmq answered with an error: {snap['error']}" if isinstance(snap, Mapping) and snap.get("error")
               else "not governed by rmq (no rmq part in its stats)")
        return {"hostname": hostname, "governed": False, "note": why}
    mem = _mapping(snap.get("memory"))
    cpu = _mapping(snap.get("cpu"))
    disk = _mapping(snap.get("disk"))
    when = _number(snap.get("time"))
    return {
        "hostname": hostname,
        "governed": True,
        "pid": snap.get("pid"),
        "age_s": round(max(0.0, now - when), 1) if when is not None else None,
        "memory": _memory(mem),
        "paused": bool(snap.get("paused")),
        "paused_queues": [str(q) for q in snap.get("paused_queues") or ()],
        "cpu": {"slots": _number(cpu.get("slots")), "slots_used": _number(cpu.get("slots_used")),
                "percent": _number(cpu.get("percent"))},
        "disk": {"root": disk.get("root"), "used_bytes": _number(disk.get("used_bytes")),
                 "total_bytes": _number(disk.get("total_bytes")), "free_bytes": _number(disk.get("free_bytes")),
                 "ratio": _number(disk.get("ratio")), "reserved_bytes": _number(disk.get("reserved_bytes"))},
        "models": _models(_mapping(snap.get("processes"))),
        "counters": _counters(_mapping(snap.get("counters")), mem.get("oom_kills")),
        "reservations": _reservations(snap.get("reservations")),
        "recent_kills": _kills(mem.get("recent_kills"), now),
    }


def resources_view(replies: Mapping[str, Any] | None, now: float, errors: list[str] | None = None) -> dict[str, Any]:
    """The page's data: a row per worker that answered, sorted by hostname."""
    rows = [worker_row(str(host), reply, now) for host, reply in sorted((replies or {}).items())]
    return {"time": now, "workers": rows, "errors": list(errors or [])}
