"""The hooks each resource concern runs around a governed task, in the pool process.

A guard's ``enter`` runs before the task body, in order; ``exit`` runs after it, in
reverse order, and only for guards whose ``enter`` returned. ``enter`` may raise
:class:`rmq.core.errors.Defer` (re-queue the task later, not a failure) or an
:class:`rmq.core.errors.RmqError` (the task fails with it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmq.core.selfmem import own_rss_bytes

if TYPE_CHECKING:  # pragma: no cover
    from rmq.core.config import RmqConfig
    from rmq.core.declarations import TaskDeclaration
    from rmq.core.runtime import Runtime

__all__ = ["Guard", "TaskContext"]


@dataclass(slots=True)  # made for every task: quicker to build and to read
class TaskContext:
    """What guards know about the task being run.

    Attributes:
        task_name: registered task name.
        task_id: the Celery task id.
        declaration: the task's declaration.
        config: the worker's rmq config.
        args / kwargs: the call's arguments (guards may read, never change them).
        memory_bytes: the memory admitted for this run (declared or learned), set by admission.
        session_dir: set by the session guard.
        state: scratch space, one key per guard.
        rss_before / rss_after: this process's RSS before and after the body, read once for all
            guards (see :meth:`rss_before_body`), ``None`` until a guard asks.
        runtime: the worker's :class:`~rmq.core.runtime.Runtime` the task runs under (``None``: guards
            look up the current one).
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

    def rss_before_body(self, probe: Callable[[], int] = own_rss_bytes) -> int:
        """This process's RSS before the body: read by the first guard that asks (on enter)."""
        if self.rss_before is None:
            self.rss_before = probe()
        return self.rss_before

    def rss_after_body(self, probe: Callable[[], int] = own_rss_bytes) -> int:
        """This process's RSS after the body, before any guard released anything (on exit)."""
        if self.rss_after is None:
            self.rss_after = probe()
        return self.rss_after


class Guard:
    """Base class: every hook is a no-op."""

    #: short name, used in logs and counters
    name = "guard"

    def applies(self, declaration: TaskDeclaration) -> bool:
        """Whether this guard has anything to do for tasks with this declaration."""
        return True

    def enter(self, ctx: TaskContext) -> None:
        """Acquire what the task needs; raise ``Defer`` to re-queue it later."""

    def exit(self, ctx: TaskContext, failed: bool) -> None:
        """Release what ``enter`` acquired; ``failed`` tells whether the task raised."""
