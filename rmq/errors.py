"""Every error rmq raises, under one root: the public import path (``from rmq.errors import ...``).

They are defined in :mod:`rmq.core.errors`, where every part of rmq can reach them.
"""

from rmq.core.errors import (
    BudgetExceeded,
    ConfigError,
    Defer,
    MemoryBudgetExceeded,
    ModelLoadError,
    ModelNotRegistered,
    RateLimiterUnavailable,
    ResourceUnavailable,
    RmqError,
    TaskProcessLost,
)

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
