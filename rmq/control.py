"""Remote-control commands: ``celery inspect rmq`` returns the governor's snapshot.

Commands take no paths or other free-form input (security: a broker message must not
steer file operations).
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

__all__ = ["rmq_snapshot"]


def governor_step(worker: Any) -> Any:
    """The worker's rmq bootstep, or ``None``."""
    for step in getattr(worker, "steps", []) or []:
        if step is not None and getattr(step, "label", "") == "rmq governor":
            return step
    return None


@inspect_command(name="rmq")
def rmq_snapshot(state: Any, **kwargs: Any) -> dict[str, Any]:
    """The worker's rmq snapshot (the same as ``inspect stats`` under ``rmq``)."""
    worker = state.consumer.controller
    step = governor_step(worker)
    if step is None or step.snapshots is None:
        return {"error": "rmq is not running in this worker"}
    return step.snapshots.build()
