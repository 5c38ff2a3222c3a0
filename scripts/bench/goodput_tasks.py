"""Task app of ``goodput.py`` (``celery -A goodput_tasks worker``, with ``scripts/bench`` on ``PYTHONPATH``).

``BENCH_MODE`` picks the app, the way a user would write it:

- ``plain``: a plain Celery app (broker and result backend, nothing else) whose tasks are
  ``@app.task(acks_late=True, reject_on_worker_lost=True)``; rmq is never imported.
- ``rmq``: the same app with ``rmq.install(app)`` and the tasks as ``@governed_task``s:
  ``goodput.honest`` declares ``BENCH_HONEST_MIB`` (400) MiB, ``goodput.none`` nothing,
  ``goodput.lying`` ``BENCH_LYING_MIB`` (100) MiB for the same 300 MiB; ``goodput.subprocess`` and
  ``goodput.unbounded`` declare nothing.
  Extra rmq settings come as ``RMQ_<KEY>`` variables (the bench's ``--set``).

Both modes register the same task names, so the bench sends one name to either side.
``RMQ_BROKER_URL`` is broker and result backend.

Every run of a task notes its start (``goodput:starts:<task id>``: JSON ``{"pid", "t"}``), so the
bench counts re-runs and redeliveries; ``goodput.subprocess`` and ``goodput.unbounded`` note their
child (``goodput:children:<task id>``: JSON ``{"pid", "created"}``) before waiting for it, so the
bench can tell afterwards whether it outlived its task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import psutil
import redis as redis_lib
from celery import Celery

MiB = 1 << 20
MODE = os.environ.get("BENCH_MODE", "rmq")
BROKER = os.environ.get("RMQ_BROKER_URL", "redis://127.0.0.1:6379/12")

#: the child of ``goodput.subprocess`` (an encoder, ffmpeg-style): touches argv[1] MiB, holds argv[2] s
CHILD_TOUCH = """
import sys, time
n = int(sys.argv[1]) << 20
block = bytearray(n)
for i in range(0, n, 4096):
    block[i] = 1
time.sleep(float(sys.argv[2]))
"""

#: the child of ``goodput.unbounded``: argv[1] MiB more every argv[2] s, without end. The only bound is
#: time (argv[3] s, exit 3), so that a child nothing stops cannot outlive a crashed bench for long.
CHILD_GROW = """
import sys, time
step, pause, give_up = int(sys.argv[1]) << 20, float(sys.argv[2]), time.monotonic() + float(sys.argv[3])
blocks = []
while time.monotonic() < give_up:
    block = bytearray(step)
    for i in range(0, step, 4096):
        block[i] = 1
    blocks.append(block)
    time.sleep(pause)
sys.exit(3)
"""

app = Celery("goodput_tasks", broker=BROKER, backend=BROKER)

_redis: redis_lib.Redis | None = None
_redis_pid = -1


def _client() -> redis_lib.Redis:
    global _redis, _redis_pid
    if _redis is None or _redis_pid != os.getpid():
        _redis, _redis_pid = redis_lib.Redis.from_url(BROKER), os.getpid()
    return _redis


def _note(key: str, record: dict[str, Any]) -> None:
    pipe = _client().pipeline()
    pipe.rpush(key, json.dumps(record))
    pipe.expire(key, 3600)
    pipe.execute()


def _touch(n: int) -> bytearray:
    block = bytearray(n)
    for i in range(0, n, 4096):
        block[i] = 1
    return block


def touch(task_id: str | None, mib: int, hold_s: float) -> dict[str, Any]:
    """Touch ``mib`` MiB in this process, hold it ``hold_s`` s, free it."""
    started = time.time()
    _note(f"goodput:starts:{task_id}", {"pid": os.getpid(), "t": started})
    block = _touch(mib * MiB)
    time.sleep(hold_s)
    ended = time.time()  # before the memory goes back
    del block
    return {"pid": os.getpid(), "started": started, "ended": ended, "freed": time.time()}


def run_child(task_id: str | None, code: str, *argv: object) -> dict[str, Any]:
    """Run ``python -c code argv...`` and wait for it; a child that fails fails the task."""
    started = time.time()
    _note(f"goodput:starts:{task_id}", {"pid": os.getpid(), "t": started})
    child = subprocess.Popen([sys.executable, "-c", code, *map(str, argv)])
    try:
        created = psutil.Process(child.pid).create_time()
    except psutil.Error:  # already gone: its exit status tells what happened
        created = None
    _note(f"goodput:children:{task_id}", {"pid": child.pid, "created": created})
    status = child.wait()
    ended = time.time()
    if status != 0:
        raise subprocess.CalledProcessError(status, "python -c <child>")
    return {"pid": os.getpid(), "child": child.pid, "started": started, "ended": ended, "freed": ended}


def _bodies() -> dict[str, Any]:
    """The five task bodies, each bound (``bind=True``) so that it knows its task id."""

    def honest(self: Any, mib: int, hold_s: float) -> dict[str, Any]:
        return touch(self.request.id, mib, hold_s)

    def none(self: Any, mib: int, hold_s: float) -> dict[str, Any]:
        return touch(self.request.id, mib, hold_s)

    def lying(self: Any, mib: int, hold_s: float) -> dict[str, Any]:
        return touch(self.request.id, mib, hold_s)

    def in_subprocess(self: Any, mib: int, hold_s: float) -> dict[str, Any]:
        return run_child(self.request.id, CHILD_TOUCH, mib, hold_s)

    def unbounded(self: Any, step_mib: int, pause_s: float, give_up_s: float) -> dict[str, Any]:
        return run_child(self.request.id, CHILD_GROW, step_mib, pause_s, give_up_s)

    return {"honest": honest, "none": none, "lying": lying, "subprocess": in_subprocess, "unbounded": unbounded}


if MODE == "rmq":
    import rmq
    from rmq import governed_task

    rmq.install(app)
    memory = {"honest": {"memory": f"{os.environ.get('BENCH_HONEST_MIB', '400')}MiB"},
              "lying": {"memory": f"{os.environ.get('BENCH_LYING_MIB', '100')}MiB"}}
    for _row, _body in _bodies().items():
        governed_task(name=f"goodput.{_row}", bind=True, **memory.get(_row, {}))(_body)
else:
    for _row, _body in _bodies().items():
        app.task(name=f"goodput.{_row}", bind=True, acks_late=True, reject_on_worker_lost=True)(_body)
