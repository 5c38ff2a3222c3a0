"""Cluster-level alerts: conditions no single worker can see, read from consecutive cluster views.

A queue whose backlog keeps growing, and a queue that holds messages while no live worker consumes
it. The checks are pure: the history they need travels inside the view itself, so the monitor beat
task (whichever worker runs it) only has to store the view and hand it back the next time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

from rmq.monitoring.alerts import Alert

__all__ = ["active_cluster_alerts", "cluster_alerts"]


def _consumed(view: Mapping[str, Any]) -> set[str] | None:
    """Queues some live worker consumes (paused ones count), or None when the view cannot tell."""
    if "consumers" not in view:
        return None
    workers = view.get("workers") or {}
    consumed = {q for q, hosts in (view.get("consumers") or {}).items() if set(hosts or ()) & set(workers)}
    for snapshot in workers.values():
        consumed.update((snapshot or {}).get("paused_queues") or ())
    return consumed


def cluster_alerts(
    previous_view: Mapping[str, Any] | None,
    current_view: dict[str, Any],
    *,
    growth_views: int = 3,
    unconsumed_views: int = 2,
    cooldown_s: float = 0.0,
    hostname: str = "cluster",
) -> list[Alert]:
    """Cluster-level checks on two consecutive cluster views; return alerts newly raised.

    Raises ``backlog_growing`` when a queue's depth rose strictly over the last ``growth_views``
    views, and ``queue_unconsumed`` when a queue held messages and no live worker consumed it
    in ``unconsumed_views`` views in a row (needs ``view["consumers"] = {queue: [hostname]}``,
    e.g. from ``inspect active_queues``; a worker's paused queues count as consumed). Each
    condition raises once while it lasts, at most once per ``cooldown_s``.

    The history this needs is written into ``current_view["history"]``; store the view as-is
    and pass it back as ``previous_view`` next time.
    """
    prev = (previous_view or {}).get("history") or {}
    now = float(current_view.get("time") or time.time())
    keep = max(growth_views, 2)
    depths: dict[str, list[int]] = {}
    for q, depth in (current_view.get("queues") or {}).items():
        if depth is not None:
            depths[q] = (list((prev.get("depths") or {}).get(q, [])) + [int(depth)])[-keep:]
    consumed = _consumed(current_view)
    unconsumed: dict[str, int] = {}
    if consumed is not None:
        for q, hist in depths.items():
            if hist[-1] > 0 and q not in consumed:
                unconsumed[q] = int((prev.get("unconsumed") or {}).get(q, 0)) + 1

    conditions: dict[str, Alert] = {}
    for q, hist in depths.items():
        recent = hist[-growth_views:]
        if len(recent) == growth_views and all(b > a for a, b in pairwise(recent)):
            trail = " -> ".join(map(str, recent))
            conditions[f"backlog_growing:{q}"] = Alert(
                "backlog_growing",
                recent[-1],
                recent[0],
                f"queue {q!r} backlog growing over the last {growth_views} views: {trail}",
                now,
                hostname,
                subject=q,
            )
    for q, streak in unconsumed.items():
        if streak >= unconsumed_views:
            conditions[f"queue_unconsumed:{q}"] = Alert(
                "queue_unconsumed",
                depths[q][-1],
                0,
                f"queue {q!r} holds {depths[q][-1]} messages and no live worker consumes it",
                now,
                hostname,
                subject=q,
            )

    was_active = prev.get("active") or {}
    raised_at = {k: float(t) for k, t in (prev.get("raised_at") or {}).items() if now - float(t) < cooldown_s}
    new: list[Alert] = []
    active: dict[str, dict[str, Any]] = {}
    for key, alert in conditions.items():
        reported = bool((was_active.get(key) or {}).get("reported"))
        if not reported and (key not in raised_at or now - raised_at[key] >= cooldown_s):
            new.append(alert)
            raised_at[key] = now
            reported = True
        active[key] = {"alert": alert.as_dict(), "reported": reported}
    current_view["history"] = {
        "depths": depths,
        "unconsumed": unconsumed,
        "active": active,
        "raised_at": raised_at,
    }
    return new


def active_cluster_alerts(view: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Cluster conditions in effect in a view that went through :func:`cluster_alerts`."""
    active = ((view.get("history") or {}).get("active")) or {}
    return [entry["alert"] for entry in active.values()]
