"""Which models to unload for one unload signal: the worker's least recently used, not each process's.

The governor's unload signal carries one worker-wide figure (the bytes above the unload target,
or what a waiting load misses) and reaches every pool process. If each process freed that much
from its own cache, a worker whose N processes hold unpinned models would unload N times too
much, and a model used a second ago in one process would go while an hour-old one stays in
another. Instead every process draws the same plan from what the worker holds: the ledger's
model reservations (authoritative: what is resident, where, how big), each process's published
``models`` gauge (last use, leases) and the registry (pinning); then it unloads its own share.

The gauges of other processes may be a second old: a model they show unleased but that is
leased now is skipped by its owner and that signal frees less. The ladder repeats its signal
every second while memory stays high, and a waiting load asks again, so the next plan, on
fresher figures, takes the next candidates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rmq.models.registry import Registry

__all__ = ["Resident", "plan_relief", "resident_models"]


@dataclass(frozen=True)
class Resident:
    """One model resident in one pool process (sizes in bytes, ``last_used`` epoch seconds)."""

    pid: int
    name: str
    size_bytes: int
    pinned: bool
    leased: bool
    last_used: float


def plan_relief(residents: Iterable[Resident], bytes_wanted: int) -> list[Resident]:
    """The least recently used unpinned, unleased models whose sizes add up to ``bytes_wanted``.

    Ties break by pid and name, so that every process computes the same plan.
    """
    candidates = sorted(
        (r for r in residents if not (r.pinned or r.leased)), key=lambda r: (r.last_used, r.pid, r.name)
    )
    plan: list[Resident] = []
    freed = 0
    for r in candidates:
        if freed >= bytes_wanted:
            break
        plan.append(r)
        freed += r.size_bytes
    return plan


def resident_models(
    own_pid: int,
    own: Iterable[Mapping[str, Any]],
    reservations: Iterable[tuple[int, str, int]],
    gauges: Mapping[int, Iterable[Mapping[str, Any]]],
    registry: Registry,
) -> list[Resident]:
    """What the worker holds, from this process's live cache and the others' published figures.

    Args:
        own_pid: this process.
        own: this process's ``ModelCache.snapshot()`` (live).
        reservations: ``(pid, model name, bytes)`` of the ledger's model reservations.
        gauges: pid -> that process's published ``models`` gauge.
        registry: where pinning is looked up for models of other processes.

    A model another process has reserved but not yet published counts as used just now: a
    load in progress is never the one to go.
    """
    out = [
        Resident(own_pid, m["name"], int(m["size_bytes"]), bool(m["pinned"]), bool(m["leased"]), float(m["last_used"]))
        for m in own
    ]
    for pid, name, size in reservations:
        if pid == own_pid:
            continue  # the live snapshot says it better (and leaves out loads in progress)
        shown = {g["name"]: g for g in gauges.get(pid, ())}.get(name)
        pinned = registry.get(name).pinned if name in registry else bool(shown and shown["pinned"])
        leased = bool(shown and shown["leased"])
        last_used = float(shown["last_used"]) if shown else math.inf
        out.append(Resident(pid, name, size, pinned, leased, last_used))
    return out
