"""Giving freed heap back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

__all__ = ["malloc_trim", "collect_and_trim"]

_libc: ctypes.CDLL | None | bool = False


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is False:
        _libc = None
        if sys.platform.startswith("linux"):
            # glibc's soname first: find_library runs ldconfig in a forked child, which a pool
            # process holding models pays for, and whose peak RSS (the parent's pages at the fork)
            # the kernel then reports as a subprocess's peak of the running task
            for name in ("libc.so.6", None):
                try:
                    lib = ctypes.CDLL(name or ctypes.util.find_library("c") or "libc.so.6")
                except OSError:
                    continue
                if hasattr(lib, "malloc_trim"):
                    _libc = lib
                    break
    return _libc  # type: ignore[return-value]


def malloc_trim() -> bool:
    """Call glibc's ``malloc_trim(0)``; return False where there is no glibc."""
    lib = _load_libc()
    if lib is None:
        return False
    return bool(lib.malloc_trim(0))


def collect_and_trim() -> None:
    """``gc.collect()`` then ``malloc_trim(0)``, and empty torch's CUDA cache if torch is loaded."""
    gc.collect()
    malloc_trim()
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # a broken CUDA setup must not break unloading
            pass
