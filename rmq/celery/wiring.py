"""``rmq.install(app)``: wires rmq into a Celery app. Idempotent; nothing happens on import."""

from __future__ import annotations

from typing import Any

from celery import signals
from kombu import Queue

from rmq.celery.task import GovernedTask
from rmq.core.routing import REDIS_PRIORITY_STEPS, to_wire_priority, transport_kind
from rmq.core.runtime import config_for

__all__ = ["install", "router"]

_signals_connected = False


def router(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict[str, Any] | None:
    """Celery router: heavy governed tasks go to the heavy queue (an explicit ``queue=`` wins)."""
    if task is None or not isinstance(task, GovernedTask):
        return None
    from rmq.core.routing import choose_queue

    cfg = config_for(task.app)
    queue = choose_queue(task.rmq.heavy, task.rmq.memory_bytes, cfg.heavy_memory_threshold, cfg.heavy_queue)
    return {"queue": queue} if queue else None


def _configure(app: Any) -> None:
    cfg = config_for(app)
    conf = app.conf
    routes = conf.task_routes
    if routes is None:
        routes = ()
    elif isinstance(routes, (dict, str)) or callable(routes):
        routes = (routes,)
    if router not in routes:
        conf.task_routes = (router, *routes)
    kind = transport_kind(app)
    options = dict(conf.broker_transport_options or {})
    if kind == "redis" and cfg.priorities:
        options.setdefault("priority_steps", list(REDIS_PRIORITY_STEPS))
        options.setdefault("sep", ":")
        options.setdefault("queue_order_strategy", "priority")
    if kind == "redis":
        options.setdefault("visibility_timeout", int(cfg.visibility_timeout))
        options.setdefault("unacked_restore_interval", max(1, int(cfg.unacked_restore_interval)))
        options.setdefault("unacked_restore_throttle", 1)
    conf.broker_transport_options = options
    if conf.task_queue_max_priority is None and cfg.priorities:
        conf.task_queue_max_priority = 10
    if conf.task_default_priority is None and cfg.priorities:
        conf.task_default_priority = to_wire_priority(cfg.default_priority, kind)
    if kind == "redis":
        backend_opts = dict(conf.result_backend_transport_options or {})
        backend_opts.setdefault("visibility_timeout", int(cfg.visibility_timeout))
        conf.result_backend_transport_options = backend_opts
    if conf.worker_autoscaler in (None, "celery.worker.autoscale:Autoscaler") and cfg.autoscaler:
        conf.worker_autoscaler = "rmq.celery.autoscale:ResourceAutoscaler"
    _declare_heavy_queue(app, cfg.heavy_queue)
    schedule = dict(conf.beat_schedule or {})
    schedule.setdefault("rmq.cleanup_sessions", {"task": "rmq.cleanup_sessions", "schedule": cfg.cleanup_interval})
    schedule.setdefault("rmq.monitor", {"task": "rmq.monitor", "schedule": cfg.monitor_beat_interval})
    if cfg.beat_entries:
        conf.beat_schedule = schedule


def _declare_heavy_queue(app: Any, heavy: str) -> None:
    """Put the heavy queue in ``task_queues``, so that a worker started without ``-Q`` consumes it.

    A worker without ``-Q`` consumes ``task_queues`` if set, else only the default queue: a queue
    that only a router names has no consumer, and heavy tasks would wait forever. When
    ``task_queues`` is unset, it becomes the default queue (built as Celery builds it) plus the
    heavy queue; a list the user set gets the heavy queue added. ``-Q`` and ``-X`` keep their
    meaning (``rmq worker --profile light`` consumes the default queue only).
    """
    conf = app.conf
    queues = conf.task_queues
    if isinstance(queues, dict):  # the old style, {name: options}
        if heavy not in queues:
            conf.task_queues = {**queues, heavy: {"exchange": heavy, "routing_key": heavy}}
        return
    if isinstance(queues, Queue):
        queues = [queues]
    current = list(queues or ())
    if any(getattr(q, "name", None) == heavy for q in current):
        return
    celery_made = app.amqp.Queues(None)  # the default queue, and a missing one, as Celery makes them
    if not current:
        current = list(celery_made.values())
    conf.task_queues = (*current, celery_made.new_missing(heavy))
    amqp = app.__dict__.get("amqp")
    if amqp is not None and "queues" in amqp.__dict__:  # installed after the app built its queues
        amqp.__dict__.pop("queues")


def _heavy_bound(app: Any, heavy: str) -> list[str]:
    """The names of ``app``'s tasks whose messages can go to the ``heavy`` queue: by rmq's router
    (a heavy declaration), the task's own ``queue``, or the app's routes for the task's name. A
    route that cannot be worked out without a real call (a router that raises) counts as heavy."""
    bound = []
    router = app.amqp.router
    for name, task in list(app.tasks.items()):
        if name.startswith("celery."):
            continue
        if getattr(task, "queue", None) == heavy:
            bound.append(name)
            continue
        try:
            queue = router.route({}, name, (), {}, task_type=task).get("queue")
        except Exception:  # a user's router that needs real arguments: assume it may choose the heavy queue
            bound.append(name)
            continue
        if getattr(queue, "name", queue) == heavy:
            bound.append(name)
    return bound


def consume_heavy_only_if_needed(worker: Any) -> None:
    """A worker started without ``-Q`` consumes the heavy queue only when one of its tasks can go there.

    On Redis each consumed queue adds its priority lists to the BRPOP the worker sends for every
    message; a worker whose tasks never go to the heavy queue would pay that for nothing (and could
    not run a heavy task anyway: Celery drops a message of a task it does not know). ``-Q`` and
    ``-X`` keep their meaning: with ``-Q`` the worker consumes what it names.
    """
    app = getattr(worker, "app", None)
    if app is None or not getattr(app, "_rmq_installed", False):
        return
    queues = app.amqp.queues
    heavy = config_for(app).heavy_queue
    if queues._consume_from is not None or heavy not in queues.consume_from:
        return  # -Q given, or -X rmq.heavy: what the command line says
    if _heavy_bound(app, heavy):
        return
    queues.deselect([heavy])  # as -X does; the banner's [queues] shows it (logging is not set up yet)


def _connect_signals() -> None:
    global _signals_connected
    if _signals_connected:
        return
    _signals_connected = True
    from rmq.celery.child import on_process_exit, on_process_start
    from rmq.core.runtime import current

    # after -Q/-X are applied and the task modules imported, before the consumer starts
    @signals.worker_init.connect(weak=False)
    def _worker_init(sender: Any = None, **_: Any) -> None:
        consume_heavy_only_if_needed(sender)

    @signals.worker_process_init.connect(weak=False)
    def _child_start(**_: Any) -> None:
        rt = current()
        if rt is not None:
            on_process_start(rt)

    @signals.worker_process_shutdown.connect(weak=False)
    def _child_exit(**_: Any) -> None:
        rt = current()
        if rt is not None:
            on_process_exit(rt)


def install(app: Any) -> Any:
    """Wire rmq into ``app``: the governor bootstep, routes, priorities, transport options,
    remote-control commands, beat entries and signals. Calling it again does nothing.

    Configuration is read when the app is configured (``rmq_*`` keys and ``RMQ_*``
    variables); a bad value raises :class:`~rmq.core.errors.ConfigError` (a worker exits 2).
    """
    if getattr(app, "_rmq_installed", False):
        return app
    app._rmq_installed = True
    from rmq.memory.scaling import check_command_line

    check_command_line()  # a bad --autoscale on a `celery worker` command line: exit 2, one line
    from rmq.celery import beat, control  # noqa: F401  (registers the beat tasks and remote-control commands)
    from rmq.celery.bootstep import GovernorStep

    app.steps["worker"].add(GovernorStep)
    _connect_signals()
    if app.configured:
        _configure(app)
    else:
        app.on_after_configure.connect(lambda sender, **kw: _configure(sender), weak=False)
    return app
