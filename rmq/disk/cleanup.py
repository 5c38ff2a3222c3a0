"""Cleanup of a session root: read it, let the policy choose, remove what it chose, report.

Run by the ``rmq cleanup`` command and by each worker's ``rmq_cleanup`` remote-control command
(which beat's ``rmq.cleanup_sessions`` broadcasts, so every host cleans its own disk). The choice is
:func:`rmq.disk.cleanup_policy.choose_removals`; this module takes its readings and applies it. A
task may start using a session between the plan and its removal, so each removal checks again,
under the root's lock, that no live process holds the session and that it is the very directory
that was measured, unchanged since; only then is it renamed into the trash and deleted from there.
Only ``session_*`` entries directly under the root, and rmq's own ``.rmq`` state, are ever touched.
See ``docs/design.md#sessions``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from rmq.core.units import format_bytes
from rmq.disk.cleanup_policy import Candidate, CleanupPlan, SessionReading, choose_removals
from rmq.disk.safe_tree import measure_tree
from rmq.disk.session_ids import SESSION_PREFIX
from rmq.disk.session_root import SessionRoot

if TYPE_CHECKING:  # pragma: no cover
    from rmq.core.config import RmqConfig

#: disk pressure spares sessions idle for less than this (``rmq_disk_pressure_min_idle``)
DEFAULT_PRESSURE_MIN_IDLE_S = 3600.0

__all__ = ["CleanupReport", "DiskUsage", "cleanup_from_config", "format_report", "plan_cleanup", "run_cleanup"]

#: returns ``(total, used, free)`` bytes of a filesystem, like :func:`shutil.disk_usage`
DiskUsage = Callable[[], "tuple[int, int, int]"]


def _read_sessions(sr: SessionRoot) -> list[SessionReading]:
    readings: list[SessionReading] = []
    for name in sr.names():
        try:
            top = os.stat(name, dir_fd=sr.fd, follow_symlinks=False)
            info = measure_tree(sr.fd, name)  # type: ignore[arg-type]
        except OSError:
            continue  # vanished or unreadable: next run
        readings.append(SessionReading(name, info.newest_mtime, info.bytes, top.st_ino, top.st_mtime_ns))
    return readings


def _read_disk(disk_usage: DiskUsage) -> tuple[int, int, int] | None:
    try:
        return disk_usage()
    except OSError:
        return None


def _plan(
    sr: SessionRoot,
    now: float,
    max_age_s: float,
    failed_ttl_s: float,
    disk_usage: DiskUsage,
    high_ratio: float,
    low_ratio: float,
    older_than_s: float | None,
    min_idle_s: float = DEFAULT_PRESSURE_MIN_IDLE_S,
) -> CleanupPlan:
    """Read the root (leases, failure marks, sessions, then the disk) and let the policy choose."""
    live, _ = sr.scan_leases()
    failed = sr.failed_markers()
    sessions = _read_sessions(sr)
    return choose_removals(
        sessions,
        live,
        failed,
        _read_disk(disk_usage),
        now=now,
        max_age_s=max_age_s,
        failed_ttl_s=failed_ttl_s,
        high_ratio=high_ratio,
        low_ratio=low_ratio,
        older_than_s=older_than_s,
        min_idle_s=min_idle_s,
    )


def plan_cleanup(
    root: str | os.PathLike[str],
    now: float,
    max_age_s: float,
    failed_ttl_s: float,
    disk_usage: DiskUsage,
    high_ratio: float,
    low_ratio: float,
    older_than_s: float | None = None,
    min_idle_s: float = DEFAULT_PRESSURE_MIN_IDLE_S,
) -> list[Candidate]:
    """Which sessions cleanup would remove, touching nothing.

    The reasons (age, failed TTL, disk pressure) and their order:
    :func:`rmq.disk.cleanup_policy.choose_removals`. A session with a live lease is never a
    candidate.

    Args:
        disk_usage: returns ``(total, used, free)`` bytes of the root's filesystem.
    """
    with SessionRoot(root) as sr:
        return _plan(
            sr, now, max_age_s, failed_ttl_s, disk_usage, high_ratio, low_ratio, older_than_s, min_idle_s
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
    #: sessions disk pressure wanted but spared: idle for less than ``min_idle_s``
    skipped_recent: int = 0
    min_idle_s: float = DEFAULT_PRESSURE_MIN_IDLE_S
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
    min_idle_s: float = DEFAULT_PRESSURE_MIN_IDLE_S,
) -> CleanupReport:
    """Plan (see :func:`plan_cleanup`) and remove; also drop stale leases and leftover trash.

    Only ``session_*`` entries directly under ``root`` (and rmq's own ``.rmq`` state) are
    touched. With ``dry_run`` nothing is touched and the figures are projections. Disk pressure
    spares sessions idle for less than ``min_idle_s``.
    """
    now = time.time() if now is None else now
    usage: DiskUsage = disk_usage or (lambda: tuple(shutil.disk_usage(root)))  # type: ignore[assignment,return-value]
    report = CleanupReport(root=str(root), dry_run=dry_run, min_idle_s=min_idle_s)
    with SessionRoot(root) as sr:
        if sr.fd is None:  # no root, nothing to clean; never create it here
            return report
        plan = _plan(sr, now, max_age_s, failed_ttl_s, usage, high_ratio, low_ratio, older_than_s, min_idle_s)
        fresh_root = sr.state_fd is None  # rmq never used it: no leases, markers or trash
    report.disk_ratio_before = plan.ratio_before
    report.skipped_live = len(set(plan.skipped_live))
    report.skipped_recent = len(plan.skipped_recent)
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
    return run_cleanup(
        config.session_root_path,
        now=now,
        max_age_s=config.session_max_age,
        failed_ttl_s=config.failed_session_ttl,
        high_ratio=config.disk_high_ratio,
        low_ratio=config.disk_low_ratio,
        older_than_s=older_than_s,
        dry_run=dry_run,
        min_idle_s=config.disk_pressure_min_idle,
    )


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def format_report(report: CleanupReport) -> str:
    """A few lines for people (the ``rmq cleanup`` command and logs)."""
    verb, freed = ("would remove", "to free") if report.dry_run else ("removed", "freed")
    why = ", ".join(f"{k} {v}" for k, v in sorted(report.reasons.items()))
    head = f"rmq cleanup{' (dry run)' if report.dry_run else ''} {report.root}: {verb} {report.removed} session(s)"
    line = f"{head}, {format_bytes(report.bytes_freed)} {freed}" + (f" ({why})" if why else "")
    if report.skipped_live:
        line += f"; {report.skipped_live} in use kept"
    if report.skipped_recent:
        line += f"; {report.skipped_recent} idle for less than {_duration(report.min_idle_s)} kept"
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
