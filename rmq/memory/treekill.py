"""Ending a task's whole tree, and reaping what the worker's main process adopts
(docs/design.md#kills).

The main process is the child subreaper of its pool processes' descendants: a subprocess whose
parent died, or that double-forked, is reparented to it instead of to init. Such processes are
either left over from a killed task's tree (killed here) or ended ones (reaped here), so that a
memory kill leaves nothing running and no zombie behind.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any, Protocol

from rmq.memory.meter import TreeReading

__all__ = ["TreeKiller", "send_signal", "reap_pid"]

log = logging.getLogger("rmq.memory.governor")

#: how long a killed pool process's tree is remembered: what turns up from it is ended too
_KILLED_TREE_S = 60.0


class _Meter(Protocol):
    def tree_now(self, pool_pid: int) -> list[int]: ...


class _Killer(Protocol):
    def kill(self, pid: int) -> None: ...


def send_signal(pid: int, signum: int) -> None:
    """Send ``signum`` to ``pid`` if it still exists; never to this process."""
    if pid == os.getpid():
        return
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _hasten(pid: int) -> None:
    """Give a process about to be killed the CPU first: its memory comes back only once it has run
    its exit, and beside busy neighbours (often the very tasks waiting for that memory) a dying
    300 MiB process took 35-105 ms to go; at nice -20 it goes about as fast as one alone with nothing
    else running (31-48 ms against 46-64 ms here, scripts/bench/kernel_reaction.py, burst and
    physics rows). Every thread: a priority belongs to one thread, and the memory goes only when the
    last of them has exited (a pool process runs rmq's watcher thread beside the task). Needs
    ``CAP_SYS_NICE``; without it the kill goes ahead at the process's own priority."""
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (OSError, ValueError):
        threads = [pid]
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, -20)
        except OSError:
            pass


def reap_pid(pid: int) -> bool:
    """Reap ``pid`` if it is an ended child of this process."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return False


class TreeKiller:
    """Kills a pool process with its descendants, and tidies up after such kills each tick.

    Args:
        meter: gives a pool process's descendants read again now (``tree_now``).
        actuator: kills the pool process itself (the worker's own rules for that apply).
        counters: the governor's counters (``strays_killed``, ``reaped`` are added to).
        signal_pid: sends a signal to a descendant (tests pass a fake).
        reap: reaps an ended child of the main process; ``True`` when it did.
    """

    def __init__(self, meter: _Meter, actuator: _Killer, counters: dict[str, Any],
                 signal_pid: Callable[[int, int], None] = send_signal,
                 reap: Callable[[int], bool] = reap_pid) -> None:
        self.meter = meter
        self.actuator = actuator
        self.counters = counters
        self.signal = signal_pid
        self.reap = reap
        self.killed: dict[int, float] = {}  # pool pid -> when its tree was killed
        self._zombies: set[int] = set()
        self._reaped: set[int] = set()  # killed pool pids the pool has reaped since

    def kill(self, pool_pid: int, now: float) -> list[int]:
        """End ``pool_pid`` and every descendant; returns the descendants signalled.

        The tree is stopped first (``SIGSTOP``), top down, and read again once stopped, so that no
        member forks a process this kill misses, and the pool process cannot store a result of its
        own when a subprocess it waits for dies. Then the pool process is killed first, so that the
        task ends as a memory kill, not as a failed subprocess. Each gets the CPU first on its way
        out (:func:`_hasten`)."""
        self.killed[pool_pid] = now
        members = [p for p in self.meter.tree_now(pool_pid) if p != pool_pid]
        for pid in [pool_pid, *members]:
            self.signal(pid, signal.SIGSTOP)
        for pid in self.meter.tree_now(pool_pid):
            if pid not in members and pid != pool_pid:
                self.signal(pid, signal.SIGSTOP)
                members.append(pid)
        for pid in [pool_pid, *members]:
            _hasten(pid)
        self.actuator.kill(pool_pid)
        for pid in members:
            self.signal(pid, signal.SIGKILL)
        return members

    def tidy(self, reading: TreeReading, now: float) -> None:
        """Kill what is left of a killed tree (a process it forked as it was being killed, or one
        the kill could not see yet), and reap the descendants that ended under the main process. A
        zombie is reaped only once seen on two ticks in a row: a pool process the pool has just
        started, which the pool reaps itself, is never one that long."""
        for pool, at in list(self.killed.items()):
            if pool in reading.rss and pool in self._reaped:  # the pid now names a new pool process
                self._reaped.discard(pool)
                del self.killed[pool]
            elif now - at > _KILLED_TREE_S:
                self._reaped.discard(pool)
                del self.killed[pool]
            elif pool not in reading.rss:
                self._reaped.add(pool)
        left = [(pid, owner) for pid, owner in reading.stray_owner.items() if owner in self.killed]
        left += [(pid, pool) for pool in self.killed for pid in reading.descendants.get(pool, ())]
        for pid, owner in left:
            log.warning("rmq killing pid %d, left over from the tree of killed pid %d", pid, owner)
            self.signal(pid, signal.SIGKILL)
            self.counters["strays_killed"] += 1
        zombies = set(reading.zombies)
        for pid in zombies & self._zombies:
            if self.reap(pid):
                self.counters["reaped"] += 1
        self._zombies = zombies
