"""Test app for the operations package: tasks that move every figure the dashboard shows.

Admissions (``ops.noop``), a model loaded and one unloaded (``ops.models``), a wait for a rate-limit
token and a deferral for lack of one (``ops.throttled``, ``ops.denied``), a session directory
(``ops.session``), and, from ``monitorapp``, ``m.memory_phases`` that holds a worker in a memory zone.
Every model here is SYNTHETIC (real resident memory, no weights).
"""

from __future__ import annotations

import os

import monitorapp  # noqa: F401  (registers m.noop and m.memory_phases)

from rmq import governed_task, models, throttle
from rmq.testing.synthetic_models import synthetic_loader
from workers.app import make_app

app = make_app()
app.set_current()

models.register("ops.kept", size="8MiB", loader=synthetic_loader("ops.kept", "8MiB"))
models.register("ops.cycled", size="8MiB", loader=synthetic_loader("ops.cycled", "8MiB"))


@governed_task(memory="16MiB", name="ops.noop")
def noop(i: int = 0) -> int:
    return i


@governed_task(memory="48MiB", name="ops.models")
def use_models() -> dict:
    """Loads two models, then unloads one (the other stays resident in this pool process)."""
    with models.use("ops.kept"), models.use("ops.cycled"):
        pass
    evicted = models.cache().evict("ops.cycled")
    return {"pid": os.getpid(), "evicted": evicted}


@governed_task(memory="16MiB", name="ops.throttled")
def throttled(calls: int = 3, rate: str = "2/s") -> int:
    """Takes ``calls`` tokens of a limit that grants fewer at once: the last ones wait for theirs."""
    for _ in range(calls):
        with throttle("ops-api", rate):
            pass
    return calls


@governed_task(memory="16MiB", name="ops.denied")
def denied() -> str:
    """Takes the only token of an hourly limit; a second call is deferred (no token within 0 s)."""
    with throttle("ops-hourly", "1/h", max_wait_s=0):
        return "granted"


@governed_task(session=True, bind=True, name="ops.session")
def session(self, session_id: str) -> str:
    """Writes a file into its session directory (removed after the task)."""
    (self.session_dir / "out.txt").write_text("x" * 1024)
    return str(self.session_dir)
