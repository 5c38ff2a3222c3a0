"""``@governed_task`` and the task base class that runs the concerns. Celery glue, thin.

The base class runs each applicable concern around the task body in the pool process,
turns :class:`~rmq.core.errors.Defer` into a deferral (re-queued with a countdown, same task id,
``max_retries`` untouched, at most ``rmq_max_deferrals`` times), and gives priorities the
AMQP meaning on every broker.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Retry

from rmq.celery.copies import (
    DEFERRALS,
    RESERVE,
    finished_copy,
    is_copy,
    release_claim,
    request_header,
    rmq_headers,
    run_copy,
    run_original,
)
from rmq.celery.resend import resend
from rmq.concern import Concern, TaskContext, current_context, set_current_context
from rmq.core import runtime as _runtime
from rmq.core.declarations import RMQ_OPTIONS, TaskDeclaration, parse_declaration
from rmq.core.errors import Defer, ResourceUnavailable
from rmq.core.routing import from_wire_priority, to_wire_priority, transport_kind
from rmq.core.runtime import config_for, current
from rmq.core.units import parse_priority

__all__ = ["governed_task", "GovernedTask", "config_for", "rmq_headers"]

log = logging.getLogger("rmq.celery.task")
_UNCOUNTED = frozenset({"rate_limit", "duplicate"})  # deferrals that hold nothing back
#: limiter outages (its Redis down or refusing) defer uncounted, for at most ``rmq_limiter_outage_max``
#: after the task's first such deferral (header ``rmq_outage_since``), so a Redis that stays broken ends
_OUTAGES = frozenset({"rate_limit_unavailable", "concurrency_unavailable"})
OUTAGE_SINCE = "rmq_outage_since"
DEFAULT_OUTAGE_MAX_S = 3600.0


class GovernedTask(Task):
    """Base class of governed tasks. Users get it through :func:`governed_task`."""

    abstract = True
    #: the task's declaration (set by the decorator)
    rmq: TaskDeclaration = TaskDeclaration()
    Request = "rmq.celery.request:GovernedRequest"
    acks_late = True
    reject_on_worker_lost = True
    _rmq_argnames: tuple[str, ...] | None = None

    # running ----------------------------------------------------------------
    @property
    def session_dir(self) -> Path:
        """The session directory of the running task (``session=True`` tasks only)."""
        ctx = current_context()
        if ctx is None or ctx.session_dir is None:
            raise AttributeError(f"{self.name} has no session directory (declare session=True)")
        return ctx.session_dir

    @property
    def rmq_context(self) -> TaskContext | None:
        """The running task's :class:`~rmq.concern.TaskContext`, if governed."""
        return current_context()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rt = _runtime._current  # current() without the call: this runs per task
        request = self.request_stack.top  # what Celery's tracer pushed (self.request, less two calls)
        if rt is None or request is None or request.called_directly or request.is_eager:
            return super().__call__(*args, **kwargs)
        leftover = getattr(finished_copy, "claim", None)
        if leftover is not None:  # after_return did not run for the previous task (overridden without super)
            finished_copy.claim = None
            release_claim(rt, leftover)
        if not is_copy(request):
            return run_original(self, rt, request, args, kwargs)
        return run_copy(self, rt, request, args, kwargs)  # see rmq.celery.copies

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if getattr(finished_copy, "claim", None) == task_id:
            finished_copy.claim = None
            rt = _runtime._current  # current() without the call: this runs per task
            if rt is not None:
                release_claim(rt, task_id)
        super().after_return(status, retval, task_id, args, kwargs, einfo)

    def _run_governed(self, rt: Any, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the body inside every applicable concern (Defer from a concern or the body defers it)."""
        if self._rmq_argnames is None:
            try:
                params = inspect.signature(self.run).parameters
                type(self)._rmq_argnames = tuple(params)
            except (TypeError, ValueError):
                type(self)._rmq_argnames = ()
        ctx = TaskContext(
            task_name=self.name,
            task_id=request.id,
            declaration=self.rmq,
            config=rt.config,
            args=args,  # this call's own tuple and dict: nothing else holds them
            kwargs=kwargs,
            runtime=rt,
        )
        reserve = request_header(request, RESERVE)
        if reserve:  # a re-run after a memory kill: reserve at least what the kill saw
            ctx.min_memory_bytes = int(reserve)
        ctx.state["argnames"] = self._rmq_argnames
        entered: list[Concern] = []
        set_current_context(ctx)
        try:
            # the concerns and whether the body is called directly, as worked out once per task class
            # (read here without the two method calls: each costs about 1 us in a busy pool process)
            cached = type(self).__dict__.get("_rmq_concerns")
            concerns = cached[1] if cached is not None and cached[0] is self.rmq else self._applicable_concerns()
            direct = type(self).__dict__.get("_rmq_direct")
            if direct is None:
                direct = self._runs_directly()
            try:
                for concern in concerns:
                    concern.enter(ctx)
                    entered.append(concern)
            except Defer as defer:
                self._exit_concerns(entered, ctx, failed=True)
                entered = []
                return self._defer(defer)
            failed = True
            try:
                result = self.run(*args, **kwargs) if direct else super().__call__(*args, **kwargs)
                failed = False
                return result
            except Defer as defer:  # raised by the body, e.g. a model load that does not fit
                self._exit_concerns(entered, ctx, failed=True)
                entered = []
                return self._defer(defer)
            finally:
                self._exit_concerns(entered, ctx, failed)
                entered = []
        finally:
            if entered:
                self._exit_concerns(entered, ctx, failed=True)
            set_current_context(None)
            rt.stats.flush()

    def _runs_directly(self) -> bool:
        """Whether the body can be called without ``Task.__call__`` (worked out once per task class).

        Celery's tracer has already pushed this task and its request, which ``Task.__call__`` would
        push again (~15 us per task). A base class between ``GovernedTask`` and ``Task`` that overrides
        ``__call__`` (a database session, say) is still called.
        """
        direct = type(self).__dict__.get("_rmq_direct")
        if direct is None:
            mro = type(self).__mro__
            after = mro[mro.index(GovernedTask) + 1:]
            direct = next((k for k in after if "__call__" in k.__dict__), Task) is Task
            type(self)._rmq_direct = direct
        return direct

    def _applicable_concerns(self) -> tuple[Concern, ...]:
        """The concerns this task's declaration needs, in order (worked out once per task)."""
        cached = type(self).__dict__.get("_rmq_concerns")
        if cached is None or cached[0] is not self.rmq:
            from rmq.celery.concerns import default_concerns  # in the worker only: clients never run tasks

            cached = (self.rmq, tuple(c for c in default_concerns() if c.applies(self.rmq)))
            type(self)._rmq_concerns = cached
        return cached[1]

    @staticmethod
    def _exit_concerns(entered: list[Concern], ctx: TaskContext, failed: bool) -> None:
        for concern in reversed(entered):
            try:
                concern.exit(ctx, failed)
            except Exception:
                log.exception("rmq %s failed to release for %s[%s]", concern.name, ctx.task_name, ctx.task_id)

    def _defer(self, defer: Defer) -> Any:
        rt = current()
        request = self.request
        headers = rmq_headers(request)
        done = int(headers.get(DEFERRALS, 0) or 0)
        if rt is not None:
            rt.stats.incr("deferred", defer.kind)
        # a rate-limit deferral is a booked turn that holds nothing: it does not use up the budget
        counted = defer.kind not in _UNCOUNTED and defer.kind not in _OUTAGES
        if counted and rt is not None and done >= rt.config.max_deferrals:
            raise ResourceUnavailable(self.name, defer.reason, done)
        if defer.kind in _OUTAGES:
            now = time.time()
            since = float(headers.get(OUTAGE_SINCE) or now)
            longest = rt.config.limiter_outage_max if rt else DEFAULT_OUTAGE_MAX_S
            if now - since >= longest:
                raise ResourceUnavailable(self.name, f"{defer.reason} (for {now - since:.0f}s)", done)
            headers[OUTAGE_SINCE] = since
        headers[DEFERRALS] = done + int(counted)
        sig = resend(self, request, defer.countdown_s, headers)
        log.info("rmq deferred %s[%s] for %.2fs (%s): %s", self.name, request.id, defer.countdown_s,
                 defer.kind, defer.reason)
        raise Retry(message=f"rmq deferred ({defer.kind}): {defer.reason}", when=defer.countdown_s, sig=sig)

    # sending ------------------------------------------------------------------
    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: Any = None, producer: Any = None,
                    link: Any = None, link_error: Any = None, shadow: Any = None, **options: Any) -> Any:
        priority = options.get("priority")
        if priority is None:
            priority = self.rmq.priority
        cfg = config_for(self.app)
        if not cfg.priorities:  # rmq_priorities off: Celery's own meaning, as given
            return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)
        if priority is None:
            priority = cfg.default_priority
        options["priority"] = to_wire_priority(parse_priority(priority), transport_kind(self.app))
        return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)

    def signature_from_request(self, request: Any = None, args: Any = None, kwargs: Any = None,
                               queue: Any = None, **extra_options: Any) -> Any:
        # The request carries the wire priority; apply_async translates again, so undo it here.
        sig = super().signature_from_request(request, args, kwargs, queue, **extra_options)
        wire = sig.options.get("priority")
        if wire is not None and config_for(self.app).priorities:
            sig.options["priority"] = from_wire_priority(wire, transport_kind(self.app))
        return sig


def governed_task(*args: Any, **options: Any) -> Any:
    """Declare a governed Celery task: ``@governed_task`` or ``@governed_task(memory="2GiB", ...)``.

    rmq options (``memory``, ``cpu``, ``disk``, ``heavy``, ``priority``, ``session``,
    ``cleanup``, ``rate_limits``, ``concurrency``, ``network``, ``hygiene``) are validated
    now and raise :class:`~rmq.core.errors.ConfigError` naming the argument and value; every
    other option goes to Celery (``shared_task`` semantics: no app needed here).
    """
    if len(args) == 1 and callable(args[0]) and not options:
        return governed_task()(args[0])
    if args:
        raise TypeError("governed_task takes keyword options only, e.g. @governed_task(memory='2GiB')")
    rmq_opts = {k: options.pop(k) for k in list(options) if k in RMQ_OPTIONS}
    declaration = parse_declaration(**rmq_opts)
    if declaration.network:
        from rmq.network.retries import apply_network_defaults

        apply_network_defaults(options)
    base = options.pop("base", GovernedTask)
    if not issubclass(base, GovernedTask):
        raise TypeError(f"base must subclass rmq.GovernedTask, got {base!r}")

    def decorate(fun: Any) -> Any:
        return shared_task(base=base, rmq=declaration, **options)(fun)

    return decorate
