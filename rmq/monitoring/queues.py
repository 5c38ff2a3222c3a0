"""Queue depths as the broker holds them (Redis keeps one list per priority step)."""

from __future__ import annotations

from typing import Any

__all__ = ["redis_priority_depths", "redis_queue_depth"]


def redis_priority_depths(
    client: Any, queue: str, sep: str = ":", steps: range | list[int] = range(10)
) -> dict[int, int]:
    """Messages waiting in ``queue`` on Redis per priority step: the base list holds step 0, each other
    step has a list of its own (``queue + sep + step``). An exporter that reads only the base list
    misses every message sent with a priority."""
    step_list = sorted({0, *steps})
    names = [queue if p == 0 else f"{queue}{sep}{p}" for p in step_list]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    return {p: int(n) for p, n in zip(step_list, pipe.execute(), strict=True)}


def redis_queue_depth(client: Any, queue: str, sep: str = ":", steps: range | list[int] = range(10)) -> int:
    """Messages waiting in ``queue`` on Redis: its base list plus one list per priority step."""
    return sum(redis_priority_depths(client, queue, sep, steps).values())
