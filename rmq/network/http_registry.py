"""The process's named HTTP clients: ``client(name, ...)`` makes one on first use and returns it after.

``client("tts-api", base_url=..., rate="10/s", concurrency=4)`` returns this process's one pooled
:class:`~rmq.network.http_client.RmqHttpClient` of that name, so every task in a pool process shares
its connections and its cluster-wide limits are declared once. Clients are per process: a forked child
makes its own from its parent's settings and never touches the parent's sockets; they close when the
process exits. See docs/design.md#http.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import httpx

from rmq.core import runtime as _runtime
from rmq.core.errors import ConfigError
from rmq.core.units import Rate, parse_duration, parse_rate
from rmq.network.http_client import COUNTERS, RmqHttpClient

__all__ = ["client", "close_all", "stats"]

log = logging.getLogger(__name__)

_registry: dict[tuple[int, str], RmqHttpClient] = {}
_registry_lock = threading.Lock()
_hooked = False


def _reset_lock_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()  # a thread of the parent may have held it at fork


def _hook_process() -> None:
    global _hooked
    if not _hooked:  # once: forked children inherit atexit and fork hooks
        _hooked = True
        atexit.register(close_all)
        os.register_at_fork(after_in_child=_reset_lock_in_child)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 200 or any(c.isspace() or c == "\0" for c in name):
        raise ConfigError(f"http client name must be a non-empty string without spaces, got {name!r}")
    return name


def client(name: str, base_url: str | None = None, rate: str | Rate | None = None,
           concurrency: int | None = None, timeout: float | str | None = None, retries: int | None = None,
           max_wait: float | str | None = None, headers: Mapping[str, str] | None = None,
           redis: Any = None) -> RmqHttpClient:
    """This process's pooled client ``name``, made on first use with these settings.

    A later call may repeat the settings or leave them out (None); a differing one is an error.
    Clients close when the process exits (atexit, and the worker runtime's exit hooks). A forked
    child gets its own client, made from the parent's settings, and never touches the parent's
    connections.

    Args:
        name: client name (limit keys ``rmq:rate:http:<name>`` / ``rmq:sem:http:<name>``, counters).
        base_url: prefix of relative URLs.
        rate: cluster-wide attempts, ``"10/s"``, ``"100/m"``; None: unlimited.
        concurrency: cluster-wide attempts in flight (int >= 1); None: unlimited (pool of 10).
        timeout: per-attempt timeout, seconds or ``"500ms"``; default 10 s.
        retries: extra attempts on connection errors, timeouts, 429 and 5xx; default 3. A request
            that reached the server is repeated only for an idempotent method, a 429, or a
            request sent with ``idempotent=True``.
        max_wait: longest wait for a token or permit before ``Defer``; default
            ``rmq_throttle_max_wait`` inside a worker, else 2 s.
        headers: default headers sent with every request.
        redis: a ``redis.Redis`` for the limits; default the worker runtime's.

    Raises:
        ConfigError: a bad value, or settings that differ from the existing client's.
    """
    _check_name(name)
    wanted: dict[str, Any] = {}
    if base_url is not None:
        if not isinstance(base_url, str):
            raise ConfigError(f"http client {name!r}: base_url must be a string, got {base_url!r}")
        wanted["base_url"] = base_url
    if rate is not None:
        wanted["rate"] = parse_rate(rate, f"http client {name!r} rate")
    if concurrency is not None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"http client {name!r}: concurrency must be an integer >= 1, got {concurrency!r}")
        wanted["concurrency"] = concurrency
    if timeout is not None:
        wanted["timeout_s"] = parse_duration(timeout, f"http client {name!r} timeout")
    if retries is not None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"http client {name!r}: retries must be an integer >= 0, got {retries!r}")
        wanted["retries"] = retries
    if max_wait is not None:
        wanted["max_wait_s"] = parse_duration(max_wait, f"http client {name!r} max_wait", allow_zero=True)
    if headers is not None:
        wanted["headers"] = dict(headers)
    if redis is not None:
        wanted["redis"] = redis
    pid = os.getpid()
    with _registry_lock:
        existing = _registry.get((pid, name))
        if existing is None or existing.closed:  # a forked child takes its parent's settings, not sockets
            existing = next((c for (p, n), c in reversed(_registry.items()) if n == name and p != pid), None)
        if existing is not None:
            for attr, value in wanted.items():
                have = getattr(existing, attr)
                if (have is not value) if attr == "redis" else (have != value):
                    raise ConfigError(f"http client {name!r} already exists with {attr}={have!r}; "
                                      f"got {attr}={value!r}")
            if existing.pid == pid:
                return existing
            wanted = {**existing.given, **wanted}
        if "redis" not in wanted and ("rate" in wanted or "concurrency" in wanted) and _runtime.current() is None:
            raise ConfigError(f"http client {name!r} has cluster-wide limits but no Redis outside a worker: "
                              "pass redis=redis.Redis(...)")
        made = RmqHttpClient(name, **wanted)
        made.given = wanted
        _registry[(pid, name)] = made
        _hook_process()
    rt = _runtime.current()
    if rt is not None and _close_hook not in rt.process_exit_hooks:
        rt.process_exit_hooks.append(_close_hook)
    return made


def _close_hook(rt: Any) -> None:
    close_all()


def close_all() -> None:
    """Close this process's clients (a forked child leaves its parent's alone) and forget them."""
    pid = os.getpid()
    with _registry_lock:
        mine = [key for key in _registry if key[0] == pid]
        clients = [_registry.pop(key) for key in mine]
    for c in clients:
        try:
            c.close()
        except (OSError, RuntimeError, httpx.HTTPError) as exc:  # pragma: no cover - exit goes on
            log.debug("rmq: closing http client %r: %s", c.name, exc)


def stats(name: str | None = None) -> dict[str, Any]:
    """This process's counters: ``{name: {counter: n}}``, or one client's dict when ``name`` is given."""
    pid = os.getpid()
    with _registry_lock:
        clients = {n: c for (p, n), c in _registry.items() if p == pid}
    if name is not None:
        return clients[name].stats() if name in clients else dict.fromkeys(COUNTERS, 0)
    return {n: c.stats() for n, c in clients.items()}
