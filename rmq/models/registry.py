"""Model registrations: a name, a loader, a size, pinning and an unload hook.

Registration is process-global and happens when user modules are imported, so it does
nothing but validate and record: no thread, no file, no load.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rmq.core.errors import ConfigError, ModelNotRegistered
from rmq.core.units import parse_size

__all__ = ["REGISTRY", "ModelSpec", "Registry"]

Loader = Callable[[], Any]
UnloadHook = Callable[[Any], None]


@dataclass(frozen=True)
class ModelSpec:
    """One registered model.

    Attributes:
        name: the name tasks use in ``models.get(name)``.
        loader: called with no arguments to build the model object.
        size_bytes: the declared size, or ``None`` to measure the process's growth during load.
        pinned: never evicted by memory pressure or by the cache's caps.
        unload: called with the model object before the cache drops it, or ``None``
            (then the object's own ``unload()`` or ``close()`` is called if it has one).
    """

    name: str
    loader: Loader
    size_bytes: int | None = None
    pinned: bool = False
    unload: UnloadHook | None = None


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """True for the same object, or the same function re-created by a module reload."""
    if a is b:
        return True

    def key(fn: Callable[..., Any]) -> tuple[Any, ...]:
        qualname = getattr(fn, "__qualname__", None)
        line = (
            getattr(getattr(fn, "__code__", None), "co_firstlineno", None)
            if "<lambda>" in str(qualname)
            else 0
        )
        return (getattr(fn, "__module__", None), qualname, line)

    key_a = key(a)
    return None not in key_a and key_a == key(b)


class Registry:
    """Thread-safe name -> :class:`ModelSpec` map. ``REGISTRY`` is the process-global one."""

    def __init__(self) -> None:
        self._specs: dict[str, ModelSpec] = {}
        self._lock = threading.Lock()

    def register(
        self,
        name: str,
        size: object = None,
        pinned: bool = False,
        loader: Loader | None = None,
        unload: UnloadHook | None = None,
    ) -> Any:
        """Register ``loader`` under ``name``; without ``loader``, return a decorator that does.

        Args:
            name: a non-empty string.
            size: ``"1.5GiB"``, ``"512MB"`` or bytes; ``None`` (default) measures the load.
            pinned: keep the model loaded under pressure and over the cache's caps.
            loader: the function that builds the model (or use this as a decorator).
            unload: called with the model object when it is unloaded.

        Returns:
            The loader itself (decorator form and call form alike).

        Raises:
            ConfigError: a bad name, size, pinned flag, loader or hook, or a name already
                registered with a different loader.
        """
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"models.register name must be a non-empty string, got {name!r}")
        size_bytes = None if size is None else parse_size(size, f"models.register({name!r}) size")
        if not isinstance(pinned, bool):
            raise ConfigError(f"models.register({name!r}) pinned must be True or False, got {pinned!r}")
        if unload is not None and not callable(unload):
            raise ConfigError(f"models.register({name!r}) unload must be callable, got {unload!r}")

        def add(fn: Loader) -> Loader:
            if not callable(fn):
                raise ConfigError(f"models.register({name!r}) loader must be callable, got {fn!r}")
            spec = ModelSpec(name, fn, size_bytes, pinned, unload)
            with self._lock:
                old = self._specs.get(name)
                if old is not None and not _same_function(old.loader, fn):
                    raise ConfigError(
                        f"model {name!r} is already registered with loader "
                        f"{getattr(old.loader, '__qualname__', old.loader)!r}, got "
                        f"{getattr(fn, '__qualname__', fn)!r}"
                    )
                self._specs[name] = spec
            return fn

        if loader is None:
            return add
        return add(loader)

    def get(self, name: str) -> ModelSpec:
        """The spec of ``name``.

        Raises:
            ModelNotRegistered: nobody registered ``name``.
        """
        with self._lock:
            spec = self._specs.get(name)
        if spec is None:
            raise ModelNotRegistered(name)
        return spec

    def names(self) -> list[str]:
        """Registered names, sorted."""
        with self._lock:
            return sorted(self._specs)

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests; a resident model stays cached until evicted)."""
        with self._lock:
            self._specs.pop(name, None)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._specs


#: the process-global registry that ``models.register`` writes to
REGISTRY = Registry()
