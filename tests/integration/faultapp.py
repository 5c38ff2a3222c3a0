"""Task app of the fault tests (``tests/integration/test_copies_faults.py``): the ``soak.*`` tasks
(every run recorded in Redis, see ``soakapp``) plus tasks that die in the ways a worker meets.

``fault.crash`` records its runs as files (it must work with no Redis at all); ``fault.grow_once``
grows until the governor kills it, then succeeds on its re-run.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from soakapp import _touch, app, record_done, record_start  # noqa: F401  (also registers soak.*)

from rmq import governed_task
from rmq.celery.task import rmq_headers

MiB = 1 << 20


@governed_task(name="fault.crash", bind=True, ignore_result=False)
def crash(self: Any, directory: str) -> str:
    """Writes one file per run into ``directory``, then dies of SIGSEGV (a crashing C extension)."""
    with open(os.path.join(directory, f"run-{time.time():.6f}-{os.getpid()}"), "w"):
        pass
    os.kill(os.getpid(), signal.SIGSEGV)
    return "unreachable"


@governed_task(memory="100MiB", name="fault.grow_once", bind=True)
def grow_once(self: Any, step_mib: int = 50) -> str:
    """The first run allocates without bound (the governor kills it); the re-run succeeds."""
    record_start(self.request)
    if not int(rmq_headers(self.request).get("rmq_kills", 0) or 0):
        blocks = []
        while True:
            blocks.append(_touch(step_mib * MiB))
            time.sleep(0.05)
    record_done(self.request)
    return "grew once"
