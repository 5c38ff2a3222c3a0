"""Parsing of user-facing quantities, done once at the edge.

Sizes become bytes, durations seconds, rates a :class:`Rate`, priorities an integer
0-9 where a larger number runs first (the AMQP convention).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from decimal import Decimal

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
    "parse_int",
    "parse_number",
    "shown",
    "format_bytes",
    "PRIORITY_NAMES",
    "MAX_PRIORITY",
    "MAX_SIZE_BYTES",
    "MAX_DURATION_S",
    "MAX_RATE_COUNT",
    "MAX_INT",
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
_DURATION_UNITS: dict[str, Decimal | int] = {
    "": 1, "ms": Decimal("0.001"), "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400,
}
_RATE_PERIODS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
# ASCII digits and spaces only (re.ASCII): int() and float() also read Arabic-Indic or full-width
# digits, which nobody means in a size, and a setting should read the same in every parser.
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$", re.ASCII)
_INTEGER = re.compile(r"^\s*([-+]?)([0-9]+)\s*$", re.ASCII)
_REAL = re.compile(r"^\s*([-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*$", re.ASCII)

MAX_PRIORITY = 9
PRIORITY_NAMES = {"high": 8, "normal": 5, "low": 2}
#: The largest size: what the ledger's signed 64-bit fields hold (8 EiB).
MAX_SIZE_BYTES = 2**63 - 1
#: The longest duration, ten years: sleeps, ``Event.wait``, countdowns and Redis expiries all
#: take it, where ``1e300`` seconds raises ``OverflowError`` in each of them.
MAX_DURATION_S = 3650 * 86400.0
#: The most events of one rate per period: a rate's log in Redis holds up to that many entries,
#: and Lua counts in doubles.
MAX_RATE_COUNT = 10**9
#: The largest integer setting or count: what a C int (the ledger's CPU slots, ``deque`` lengths,
#: Redis list indexes) holds on every platform.
MAX_INT = 2**31 - 1
_SHOWN_CHARS = 80


def shown(value: object) -> str:
    """``repr(value)`` for an error message, cut to 80 characters.

    A 5000-digit value is not copied into a log line whole, and an int past Python's 4300-digit
    limit for conversion to text (whose ``repr`` raises ``ValueError``) is described instead.
    """
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - the int digit limit, or a user object's broken __repr__
        if isinstance(value, int):
            return f"<int of {value.bit_length()} bits>"
        return f"<{type(value).__name__} object>"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _bad(what: str, kind: str, value: object) -> ConfigError:
    return ConfigError(f"{what} must be {kind}, got {shown(value)}")


def _decimal(text: str) -> Decimal:
    """An ASCII decimal already matched by a regex: exact, with no digit limit and no overflow."""
    return Decimal(text)


def parse_size(value: object, what: str = "size", allow_zero: bool = False) -> int:
    """Parse ``"512MiB"``, ``"2GB"``, ``"1.5GiB"`` or an integer number of bytes.

    Digits are ASCII; sizes go up to :data:`MAX_SIZE_BYTES` (8 EiB).

    Raises:
        ConfigError: naming ``what`` and the value, for anything else or a value <= 0.
    """
    kind = "a size like '2GiB'"
    n: int | Decimal
    if isinstance(value, bool):
        raise _bad(what, kind, value)
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(what, kind, value)
        n = Decimal(value)
    elif isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise _bad(what, kind, value)
        n = _decimal(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    else:
        raise _bad(what, kind, value)
    if n < 0 or n > MAX_SIZE_BYTES:
        raise _bad(what, "a size like '2GiB' up to 8EiB" if n > 0 else kind, value)
    size = int(n)
    if size == 0 and not allow_zero:
        raise _bad(what, kind, value)
    return size


def parse_duration(value: object, what: str = "duration", allow_zero: bool = False) -> float:
    """Parse ``"250ms"``, ``"15m"``, ``"24h"`` or a number of seconds into seconds.

    Digits are ASCII; durations go up to :data:`MAX_DURATION_S` (``"3650d"``).
    """
    kind = "a duration like '250ms' or '24h'"
    s: int | float | Decimal
    if isinstance(value, bool):
        raise _bad(what, kind, value)
    if isinstance(value, (int, float)):
        s = value
    elif isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        if not m or m.group(2).lower() not in _DURATION_UNITS:
            raise _bad(what, kind, value)
        s = _decimal(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    else:
        raise _bad(what, kind, value)
    # compared before float(): an int past 1e308 has no float, and nan compares false both ways
    if not (0 <= s <= MAX_DURATION_S) or (s == 0 and not allow_zero):
        raise _bad(what, kind + " up to '3650d'" if s > MAX_DURATION_S else kind, value)
    return float(s)


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


_RATE = re.compile(r"^\s*([0-9]+)\s*/\s*([a-zA-Z]+)\s*$", re.ASCII)


def parse_rate(value: object, what: str = "rate") -> Rate:
    """Parse ``"10/s"``, ``"100/m"``, ``"5000/h"`` into a :class:`Rate` (at most 10^9 per period)."""
    if isinstance(value, Rate):
        return value
    kind = "a rate like '10/s', '100/m' or '5000/h'"
    if not isinstance(value, str):
        raise _bad(what, kind, value)
    m = _RATE.match(value)
    if not m or m.group(2).lower() not in _RATE_PERIODS:
        raise _bad(what, kind, value)
    digits = m.group(1).lstrip("0")
    if not digits:
        raise _bad(what, kind, value)
    if len(digits) > len(str(MAX_RATE_COUNT)) or int(digits) > MAX_RATE_COUNT:  # no int() of 5000 digits
        raise _bad(what, f"{kind}, at most {MAX_RATE_COUNT} per period", value)
    return Rate(int(digits), _RATE_PERIODS[m.group(2).lower()])


def parse_priority(value: object, what: str = "priority") -> int:
    """Parse ``"high" | "normal" | "low"`` or 0-9 (larger runs first) into 0-9.

    A number in a string is ASCII digits only: ``"٣"``, ``"３"`` and ``"³"`` are refused.
    """
    kind = "'high', 'normal', 'low' or an integer 0-9 (larger runs first)"
    if isinstance(value, bool):
        raise _bad(what, kind, value)
    if isinstance(value, str):
        if value.lower() in PRIORITY_NAMES:
            return PRIORITY_NAMES[value.lower()]
        m = _INTEGER.match(value)
        if not m or m.group(1) or len(m.group(2).lstrip("0")) > 1:  # no int() of 5000 digits
            raise _bad(what, kind, value)
        value = int(m.group(2))
    if isinstance(value, int) and 0 <= value <= MAX_PRIORITY:
        return value
    raise _bad(what, kind, value)


def _real(value: object) -> float | None:
    """A finite float from an int, a float, a ``numbers.Real``, a ``Decimal`` or ASCII decimal
    text (``"0.85"``, ``"-1"``, ``".5"``: no exponent, no ``inf``/``nan``, no ``_``); else None."""
    if isinstance(value, bool):
        return None
    number: object = value
    if isinstance(value, str):
        m = _REAL.match(value)
        if not m:
            return None
        number = _decimal(m.group(1))
    elif not isinstance(value, (numbers.Real, Decimal)):
        return None
    try:
        f = float(number)  # type: ignore[arg-type]
    except (OverflowError, ValueError, TypeError):  # an int past 1e308, a signalling NaN
        return None
    return f if math.isfinite(f) else None


def parse_number(value: object, what: str, kind: str, percent: bool = False) -> float:
    """A finite number (see :func:`_real`); with ``percent``, text may end with ``%`` (not divided).

    Raises:
        ConfigError: ``"{what} must be {kind}, got {value}"`` for anything else.
    """
    text = value.strip() if isinstance(value, str) else value
    if percent and isinstance(text, str) and text.endswith("%"):
        text = text[:-1]
    f = _real(text)
    if f is None:
        raise _bad(what, kind, value)
    return f


def parse_int(value: object, what: str, minimum: int = 0, maximum: int = MAX_INT) -> int:
    """A whole number in ``[minimum, maximum]``: an int, a whole float, or ASCII digits with an
    optional sign (``"3"``, ``" -1 "``; no ``_``, no other scripts' digits).

    Raises:
        ConfigError: naming ``what``, the range and the value.
    """
    kind = f"an integer >= {minimum}" if maximum == MAX_INT else f"an integer {minimum}-{maximum}"
    n: int | None = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        n = value
    elif isinstance(value, float):
        n = int(value) if math.isfinite(value) and value.is_integer() else None
    elif isinstance(value, str) and (m := _INTEGER.match(value)):
        digits = m.group(2).lstrip("0") or "0"
        if len(digits) <= len(str(MAX_SIZE_BYTES)):
            n = int(m.group(1) + digits)
        else:  # out of range either way, and int() of 5000 digits raises
            n = minimum - 1 if m.group(1) == "-" else maximum + 1
    if n is None:
        raise _bad(what, kind, value)
    if not minimum <= n <= maximum:
        raise _bad(what, kind if n < minimum else f"an integer {minimum}-{maximum}", value)
    return n


def parse_ratio(value: object, what: str = "ratio") -> float:
    """Parse a fraction in (0, 1]: ``0.85``, ``"0.85"`` or ``"85%"``."""
    kind = "a fraction in (0, 1] like 0.85 or '85%'"
    f = parse_number(value, what, kind, percent=True)
    if isinstance(value, str) and value.strip().endswith("%"):
        f /= 100.0
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
