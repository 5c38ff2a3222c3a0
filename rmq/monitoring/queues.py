"""Queue depths as the broker holds them (Redis keeps one list per priority step)."""

from __future__ import annotations

from typing import Any

__all__ = ["redis_queue_depth"]


def redis_queue_depth(client: Any, queue: str, sep: str = ":", steps: range = range(10)) -> int:
    """Messages waiting in ``queue`` on Redis: its base list plus one list per priority step."""
    names = [queue] + [f"{queue}{sep}{p}" for p in steps if p]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    return int(sum(pipe.execute()))
