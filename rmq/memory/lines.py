"""The budget's lines, chosen by how fast the governor can react (docs/design.md#lines).

Polling every ``rmq_monitor_interval`` lets several tasks allocate hundreds of MiB between two
readings, so the polling lines keep a wide margin under the limit. With kernel accounting the
kernel wakes the governor when memory crosses a line (and holds a burst at the limit while rmq
kills), so the lines can sit close to the physical limit, and the machine's memory is used.
A user who sets any of the lines or the budget keeps exactly the lines they set (the others at
their polling defaults): the two sets are never mixed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rmq.core.config import RmqConfig

__all__ = ["Lines", "POLLING", "KERNEL", "LINE_KEYS", "kernel_lines", "lines_for"]

MiB = 1 << 20

#: the least room above the kernel kill line, and between it and the admit line: the main process's
#: share of the worker's cgroup grows after each pool process it forks (its copy-on-write pages),
#: by 8 MiB a fork and 53 MiB within 1.5 s when kills replaced several (a 768 MiB worker, 6 pool
#: processes, its heap frozen before each fork), and the pools' cap cannot be lowered under what
#: they hold meanwhile. 1.5 % of a 768 MiB worker (11.5 MiB) was too little, and 24 MiB failed about
#: one run in eight of tests/integration/test_kernel_accounting.py's lying declarations: the main
#: process's next page then went to the kernel's OOM killer.
KERNEL_MIN_MARGIN_BYTES = 48 * MiB

#: the keys a user sets to choose lines themselves
LINE_KEYS = frozenset({"memory_budget", "admit_ratio", "unload_ratio", "unload_target_ratio",
                       "pause_ratio", "resume_ratio", "kill_ratio"})


@dataclass(frozen=True)
class Lines:
    """A budget as a fraction of the detected limit, and the lines as fractions of the budget."""

    budget_percent: float
    admit: float
    unload: float
    unload_target: float
    pause: float
    resume: float
    kill: float
    source: str


#: the configuration's defaults (90 % of the limit; admit 0.85, kill 0.95)
POLLING = Lines(0.90, 0.85, 0.80, 0.70, 0.85, 0.75, 0.95, "polling defaults")

#: woken by the kernel, bursts held at the kill line: the kill line 1.5 % under the limit, admission up to
#: 97 %. Admission weighs learned peaks against the worker's memory as it is, and a warmed-up worker
#: holds about 10 MiB more than the idle one its room was read from: at 96 % four tasks that fit the
#: 1.5 GiB cgroup of scripts/bench/goodput.py with 2.6 MiB to spare ran three at once for whole rounds.
KERNEL = Lines(1.00, 0.97, 0.93, 0.85, 0.98, 0.93, 0.985, "kernel wake-up defaults")


def kernel_lines(limit_bytes: int | None) -> Lines:
    """The kernel set for a worker whose cgroup's limit is ``limit_bytes``: :data:`KERNEL`, with the
    margins above the kill and the admit lines widened to at least ``KERNEL_MIN_MARGIN_BYTES`` on a
    small worker (under 1.6 GiB)."""
    base = 1 - KERNEL.kill
    if not limit_bytes or limit_bytes * base >= KERNEL_MIN_MARGIN_BYTES:
        return KERNEL
    margin = min(0.1, KERNEL_MIN_MARGIN_BYTES / limit_bytes)
    unload = min(KERNEL.unload, 1 - 2 * margin - 0.04)
    return replace(
        KERNEL, kill=1 - margin, admit=1 - 2 * margin, pause=1 - margin * (1 - KERNEL.pause) / base,
        unload=unload, resume=unload, unload_target=min(KERNEL.unload_target, unload - 0.08),
        source=f"kernel wake-up defaults, margins of {KERNEL_MIN_MARGIN_BYTES // MiB} MiB",
    )


def lines_for(config: RmqConfig, kernel: bool, limit_bytes: int | None = None) -> Lines:
    """The lines a worker uses: the kernel set (for a cgroup limit of ``limit_bytes``) with kernel
    accounting unless the user chose lines."""
    if kernel and not (config.explicit & LINE_KEYS):
        return kernel_lines(limit_bytes)
    kind, value = config.memory_budget
    return replace(
        POLLING,
        budget_percent=value if kind == "percent" else POLLING.budget_percent,
        admit=config.admit_ratio, unload=config.unload_ratio, unload_target=config.unload_target_ratio,
        pause=config.pause_ratio, resume=config.resume_ratio, kill=config.kill_ratio,
        source="configured" if config.explicit & LINE_KEYS else POLLING.source,
    )
