"""Removing and measuring a directory tree without following a symlink or leaving the tree.

A session's content was written by tasks, and a task may leave symlinks to anywhere (by mistake or
not), so removal and measurement walk directory descriptors opened with ``O_NOFOLLOW |
O_DIRECTORY`` and act on names relative to them (``unlink``/``rmdir``/``stat`` with ``dir_fd``):
a symlink is removed as a link, never followed, and a directory swapped for a symlink mid-walk
cannot redirect the removal outside the tree. Removal never crosses into another filesystem (a
mount point inside a session). See ``docs/design.md#sessions``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from typing import NamedTuple

__all__ = ["DIR_FLAGS", "Removed", "TreeInfo", "measure_tree", "remove_tree"]

#: open a real directory, never through a symlink, and keep it out of exec-ed children
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Removed(NamedTuple):
    """What :func:`remove_tree` deleted: bytes of regular files (``st_size``) and entries."""

    bytes_freed: int
    entries: int


class TreeInfo(NamedTuple):
    """A tree's newest mtime (epoch s), regular-file bytes and entry count, links not followed."""

    newest_mtime: float
    bytes: int
    entries: int


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a single path component: {name!r}")


def _open_dir(parent_fd: int, name: str, fix_perms: bool) -> int | None:
    """Descriptor of the real directory ``name``, or None if it is not one (a link, a file)."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except PermissionError:
        if not fix_perms:
            return None
        # An unreadable directory: chmod it through an O_PATH descriptor, which pins the
        # real directory (never a link), then open it through /proc/self/fd.
        path_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            os.chmod(f"/proc/self/fd/{path_fd}", 0o700)
            return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        finally:
            os.close(path_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return None
        raise


def _walk(top_fd: int, name: str, removing: bool) -> Iterator[tuple[int, str, os.stat_result, bool]]:
    """Post-order ``(parent_fd, name, lstat, is_dir)``; ``parent_fd`` is open while yielded."""
    dev = os.fstat(top_fd).st_dev
    stack: list[tuple[int, int, str, os.stat_result, list[str]]] = []

    def visit(parent_fd: int, entry: str) -> tuple[int | None, os.stat_result] | None:
        try:
            st = os.stat(entry, dir_fd=parent_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev != dev:
                    if removing:
                        raise OSError(errno.EXDEV, "a mount point inside a session; not descending", entry)
                    return None, st
                fd = _open_dir(parent_fd, entry, fix_perms=removing)
                if fd is not None:
                    st = os.fstat(fd)
                    if removing and st.st_mode & 0o700 != 0o700:
                        with contextlib.suppress(PermissionError):  # not ours: removal will say why
                            os.chmod(fd, 0o700)  # fchmod: lets us stat and unlink its entries
                    return fd, st
                st = os.stat(entry, dir_fd=parent_fd, follow_symlinks=False)  # swapped under us
            return None, st
        except FileNotFoundError:
            return None
        except PermissionError:
            if removing:
                raise
            return None  # measuring only: skip what we may not read

    try:
        first = visit(top_fd, name)
        if first is None:
            return
        if first[0] is None:
            yield top_fd, name, first[1], False
            return
        stack.append((first[0], top_fd, name, first[1], os.listdir(first[0])))
        while stack:
            fd, parent_fd, entry, st, pending = stack[-1]
            if pending:
                child = pending.pop()
                seen = visit(fd, child)
                if seen is None:
                    continue
                child_fd, child_st = seen
                if child_fd is None:
                    yield fd, child, child_st, stat.S_ISDIR(child_st.st_mode)
                else:
                    stack.append((child_fd, fd, child, child_st, os.listdir(child_fd)))
            else:
                stack.pop()
                os.close(fd)
                yield parent_fd, entry, st, True
    finally:
        for frame in stack:
            os.close(frame[0])


def remove_tree(root: int | str | os.PathLike[str], name: str) -> Removed:
    """Delete entry ``name`` of directory ``root`` (a path or a directory descriptor) and all below it.

    Symlinks are unlinked, never followed; nothing outside ``root`` is touched, even if the
    tree changes during the walk. Directories below ``name`` that their owner made
    unwritable or unreadable are chmod-ed 0700 (through descriptors) so they can be emptied.

    Raises:
        ValueError: ``name`` is not a single path component.
        OSError: an entry could not be removed (a mount point, immutable file...).
    """
    _check_name(name)
    if isinstance(root, int):
        return _remove(root, name)
    top_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _remove(top_fd, name)
    finally:
        os.close(top_fd)


def _remove(top_fd: int, name: str) -> Removed:
    freed = entries = 0
    for parent_fd, entry, st, is_dir in _walk(top_fd, name, removing=True):
        try:
            (os.rmdir if is_dir else os.unlink)(entry, dir_fd=parent_fd)
        except FileNotFoundError:
            continue  # removed concurrently
        entries += 1
        if stat.S_ISREG(st.st_mode) and st.st_nlink <= 1:  # a hard link frees nothing
            freed += st.st_size
    return Removed(freed, entries)


def measure_tree(root_fd: int, name: str) -> TreeInfo:
    """Newest mtime, regular-file bytes and entry count of ``name`` under ``root_fd`` (lstat only)."""
    newest, size, entries = 0.0, 0, 0
    for _parent, _entry, st, _is_dir in _walk(root_fd, name, removing=False):
        newest = max(newest, st.st_mtime)
        entries += 1
        if stat.S_ISREG(st.st_mode):
            size += st.st_size
    return TreeInfo(newest, size, entries)
