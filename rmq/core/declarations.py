"""What a governed task declares it needs, validated when the decorator runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rmq.core.errors import ConfigError
from rmq.core.units import MAX_INT, Rate, parse_priority, parse_rate, parse_size, shown

__all__ = ["TaskDeclaration", "parse_declaration", "RMQ_OPTIONS", "CLEANUP_POLICIES"]

CLEANUP_POLICIES = ("after_task", "keep")

#: Decorator options that belong to rmq; every other option goes to Celery.
RMQ_OPTIONS = (
    "memory",
    "cpu",
    "disk",
    "heavy",
    "priority",
    "session",
    "cleanup",
    "rate_limits",
    "concurrency",
    "network",
    "hygiene",
)


@dataclass(frozen=True)
class TaskDeclaration:
    """Resources a task declares. Sizes in bytes; ``None`` means "not declared".

    Attributes:
        memory_bytes: peak memory the task adds to its process; ``None`` = learned.
        cpu_slots: CPU slots held while running (0 = none).
        disk_bytes: disk space needed under the session root.
        heavy: route to the heavy queue.
        priority: 0-9, larger runs first; ``None`` = the configured default.
        session: name of the argument that carries the session id, or ``None``.
        session_configured: ``session=True`` was given: the argument is ``rmq_session_arg``, read
            when the task runs (``session`` then holds the default name, ``session_id``).
        cleanup: ``"after_task"`` or ``"keep"``.
        rate_limits: cluster-wide rates by limit name.
        concurrency: cluster-wide permits by limit name.
        network: retry network errors with backoff by default.
        hygiene: run gc and heap trimming after the task.
    """

    memory_bytes: int | None = None
    cpu_slots: int = 0
    disk_bytes: int = 0
    heavy: bool = False
    priority: int | None = None
    session: str | None = None
    cleanup: str = "after_task"
    rate_limits: Mapping[str, Rate] = field(default_factory=dict)
    concurrency: Mapping[str, int] = field(default_factory=dict)
    network: bool = False
    hygiene: bool = True
    session_configured: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form, for snapshots and logs."""
        return {
            "memory_bytes": self.memory_bytes,
            "cpu_slots": self.cpu_slots,
            "disk_bytes": self.disk_bytes,
            "heavy": self.heavy,
            "priority": self.priority,
            "session": self.session,
            "cleanup": self.cleanup,
            "rate_limits": {k: str(v) for k, v in self.rate_limits.items()},
            "concurrency": dict(self.concurrency),
            "network": self.network,
            "hygiene": self.hygiene,
        }


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {shown(value)}")
    return value


def _limit_name(arg: str, name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 100 or any(c.isspace() for c in name):
        raise ConfigError(f"{arg} keys must be non-empty names without spaces, got {shown(name)}")
    return name


def parse_declaration(
    memory: object = None,
    cpu: object = None,
    disk: object = None,
    heavy: object = False,
    priority: object = None,
    session: object = False,
    cleanup: object = "after_task",
    rate_limits: object = None,
    concurrency: object = None,
    network: object = False,
    hygiene: object = True,
    session_arg: str = "session_id",
) -> TaskDeclaration:
    """Validate decorator arguments into a :class:`TaskDeclaration`.

    Raises:
        ConfigError: naming the argument and the bad value.
    """
    memory_bytes = None if memory is None else parse_size(memory, "memory")
    if cpu is None:
        cpu_slots = 0
    elif isinstance(cpu, bool) or not isinstance(cpu, int) or not 1 <= cpu <= MAX_INT:
        raise ConfigError(f"cpu must be a whole number of CPU slots >= 1, got {shown(cpu)}")
    else:
        cpu_slots = cpu
    disk_bytes = 0 if disk is None else parse_size(disk, "disk")
    prio = None if priority is None else parse_priority(priority, "priority")
    if session is True:
        session_name: str | None = session_arg
    elif session is False or session is None:
        session_name = None
    elif isinstance(session, str) and session.isidentifier():
        session_name = session
    else:
        raise ConfigError(f"session must be True, False or an argument name, got {shown(session)}")
    if cleanup not in CLEANUP_POLICIES:
        raise ConfigError(f"cleanup must be one of {CLEANUP_POLICIES}, got {shown(cleanup)}")
    rates: dict[str, Rate] = {}
    if rate_limits is not None:
        if not isinstance(rate_limits, Mapping):
            raise ConfigError(f"rate_limits must be a dict like {{'tts-api': '10/s'}}, got {shown(rate_limits)}")
        for name, rate in rate_limits.items():
            key = _limit_name("rate_limits", name)
            rates[key] = parse_rate(rate, f"rate_limits[{key!r}]")
    permits: dict[str, int] = {}
    if concurrency is not None:
        if not isinstance(concurrency, Mapping):
            raise ConfigError(f"concurrency must be a dict like {{'gpu-api': 2}}, got {shown(concurrency)}")
        for name, n in concurrency.items():
            key = _limit_name("concurrency", name)
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_INT:
                kind = f"1-{MAX_INT}" if isinstance(n, int) and n > MAX_INT else ">= 1"
                raise ConfigError(f"concurrency[{key!r}] must be an integer {kind}, got {shown(n)}")
            permits[key] = n
    return TaskDeclaration(
        memory_bytes=memory_bytes,
        cpu_slots=cpu_slots,
        disk_bytes=disk_bytes,
        heavy=_flag("heavy", heavy),
        priority=prio,
        session=session_name,
        cleanup=str(cleanup),
        rate_limits=rates,
        concurrency=permits,
        network=_flag("network", network),
        hygiene=_flag("hygiene", hygiene),
        session_configured=session is True,
    )
