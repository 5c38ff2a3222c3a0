"""rmq's configuration: every ``rmq_*`` key, parsed and validated into one frozen object.

Keys live in the Celery config and are read the way Celery reads its own: ``rmq_memory_budget``
(``app.conf``, a settings object or module), ``RMQ_MEMORY_BUDGET`` (an upper-case config), or under
the app's namespace (``config_from_object(settings, namespace="CELERY")``: Django's
``CELERY_RMQ_MEMORY_BUDGET``). Each one can be overridden by the environment variable of the same
name in upper case (``RMQ_MEMORY_BUDGET=6GiB``). Unknown rmq keys in the Celery config are refused.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from rmq.core.errors import ConfigError
from rmq.core.setting_values import (
    boolean,
    duration,
    duration_or_zero,
    fraction,
    http_url,
    identifier,
    int_between,
    optional,
    percent,
    redis_url_value,
    share,
    size,
    size_or_zero,
    string,
)
from rmq.core.units import parse_priority, parse_ratio, parse_size_or_percent, shown

__all__ = ["RmqConfig", "load_config", "KEYS"]


# name -> (default, parser). Defaults are user-facing values, parsed like user input.
KEYS: dict[str, tuple[Any, Callable[[object, str], Any]]] = {
    # memory: the budget, admission and the pressure ladder (docs/design.md#pressure-ladder)
    "memory_budget": ("90%", parse_size_or_percent),
    "monitor_interval": ("250ms", duration),
    "admit_ratio": (0.85, parse_ratio),
    "unload_ratio": (0.80, parse_ratio),
    "unload_target_ratio": (0.70, parse_ratio),
    "pause_ratio": (0.85, parse_ratio),
    "resume_ratio": (0.75, parse_ratio),
    "kill_ratio": (0.95, parse_ratio),
    "memory_kill_retries": (2, int_between(0)),
    "kill_backoff": ("1s", duration_or_zero),
    "admission_wait": ("5s", duration_or_zero),
    "defer_countdown": ("2s", duration),
    "max_deferrals": (30, int_between(0)),
    "default_task_memory": ("32MiB", size_or_zero),
    "learn_percentile": (0.95, parse_ratio),
    "learn_window": (50, int_between(1)),
    "uss_interval": ("10s", duration),
    "heavy_memory_threshold": ("1GiB", size),
    "heavy_queue": ("rmq.heavy", string),
    "default_priority": ("normal", parse_priority),
    "worker_lost_retries": (3, int_between(0)),
    "runtime_dir": (None, optional(string)),
    # crash recovery: how soon the unacked messages of a dead worker come back
    "visibility_timeout": ("20s", duration),
    "unacked_restore_interval": ("2s", duration),
    # models
    "models_max_memory": (None, optional(size)),
    "models_max_count": (None, optional(int_between(1))),
    "model_load_wait": ("10s", duration_or_zero),
    # cpu (docs/design.md#cpu)
    "cpu_slots": (None, optional(int_between(1))),
    # network: rate limits and concurrency leases
    "redis_url": (None, optional(redis_url_value)),
    "concurrency_lease": ("30s", duration),
    "throttle_max_wait": ("2s", duration_or_zero),
    "limiter_outage_max": ("1h", duration),
    # disk and sessions
    "session_root": (None, optional(string)),
    "session_arg": ("session_id", identifier),
    "failed_session_ttl": ("1h", duration_or_zero),
    "session_max_age": ("24h", duration),
    "cleanup_interval": ("15m", duration),
    "disk_high_ratio": (0.80, parse_ratio),
    "disk_low_ratio": (0.70, parse_ratio),
    "disk_pressure_min_idle": ("1h", duration_or_zero),
    # monitoring and alerts
    "metrics_port": (None, optional(int_between(0, 65535))),
    "metrics_addr": ("127.0.0.1", string),
    "alert_memory_ratio": (0.85, parse_ratio),
    "alert_cpu_percent": (90, percent),
    "alert_disk_ratio": (0.80, parse_ratio),
    "alert_hysteresis": (0.05, fraction),
    "alert_cooldown": ("5m", duration_or_zero),
    "alert_webhook": (None, optional(http_url)),
    "monitor_beat_interval": ("60s", duration),
    # hygiene between tasks, leak detection
    "hygiene_margin": ("16MiB", size_or_zero),
    "leak_ceiling": (None, optional(size)),
    "leak_slope": ("8MiB", size),
    "leak_window": (8, int_between(2)),
    # autoscaler (docs/design.md#autoscaling)
    "autoscale_keepalive": ("30s", duration_or_zero),
    # what install() adds, each of which can be left out (docs/configuration.md#turning-things-off)
    "beat_entries": (True, boolean),
    "autoscaler": (True, boolean),
    "priorities": (True, boolean),
    # kernel-grade governance (docs/design.md#kernel-accounting)
    "kernel_accounting": (True, boolean),
    "unknown_share": (0.5, share),
    "oom_hold": (True, boolean),
    "share_heap": (True, boolean),
}


@dataclass(frozen=True)
class RmqConfig:
    """Validated rmq settings. Sizes in bytes, durations in seconds, ratios as fractions.

    Build it with :func:`load_config`; see ``KEYS`` for every key and its default.
    """

    memory_budget: tuple[str, float]
    monitor_interval: float
    admit_ratio: float
    unload_ratio: float
    unload_target_ratio: float
    pause_ratio: float
    resume_ratio: float
    kill_ratio: float
    memory_kill_retries: int
    kill_backoff: float
    admission_wait: float
    defer_countdown: float
    max_deferrals: int
    default_task_memory: int
    learn_percentile: float
    learn_window: int
    uss_interval: float
    heavy_memory_threshold: int
    heavy_queue: str
    default_priority: int
    worker_lost_retries: int
    runtime_dir: str | None
    visibility_timeout: float
    unacked_restore_interval: float
    models_max_memory: int | None
    models_max_count: int | None
    model_load_wait: float
    cpu_slots: int | None
    redis_url: str | None
    concurrency_lease: float
    throttle_max_wait: float
    limiter_outage_max: float
    session_root: str | None
    session_arg: str
    failed_session_ttl: float
    session_max_age: float
    cleanup_interval: float
    disk_high_ratio: float
    disk_low_ratio: float
    disk_pressure_min_idle: float
    metrics_port: int | None
    metrics_addr: str
    alert_memory_ratio: float
    alert_cpu_percent: float
    alert_disk_ratio: float
    alert_hysteresis: float
    alert_cooldown: float
    alert_webhook: str | None
    monitor_beat_interval: float
    hygiene_margin: int
    leak_ceiling: int | None
    leak_slope: int
    leak_window: int
    autoscale_keepalive: float
    beat_entries: bool
    autoscaler: bool
    priorities: bool
    kernel_accounting: bool
    unknown_share: float
    oom_hold: bool
    share_heap: bool
    #: the keys the user gave (in the conf or the environment), for defaults that depend on the machine
    explicit: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        if not (self.unload_target_ratio < self.unload_ratio):
            raise ConfigError(
                f"rmq_unload_target_ratio ({self.unload_target_ratio}) must be below "
                f"rmq_unload_ratio ({self.unload_ratio})"
            )
        if not (self.resume_ratio < self.pause_ratio):
            raise ConfigError(
                f"rmq_resume_ratio ({self.resume_ratio}) must be below rmq_pause_ratio ({self.pause_ratio})"
            )
        if not (self.unload_ratio <= self.pause_ratio < self.kill_ratio):
            raise ConfigError(
                "thresholds out of order: need rmq_unload_ratio <= rmq_pause_ratio < rmq_kill_ratio, got "
                f"{self.unload_ratio} / {self.pause_ratio} / {self.kill_ratio}"
            )
        if not (self.admit_ratio <= self.kill_ratio):
            raise ConfigError(
                f"rmq_admit_ratio ({self.admit_ratio}) must not exceed rmq_kill_ratio ({self.kill_ratio})"
            )
        if not (self.disk_low_ratio < self.disk_high_ratio):
            raise ConfigError(
                f"rmq_disk_low_ratio ({self.disk_low_ratio}) must be below "
                f"rmq_disk_high_ratio ({self.disk_high_ratio})"
            )

    @property
    def session_root_path(self) -> str:
        """The session root, defaulting to ``<tmp>/rmq-sessions``."""
        return self.session_root or os.path.join(tempfile.gettempdir(), "rmq-sessions")

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for ``rmq doctor`` and snapshots."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "explicit"}


def load_config(conf: Mapping[str, Any] | Any, environ: Mapping[str, str] | None = None) -> RmqConfig:
    """Build the config from a Celery conf (or any mapping) and the environment.

    Precedence: ``RMQ_<KEY>`` environment variable, then the key in ``conf``, then the default. In
    ``conf`` a key may be written ``rmq_<key>``, ``RMQ_<KEY>`` (without a namespace), or with the
    conf's namespace as Celery reads it (``conf.prefix``: ``CELERY_RMQ_<KEY>`` for
    ``namespace="CELERY"``), where the namespaced form wins as it does for Celery's own keys.

    Raises:
        ConfigError: for an unknown rmq key (in any of those forms), one key given twice with
            different values, a bad value (naming key and value), or thresholds out of order.
    """
    environ = os.environ if environ is None else environ
    given = _rmq_keys(conf)
    values: dict[str, Any] = {}
    explicit = set()
    for key, (default, parse) in KEYS.items():
        env_name = f"RMQ_{key.upper()}"
        if env_name in environ:
            raw, source = environ[env_name], env_name
            explicit.add(key)
        elif key in given:
            raw, source = given[key]
            explicit.add(key)
        else:
            raw, source = default, f"rmq_{key}"
        values[key] = parse(raw, source)
    return RmqConfig(**values, explicit=frozenset(explicit))


def _namespace(conf: Any) -> str:
    """The conf's namespace prefix as Celery's ``ConfigurationView`` keeps it (``"CELERY_"``), or ``""``."""
    prefix = getattr(conf, "prefix", None)
    return prefix if isinstance(prefix, str) else ""


def _rmq_keys(conf: Any) -> dict[str, tuple[Any, str]]:
    """rmq's keys in ``conf``: name (``memory_budget``) -> (value, the key as written).

    Celery's conf iterates over every key of every source (``app.conf``, the config object or
    module, the defaults). A key given in several forms is read back through the conf itself, so
    the namespaced form and ``app.conf`` changes win exactly as they do for Celery's own settings.
    """
    finalize = getattr(conf, "finalize", None)
    if callable(finalize):  # Celery's settings learn their namespace when first read
        finalize()
    try:
        items = list(conf.items())
    except AttributeError:
        return {}
    prefix = _namespace(conf)
    # Celery puts the whole namespaced key in the namespace's case: CELERY_ -> CELERY_RMQ_X
    spaced = (prefix + "rmq_").upper() if prefix.isupper() else (prefix + "rmq_").lower()
    found: dict[str, dict[str, tuple[str, Any]]] = {}
    for raw, value in items:
        if not isinstance(raw, str):
            continue
        if prefix and raw.startswith(spaced):
            name, form = raw[len(spaced):].lower(), "spaced"
            known = raw == _in_case(spaced + name, spaced)
        elif raw.startswith("rmq_"):
            name, form, known = raw[4:], "lower", True
        elif raw.lower().startswith("rmq_") and not prefix:
            # an upper-case config (Celery's old style); under a namespace (Django's settings) plain
            # upper-case names are the project's own, and Celery ignores them there too
            name, form, known = raw[4:].lower(), "upper", raw.isupper()
        else:
            continue
        if not known or name not in KEYS:
            raise ConfigError(f"unknown rmq setting {shown(raw)} (known: see rmq.core.config.KEYS)")
        found.setdefault(name, {})[form] = (raw, value)
    out: dict[str, tuple[Any, str]] = {}
    for name, forms in found.items():
        if "lower" in forms and "upper" in forms and forms["lower"][1] != forms["upper"][1]:
            (low, a), (up, b) = forms["lower"], forms["upper"]
            raise ConfigError(f"{low} and {up} are both set, to {shown(a)} and {shown(b)}: keep one")
        if len(forms) > 1 and "upper" not in forms and callable(getattr(conf, "get", None)):
            value = conf.get(f"rmq_{name}")  # Celery's own choice between the namespaced and plain key
            raw = next((r for r, v in forms.values() if v is value), next(iter(forms.values()))[0])
            out[name] = (value, raw)
            continue
        raw, value = forms.get("spaced") or forms.get("lower") or forms["upper"]
        out[name] = (value, raw)
    return out


def _in_case(key: str, like: str) -> str:
    return key.upper() if like.isupper() else key.lower()
