"""Session directories (SPEC C6): validated ids, per-session leases, cleanup on task end.

Layout under the session root (``rmq_session_root``)::

    session_<id>/                 the task's working directory (mode 0700)
    .rmq/lock                     flock serialising "create or take a lease" against "remove"
    .rmq/leases/<id>.<pid>.<task>.<token>   one file per holder, flock-ed LOCK_EX while held
    .rmq/failed/<id>              time a task failed in the session (epoch seconds)
    .rmq/trash/                   sessions being removed (renamed here under the lock)

A lease is live iff its file is flock-ed: the kernel drops the lock when the holder's last
descriptor closes, so a SIGKILLed holder stops protecting its session at once, without
pid checks (pids are reused and differ across containers). Checkers probe with
``LOCK_SH | LOCK_NB``. Every removal decision (is it live? then rename it into the trash) is
made under ``.rmq/lock``, and :meth:`SessionStore.open` creates the lease and the directory
under the same lock, so a session is never removed between being chosen and being used.
Lease descriptors are close-on-exec; a child the holder forks shares the lock (the lease lives
until both are gone). The root path itself may be a symlink (the operator's choice); nothing
below it is ever followed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from rmq.core import runtime
from rmq.core.declarations import CLEANUP_POLICIES
from rmq.core.errors import ConfigError, RmqError
from rmq.concern import Concern, TaskContext

if TYPE_CHECKING:  # pragma: no cover
    from rmq.disk.safe_tree import Removed
    from rmq.core.declarations import TaskDeclaration

__all__ = [
    "SESSION_PREFIX",
    "SessionError",
    "SessionGuard",
    "SessionRoot",
    "SessionStore",
    "is_live",
    "validate_session_id",
]

log = logging.getLogger("rmq.disk.sessions")

SESSION_PREFIX = "session_"
STATE_DIR = ".rmq"
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SessionError(RmqError):
    """A session directory cannot be used safely (a symlink, not a directory, not ours)."""


def validate_session_id(value: object) -> str:
    """Return ``value`` if it is a valid session id (``[A-Za-z0-9_-]{1,128}``).

    Raises:
        ConfigError: naming the (truncated) bad value.
    """
    if isinstance(value, str) and _ID_RE.fullmatch(value):
        return value
    shown = repr(value)
    if len(shown) > 60:
        shown = f"{shown[:50]}...' ({len(value) if isinstance(value, str) else '?'} characters)"
    raise ConfigError(f"invalid session id {shown}: use 1-128 characters from A-Z a-z 0-9 _ -")


def _safe_token(text: object) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(text))[:64] or "_"


# Descriptors holding a root lock in this process; a forked child closes its copies.
_lock_fds: set[int] = set()
_lock_fds_guard = threading.Lock()
_fork_hooked = False


def _open_lock_fd(state_fd: int) -> int:
    global _fork_hooked
    with _lock_fds_guard:
        if not _fork_hooked:  # registered on first use: nothing happens on import
            os.register_at_fork(
                before=_lock_fds_guard.acquire,
                after_in_parent=_lock_fds_guard.release,
                after_in_child=_drop_inherited_locks,
            )
            _fork_hooked = True
        fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=state_fd)
        _lock_fds.add(fd)
    return fd


def _close_lock_fd(fd: int) -> None:
    with _lock_fds_guard:  # a fork between close and discard would close a reused number
        _lock_fds.discard(fd)
        os.close(fd)


def _drop_inherited_locks() -> None:
    for fd in _lock_fds:
        try:
            os.close(fd)  # the parent's lock stays: flock is per open file, we drop one reference
        except OSError:
            pass
    _lock_fds.clear()
    _lock_fds_guard.release()  # acquired by the forking thread in ``before``


def _subdir(parent_fd: int, name: str, create: bool) -> int | None:
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise SessionError(f"{name!r} in the session root is not a directory (or is a symlink)") from exc
        raise


class SessionRoot:
    """Descriptors on a session root and its ``.rmq`` state directories; a context manager.

    With ``create=False`` nothing is created: missing directories give ``None`` descriptors
    and the queries answer "nothing there".
    """

    def __init__(self, root: str | os.PathLike[str], create: bool = False) -> None:
        self.path = Path(root)
        self.fd: int | None = None
        self.leases_fd = self.failed_fd = self.trash_fd = self.state_fd = None
        if create:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self.state_fd = _subdir(self.fd, STATE_DIR, create)
            if self.state_fd is not None:
                self.leases_fd = _subdir(self.state_fd, "leases", create)
                self.failed_fd = _subdir(self.state_fd, "failed", create)
                self.trash_fd = _subdir(self.state_fd, "trash", create)
        except FileNotFoundError:
            if create:
                self.close()
                raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close every descriptor."""
        for attr in ("leases_fd", "failed_fd", "trash_fd", "state_fd", "fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the root's removal lock (blocking).

        A process forked while the lock is held (a pool process forked by the worker while
        its cleanup thread holds it) closes its inherited copy at once, so the lock is
        never kept by a process that does not know it holds it.
        """
        if self.state_fd is None:
            raise FileNotFoundError(errno.ENOENT, "session root has no state directory", str(self.path))
        fd = _open_lock_fd(self.state_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            _close_lock_fd(fd)

    def names(self) -> list[str]:
        """Entries named ``session_*`` directly under the root."""
        if self.fd is None:
            return []
        return sorted(n for n in os.listdir(self.fd) if n.startswith(SESSION_PREFIX))

    # leases -----------------------------------------------------------------------------
    def acquire_lease(self, session_id: str, task_id: object) -> tuple[int, str]:
        """Create and flock a lease file; returns ``(fd, name)``. Call under :meth:`lock`."""
        assert self.leases_fd is not None
        name = f"{session_id}.{os.getpid()}.{_safe_token(task_id)}.{secrets.token_hex(4)}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=self.leases_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a checker probes it
            info = {"session": session_id, "pid": os.getpid(), "task_id": str(task_id), "time": time.time()}
            os.write(fd, json.dumps(info).encode())
        except BaseException:
            os.unlink(name, dir_fd=self.leases_fd)
            os.close(fd)
            raise
        return fd, name

    def release_lease(self, lease: tuple[int, str]) -> None:
        """Remove a lease file this process holds and drop its lock."""
        fd, name = lease
        try:
            if self.leases_fd is not None:
                st = os.stat(name, dir_fd=self.leases_fd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                    os.unlink(name, dir_fd=self.leases_fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def scan_leases(self) -> tuple[set[str], list[str]]:
        """``(ids with a live lease, names of stale lease files)``."""
        live: set[str] = set()
        stale: list[str] = []
        if self.leases_fd is None:
            return live, stale
        for name in os.listdir(self.leases_fd):
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                fd = os.open(name, flags, dir_fd=self.leases_fd)
            except FileNotFoundError:
                continue
            except OSError:
                stale.append(name)  # a symlink or worse: junk, never a lease of ours
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                live.add(name.split(".", 1)[0])
            else:
                stale.append(name)
            finally:
                os.close(fd)
        return live, stale

    def remove_stale_leases(self) -> int:
        """Unlink lease files nobody holds (their holder died). Call under :meth:`lock`."""
        _, stale = self.scan_leases()
        for name in stale:
            try:
                os.unlink(name, dir_fd=self.leases_fd)
            except FileNotFoundError:
                pass
        return len(stale)

    # failed markers ---------------------------------------------------------------------
    def mark_failed(self, session_id: str, now: float) -> None:
        """Record that a task failed in the session at ``now``."""
        assert self.failed_fd is not None
        tmp = f"{session_id}.tmp{secrets.token_hex(4)}"
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=self.failed_fd,
        )
        with os.fdopen(fd, "w") as fh:
            fh.write(repr(float(now)))
        os.replace(tmp, session_id, src_dir_fd=self.failed_fd, dst_dir_fd=self.failed_fd)

    def clear_failed(self, session_id: str) -> None:
        """Forget a failure marker (only valid ids have one: ``session_..`` is no session)."""
        if self.failed_fd is not None and _ID_RE.fullmatch(session_id):
            try:
                os.unlink(session_id, dir_fd=self.failed_fd)
            except FileNotFoundError:
                pass

    def failed_markers(self) -> dict[str, float]:
        """``{session id: failure time}``."""
        out: dict[str, float] = {}
        if self.failed_fd is None:
            return out
        for name in os.listdir(self.failed_fd):
            if not _ID_RE.fullmatch(name):  # "<id>.tmp..." being written, or junk
                continue
            try:
                fd = os.open(
                    name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.failed_fd
                )
            except OSError:
                continue
            with os.fdopen(fd) as fh:
                try:
                    out[name] = float(fh.read(64))
                except ValueError:
                    out[name] = os.fstat(fd).st_mtime
        return out

    # removal ----------------------------------------------------------------------------
    def retire(self, name: str) -> str | None:
        """Rename root entry ``name`` into the trash; returns its trash name. Call under :meth:`lock`."""
        assert self.fd is not None and self.trash_fd is not None
        trash_name = f"{name}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            os.rename(name, trash_name, src_dir_fd=self.fd, dst_dir_fd=self.trash_fd)
        except FileNotFoundError:
            return None
        return trash_name

    def purge(self, trash_name: str) -> Removed:
        """Delete a trash entry without following links."""
        from rmq.disk.safe_tree import remove_tree  # cleanup builds on this module

        assert self.trash_fd is not None
        return remove_tree(self.trash_fd, trash_name)

    def ensure_session_dir(self, session_id: str) -> None:
        """Create ``session_<id>`` (0700) or check the existing one is our real directory; touch it."""
        assert self.fd is not None
        name = SESSION_PREFIX + session_id
        try:
            os.mkdir(name, 0o700, dir_fd=self.fd)
        except FileExistsError:
            pass
        st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise SessionError(f"refusing session {session_id!r}: {self.path / name} is {kind}")
        if st.st_uid != os.geteuid():
            raise SessionError(
                f"refusing session {session_id!r}: {self.path / name} belongs to uid {st.st_uid}"
            )
        self.touch(session_id)

    def touch(self, session_id: str) -> None:
        """Set the session directory's mtime to now: its age counts from its last use."""
        assert self.fd is not None
        try:
            fd = os.open(SESSION_PREFIX + session_id, _DIR_FLAGS, dir_fd=self.fd)
        except OSError:
            return  # gone, or not a real directory: nothing to touch
        try:
            os.utime(fd)
        finally:
            os.close(fd)


def is_live(root: str | os.PathLike[str], session_id: str) -> bool:
    """Whether a live process holds a lease on the session."""
    with SessionRoot(root) as sr:
        return session_id in sr.scan_leases()[0]


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

    The id comes from the keyword argument named by ``declaration.session``, else from the
    positional arguments when ``ctx.state["argnames"]`` (the task function's parameter names,
    aligned with ``ctx.args``, so without a bound ``self``) is given.
    """

    name = "session"

    def applies(self, declaration: TaskDeclaration) -> bool:
        """Only for ``session=...`` tasks."""
        return bool(declaration.session)

    def enter(self, ctx: TaskContext) -> None:
        """Validate the id (before touching any file), open the directory, set ``ctx.session_dir``."""
        arg = ctx.declaration.session
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
