"""Synthetic models: real memory, no weights. For the reference app, the demo and benchmarks.

A :class:`SyntheticModel` of ``size_bytes`` holds large buffers (like tensors: several
chunks, every page touched so it is resident) and, for ``small_objects_fraction`` of the size,
many small Python objects (lists of ints, strings, short byte strings) like the vocabularies,
configs and tokenizer tables of real models. Those are what fragment the heap and make
``malloc_trim`` matter when the model is unloaded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from rmq.core.units import format_bytes, parse_size

__all__ = ["SyntheticModel", "synthetic_loader"]

_PAGE = 4096
_INTS_PER_LIST = 32


class SyntheticModel:
    """A model that is only memory, and says so.

    Args:
        name: the model's name (shown in ``repr``).
        size_bytes: total size to allocate, in bytes (or a size string like ``"200MiB"``).
        small_objects_fraction: share of the size made of small Python objects (0-1, default 0.2).
        chunk_bytes: size of each large buffer (default 4 MiB).
    """

    synthetic = True

    def __init__(
        self,
        name: str,
        size_bytes: int | str,
        small_objects_fraction: float = 0.2,
        chunk_bytes: int = 4 * 2**20,
    ) -> None:
        if not 0.0 <= small_objects_fraction <= 1.0:
            raise ValueError(f"small_objects_fraction must be in [0, 1], got {small_objects_fraction!r}")
        self.name = name
        self.size_bytes = parse_size(size_bytes, "size_bytes")
        self.small_objects_fraction = small_objects_fraction
        small_target = int(self.size_bytes * small_objects_fraction)
        self._records: list[tuple[list[int], str, bytes]] | None = self._make_records(small_target)
        self._chunks: list[bytearray] | None = self._make_chunks(self.size_bytes - small_target, chunk_bytes)

    @staticmethod
    def _make_records(target_bytes: int) -> list[tuple[list[int], str, bytes]]:
        records: list[tuple[list[int], str, bytes]] = []
        total, i = 0, 1_000_000
        while total < target_bytes:
            ints = [i + j for j in range(_INTS_PER_LIST)]  # > 256: real int objects, not cached ones
            text = f"{i:x}" * 8
            blob = bytes(1000 + (i % 2048))  # above pymalloc's 512 B: lands in malloc's heap
            records.append((ints, text, blob))
            total += (
                sys.getsizeof(ints) + _INTS_PER_LIST * 28 + sys.getsizeof(text) + sys.getsizeof(blob) + 56 + 8
            )
            i += _INTS_PER_LIST
        return records

    @staticmethod
    def _make_chunks(target_bytes: int, chunk_bytes: int) -> list[bytearray]:
        chunks = []
        while target_bytes > 0:
            n = min(chunk_bytes, target_bytes)
            chunk = bytearray(n)
            chunk[::_PAGE] = b"\x01" * len(range(0, n, _PAGE))  # touch every page: resident
            chunks.append(chunk)
            target_bytes -= n
        return chunks

    @property
    def loaded(self) -> bool:
        """False once ``unload()`` ran."""
        return self._chunks is not None

    def infer(self, x: int) -> int:
        """Deterministic toy inference: reads a few bytes of the buffers and records."""
        if self._chunks is None or self._records is None:
            raise RuntimeError(f"synthetic model {self.name!r} was unloaded")
        out = x
        if self._chunks:
            chunk = self._chunks[x % len(self._chunks)]
            out += chunk[(x * _PAGE) % len(chunk)] + len(chunk)
        if self._records:
            ints, text, _ = self._records[x % len(self._records)]
            out += ints[x % _INTS_PER_LIST] + len(text)
        return out

    def unload(self) -> None:
        """Drop the buffers and objects (the cache calls this before dropping the model)."""
        self._chunks = None
        self._records = None

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "unloaded"
        return (
            f"<SyntheticModel {self.name!r} {format_bytes(self.size_bytes)} synthetic: real memory, "
            f"no weights ({self.small_objects_fraction:.0%} small objects), {state}>"
        )


def synthetic_loader(name: str, size: int | str, small_objects_fraction: float = 0.2) -> Callable[[], Any]:
    """A loader for ``models.register`` that builds a :class:`SyntheticModel`.

    Example::

        models.register("demo_model", loader=synthetic_loader("demo_model", "200MiB"))
    """
    size_bytes = parse_size(size, f"synthetic model {name!r} size")

    def load_synthetic() -> SyntheticModel:
        return SyntheticModel(name, size_bytes, small_objects_fraction)

    load_synthetic.__qualname__ = f"synthetic_loader.<{name}>"
    return load_synthetic
