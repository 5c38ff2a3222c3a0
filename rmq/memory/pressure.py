"""The pressure ladder: unload, pause, kill, each with hysteresis. Pure state machine."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Ladder", "Step"]


@dataclass(frozen=True)
class Step:
    """What the governor should do after one reading.

    Attributes:
        zone: ``"ok"``, ``"unload"``, ``"pause"`` or ``"kill"``.
        unload: ask pool processes to unload models now.
        unload_bytes: how much to free to get under the unload target.
        pause / resume: stop or restart fetching messages (edges only).
        kill: kill a task process now.
    """

    zone: str
    unload: bool = False
    unload_bytes: int = 0
    pause: bool = False
    resume: bool = False
    kill: bool = False


class Ladder:
    """Fractions of the budget: unload at ``unload`` until ``unload_target``, pause at
    ``pause`` until ``resume``, kill at ``kill``. Unload requests repeat every
    ``unload_repeat_s`` while memory stays above the target.
    """

    def __init__(
        self,
        budget_bytes: int,
        unload: float,
        unload_target: float,
        pause: float,
        resume: float,
        kill: float,
        unload_repeat_s: float = 1.0,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.unload_at, self.unload_target = unload, unload_target
        self.pause_at, self.resume_at = pause, resume
        self.kill_at = kill
        self.unload_repeat_s = unload_repeat_s
        self.unloading = False
        self.paused = False
        self._last_unload = float("-inf")

    def update(self, worker_bytes: int, now: float) -> Step:
        """Feed one reading; returns the actions it calls for."""
        ratio = worker_bytes / self.budget_bytes if self.budget_bytes else 0.0
        unload = False
        if not self.unloading and ratio >= self.unload_at:
            self.unloading = True
            unload = True
        elif self.unloading and ratio < self.unload_target:
            self.unloading = False
        elif self.unloading and now - self._last_unload >= self.unload_repeat_s:
            unload = True
        if unload:
            self._last_unload = now
        pause = resume = False
        if not self.paused and ratio >= self.pause_at:
            self.paused = pause = True
        elif self.paused and ratio < self.resume_at:
            self.paused, resume = False, True
        kill = ratio >= self.kill_at
        zone = "kill" if kill else "pause" if self.paused else "unload" if self.unloading else "ok"
        target = int(self.budget_bytes * self.unload_target)
        return Step(zone, unload, max(0, worker_bytes - target) if unload else 0, pause, resume, kill)
