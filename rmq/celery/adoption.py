"""Hazards of adopting rmq on an existing deployment, found by ``rmq doctor``. Celery glue: it asks
the broker and the workers.

- RabbitMQ queues declared without the arguments ``install()`` declares them with (``x-max-priority``):
  a worker's declaration then fails with ``PRECONDITION_FAILED``.
- Messages waiting in Redis lists of a priority layout this app does not read (Celery's default one
  before ``install()``, rmq's after ``rmq_priorities`` was turned off): no worker fetches them.
- Workers without rmq on the same Redis database: rmq's short visibility timeout hands the messages
  of their long tasks to another worker while they still run.

See docs/operations.md#rmq-doctor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rmq.core.config import RmqConfig
from rmq.core.routing import transport_kind

__all__ = ["Finding", "adoption_findings"]

#: kombu's Redis separator between a queue's name and a priority step when none is configured
_KOMBU_SEP = "\x06\x16"
_NOT_FOUND, _PRECONDITION_FAILED = 404, 406


@dataclass(frozen=True)
class Finding:
    """One adoption check's outcome; a ``hazard`` comes with its ``fix``."""

    check: str
    summary: str
    hazard: bool = False
    fix: str = ""


def adoption_findings(app: Any, cfg: RmqConfig, inspect_timeout_s: float = 1.5) -> list[Finding]:
    """Every adoption check that applies to the app's broker."""
    kind = transport_kind(app)
    if kind == "redis":
        return [redis_layout(app, cfg), foreign_workers(app, cfg, inspect_timeout_s)]
    if kind == "amqp":
        return [rabbitmq_queues(app, cfg)]
    return []


def consumed_queues(app: Any, cfg: RmqConfig) -> list[str]:
    """The queues this app's workers consume or are routed to: ``task_queues``, the default queue and
    the heavy queue."""
    names = list(app.amqp.queues.keys())
    for name in (app.conf.task_default_queue or "celery", cfg.heavy_queue):
        if name not in names:
            names.append(name)
    return names


def rabbitmq_queues(app: Any, cfg: RmqConfig) -> Finding:
    """Declare each existing queue as this app's workers do; the broker refuses a mismatch."""
    check = "rabbitmq queues"
    bad: list[str] = []
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)
        for name in consumed_queues(app, cfg):
            queue = app.amqp.queues[name]  # as a worker declares it (Celery adds x-max-priority)
            channel = conn.channel()
            try:
                channel.queue_declare(queue=name, passive=True)
            except conn.channel_errors as exc:
                if getattr(exc, "reply_code", getattr(exc, "code", None)) == _NOT_FOUND:
                    continue  # absent: the first worker creates it as it should be
                raise
            finally:
                _close(channel)
            channel = conn.channel()
            try:
                queue.bind(channel).queue_declare()
            except conn.channel_errors as exc:
                if getattr(exc, "reply_code", getattr(exc, "code", None)) != _PRECONDITION_FAILED:
                    raise
                bad.append(f"{name!r} ({getattr(exc, 'reply_text', exc)})")
                continue
            finally:
                _close(channel)
    if not bad:
        return Finding(check, "every existing queue matches the arguments this app declares")
    wanted = "x-max-priority=10" if cfg.priorities else "no x-max-priority"
    return Finding(
        check,
        f"{', '.join(bad)}: declared with other arguments than this app's ({wanted}); its workers would "
        "stop with PRECONDITION_FAILED when they declare it",
        hazard=True,
        fix="drain the queue with the old workers, then delete it (rabbitmqctl delete_queue NAME) so that "
            "rmq's workers declare it again; or keep the old queues and set rmq_priorities = False "
            "(priorities then keep Celery's meaning)",
    )


def _close(channel: Any) -> None:
    try:
        channel.close()
    except Exception:  # a channel the broker closed already
        pass


def redis_layout(app: Any, cfg: RmqConfig) -> Finding:
    """Lists of a queue under another priority layout (other separator or steps) that hold messages
    nobody fetches."""
    check = "redis priority lists"
    options = app.conf.broker_transport_options or {}
    from kombu.transport.redis import PRIORITY_STEPS

    sep = options.get("sep", _KOMBU_SEP)
    steps = options.get("priority_steps", PRIORITY_STEPS)
    stranded: list[str] = []
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        for name in consumed_queues(app, cfg):
            read = {name, *(f"{name}{sep}{step}" for step in steps if step)}
            pattern = re.compile(re.escape(name) + "(:|" + re.escape(_KOMBU_SEP) + "|" + re.escape(sep) + r")\d+")
            for raw in client.scan_iter(match=_glob_escape(name) + "*", count=1000):
                key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                if key in read or not pattern.fullmatch(key) or client.type(raw) not in (b"list", "list"):
                    continue
                waiting = client.llen(raw)
                if waiting:
                    stranded.append(f"{key!r}: {waiting}")
    layout = f"steps {list(steps)}, separator {sep!r}"
    if not stranded:
        return Finding(check, f"no messages wait outside this app's layout ({layout})")
    return Finding(
        check,
        f"messages wait in lists this app's workers do not read ({layout}): {', '.join(stranded)}",
        hazard=True,
        fix="let workers of the old layout drain them before switching (a worker without rmq, or one with "
            "rmq_priorities = False, reads Celery's default layout), or move them into the queue's own list, "
            "e.g. redis-cli LMOVE <list> <queue> RIGHT LEFT until the list is empty (they then run first)",
    )


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def foreign_workers(app: Any, cfg: RmqConfig, timeout_s: float) -> Finding:
    """Workers on this Redis database without rmq: those whose remote-control binding uses another
    separator (kombu's default: an app without rmq's transport options, which cannot answer this
    app's ``inspect``), and those that answer ``inspect stats`` without an ``rmq`` part."""
    check = "workers without rmq"
    sep = (app.conf.broker_transport_options or {}).get("sep", _KOMBU_SEP)
    exchange = f"{app.conf.control_exchange or 'celery'}.pidbox"
    other_layout: list[str] = []
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        for raw in client.smembers(f"_kombu.binding.{exchange}"):
            entry = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            if entry.startswith(sep + sep) or not entry.endswith(f".{exchange}"):
                continue
            other = next((s for s in (":", _KOMBU_SEP) if s != sep and entry.startswith(s + s)), None)
            if other is not None:
                other_layout.append(entry[2 * len(other):-len(f".{exchange}")])
    replies = app.control.inspect(timeout=timeout_s).stats() or {}
    foreign = sorted({*other_layout, *(n for n, st in replies.items() if not (isinstance(st, dict) and "rmq" in st))})
    if not foreign:
        return Finding(check, f"{len(replies)} worker(s) answered, all with rmq")
    return Finding(
        check,
        f"{', '.join(foreign)} share(s) this Redis database without rmq: rmq's workers hand back every "
        f"unacknowledged message older than rmq_visibility_timeout ({cfg.visibility_timeout:g}s), so a task "
        "of theirs that runs longer is delivered again while it runs"
        + (("; and their kombu bindings use another separator, so remote-control replies (inspect, ping) "
            "between the two kinds fail (ValueError: not enough values to unpack)") if other_layout else "")
        + " (a worker killed without a warm shutdown leaves its binding behind: check the names)",
        hazard=True,
        fix="install rmq in their app too (rmq.install(app)), or give them their own Redis database, or "
            "raise rmq_visibility_timeout above their longest task (a dead worker's messages then come back "
            "that much later)",
    )
