"""Profiling aid: CPU and wall time of each part of the governed task path, inside pool processes.

Import it into a worker (``SOAK_IMPORT=pathtiming`` with ``-A soakapp``) and set
``PATHTIMING_DIR``: each pool process wraps ``GovernedTask.__call__``, ``after_return``, every
concern's ``enter``/``exit``, admission's ledger step and the ledger lock, and writes
``<PATHTIMING_DIR>/path-<pid>.json`` when it exits: ``{part: [cpu seconds, wall seconds], ...,
"tasks": n}``. Divide by ``tasks`` for the time per task in a busy worker (caches cold), which is
what throughput pays, unlike a loop that runs the path hot (``ovh.profile_guards``). Each wrapper
adds two ``thread_time`` and two ``perf_counter`` calls (about 1 us) to what it wraps, and the
wrappers nested inside ``__call__`` add theirs to it: with ``PATHTIMING_PARTS=call`` only
``__call__`` and ``after_return`` are wrapped, for the whole path's figure with one wrapper's cost.
With ``PATHSTUBS`` set it imports ``pathstubs`` first (one part of the path taken out, to price it).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import signals

if os.environ.get("PATHSTUBS"):
    import pathstubs  # noqa: F401  (before the wrappers: they wrap what it put in place)

from rmq.celery import concerns
from rmq.celery.task import GovernedTask
from rmq.core import ledger
from rmq.memory import reservation

_acc: dict[str, list[float]] = {}
_tasks = [0]


def _wrap(owner: Any, attr: str, label: str, count: bool = False) -> None:
    original = getattr(owner, attr)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0, w0 = time.thread_time(), time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            got = _acc.setdefault(label, [0.0, 0.0])
            got[0] += time.thread_time() - t0
            got[1] += time.perf_counter() - w0
            if count:
                _tasks[0] += 1

    setattr(owner, attr, timed)


_wrap(GovernedTask, "__call__", "GovernedTask.__call__", count=True)
_wrap(GovernedTask, "after_return", "GovernedTask.after_return")
if os.environ.get("PATHTIMING_PARTS") != "call":
    for _concern in concerns.default_concerns():
        _wrap(type(_concern), "enter", f"{_concern.name}.enter")
        _wrap(type(_concern), "exit", f"{_concern.name}.exit")
    _wrap(reservation, "_try_once", "admission: ledger step")
    _wrap(ledger._Lock, "__enter__", "ledger lock")


@signals.worker_process_shutdown.connect(weak=False)
def _dump(**_: Any) -> None:
    directory = os.environ.get("PATHTIMING_DIR")
    if directory:
        with open(os.path.join(directory, f"path-{os.getpid()}.json"), "w") as fh:
            json.dump({**_acc, "tasks": _tasks[0]}, fh)
