"""Session cleanup (SPEC C6): safe tree removal, the cleanup plan and its execution.

Deletion walks directory descriptors opened with ``O_NOFOLLOW | O_DIRECTORY`` and removes
names relative to them (``unlink``/``rmdir`` with ``dir_fd``), so a symlink is removed as a
link, never followed, and swapping a directory for a symlink mid-walk cannot redirect the
deletion outside the root. Removal never crosses into another filesystem (mount points).

The plan is computed from injected readings (``now``, ``disk_usage``), so policies are tested
with fake clocks and fake disks; execution re-checks each session's lease under the root's
lock before removing it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from rmq.disk.session_root import SESSION_PREFIX, SessionRoot
from rmq.core.units import format_bytes

if TYPE_CHECKING:  # pragma: no cover
    from rmq.core.config import RmqConfig

__all__ = [
    "Candidate",
    "CleanupReport",
    "Removed",
    "TreeInfo",
    "cleanup_from_config",
    "format_report",
    "measure_tree",
    "plan_cleanup",
    "remove_tree",
    "run_cleanup",
]

DiskUsage = Callable[[], "tuple[int, int, int]"]
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
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


@dataclass(frozen=True)
class Candidate:
    """A session chosen for removal, and why (``"age"``, ``"failed"`` or ``"disk"``)."""

    name: str
    reason: str
    newest_mtime: float
    bytes: int
    ino: int
    mtime_ns: int

    @property
    def session_id(self) -> str:
        """The id part of the name."""
        return self.name[len(SESSION_PREFIX) :]


class _Plan(NamedTuple):
    candidates: list[Candidate]
    skipped_live: list[str]
    ratio_before: float | None
    ratio_projected: float | None


def _plan(
    sr: SessionRoot,
    now: float,
    max_age_s: float,
    failed_ttl_s: float,
    disk_usage: DiskUsage,
    high_ratio: float,
    low_ratio: float,
    older_than_s: float | None,
) -> _Plan:
    live, _ = sr.scan_leases()
    failed = sr.failed_markers()
    limit_s = max_age_s if older_than_s is None else older_than_s
    sessions: list[tuple[str, TreeInfo, os.stat_result]] = []
    for name in sr.names():
        try:
            top = os.stat(name, dir_fd=sr.fd, follow_symlinks=False)
            sessions.append((name, measure_tree(sr.fd, name), top))  # type: ignore[arg-type]
        except OSError:
            continue  # vanished or unreadable: next run
    sessions.sort(key=lambda s: (s[1].newest_mtime, s[0]))

    def candidate(name: str, info: TreeInfo, top: os.stat_result, reason: str) -> Candidate:
        return Candidate(name, reason, info.newest_mtime, info.bytes, top.st_ino, top.st_mtime_ns)

    chosen: list[Candidate] = []
    skipped: list[str] = []
    for name, info, top in sessions:
        sid = name[len(SESSION_PREFIX) :]
        if sid in failed:  # failed sessions live by their TTL, not by max age
            due, reason = now - failed[sid] > failed_ttl_s, "failed"
        else:
            due, reason = now - info.newest_mtime > limit_s, "age"
        if due and sid in live:
            skipped.append(name)
        elif due:
            chosen.append(candidate(name, info, top, reason))
    try:
        total, used, _free = disk_usage()
    except OSError:
        return _Plan(chosen, skipped, None, None)
    if total <= 0:
        return _Plan(chosen, skipped, None, None)
    projected = used - sum(c.bytes for c in chosen)
    if used / total >= high_ratio:
        picked = {c.name for c in chosen}
        for name, info, top in sessions:  # oldest first
            if projected / total < low_ratio:
                break
            if name in picked:
                continue
            if name[len(SESSION_PREFIX) :] in live:
                skipped.append(name)
                continue
            chosen.append(candidate(name, info, top, "disk"))
            projected -= info.bytes
    return _Plan(chosen, skipped, used / total, max(projected, 0) / total)


def plan_cleanup(
    root: str | os.PathLike[str],
    now: float,
    max_age_s: float,
    failed_ttl_s: float,
    disk_usage: DiskUsage,
    high_ratio: float,
    low_ratio: float,
    older_than_s: float | None = None,
) -> list[Candidate]:
    """Which sessions cleanup would remove, touching nothing.

    Policies: age (newest mtime of the tree older than ``older_than_s`` or ``max_age_s``);
    failed (failure mark older than ``failed_ttl_s``; such sessions ignore max age); disk
    pressure (``used/total >= high_ratio``: oldest idle sessions until the projected ratio is
    below ``low_ratio``). A session with a live lease is never a candidate.

    Args:
        disk_usage: returns ``(total, used, free)`` bytes of the root's filesystem.
    """
    with SessionRoot(root) as sr:
        return _plan(
            sr, now, max_age_s, failed_ttl_s, disk_usage, high_ratio, low_ratio, older_than_s
        ).candidates


@dataclass
class CleanupReport:
    """What a cleanup run did (or, with ``dry_run``, would do)."""

    root: str
    dry_run: bool = False
    removed: int = 0
    bytes_freed: int = 0
    removed_names: list[str] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    skipped_live: int = 0
    stale_leases_removed: int = 0
    disk_ratio_before: float | None = None
    disk_ratio_after: float | None = None
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (beat task result, ``inspect`` replies)."""
        return asdict(self)


def _ratio(disk_usage: DiskUsage) -> float | None:
    try:
        total, used, _free = disk_usage()
    except OSError:
        return None
    return used / total if total > 0 else None


def run_cleanup(
    root: str | os.PathLike[str],
    now: float | None = None,
    max_age_s: float = 86400.0,
    failed_ttl_s: float = 3600.0,
    disk_usage: DiskUsage | None = None,
    high_ratio: float = 0.80,
    low_ratio: float = 0.70,
    older_than_s: float | None = None,
    dry_run: bool = False,
) -> CleanupReport:
    """Plan (see :func:`plan_cleanup`) and remove; also drop stale leases and leftover trash.

    Only ``session_*`` entries directly under ``root`` (and rmq's own ``.rmq`` state) are
    touched. With ``dry_run`` nothing is touched and the figures are projections.
    """
    now = time.time() if now is None else now
    usage: DiskUsage = disk_usage or (lambda: tuple(shutil.disk_usage(root)))  # type: ignore[assignment,return-value]
    report = CleanupReport(root=str(root), dry_run=dry_run)
    with SessionRoot(root) as sr:
        if sr.fd is None:  # no root, nothing to clean; never create it here
            return report
        plan = _plan(sr, now, max_age_s, failed_ttl_s, usage, high_ratio, low_ratio, older_than_s)
        fresh_root = sr.state_fd is None  # rmq never used it: no leases, markers or trash
    report.disk_ratio_before = plan.ratio_before
    report.skipped_live = len(set(plan.skipped_live))
    if dry_run or (fresh_root and not plan.candidates):
        for c in plan.candidates:
            _count(report, c.name, c.reason, c.bytes)
        report.disk_ratio_after = plan.ratio_projected
        return report
    with SessionRoot(root, create=True) as sr:
        with sr.lock():
            report.stale_leases_removed = sr.remove_stale_leases()
        for leftover in os.listdir(sr.trash_fd):  # type: ignore[arg-type]
            _purge(sr, leftover, report)  # left over by a crashed run
        for c in plan.candidates:
            trash_name: str | None = None
            with sr.lock():
                if c.session_id in sr.scan_leases()[0]:
                    report.skipped_live += 1
                    continue
                try:
                    top = os.stat(c.name, dir_fd=sr.fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if (top.st_ino, top.st_mtime_ns) != (c.ino, c.mtime_ns):
                    continue  # used since it was planned
                trash_name = sr.retire(c.name)
                sr.clear_failed(c.session_id)
            if trash_name is not None:
                _count(report, c.name, c.reason, _purge(sr, trash_name, report))
        present = {n[len(SESSION_PREFIX) :] for n in sr.names()}
        with sr.lock():
            for sid in set(sr.failed_markers()) - present:
                sr.clear_failed(sid)
    report.disk_ratio_after = _ratio(usage)
    return report


def _count(report: CleanupReport, name: str, reason: str, freed: int) -> None:
    report.removed += 1
    report.bytes_freed += freed
    report.removed_names.append(name)
    report.reasons[reason] = report.reasons.get(reason, 0) + 1


def _purge(sr: SessionRoot, trash_name: str, report: CleanupReport) -> int:
    try:
        return sr.purge(trash_name).bytes_freed
    except OSError as exc:
        report.errors.append(f"{trash_name}: {exc}")
        return 0


def cleanup_from_config(
    config: RmqConfig, dry_run: bool = False, older_than_s: float | None = None, now: float | None = None
) -> CleanupReport:
    """Run cleanup on ``config.session_root_path`` with the configured ages, TTL and disk ratios."""
    root = config.session_root_path
    return run_cleanup(
        root,
        now=now,
        max_age_s=config.session_max_age,
        failed_ttl_s=config.failed_session_ttl,
        disk_usage=lambda: tuple(shutil.disk_usage(root)),  # type: ignore[arg-type,return-value]
        high_ratio=config.disk_high_ratio,
        low_ratio=config.disk_low_ratio,
        older_than_s=older_than_s,
        dry_run=dry_run,
    )


def format_report(report: CleanupReport) -> str:
    """A few lines for people (the ``rmq cleanup`` command and logs)."""
    verb, freed = ("would remove", "to free") if report.dry_run else ("removed", "freed")
    why = ", ".join(f"{k} {v}" for k, v in sorted(report.reasons.items()))
    head = f"rmq cleanup{' (dry run)' if report.dry_run else ''} {report.root}: {verb} {report.removed} session(s)"
    line = f"{head}, {format_bytes(report.bytes_freed)} {freed}" + (f" ({why})" if why else "")
    if report.skipped_live:
        line += f"; {report.skipped_live} in use kept"
    if report.disk_ratio_before is not None:
        after = "?" if report.disk_ratio_after is None else f"{report.disk_ratio_after:.1%}"
        line += f"; disk {report.disk_ratio_before:.1%} -> {after}"
    lines = [line]
    if report.removed_names:
        shown = ", ".join(report.removed_names[:10])
        more = f" and {len(report.removed_names) - 10} more" if len(report.removed_names) > 10 else ""
        lines.append(f"  {verb}: {shown}{more}")
    lines += [f"  error: {e}" for e in report.errors]
    return "\n".join(lines)
