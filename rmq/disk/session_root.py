"""A session root on disk: its layout, the removal lock, leases and failure marks.

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
made under ``.rmq/lock``, and :meth:`rmq.disk.sessions.SessionStore.open` creates the lease and
the directory under the same lock, so a session is never removed between being chosen and being
used. Lease descriptors are close-on-exec; a child the holder forks shares the lock (the lease
lives until both are gone). The root path itself may be a symlink (the operator's choice);
nothing below it is ever followed. A root in a directory that every user can write to (the
shared temporary directory, where the default root lives) may have been made by someone else:
there it must be a real directory (not a symlink), owned by this user, that no one else can
write, or :class:`SessionError` refuses it. See ``docs/design.md#sessions``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from rmq.core.errors import RmqError
from rmq.disk.root_lock import hold_root_lock
from rmq.disk.safe_tree import DIR_FLAGS, Removed, remove_tree
from rmq.disk.session_ids import SESSION_ID_PATTERN, SESSION_PREFIX

__all__ = ["SessionError", "SessionRoot", "is_live"]

STATE_DIR = ".rmq"


class SessionError(RmqError):
    """A session directory cannot be used safely (a symlink, not a directory, not ours)."""


def _safe_token(text: object) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(text))[:64] or "_"


def _subdir(parent_fd: int, name: str, create: bool) -> int | None:
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise SessionError(f"{name!r} in the session root is not a directory (or is a symlink)") from exc
        raise


def _in_shared_dir(path: Path) -> bool:
    """Whether ``path``'s parent lets every user create entries (``/tmp``, ``/var/tmp``, ``/dev/shm``)."""
    try:
        return bool(os.stat(path.absolute().parent).st_mode & stat.S_IWOTH)
    except OSError:
        return False


def _check_shared_root(path: Path, fd: int) -> None:
    """Refuse a root in a shared directory that another user could control."""
    st = os.fstat(fd)
    advice = "set rmq_session_root to a directory of your own, or remove it"
    if st.st_uid != os.geteuid():
        raise SessionError(f"session root {str(path)!r} is owned by uid {st.st_uid}, not by this user "
                           f"(uid {os.geteuid()}), in a directory every user can write to: {advice}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SessionError(f"session root {str(path)!r} is writable by others (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}), in a directory every user can write to: {advice}")


class SessionRoot:
    """Descriptors on a session root and its ``.rmq`` state directories; a context manager.

    With ``create=False`` nothing is created: missing directories give ``None`` descriptors
    and the queries answer "nothing there".
    """

    def __init__(self, root: str | os.PathLike[str], create: bool = False) -> None:
        self.path = Path(root)
        self.fd: int | None = None
        self.leases_fd = self.failed_fd = self.trash_fd = self.state_fd = None
        shared = _in_shared_dir(self.path)
        if create:
            try:
                os.makedirs(self.path, mode=0o700, exist_ok=True)
            except FileExistsError:  # a dangling symlink or a file: refused just below
                pass
        try:
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                                  | (os.O_NOFOLLOW if shared else 0))
            except OSError as exc:
                if shared and exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise SessionError(
                        f"session root {str(self.path)!r} is a symlink or not a directory, in a directory "
                        "every user can write to: set rmq_session_root to a directory of your own") from exc
                raise
            if shared:
                _check_shared_root(self.path, self.fd)
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
        with hold_root_lock(self.state_fd):
            yield

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
        if self.failed_fd is not None and SESSION_ID_PATTERN.fullmatch(session_id):
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
            if not SESSION_ID_PATTERN.fullmatch(name):  # "<id>.tmp..." being written, or junk
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
            fd = os.open(SESSION_PREFIX + session_id, DIR_FLAGS, dir_fd=self.fd)
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
