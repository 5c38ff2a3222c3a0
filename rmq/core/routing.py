"""Queues and priorities that mean the same on every broker. Pure except ``transport_kind``.

Users speak AMQP: 0-9, a larger number runs first. RabbitMQ does that natively with
``x-max-priority``; kombu's Redis transport runs 0 first, so rmq flips the number on the
wire for Redis.
"""

from __future__ import annotations

from typing import Any

from rmq.core.units import MAX_PRIORITY

__all__ = ["to_wire_priority", "from_wire_priority", "transport_kind", "choose_queue", "REDIS_SCHEMES",
           "REDIS_PRIORITY_STEPS"]

REDIS_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")

#: kombu's Redis ``priority_steps`` rmq sets: one list per step, every list of every consumed queue
#: in each BRPOP a worker sends (one per message). Four steps, as plain Celery has them (kombu's
#: default), put the user's priorities 9-7, 6-4, 3-1 and 0 in four lists (first in, first out
#: within one), so ``high`` (8), ``normal`` (5) and ``low`` (2) each have their own; ten steps
#: (``list(range(10))``, set by the user) give each priority its own list, for a BRPOP of ten keys
#: per queue, which cost 2-3 % of a no-op's throughput (docs/configuration.md#priorities-on-redis).
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)


def transport_kind(app: Any) -> str:
    """``"redis"``, ``"amqp"`` or another scheme, from the app's broker URL."""
    cached = getattr(app, "_rmq_transport_kind", None)
    if cached is not None:
        return cached
    url = app.conf.broker_url or "amqp://"
    if isinstance(url, (list, tuple)):
        url = url[0]
    scheme = str(url).split("://", 1)[0].split("+")[0] if "://" in str(url) else str(url)
    kind = "redis" if scheme in REDIS_SCHEMES or str(url).startswith(REDIS_SCHEMES) else scheme
    app._rmq_transport_kind = kind
    return kind


def to_wire_priority(priority: int, kind: str) -> int:
    """A user priority (larger first) as the broker wants it."""
    return MAX_PRIORITY - priority if kind == "redis" else priority


def from_wire_priority(wire: int, kind: str) -> int:
    """The inverse of :func:`to_wire_priority`."""
    return MAX_PRIORITY - wire if kind == "redis" else wire


def choose_queue(heavy: bool, memory_bytes: int | None, heavy_threshold: int, heavy_queue: str) -> str | None:
    """The heavy queue for heavy tasks (declared, or memory at/above the threshold), else ``None``."""
    if heavy or (memory_bytes is not None and memory_bytes >= heavy_threshold):
        return heavy_queue
    return None
