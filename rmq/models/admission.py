"""Admission of model loads: the protocol the worker's ledger implements for the cache."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["NullReserver", "Reserver"]


@runtime_checkable
class Reserver(Protocol):
    """Reserves memory for model loads in the worker's budget (the ledger implements it).

    Keys look like ``"model:<name>"`` and belong to the calling process: two pool processes
    holding the same model hold two reservations.

    A reserver may also offer ``admit(key, size_bytes, timeout_s, relieve) -> bool``, which the
    cache then calls instead: it calls ``relieve(missing_bytes)`` to unload this process's LRU
    models by what is missing, before it asks anyone else (see
    :class:`rmq.models.reserver.LedgerModelReserver`).
    """

    def reserve(self, key: str, size_bytes: int, timeout_s: float) -> bool:
        """Reserve ``size_bytes`` for ``key``, waiting up to ``timeout_s``; False if refused."""
        ...

    def release(self, key: str) -> None:
        """Release this process's reservation of ``key`` (unknown keys are ignored)."""
        ...


class NullReserver:
    """Grants everything: the reserver outside a governed worker."""

    def reserve(self, key: str, size_bytes: int, timeout_s: float) -> bool:
        """Always True."""
        return True

    def release(self, key: str) -> None:
        """Nothing to release."""
