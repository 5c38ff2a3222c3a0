"""Parsing of user-facing quantities, done once at the edge.

Sizes become bytes, durations seconds, rates a :class:`Rate`, priorities an integer
0-9 where a larger number runs first (the AMQP convention).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from rmq.core.errors import ConfigError
from rmq.core.formatting import format_bytes

__all__ = [
    "Rate",
    "parse_size",
    "parse_duration",
    "parse_rate",
    "parse_priority",
    "parse_ratio",
    "parse_size_or_percent",
    "format_bytes",
    "PRIORITY_NAMES",
    "MAX_PRIORITY",
]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_PERIODS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

MAX_PRIORITY = 9
PRIORITY_NAMES = {"high": 8, "normal": 5, "low": 2}


def _bad(what: str, kind: str, value: object) -> ConfigError:
    return ConfigError(f"{what} must be {kind}, got {value!r}")


def parse_size(value: object, what: str = "size", allow_zero: bool = False) -> int:
    """Parse ``"512MiB"``, ``"2GB"``, ``"1.5GiB"`` or an integer number of bytes.

    Raises:
        ConfigError: naming ``what`` and the value, for anything else or a value <= 0.
    """
    kind = "a size like '2GiB'"
    if isinstance(value, bool):
        raise _bad(what, kind, value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(what, kind, value)
        n = int(value)
    elif isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise _bad(what, kind, value)
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    else:
        raise _bad(what, kind, value)
    if n < 0 or (n == 0 and not allow_zero):
        raise _bad(what, kind, value)
    return n


def parse_duration(value: object, what: str = "duration", allow_zero: bool = False) -> float:
    """Parse ``"250ms"``, ``"15m"``, ``"24h"`` or a number of seconds into seconds."""
    kind = "a duration like '250ms' or '24h'"
    if isinstance(value, bool):
        raise _bad(what, kind, value)
    if isinstance(value, (int, float)):
        s = float(value)
    elif isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        if not m or m.group(2).lower() not in _DURATION_UNITS:
            raise _bad(what, kind, value)
        s = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    else:
        raise _bad(what, kind, value)
    if not math.isfinite(s) or s < 0 or (s == 0 and not allow_zero):
        raise _bad(what, kind, value)
    return s


@dataclass(frozen=True)
class Rate:
    """``count`` events per ``period_s`` seconds."""

    count: int
    period_s: float

    @property
    def interval_s(self) -> float:
        """Seconds between two events at a steady pace."""
        return self.period_s / self.count

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h", 86400.0: "d"}.get(self.period_s)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.period_s}s"


_RATE = re.compile(r"^\s*([0-9]+)\s*/\s*([a-z]+)\s*$")


def parse_rate(value: object, what: str = "rate") -> Rate:
    """Parse ``"10/s"``, ``"100/m"``, ``"5000/h"`` into a :class:`Rate`."""
    if isinstance(value, Rate):
        return value
    kind = "a rate like '10/s', '100/m' or '5000/h'"
    if not isinstance(value, str):
        raise _bad(what, kind, value)
    m = _RATE.match(value.lower())
    if not m or m.group(2) not in _RATE_PERIODS or int(m.group(1)) <= 0:
        raise _bad(what, kind, value)
    return Rate(int(m.group(1)), _RATE_PERIODS[m.group(2)])


def parse_priority(value: object, what: str = "priority") -> int:
    """Parse ``"high" | "normal" | "low"`` or 0-9 (larger runs first) into 0-9."""
    kind = "'high', 'normal', 'low' or an integer 0-9 (larger runs first)"
    if isinstance(value, bool):
        raise _bad(what, kind, value)
    if isinstance(value, str):
        if value.lower() in PRIORITY_NAMES:
            return PRIORITY_NAMES[value.lower()]
        if value.strip().isdigit():
            value = int(value)
        else:
            raise _bad(what, kind, value)
    if isinstance(value, int) and 0 <= value <= MAX_PRIORITY:
        return value
    raise _bad(what, kind, value)


def parse_ratio(value: object, what: str = "ratio") -> float:
    """Parse a fraction in (0, 1]: ``0.85``, ``"0.85"`` or ``"85%"``."""
    kind = "a fraction in (0, 1] like 0.85 or '85%'"
    if isinstance(value, bool):
        raise _bad(what, kind, value)
    try:
        if isinstance(value, str) and value.strip().endswith("%"):
            f = float(value.strip()[:-1]) / 100.0
        else:
            f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _bad(what, kind, value) from None
    if not 0.0 < f <= 1.0:
        raise _bad(what, kind, value)
    return f


def parse_size_or_percent(value: object, what: str) -> tuple[str, float]:
    """Parse a budget: ``("percent", 0.9)`` for ``"90%"``, or ``("bytes", n)`` for a size."""
    if isinstance(value, str) and value.strip().endswith("%"):
        return ("percent", parse_ratio(value, what))
    try:
        return ("bytes", float(parse_size(value, what)))
    except ConfigError:
        raise _bad(what, "a size like '6GiB' or a percentage like '90%'", value) from None
