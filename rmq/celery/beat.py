"""Beat tasks rmq adds to the schedule: session cleanup on every worker, the cluster monitor."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from rmq.celery.signals import signal_sink

__all__ = ["cleanup_sessions", "monitor"]


@shared_task(name="rmq.cleanup_sessions", bind=True, ignore_result=False)
def cleanup_sessions(self: Any, timeout: float = 8.0, dry_run: bool = False) -> dict[str, Any]:
    """Broadcast ``rmq_cleanup``: every worker cleans its own session root (its own disk).

    Celery beat runs this on one worker; the broadcast reaches all of them. Replies are
    collected until none has come for ``timeout`` seconds (a worker replies within
    ``rmq.celery.control.REPLY_WAIT_S``, with ``status: "running"`` if its cleanup takes longer).
    A ping afterwards names the live workers that did not reply.

    Returns:
        ``{"workers": {hostname: report}, "removed": n, "bytes_freed": n, "missing": [hostname]}``;
        a report has ``removed``, ``bytes_freed``, ``removed_names``, ``reasons``, ``skipped_live``.
    """
    control = self.app.control
    replies = control.broadcast(
        "rmq_cleanup", arguments={"dry_run": bool(dry_run)}, reply=True, timeout=timeout
    ) or []
    workers: dict[str, Any] = {}
    for reply in replies:
        workers.update(reply)
    alive = {host for reply in control.ping(timeout=1.0) or [] for host in reply}
    reports = [r for r in workers.values() if isinstance(r, dict)]
    return {
        "workers": workers,
        "removed": sum(int(r.get("removed", 0)) for r in reports),
        "bytes_freed": sum(int(r.get("bytes_freed", 0)) for r in reports),
        "missing": sorted(alive - set(workers)),
    }


@shared_task(name="rmq.monitor", bind=True, ignore_result=False)
def monitor(self: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Gather every worker's snapshot and the queue depths; store the cluster view.

    Cluster alerts also go to :data:`rmq.celery.signals.alert` receivers in the process running it.
    """
    from rmq.monitoring.cluster import collect_cluster_view

    return collect_cluster_view(self.app, timeout=timeout, extra_sinks=(signal_sink,))
