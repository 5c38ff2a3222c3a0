"""One resource concern's hooks into a governed worker, every one a no-op by default.

A concern (memory admission, CPU slots, rate limits, sessions, hygiene, models, monitoring) takes
part in two lives:

- **around a governed task**, in the pool process: ``enter`` runs before the body, in the
  concerns' order; ``exit`` runs after it, in reverse order, and only for concerns whose ``enter``
  returned. ``enter`` may raise :class:`rmq.core.errors.Defer` (re-queue the task later, not a
  failure) or an :class:`rmq.core.errors.RmqError` (the task fails with it). Only concerns whose
  ``applies`` says yes for the task's declaration take part.
- **around the worker**: ``worker_boot`` in the main process before the pool forks (what it builds
  there every pool process inherits), ``worker_start`` / ``worker_stop`` in the main process around
  the governor, ``process_start`` / ``process_exit`` in each pool process.

The ordered list a worker runs is assembled by the Celery layer (:mod:`rmq.celery.concerns`), which
alone may import every resource package. See ``docs/design.md#concerns``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmq.core.selfmem import own_rss_bytes

if TYPE_CHECKING:  # pragma: no cover
    from rmq.core.config import RmqConfig
    from rmq.core.declarations import TaskDeclaration
    from rmq.core.runtime import Runtime

__all__ = ["Concern", "TaskContext", "current_context", "set_current_context"]


@dataclass(slots=True)  # made for every task: quicker to build and to read
class TaskContext:
    """What concerns know about the task being run.

    Attributes:
        task_name: registered task name.
        task_id: the Celery task id.
        declaration: the task's declaration.
        config: the worker's rmq config.
        args / kwargs: the call's arguments (concerns may read, never change them).
        memory_bytes: the memory admitted for this run (declared or learned), set by admission.
        session_dir: set by the session concern.
        state: scratch space, one key per concern.
        rss_before / rss_after: this process's RSS before and after the body, read once for all
            concerns (see :meth:`rss_before_body`), ``None`` until a concern asks.
        runtime: the worker's :class:`~rmq.core.runtime.Runtime` the task runs under (``None``:
            concerns look up the current one).
        min_memory_bytes: the least this run reserves: what a memory kill of an earlier run saw
            (header ``rmq_reserve``), else 0.
    """

    task_name: str
    task_id: str
    declaration: TaskDeclaration
    config: RmqConfig
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    memory_bytes: int = 0
    session_dir: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)
    rss_before: int | None = None
    rss_after: int | None = None
    runtime: Runtime | None = None
    min_memory_bytes: int = 0

    def rss_before_body(self, probe: Callable[[], int] = own_rss_bytes) -> int:
        """This process's RSS before the body: read by the first concern that asks (on enter)."""
        if self.rss_before is None:
            self.rss_before = probe()
        return self.rss_before

    def rss_after_body(self, probe: Callable[[], int] = own_rss_bytes) -> int:
        """This process's RSS after the body, before any concern released anything (on exit)."""
        if self.rss_after is None:
            self.rss_after = probe()
        return self.rss_after


class Concern:
    """Base class: every hook is a no-op."""

    #: short name, used in logs and counters
    name = "concern"

    def applies(self, declaration: TaskDeclaration) -> bool:
        """Whether this concern has anything to do around tasks with this declaration (by default:
        whether it overrides ``enter`` or ``exit`` at all)."""
        cls = type(self)
        return cls.enter is not Concern.enter or cls.exit is not Concern.exit

    def enter(self, ctx: TaskContext) -> None:
        """Acquire what the task needs; raise ``Defer`` to re-queue it later."""

    def exit(self, ctx: TaskContext, failed: bool) -> None:
        """Release what ``enter`` acquired; ``failed`` tells whether the task raised."""

    def worker_boot(self, rt: Runtime, worker: Any) -> None:
        """Main process, before the pool forks: build what every pool process inherits."""

    def worker_start(self, rt: Runtime) -> None:
        """Main process, once the governor runs."""

    def worker_stop(self, rt: Runtime) -> None:
        """Main process, when the worker stops (after the governor)."""

    def process_start(self, rt: Runtime) -> None:
        """A pool process has started (replacements included)."""

    def process_exit(self, rt: Runtime) -> None:
        """A pool process is exiting."""


_running = threading.local()


def current_context() -> TaskContext | None:
    """The context of the governed task this thread is running (between its concerns' ``enter``
    and ``exit``), else None."""
    return getattr(_running, "ctx", None)


def set_current_context(ctx: TaskContext | None) -> None:
    """Set by the task base class around a governed task."""
    _running.ctx = ctx
