"""The parsers of setting values: each takes what a user wrote and the key's name, and returns the
typed value or raises :class:`~rmq.core.errors.ConfigError` naming the key and the value. The key
table of :mod:`rmq.core.config` pairs each key with one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from rmq.core.errors import ConfigError
from rmq.core.units import (
    MAX_INT,
    parse_duration,
    parse_int,
    parse_number,
    parse_size,
    shown,
)

__all__ = [
    "boolean",
    "duration",
    "duration_or_zero",
    "fraction",
    "http_url",
    "identifier",
    "int_between",
    "optional",
    "percent",
    "redis_url_value",
    "share",
    "size",
    "size_or_zero",
    "string",
    "url",
]



def int_between(minimum: int, maximum: int = MAX_INT) -> Callable[[object, str], int]:
    def parse(value: object, what: str) -> int:
        return parse_int(value, what, minimum, maximum)

    return parse


def optional(parse: Callable[[object, str], Any]) -> Callable[[object, str], Any]:
    def parse_optional(value: object, what: str) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
            return None
        return parse(value, what)

    return parse_optional


def string(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what} must be a non-empty string, got {shown(value)}")
    return value.strip()


def identifier(value: object, what: str) -> str:
    text = string(value, what)
    if not text.isidentifier():
        raise ConfigError(f"{what} must be an argument name, got {shown(value)}")
    return text


def percent(value: object, what: str) -> float:
    kind = "a percentage 0-100"
    f = parse_number(value, what, kind, percent=True)
    if not 0 < f <= 100:
        raise ConfigError(f"{what} must be {kind}, got {shown(value)}")
    return f


def size(v: object, w: str) -> int:
    return parse_size(v, w)


def size_or_zero(v: object, w: str) -> int:
    return parse_size(v, w, allow_zero=True)


def duration(v: object, w: str) -> float:
    return parse_duration(v, w)


def duration_or_zero(v: object, w: str) -> float:
    return parse_duration(v, w, allow_zero=True)


def url(value: object, what: str, schemes: tuple[str, ...], kind: str) -> str:
    """A URL with one of ``schemes``, a valid port and no spaces or control characters (and for
    http(s), a host): caught here, when the worker starts, not by the first request."""
    text = string(value, what)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port out of 0-65535 or not a number
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme.lower() not in schemes
        or (parts.scheme.lower() in ("http", "https") and not parts.hostname)
        or any(c.isspace() or not c.isprintable() for c in text)
    ):
        raise ConfigError(f"{what} must be {kind}, got {shown(value)}")
    return text


def http_url(value: object, what: str) -> str:
    return url(value, what, ("http", "https"), "an http(s) URL")


def redis_url_value(value: object, what: str) -> str:
    # the schemes redis-py's from_url reads (kombu's redis+socket:// is unix:// there)
    return url(value, what, ("redis", "rediss", "unix"), "a redis://, rediss:// or unix:// URL")


def fraction(v: object, w: str) -> float:
    """A fraction in [0, 1)."""
    kind = "a fraction in [0, 1)"
    f = parse_number(v, w, kind)
    if not 0.0 <= f < 1.0:
        raise ConfigError(f"{w} must be {kind}, got {shown(v)}")
    return f


def share(v: object, w: str) -> float:
    """A share in [0, 1], as a fraction or a percentage (``0.5``, ``"50%"``)."""
    kind = "a share in [0, 1] like 0.5 or '50%'"
    f = parse_number(v, w, kind, percent=True)
    if isinstance(v, str) and v.strip().endswith("%"):
        f /= 100.0
    if not 0.0 <= f <= 1.0:
        raise ConfigError(f"{w} must be {kind}, got {shown(v)}")
    return f


def boolean(value: object, what: str) -> bool:
    """True or False, also as the text an environment variable holds (true/false, yes/no, on/off, 1/0)."""
    if isinstance(value, bool):
        return value
    # only text and small ints can name a boolean (str() of an int past 4300 digits raises)
    text = str(value).strip().lower() if isinstance(value, str) or (isinstance(value, int) and -2 < value < 2) else ""
    if text in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return text in ("true", "yes", "on", "1")
    raise ConfigError(f"{what} must be true or false, got {shown(value)}")
