"""A worker started without ``-Q`` consumes the heavy queue only when one of its tasks can go there:
on Redis every consumed queue adds its lists to the BRPOP sent for each message."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from celery import Celery

import rmq
from rmq.celery.task import GovernedTask
from rmq.celery.wiring import consume_heavy_only_if_needed
from rmq.core.declarations import parse_declaration

GiB = 1024**3


def _body() -> None:
    return None


def _worker_app(*tasks: tuple[str, dict[str, Any]], plain: dict[str, dict[str, Any]] | None = None,
                **conf: Any) -> Celery:
    """An installed app holding only the given governed tasks (name, rmq options) and plain ones."""
    app = Celery("heavy", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.update(conf)
    rmq.install(app)
    for name, opts in tasks:
        app.task(name=name, base=GovernedTask, rmq=parse_declaration(**opts))(_body)
    for name, opts in (plain or {}).items():
        app.task(name=name, **opts)(_body)
    mine = {n for n, _ in tasks} | set(plain or {})
    for name in list(app.tasks):  # shared tasks other tests declared attach to every app: not this worker's
        if name not in mine and not name.startswith(("celery.", "rmq.")):
            app.tasks.unregister(name)
    return app


def _consumed(app: Celery) -> set[str]:
    consume_heavy_only_if_needed(SimpleNamespace(app=app))
    return set(app.amqp.queues.consume_from)


def test_a_worker_whose_tasks_never_go_to_the_heavy_queue_consumes_the_default_queue_only() -> None:
    app = _worker_app(("h.light", {}), ("h.small", {"memory": "100MiB"}), plain={"h.plain": {}})
    assert "rmq.heavy" in app.amqp.queues  # still declared: a client routes heavy tasks there
    assert _consumed(app) == {"celery"}


def test_a_heavy_declaration_or_a_large_memory_keeps_the_heavy_queue() -> None:
    assert _consumed(_worker_app(("h.light", {}), ("h.heavy", {"heavy": True}))) == {"celery", "rmq.heavy"}
    assert _consumed(_worker_app(("h.big", {"memory": "2GiB"}))) == {"celery", "rmq.heavy"}
    # the threshold is the worker's own
    assert _consumed(_worker_app(("h.big", {"memory": "2GiB"}), rmq_heavy_memory_threshold="4GiB")) == {"celery"}


def test_a_route_or_a_queue_of_the_users_to_the_heavy_queue_keeps_it() -> None:
    assert _consumed(_worker_app(plain={"h.q": {"queue": "rmq.heavy"}})) == {"celery", "rmq.heavy"}
    routed = _worker_app(plain={"h.r": {}}, task_routes={"h.r": {"queue": "rmq.heavy"}})
    assert _consumed(routed) == {"celery", "rmq.heavy"}


def test_a_router_that_needs_real_arguments_counts_as_one_that_may_choose_the_heavy_queue() -> None:
    def router(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
        return {"queue": "rmq.heavy"} if kwargs["size"] > 10 else None

    assert _consumed(_worker_app(plain={"h.r": {}}, task_routes=(router,))) == {"celery", "rmq.heavy"}


def test_the_command_line_decides_when_it_names_queues() -> None:
    app = _worker_app(("h.light", {}))
    app.amqp.queues.select(["celery", "rmq.heavy"])  # -Q celery,rmq.heavy
    assert _consumed(app) == {"celery", "rmq.heavy"}
    other = _worker_app(("h.heavy", {"heavy": True}))
    other.amqp.queues.deselect(["rmq.heavy"])  # -X rmq.heavy
    assert _consumed(other) == {"celery"}


def test_an_app_without_rmq_is_left_alone() -> None:
    plain = Celery("plain", broker="redis://127.0.0.1:1/0", set_as_current=False)
    plain.conf.task_queues = [*plain.amqp.Queues(None).values(), plain.amqp.Queues(None).new_missing("rmq.heavy")]
    plain.task(name="p.t")(_body)
    assert _consumed(plain) == {"celery", "rmq.heavy"}
