"""The cluster view: every worker's rmq snapshot, who consumes which queue, and queue depths.

:func:`collect_cluster_view` is what the ``rmq.monitor`` beat task runs: it asks every worker
(``inspect stats`` and ``active_queues``), reads the depth of every queue that matters, raises
cluster-level alerts by comparing with the previous view (a growing backlog, a queue nobody
consumes) and stores the view in Redis for ``rmq status`` (:func:`load_or_collect`). The view::

    {"time": epoch, "source": "monitor" | "live", "workers": {hostname: snapshot | None},
     "consumers": {queue: [hostname]}, "queues": {queue: depth | None},
     "alerts": [alert dict], "errors": [str]}
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any

from rmq.core import keys
from rmq.core.routing import transport_kind
from rmq.core.runtime import config_for, redis_url_for_app
from rmq.monitoring.alerts import AlertEngine, Sink
from rmq.monitoring.cluster_checks import active_cluster_alerts, cluster_alerts
from rmq.monitoring.queues import redis_priority_depths
from rmq.monitoring.sinks import EventSender, default_sinks
from rmq.monitoring.webhook import WebhookSender

__all__ = [
    "collect_cluster_view", "configured_queues", "load_or_collect", "load_view", "queue_depths",
    "queue_depths_by_priority", "tracked_queues",
]

log = logging.getLogger("rmq.monitoring.cluster")

#: a stored view lives this many beat intervals (at least ``MIN_TTL_S``); after that ``rmq status``
#: asks the workers itself, since the beat is evidently not running
TTL_INTERVALS = 3
MIN_TTL_S = 120


def _redis(app: Any) -> Any:
    url = redis_url_for_app(config_for(app), app)
    if not url:
        return None
    import redis as redis_lib

    return redis_lib.Redis.from_url(url, socket_timeout=3.0, socket_connect_timeout=3.0)


def tracked_queues(
    consumers: Mapping[str, Iterable[str]],
    configured: Iterable[str],
    paused: Iterable[str] = (),
    previous: Mapping[str, Any] | None = None,
) -> list[str]:
    """Queues whose depth the view reports.

    Those some worker consumes or has paused, the configured ones (default and heavy queue,
    ``task_queues``), and those of the previous view that still had a consumer or messages, so
    that a backlog left behind by a worker that stopped stays in sight until it drains (on
    Redis, :func:`queue_depths` also finds queues with messages that nobody ever consumed).
    """
    names = set(consumers) | set(configured) | set(paused)
    prev_queues = (previous or {}).get("queues") or {}
    prev_consumers = (previous or {}).get("consumers") or {}
    names |= {q for q, depth in prev_queues.items() if (depth or 0) > 0 or prev_consumers.get(q)}
    return sorted(names)


def _redis_declared(channel: Any) -> set[str]:
    """Queues kombu's Redis transport holds bindings for (one set per exchange), minus its own."""
    client, sep = channel.client, channel.sep
    prefix = getattr(channel, "global_keyprefix", "") or ""
    base = channel.keyprefix_queue % ""
    names = set()
    for raw in client.scan_iter(match=f"{prefix}{base}*", count=500):
        key = (raw.decode() if isinstance(raw, bytes) else raw)[len(prefix):]
        exchange = key[len(base):]
        if exchange.endswith(".pidbox") or exchange == "celeryev":  # remote control and events
            continue
        for member in client.smembers(key):
            queue = (member.decode() if isinstance(member, bytes) else member).split(sep)[-1]
            if queue and not queue.endswith(".pidbox") and not queue.startswith("celeryev."):
                names.add(queue)
    return names


def queue_depths(app: Any, names: Iterable[str], discover: bool = False) -> dict[str, int | None]:
    """Messages waiting in each queue: Redis lists per priority step, else a passive declare.

    A queue the broker does not know holds nothing (0). With ``discover`` on Redis, queues the
    broker has bindings for are added when they hold messages (a task routed to a queue no
    worker ever consumed). Raises the broker's connection errors when it cannot be reached.
    """
    return {q: sum(steps.values()) for q, steps in queue_depths_by_priority(app, names, discover).items()}


#: the ``priority`` of a RabbitMQ queue's depth: the broker tells only the total
ALL_PRIORITIES = "all"


def queue_depths_by_priority(
    app: Any, names: Iterable[str], discover: bool = False
) -> dict[str, dict[str, int]]:
    """Like :func:`queue_depths`, per priority: ``{queue: {priority: messages}}``.

    On Redis the priority is kombu's step (the list the message waits in: ``"0"``, ``"3"``, ...);
    on RabbitMQ one entry, :data:`ALL_PRIORITIES`, since a passive declare tells only the total.
    """
    names = list(names)
    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)
        if transport_kind(app) == "redis":
            channel = conn.default_channel
            steps = channel.priority_steps
            extra = sorted(_redis_declared(channel) - set(names)) if discover else []
            out = {q: redis_priority_depths(channel.client, q, channel.sep, steps) for q in names + extra}
            return {q: {str(p): n for p, n in by_step.items()} for q, by_step in out.items()
                    if q in names or any(n > 0 for n in by_step.values())}
        out_amqp: dict[str, dict[str, int]] = {}
        channel = conn.channel()
        try:
            for q in names:
                try:
                    count = int(channel.queue_declare(queue=q, passive=True).message_count)
                except conn.channel_errors:  # not declared: nothing waits (the error closed the channel)
                    count = 0
                    channel = conn.channel()
                out_amqp[q] = {ALL_PRIORITIES: count}
        finally:
            with contextlib.suppress(*conn.channel_errors, *conn.connection_errors):
                channel.close()
        return out_amqp


def _read(client: Any) -> dict[str, Any] | None:
    raw = client.get(keys.cluster_view())
    try:
        view = json.loads(raw) if raw else None
    except ValueError:  # not ours, or cut short: as good as none
        return None
    return view if isinstance(view, dict) else None


def load_view(app: Any) -> dict[str, Any] | None:
    """The view the monitor stored last, or None (none stored, expired, or no Redis)."""
    client = _redis(app)
    if client is None:
        return None
    try:
        return _read(client)
    finally:
        client.close()


def _gather(app: Any, timeout: float) -> tuple[dict[str, Any], dict[str, list[str]]]:
    stats = app.control.inspect(timeout=timeout).stats() or {}
    workers = {host: (reply or {}).get("rmq") for host, reply in stats.items()}
    consumers: dict[str, list[str]] = {}
    if workers:
        hosts = sorted(workers)
        inspect = app.control.inspect(destination=hosts, timeout=timeout, limit=len(hosts))
        for host, queues in (inspect.active_queues() or {}).items():
            for q in queues or ():
                name = q.get("name") if isinstance(q, Mapping) else None
                if name:
                    consumers.setdefault(name, []).append(host)
    return workers, {q: sorted(h) for q, h in consumers.items()}


def configured_queues(app: Any) -> list[str]:
    """The app's default queue, rmq's heavy queue and the queues of ``task_queues``."""
    names = [app.conf.task_default_queue or "celery", config_for(app).heavy_queue]
    for q in app.conf.task_queues or ():
        name = getattr(q, "name", q if isinstance(q, str) else None)
        if name:
            names.append(name)
    return names


def _raise(app: Any, alerts: list[Any], hostname: str, extra_sinks: Iterable[Sink]) -> None:
    """Deliver cluster alerts to the log, ``extra_sinks``, the webhook and the ``rmq-alert`` event."""
    config = config_for(app)
    webhook = WebhookSender(config.alert_webhook) if config.alert_webhook else None
    events = EventSender(app, hostname)
    try:
        AlertEngine([], default_sinks(events, webhook, extra_sinks)).dispatch(alerts)
    finally:
        events.close()
        if webhook is not None:  # a beat task may end soon: give the webhook a bounded moment
            webhook.wait_idle(5.0)
            webhook.stop(0.5)


def collect_cluster_view(
    app: Any,
    timeout: float = 5.0,
    *,
    store: bool = True,
    alert: bool = True,
    hostname: str | None = None,
    extra_sinks: Iterable[Sink] = (),
) -> dict[str, Any]:
    """Ask every worker and the broker; raise cluster alerts; store and return the view.

    Args:
        app: the Celery app.
        timeout: seconds to wait for workers' replies (every live worker answers within it).
        store: write the view to Redis (``rmq:cluster``) with a TTL of a few beat intervals.
        alert: compare with the stored view and raise ``backlog_growing`` / ``queue_unconsumed``.
        hostname: stamped on the ``rmq-alert`` events (default: this host's name).
        extra_sinks: alert sinks of the caller's layer, besides the log, the webhook and the
            event (the monitor beat task gives the ``rmq.celery.signals.alert`` signal's sink).
    """
    config = config_for(app)
    view: dict[str, Any] = {"time": time.time(), "source": "monitor" if store else "live", "errors": []}
    workers, consumers = _gather(app, timeout)
    view["workers"] = workers
    view["consumers"] = consumers
    previous = None
    client = _redis(app) if (store or alert) else None
    try:
        if client is not None and alert:
            try:
                previous = _read(client)
            except Exception as exc:  # Redis down: no history, so no cluster alerts this time
                view["errors"].append(f"previous view: {type(exc).__name__}: {exc}")
                log.warning("rmq monitor could not read the previous cluster view", exc_info=True)
        paused = [q for snap in workers.values() for q in (snap or {}).get("paused_queues") or ()]
        names = tracked_queues(consumers, configured_queues(app), paused, previous)
        try:
            view["queues"] = queue_depths(app, names, discover=True)
        except Exception as exc:  # the broker is down: the workers' part of the view still helps
            view["queues"] = dict.fromkeys(names)
            view["errors"].append(f"queue depths: {type(exc).__name__}: {exc}")
            log.warning("rmq monitor could not read queue depths", exc_info=True)
        if alert:
            new = cluster_alerts(previous, view, cooldown_s=config.alert_cooldown)
            if new:
                _raise(app, new, hostname or socket.gethostname(), extra_sinks)
        view["alerts"] = _alerts(view)
        if client is not None and store:
            ttl = max(MIN_TTL_S, int(TTL_INTERVALS * config.monitor_beat_interval))
            try:
                client.set(keys.cluster_view(), json.dumps(view, default=str), ex=ttl)
            except Exception as exc:
                view["errors"].append(f"storing the view: {type(exc).__name__}: {exc}")
                log.warning("rmq monitor could not store the cluster view", exc_info=True)
    finally:
        if client is not None:
            client.close()
    return view


def _alerts(view: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = list(active_cluster_alerts(view))
    for host, snap in sorted((view.get("workers") or {}).items()):
        for name in (snap or {}).get("alerts") or ():
            out.append({"hostname": host, "name": name, "subject": "", "message": f"{name} alert in effect"})
    return out


def load_or_collect(app: Any, live: bool = False, timeout: float = 2.0) -> dict[str, Any]:
    """For ``rmq status``: the stored view, else (or with ``live``) a fresh read-only one.

    A live collection neither stores the view nor raises alerts. ``history`` (the monitor's
    alert bookkeeping) is left out.
    """
    view = None if live else load_view(app)
    if view is None:
        view = collect_cluster_view(app, timeout, store=False, alert=False)
    view.pop("history", None)
    return view
