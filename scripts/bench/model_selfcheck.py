"""Does unloading a model give its memory back to the OS here? Measure it (docs/guarantees.md#p7).

Run it in a fresh process so the figures are clean::

    python scripts/bench/model_selfcheck.py --size 200MiB [--no-trim] [--kind synthetic|torch|cuda]

It prints one JSON object. Each cycle loads the model through a :class:`ModelCache` (size
measured, not declared), leases it for a toy inference that leaves a little task data behind
(as a task's results outlive the model in a long-lived pool process), then unloads it with
``relieve()``, reading RSS before the load, after it and after the unload. The second cycle is a
reload in the same process, the usual case in a worker and the one where ``malloc_trim`` counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from rmq.core.units import parse_size
from rmq.models.cache import ModelCache, rss_probe
from rmq.models.registry import Registry
from rmq.testing.synthetic_models import SyntheticModel

__all__ = ["measure_unload"]

_CHUNK_BYTES = 4 * 2**20


def _torch_loader(size_bytes: int, device: str) -> Callable[[], Any]:
    def load_torch_model() -> dict[str, Any]:
        import torch

        n = max(1, size_bytes // _CHUNK_BYTES)
        return {f"w{i}": torch.ones(_CHUNK_BYTES // 4, dtype=torch.float32, device=device) for i in range(n)}

    return load_torch_model


def measure_unload(
    size_bytes: int, trim: bool = True, kind: str = "synthetic", cycles: int = 2
) -> dict[str, Any]:
    """Load and unload a model ``cycles`` times through a cache; return RSS figures per cycle.

    Args:
        size_bytes: model size.
        trim: whether the cache calls ``malloc_trim(0)`` after unloading.
        kind: ``"synthetic"`` (:class:`SyntheticModel`), ``"torch"`` (CPU tensors) or
            ``"cuda"`` (GPU tensors; adds ``cuda_reserved_*`` figures).
        cycles: how many load/unload rounds.
    """
    registry = Registry()
    if kind == "synthetic":
        registry.register("selfcheck", loader=lambda: SyntheticModel("selfcheck", size_bytes))
    elif kind in ("torch", "cuda"):
        registry.register("selfcheck", loader=_torch_loader(size_bytes, "cuda" if kind == "cuda" else "cpu"))
    else:
        raise ValueError(f"kind must be synthetic, torch or cuda, got {kind!r}")
    cache = ModelCache(registry, trim=trim)
    task_data: list[Any] = []
    out: dict[str, Any] = {"kind": kind, "size_bytes": size_bytes, "trim": trim, "cycles": []}
    for _ in range(cycles):
        cuda = sys.modules.get("torch") if kind == "cuda" else None
        rss_before = rss_probe()
        with cache.use("selfcheck") as model:
            model.infer(7) if hasattr(model, "infer") else len(model)
            task_data.append([bytes(100) for _ in range(200)] + [bytearray(70_000)])  # a task's result
        rss_loaded = rss_probe()
        cuda_loaded = cuda.cuda.memory_reserved() if cuda is not None else None
        measured = cache.snapshot()[0]["size_bytes"]
        del model
        cache.relieve(2**62, "selfcheck")
        rss_unloaded = rss_probe()
        returned = rss_loaded - rss_unloaded
        cycle = {
            "measured_bytes": measured,
            "rss_before": rss_before,
            "rss_loaded": rss_loaded,
            "rss_unloaded": rss_unloaded,
            "returned_bytes": returned,
            "returned_ratio": returned / measured if measured else 0.0,
        }
        if cuda is not None:
            cycle["cuda_reserved_loaded"] = cuda_loaded
            cycle["cuda_reserved_unloaded"] = cuda.cuda.memory_reserved()
        out["cycles"].append(cycle)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line entry: print the figures of :func:`measure_unload` as JSON."""
    parser = argparse.ArgumentParser(
        prog="python scripts/bench/model_selfcheck.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--size", default="200MiB", help="model size (default 200MiB)")
    parser.add_argument("--no-trim", action="store_true", help="do not call malloc_trim(0) after unloading")
    parser.add_argument("--kind", default="synthetic", choices=("synthetic", "torch", "cuda"))
    parser.add_argument("--cycles", type=int, default=2)
    args = parser.parse_args(argv)
    if args.kind in ("torch", "cuda"):
        import torch  # noqa: F401  (imported before the first reading: its own footprint is not the model's)
    print(
        json.dumps(measure_unload(parse_size(args.size, "--size"), not args.no_trim, args.kind, args.cycles))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
