"""Every Redis key rmq uses, in one place, all under the ``rmq:`` prefix."""

from __future__ import annotations

PREFIX = "rmq:"


def rate_limit(name: str) -> str:
    """Sliding-window log of one cluster-wide rate limit."""
    return f"{PREFIX}rate:{name}"


def rate_limit_turns(name: str) -> str:
    """Booked turns of callers waiting for one cluster-wide rate limit."""
    return f"{PREFIX}rate-turns:{name}"


def semaphore(name: str) -> str:
    """Sorted set of leased permits (member = holder id, score = lease expiry)."""
    return f"{PREFIX}sem:{name}"


def learned_peaks(task_name: str) -> str:
    """Recent observed peaks (bytes) of one task name, newest first."""
    return f"{PREFIX}learn:{task_name}"


def worker_lost(task_id: str) -> str:
    """How often a task's process was lost without rmq killing it."""
    return f"{PREFIX}lost:{task_id}"


def cluster_view() -> str:
    """The latest cluster view written by the ``rmq.monitor`` beat task."""
    return f"{PREFIX}cluster"


def run_claim(task_id: str) -> str:
    """Which process runs a copy of this task id right now (``hostname:pid``, expiring)."""
    return f"{PREFIX}run:{task_id}"
