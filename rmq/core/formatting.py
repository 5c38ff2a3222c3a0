"""Figures written for people (log lines, error messages, the status table).

Apart from :mod:`rmq.core.units` (which parses what people write) so that the errors, which
:mod:`rmq.core.units` raises, can say their figures without importing it back.
"""

from __future__ import annotations

__all__ = ["format_bytes"]


def format_bytes(n: float | int | None) -> str:
    """``1536 * 2**20`` -> ``'1.5GiB'``, for people."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"  # pragma: no cover
