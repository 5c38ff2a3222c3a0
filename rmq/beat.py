"""Beat tasks rmq adds to the schedule: session cleanup on every worker, the cluster monitor."""

from __future__ import annotations

from typing import Any

from celery import shared_task

__all__ = ["cleanup_sessions", "monitor"]


@shared_task(name="rmq.cleanup_sessions", bind=True, ignore_result=False)
def cleanup_sessions(self: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Broadcast to every worker: each cleans its own session root. Returns reports by worker."""
    replies = self.app.control.broadcast("rmq_cleanup", reply=True, timeout=timeout) or []
    merged: dict[str, Any] = {}
    for reply in replies:
        merged.update(reply)
    return {"workers": merged}


@shared_task(name="rmq.monitor", bind=True, ignore_result=False)
def monitor(self: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Gather every worker's snapshot and the queue depths; store the cluster view."""
    from .cluster import collect_cluster_view

    return collect_cluster_view(self.app, timeout=timeout)
