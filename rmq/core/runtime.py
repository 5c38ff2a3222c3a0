"""The per-worker state that pool processes share, and per-process handles.

The worker bootstep creates one :class:`Runtime` in the main process before the pool
forks; every pool process (replacements included) inherits it. Handles that must not
cross a fork (Redis clients, lock descriptors, counters) are dropped in the child right
after the fork (:mod:`rmq.core.forks`) and re-made there on first use.

Outside a worker (a client process, a unit test) there is no runtime: ``current()``
returns ``None`` and governed tasks run ungoverned.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rmq.core import forks
from rmq.core.claims import RunClaims, claim_ttl
from rmq.core.config import RmqConfig, load_config
from rmq.core.errors import RateLimiterUnavailable
from rmq.core.procstats import ProcessStats

if TYPE_CHECKING:  # pragma: no cover
    import redis as redis_lib

    from rmq.core.ledger import Ledger

__all__ = ["Runtime", "config_for", "current", "set_current", "redis_url_for_app", "runtime_base", "runtime_dir_prefix"]

_current: Runtime | None = None
_MISSING = object()


class Runtime:
    """State of one governed worker, shared by its main process and pool processes.

    Attributes:
        config: the validated rmq config.
        app: the Celery app.
        runtime_dir: per-worker directory (ledger file, per-process counters).
        ledger: the reservation ledger and governor control block.
        redis_url: Redis used for rate limits, semaphores and learned declarations.
        main_pid: pid of the worker's main process.
    """

    def __init__(
        self,
        config: RmqConfig,
        app: Any,
        runtime_dir: str,
        ledger: Ledger,
        redis_url: str | None,
    ) -> None:
        self.config = config
        self.app = app
        self.runtime_dir = runtime_dir
        self.ledger = ledger
        self.redis_url = redis_url
        self.main_pid = os.getpid()
        self._redis: redis_lib.Redis | None = None
        #: this process's counters (flushed to the runtime dir for the governor; new in a forked child)
        self.stats = ProcessStats(runtime_dir)
        self._local: dict[str, Any] = {}
        self._lock = threading.Lock()
        #: called once in this pool process when it exits, besides the concerns' own hooks (for what
        #: is made on the fly, such as HTTP clients)
        self.process_exit_hooks: list[Callable[[Runtime], None]] = []
        #: called with a byte count when this process should free model memory
        self.unload_hooks: list[Callable[[int], int]] = []
        #: extra snapshot sections: name -> callable returning a JSON-friendly value (main process)
        self.snapshot_parts: dict[str, Callable[[], Any]] = {}
        #: the Celery worker (WorkController), in the main process only
        self.worker: Any = None
        #: the snapshot builder, in the main process only (set by the bootstep)
        self.snapshots: Any = None
        #: the governor, in the main process only (set by the bootstep)
        self.governor: Any = None
        #: how memory is counted (:class:`~rmq.memory.pool_cgroups.Accounting`), chosen before the
        #: pool forks so that each pool process can move itself into its cgroup; ``None``: /proc
        self.accounting: Any = None
        forks.forget_in_children(self)

    def _forget_inherited(self) -> None:
        """In a forked child: drop the parent's handles (made again on first use) and its lock."""
        self._redis = None
        self.stats = ProcessStats(self.runtime_dir)
        self._local = {}
        self._lock = threading.Lock()  # another thread of the parent may have held it at the fork

    @property
    def in_pool_process(self) -> bool:
        """True in a pool child, False in the worker's main process."""
        return forks.pid() != self.main_pid

    def redis(self) -> redis_lib.Redis:
        """This process's Redis client for rate limits, semaphores and learning.

        Raises:
            RateLimiterUnavailable: when no Redis URL is configured or derivable.
        """
        if self._redis is None:
            if not self.redis_url:
                raise RateLimiterUnavailable(
                    "no Redis for rmq: set rmq_redis_url (the broker and result backend are not Redis)"
                )
            import redis as redis_lib
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry

            # one quick retry: redis-py's default (10 retries) blocks a task for seconds when Redis is down
            self._redis = redis_lib.Redis.from_url(
                self.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0, health_check_interval=30,
                retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
            )
        return self._redis

    @property
    def claims(self) -> Any:
        """This process's :class:`~rmq.core.claims.RunClaims` (run claims of overlapping task copies)."""
        found = self._local.get("claims")  # read twice per governed task: no bound method, no call, once made
        return found if found is not None else self.local("claims", self._new_claims)

    def _new_claims(self) -> Any:
        return RunClaims(self.redis, ttl_s=claim_ttl(self.config.visibility_timeout))

    def made(self, key: str) -> Any | None:
        """The per-process singleton ``key`` if :meth:`local` made it in this process, else None."""
        return self._local.get(key)

    def local(self, key: str, factory: Callable[[], Any]) -> Any:
        """A per-process singleton made by ``factory`` on first use (after any fork)."""
        found = self._local.get(key, _MISSING)  # the hot path: no lock once made
        if found is not _MISSING:
            return found
        with self._lock:
            if key not in self._local:
                self._local[key] = factory()
            return self._local[key]


def current() -> Runtime | None:
    """The worker's runtime, or ``None`` outside a governed worker."""
    return _current


def set_current(runtime: Runtime | None) -> None:
    """Install (or clear) the runtime; done by the worker bootstep."""
    global _current
    _current = runtime


def redis_url_for_app(config: RmqConfig, app: Any) -> str | None:
    """``rmq_redis_url``, else the broker URL if it is Redis, else the result backend if Redis."""
    if config.redis_url:
        return config.redis_url
    for url in (app.conf.broker_url, app.conf.result_backend):
        if isinstance(url, str) and url.split("://", 1)[0] in ("redis", "rediss", "redis+socket"):
            return url
    return None


def runtime_base(configured: str | None = None) -> str:
    """Where a worker makes its runtime directory: ``rmq_runtime_dir``, else /dev/shm (tmpfs) when
    writable, else the temporary directory."""
    return configured or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir())


def runtime_dir_prefix(pid: int) -> str:
    """The name prefix of the runtime directory of the worker whose main process is ``pid``."""
    return f"rmq-{pid}-"


def config_for(app: Any) -> RmqConfig:
    """The app's rmq config, parsed once (the worker's runtime config when there is one)."""
    rt = current()
    if rt is not None and rt.app is app:
        return rt.config
    cached = getattr(app, "_rmq_config", None)
    if cached is None:
        cached = load_config(app.conf)
        app._rmq_config = cached
    return cached
