"""The ordered guard chain of governed tasks: admission first, hygiene last."""

from __future__ import annotations

from functools import lru_cache

from .guards import Guard

__all__ = ["default_guards"]


@lru_cache(maxsize=1)
def _chain() -> tuple[Guard, ...]:
    from .reservation import AdmissionGuard

    return (AdmissionGuard(),)


def default_guards() -> list[Guard]:
    """Admission (memory, CPU, disk) -> rate limits -> concurrency -> session -> thread caps -> hygiene."""
    return list(_chain())
