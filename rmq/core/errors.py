"""Every error rmq raises, under one root.

Resource errors carry their figures as attributes and say them in the message, so a
result backend, Flower or a log line shows what happened without a debugger.
"""

from __future__ import annotations

from rmq.core.formatting import format_bytes

__all__ = [
    "RmqError",
    "ConfigError",
    "BudgetExceeded",
    "ResourceUnavailable",
    "MemoryBudgetExceeded",
    "ModelNotRegistered",
    "ModelLoadError",
    "RateLimiterUnavailable",
    "Defer",
    "TaskProcessLost",
]


def _fmt_bytes(n: int | float | None) -> str:
    return format_bytes(n)


class RmqError(Exception):
    """Root of every rmq error."""


class ConfigError(RmqError, ValueError):
    """A declaration or a configuration value is invalid.

    The message names the argument or key and the bad value.
    """


class BudgetExceeded(RmqError):
    """The task declares more than an idle worker could ever admit.

    Attributes:
        task_name: the task's registered name.
        resource: ``"memory"``, ``"cpu"`` or ``"disk"``.
        declared: what the task declares (bytes, or slots for cpu).
        available: what an idle worker leaves room for (same unit).
        budget: the worker's budget (same unit).
    """

    def __init__(self, task_name: str, resource: str, declared: int, available: int, budget: int) -> None:
        self.task_name = task_name
        self.resource = resource
        self.declared = declared
        self.available = available
        self.budget = budget
        super().__init__(task_name, resource, declared, available, budget)

    def __str__(self) -> str:
        fmt = _fmt_bytes if self.resource in ("memory", "disk") else str
        return (
            f"{self.task_name} declares {self.resource}={fmt(self.declared)} but an idle worker admits at most "
            f"{fmt(self.available)} (budget {fmt(self.budget)})"
        )


class ResourceUnavailable(RmqError):
    """The task was deferred ``rmq_max_deferrals`` times and never got its resources."""

    def __init__(self, task_name: str, reason: str, deferrals: int) -> None:
        self.task_name = task_name
        self.reason = reason
        self.deferrals = deferrals
        super().__init__(task_name, reason, deferrals)

    def __str__(self) -> str:
        return f"{self.task_name} gave up after {self.deferrals} deferrals: {self.reason}"


class MemoryBudgetExceeded(RmqError):
    """The governor killed the task's process because the worker crossed its kill line.

    Attributes:
        task_name: the task's registered name.
        observed_bytes: the process's memory when it was killed.
        declared_bytes: the task's declaration (or learned declaration).
        budget_bytes: the worker's memory budget.
        kills: how many times the task was killed in all.
    """

    def __init__(
        self, task_name: str, observed_bytes: int, declared_bytes: int, budget_bytes: int, kills: int = 1
    ) -> None:
        self.task_name = task_name
        self.observed_bytes = observed_bytes
        self.declared_bytes = declared_bytes
        self.budget_bytes = budget_bytes
        self.kills = kills
        super().__init__(task_name, observed_bytes, declared_bytes, budget_bytes, kills)

    def __str__(self) -> str:
        return (
            f"{self.task_name} was killed {self.kills}x for memory: observed {_fmt_bytes(self.observed_bytes)}, "
            f"declared {_fmt_bytes(self.declared_bytes)}, worker budget {_fmt_bytes(self.budget_bytes)}"
        )


class ModelNotRegistered(RmqError, KeyError):  # noqa: N818 - the documented public name
    """``models.get(name)`` for a name nobody registered."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(name)

    def __str__(self) -> str:
        return f"model {self.name!r} is not registered"

    def __reduce__(self):
        return (type(self), (self.name,))


class ModelLoadError(RmqError):
    """A model's loader raised; the cause is chained as ``__cause__``."""


class RateLimiterUnavailable(RmqError):
    """The Redis that holds rate limits and semaphores did not answer; rmq fails closed."""


class Defer(Exception):
    """Control flow, not a failure: re-queue the task after ``countdown_s`` seconds.

    Raised by admission guards; the task base class turns it into a deferral that does not
    count against the user's ``max_retries``.
    """

    def __init__(self, reason: str, countdown_s: float, kind: str = "resources") -> None:
        self.reason = reason
        self.countdown_s = max(0.0, float(countdown_s))
        self.kind = kind
        super().__init__(f"deferred for {self.countdown_s:.2f}s ({kind}): {reason}")


class TaskProcessLost(RmqError):
    """The task's pool process died (not by rmq) more times than ``rmq_worker_lost_retries``."""

    def __init__(self, task_name: str, times: int, detail: str = "") -> None:
        self.task_name = task_name
        self.times = times
        self.detail = detail
        super().__init__(task_name, times, detail)

    def __str__(self) -> str:
        return (
            f"{self.task_name} lost its process {self.times}x (killed from outside or by the kernel): {self.detail}"
        )

