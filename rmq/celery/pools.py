"""Which worker pools rmq governs: prefork only. Any other pool stops the worker with one line.

The governor's guarantees rest on a process per running task: it reads each pool process's
memory, kills the one that runs away (its task is re-run or failed, the worker lives on), and
recycles leaking ones between tasks. The other pools have no such process:

- ``solo`` runs the task in the worker's own process: the only way to end a runaway task is to
  end the worker, and its message would come back only after the visibility timeout;
- ``threads``, ``gevent`` and ``eventlet`` run tasks as threads or greenlets of one process, whose
  memory cannot be told apart per task and which cannot be killed one at a time.

Running them "governed" would admit, meter and kill nothing reliably: rather than a worker that
looks governed and is not, the worker refuses to start (exit status 2, like a bad setting).
"""

from __future__ import annotations

from typing import Any

from celery.concurrency import ALIASES
from celery.concurrency.prefork import TaskPool as PreforkPool

from rmq.core.exits import exit_with_line

__all__ = ["check_pool", "pool_name", "refusal"]

_WHY = {
    "solo": "it runs tasks in the worker's own process, so a memory kill would end the whole worker",
    "threads": "it runs tasks as threads of one process, which cannot be measured or killed one at a time",
    "gevent": "it runs tasks as greenlets of one process, which cannot be measured or killed one at a time",
    "eventlet": "it runs tasks as greenlets of one process, which cannot be measured or killed one at a time",
}


def pool_name(pool_cls: Any) -> str:
    """The name a user gives the pool (``-P solo``), else its import path."""
    if isinstance(pool_cls, str):
        return pool_cls
    path = f"{getattr(pool_cls, '__module__', '?')}:{getattr(pool_cls, '__qualname__', pool_cls)}"
    return next((alias for alias, target in ALIASES.items() if target == path), path)


def refusal(pool_cls: Any) -> str | None:
    """Why rmq cannot govern a worker with this pool, or None for a prefork pool."""
    if isinstance(pool_cls, type) and issubclass(pool_cls, PreforkPool):
        return None
    name = pool_name(pool_cls)
    why = _WHY.get(name, "rmq governs tasks through the processes of a prefork pool")
    return (f"the {name} pool cannot be governed: {why}; start the worker with --pool prefork "
            "(or use an app without rmq.install())")


def check_pool(worker: Any) -> None:
    """Stop a booting worker whose pool rmq cannot govern: one line on stderr, exit status 2."""
    message = refusal(getattr(worker, "pool_cls", None))
    if message is not None:
        exit_with_line(message, now=True)
