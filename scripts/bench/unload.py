#!/usr/bin/env python3
"""How much of an unloaded model's memory goes back to the OS, with and without malloc_trim (docs/guarantees.md#p7).

Each measurement runs ``scripts/bench/model_selfcheck.py`` in a fresh process: a synthetic model
(80 % large buffers, 20 % small Python objects, real memory) is loaded through the model cache
(size measured), leased for a toy inference that leaves some task data behind, then unloaded;
twice, because a pool process reloads models over its life. Goal: >= 90 % returned.

Usage: scripts/bench/unload.py [--sizes 64MiB,200MiB,512MiB] [--kind synthetic|torch]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 2**20
SELFCHECK = os.path.join(ROOT, "scripts", "bench", "model_selfcheck.py")
GOAL = 0.90


def run(size: str, trim: bool, kind: str) -> dict:
    args = [sys.executable, SELFCHECK, "--size", size, "--kind", kind]
    if not trim:
        args.append("--no-trim")
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64MiB,200MiB,512MiB")
    parser.add_argument("--kind", default="synthetic", choices=("synthetic", "torch"))
    args = parser.parse_args()
    header = (
        f"{'model':>8} {'load':>6} {'measured':>9} {'RSS loaded':>11} {'unloaded+trim':>14} "
        f"{'unloaded-trim':>14} {'returned+trim':>14} {'returned-trim':>14} {'ratio':>7}"
    )
    print(f"P7 model unload ({args.kind}; MiB; fresh process per column pair; goal >= {GOAL:.0%} with trim)")
    print(header)
    print("-" * len(header))
    worst = 1.0
    for size in args.sizes.split(","):
        trimmed, untrimmed = run(size, True, args.kind), run(size, False, args.kind)
        for i, (t, u) in enumerate(zip(trimmed["cycles"], untrimmed["cycles"], strict=True)):
            worst = min(worst, t["returned_ratio"])
            ratio = t["returned_ratio"] / u["returned_ratio"] if u["returned_ratio"] > 0 else float("inf")
            print(
                f"{size:>8} {('first', 'reload')[min(i, 1)]:>6} {t['measured_bytes'] / MiB:9.1f} "
                f"{t['rss_loaded'] / MiB:11.1f} {t['rss_unloaded'] / MiB:14.1f} {u['rss_unloaded'] / MiB:14.1f} "
                f"{t['returned_ratio']:14.1%} {u['returned_ratio']:14.1%} {ratio:6.2f}x"
            )
    verdict = "PASS" if worst >= GOAL else "FAIL"
    print(f"\nworst returned with malloc_trim: {worst:.1%} (goal >= {GOAL:.0%}): {verdict}")
    print("ratio = share returned with malloc_trim / share returned without it")
    return 0 if worst >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
