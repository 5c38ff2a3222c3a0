"""Which sessions cleanup removes, and why: a pure decision on readings the caller takes.

A session is due for one of three reasons:

- ``failed``: a task failed in it and its failure mark is older than ``failed_ttl_s``. The
  directory is kept that long so someone can look at what the task left; the TTL alone decides,
  whatever the session's age.
- ``age``: the newest mtime anywhere in its tree is older than ``max_age_s`` (or the operator's
  ``older_than_s``): a session counts as in use for as long as anything in it changes.
- ``disk``: the filesystem is at least ``high_ratio`` full. Then the oldest remaining sessions idle
  for at least ``min_idle_s`` go, one by one, until the projected usage is below ``low_ratio``; the
  gap between the two ratios makes one run free room to spare instead of stopping just under the
  limit. Pressure stops at sessions idle for less than ``min_idle_s``: on a filesystem shared with
  others (an overlay, a shared ``/tmp``) that rmq cannot bring under the line, removing the
  sessions just used, ``keep`` sessions waiting for their pipeline's next step included, would
  break work and free nothing that matters; they are counted as kept instead.

A session that a live process holds a lease on is never chosen, whatever the reason. Nothing here
reads a file or a clock: the caller passes the sessions' readings, the ids with a live lease, the
failure marks, the disk's figures and ``now``, so the policy is tested on made-up figures. See
``docs/design.md#sessions``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from typing import NamedTuple

from rmq.disk.session_ids import SESSION_PREFIX

__all__ = ["Candidate", "CleanupPlan", "SessionReading", "choose_removals"]


class SessionReading(NamedTuple):
    """One ``session_*`` entry of the root, as cleanup measured it.

    Attributes:
        name: the entry's name (``session_<id>``).
        newest_mtime: the newest mtime in its tree, epoch seconds (links not followed).
        bytes: the regular-file bytes in its tree.
        ino / mtime_ns: the entry's own inode and mtime, to tell at removal time whether it was
            replaced or used since it was measured.
    """

    name: str
    newest_mtime: float
    bytes: int
    ino: int
    mtime_ns: int


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


class CleanupPlan(NamedTuple):
    """What :func:`choose_removals` chose.

    Attributes:
        candidates: the sessions to remove, in the order chosen (age and failed first, oldest
            first, then those chosen for disk pressure, oldest first).
        skipped_live: names of due sessions kept because a live process holds them (a name may
            appear twice: due by age and wanted for disk pressure).
        skipped_recent: names of sessions disk pressure wanted, kept because they were idle for
            less than ``min_idle_s``.
        ratio_before: the disk's used ratio, ``None`` if the disk could not be read.
        ratio_projected: the used ratio once the candidates are gone, ``None`` likewise.
    """

    candidates: list[Candidate]
    skipped_live: list[str]
    ratio_before: float | None
    ratio_projected: float | None
    skipped_recent: list[str] = []


def choose_removals(
    sessions: Iterable[SessionReading],
    live: Set[str],
    failed: Mapping[str, float],
    disk: tuple[int, int, int] | None,
    *,
    now: float,
    max_age_s: float,
    failed_ttl_s: float,
    high_ratio: float,
    low_ratio: float,
    older_than_s: float | None = None,
    min_idle_s: float = 0.0,
) -> CleanupPlan:
    """Choose the sessions to remove (see the module's docstring for the reasons).

    Args:
        sessions: the root's ``session_*`` entries, in any order.
        live: ids of the sessions a live process holds a lease on.
        failed: ``{session id: time its task failed}`` (epoch seconds).
        disk: ``(total, used, free)`` bytes of the root's filesystem, ``None`` if unreadable (then
            only the age and failed reasons apply).
        now: the current time, epoch seconds.
        max_age_s: age limit of idle sessions; ``older_than_s``, if given, replaces it.
        failed_ttl_s: how long a failed session is kept.
        high_ratio / low_ratio: disk pressure starts at ``used/total >= high_ratio`` and removes
            sessions until the projected ratio is below ``low_ratio``.
        min_idle_s: disk pressure never takes a session idle for less than this.
    """
    limit_s = max_age_s if older_than_s is None else older_than_s
    oldest_first = sorted(sessions, key=lambda s: (s.newest_mtime, s.name))

    def candidate(s: SessionReading, reason: str) -> Candidate:
        return Candidate(s.name, reason, s.newest_mtime, s.bytes, s.ino, s.mtime_ns)

    chosen: list[Candidate] = []
    skipped: list[str] = []
    for s in oldest_first:
        sid = s.name[len(SESSION_PREFIX) :]
        if sid in failed:  # failed sessions live by their TTL, not by max age
            due, reason = now - failed[sid] > failed_ttl_s, "failed"
        else:
            due, reason = now - s.newest_mtime > limit_s, "age"
        if due and sid in live:
            skipped.append(s.name)
        elif due:
            chosen.append(candidate(s, reason))
    if disk is None:
        return CleanupPlan(chosen, skipped, None, None)
    total, used, _free = disk
    if total <= 0:
        return CleanupPlan(chosen, skipped, None, None)
    projected = used - sum(c.bytes for c in chosen)
    recent: list[str] = []
    if used / total >= high_ratio:
        picked = {c.name for c in chosen}
        for s in oldest_first:
            if projected / total < low_ratio:
                break
            if s.name in picked:
                continue
            if s.name[len(SESSION_PREFIX) :] in live:
                skipped.append(s.name)
                continue
            if now - s.newest_mtime < min_idle_s:  # oldest first: every later one is younger
                recent = [r.name for r in oldest_first[oldest_first.index(s) :] if r.name not in picked]
                break
            chosen.append(candidate(s, "disk"))
            projected -= s.bytes
    return CleanupPlan(chosen, skipped, used / total, max(projected, 0) / total, recent)
