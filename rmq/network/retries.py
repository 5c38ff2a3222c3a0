"""Retry defaults for ``network=True`` tasks: exponential backoff with jitter, bounded."""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["NETWORK_ERRORS", "apply_network_defaults"]


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.timeout, socket.gaierror]
    try:
        import httpx

        errors += [httpx.TransportError]
    except ImportError:  # pragma: no cover - httpx is a dependency
        pass
    return tuple(errors)


NETWORK_ERRORS = _network_errors()


def apply_network_defaults(options: dict[str, Any]) -> None:
    """Fill in Celery retry options the user did not set (theirs always win)."""
    options.setdefault("autoretry_for", NETWORK_ERRORS)
    options.setdefault("retry_backoff", 2)
    options.setdefault("retry_backoff_max", 120)
    options.setdefault("retry_jitter", True)
    options.setdefault("max_retries", 5)
