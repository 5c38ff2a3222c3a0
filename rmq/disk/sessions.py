"""A session around a task: its directory opened under a lease before the body, released after.

:class:`SessionStore` opens ``<root>/session_<id>/`` under a lease and, when the task ends, applies
the task's ``cleanup`` policy: ``after_task`` removes the directory unless another task holds it,
``keep`` keeps it for the next task of a pipeline, and a failed task's directory is kept (and
marked) so that someone can look at what it left, until periodic cleanup removes it after
``rmq_failed_session_ttl``. :class:`SessionGuard` is the concern that does this around every
``session=...`` task. The layout on disk and why a lease is a flock: :mod:`rmq.disk.session_root`;
periodic cleanup: :mod:`rmq.disk.cleanup`. See ``docs/design.md#sessions``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmq.concern import Concern, TaskContext
from rmq.core import runtime
from rmq.core.declarations import CLEANUP_POLICIES
from rmq.core.errors import ConfigError
from rmq.disk.session_ids import SESSION_PREFIX, validate_session_id
from rmq.disk.session_root import SessionRoot

if TYPE_CHECKING:  # pragma: no cover
    from rmq.core.declarations import TaskDeclaration

__all__ = ["SessionGuard", "SessionStore"]

log = logging.getLogger("rmq.disk.sessions")


class SessionStore:
    """Opens and closes session directories under ``root``, holding their leases.

    One store per process and root is enough; it is thread-safe.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._held: dict[tuple[str, str], list[tuple[int, str]]] = {}
        self._lock = threading.Lock()

    def open(self, session_id: str, task_id: str) -> Path:
        """Create (if needed) and lease ``<root>/session_<id>/``; returns its path.

        Raises:
            ConfigError: invalid id (nothing is touched).
            SessionError: the name exists as a symlink, a non-directory or another user's directory.
        """
        sid = validate_session_id(session_id)
        with SessionRoot(self.root, create=True) as sr, sr.lock():
            lease = sr.acquire_lease(sid, task_id)
            try:
                sr.ensure_session_dir(sid)
                sr.clear_failed(sid)
            except BaseException:
                sr.release_lease(lease)
                raise
        with self._lock:
            self._held.setdefault((sid, str(task_id)), []).append(lease)
        return self.root / (SESSION_PREFIX + sid)

    def close(
        self,
        session_id: str,
        task_id: str,
        failed: bool,
        policy: str = "after_task",
        now: float | None = None,
    ) -> str:
        """Release the lease and apply the cleanup policy.

        ``after_task`` removes the directory unless another lease holds it; ``keep`` keeps it; a
        failed task's directory is kept and marked so cleanup removes it after
        ``rmq_failed_session_ttl`` (whatever the policy; a later ``open`` clears the mark).

        Returns:
            ``"removed"``, ``"kept"``, ``"kept_failed"`` or ``"kept_live"``.
        """
        sid = validate_session_id(session_id)
        if policy not in CLEANUP_POLICIES:
            raise ConfigError(f"cleanup must be one of {CLEANUP_POLICIES}, got {policy!r}")
        with self._lock:
            held = self._held.get((sid, str(task_id)))
            lease = held.pop() if held else None
            if held == []:
                del self._held[(sid, str(task_id))]
        with SessionRoot(self.root, create=True) as sr:
            trash = None
            with sr.lock():
                if lease is not None:
                    sr.release_lease(lease)
                if failed:
                    sr.mark_failed(sid, time.time() if now is None else now)
                    outcome = "kept_failed"
                elif policy == "keep":
                    outcome = "kept"
                elif sid in sr.scan_leases()[0]:
                    outcome = "kept_live"
                else:
                    trash = sr.retire(SESSION_PREFIX + sid)
                    outcome = "removed"
                if trash is None:
                    sr.touch(sid)
            if trash is not None:
                sr.purge(trash)
        return outcome


_stores: dict[str, SessionStore] = {}


def _store_for(root: str) -> SessionStore:
    store = _stores.get(root)
    if store is None:
        store = _stores.setdefault(root, SessionStore(root))
    return store


def _count(outcome: str) -> None:
    rt = runtime.current()
    if rt is not None:
        rt.stats.incr("sessions", outcome)


class SessionGuard(Concern):
    """Opens the task's session directory before it runs and applies its cleanup policy after.

    The id comes from the keyword argument named by ``declaration.session`` (``rmq_session_arg``
    for ``session=True``), else from the positional arguments when ``ctx.state["argnames"]``
    (the task function's parameter names, aligned with ``ctx.args``, so without a bound
    ``self``) is given.
    """

    name = "session"

    def applies(self, declaration: TaskDeclaration) -> bool:
        """Only for ``session=...`` tasks."""
        return bool(declaration.session)

    def enter(self, ctx: TaskContext) -> None:
        """Validate the id (before touching any file), open the directory, set ``ctx.session_dir``."""
        arg = ctx.config.session_arg if ctx.declaration.session_configured else ctx.declaration.session
        assert arg is not None
        sid = validate_session_id(_session_arg(ctx, arg))
        store = _store_for(ctx.config.session_root_path)
        ctx.session_dir = store.open(sid, ctx.task_id)
        ctx.state["session"] = (store, sid)
        _count("opened")

    def exit(self, ctx: TaskContext, failed: bool) -> None:
        """Release the lease; remove or keep the directory per ``declaration.cleanup``."""
        entry = ctx.state.pop("session", None)
        if entry is None:
            return
        store, sid = entry
        try:
            outcome = store.close(sid, ctx.task_id, failed=failed, policy=ctx.declaration.cleanup)
        except OSError as exc:  # the task's own result stands; cleanup retries later
            log.warning("rmq: could not clean session %s of %s: %s", sid, ctx.task_name, exc)
            outcome = "errors"
        _count(outcome)


def _session_arg(ctx: TaskContext, arg: str) -> Any:
    if arg in ctx.kwargs:
        return ctx.kwargs[arg]
    names = ctx.state.get("argnames")
    if names and arg in names:
        index = list(names).index(arg)
        if index < len(ctx.args):
            return ctx.args[index]
    raise ConfigError(f"{ctx.task_name} declares session={arg!r} but was called without a {arg!r} argument")
