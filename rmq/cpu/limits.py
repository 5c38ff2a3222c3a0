"""Native thread caps: a task's BLAS/OpenMP and torch thread pools held to its ``cpu=`` slots.

- :class:`ThreadCaps` caps BLAS/OpenMP pools (threadpoolctl), torch, and the thread-count
  environment variables of subprocesses to a task's slots while it runs.
- :class:`ThreadCapGuard` is the concern that applies the caps around a governed task and records
  the CPU seconds it used.

How many slots a worker has is :mod:`rmq.cpu.slots`; see docs/design.md#cpu.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from rmq.concern import Concern, TaskContext
from rmq.core import runtime
from rmq.cpu.slots import affinity_count

__all__ = ["THREAD_ENV_VARS", "ThreadCapGuard", "ThreadCaps", "default_threads"]

#: environment variables that size the thread pools of subprocesses a task starts
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
log = logging.getLogger(__name__)


# Variables each library reads once, when it is loaded, to size its pool (first set one wins);
# without any, BLIS runs one thread and the others one per CPU.
_LOAD_VARS = {
    "openblas": ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"),
    "mkl": ("MKL_NUM_THREADS", "OMP_NUM_THREADS"),
    "blis": ("BLIS_NUM_THREADS", "OMP_NUM_THREADS"),
    "flexiblas": ("FLEXIBLAS_NUM_THREADS", "OMP_NUM_THREADS"),
    "openmp": ("OMP_NUM_THREADS",),
    "torch": ("OMP_NUM_THREADS",),
}


def default_threads(library: str, environ: Any = os.environ, cpu_count: Callable[[], int] = affinity_count) -> int:
    """The threads ``library`` (a threadpoolctl ``internal_api``, or ``"torch"``) starts with in ``environ``."""
    for name in _LOAD_VARS.get(library, ("OMP_NUM_THREADS",)):
        head = (environ.get(name) or "").split(",")[0].strip()
        if head.isdigit() and int(head) > 0:
            return int(head)
    return 1 if library == "blis" else max(1, cpu_count())


class ThreadCaps:
    """Caps native thread pools to ``n`` threads while the block runs, then restores them.

    Covers BLAS/OpenMP libraries loaded in the process (threadpoolctl), torch when it is already
    imported, and :data:`THREAD_ENV_VARS` for subprocesses. The environment is process-wide:
    meant for the prefork pool, where a process runs one task at a time.

    A library first loaded inside the block sized its pool from the capped variables; on exit it
    is set to what it would have started with outside the block (:func:`default_threads`).
    """

    def __init__(self, n: int, cpu_count: Callable[[], int] = affinity_count) -> None:
        if n < 1:
            raise ValueError(f"thread cap must be >= 1, got {n}")
        self.n = n
        self.cpu_count = cpu_count
        self._env: dict[str, str | None] = {}
        self._limits: Any = None
        self._known: set[str] | None = None
        self._modules = 0
        self._torch_threads: int | None = None

    def __enter__(self) -> Self:
        self._env = {name: os.environ.get(name) for name in THREAD_ENV_VARS}
        os.environ.update({name: str(self.n) for name in THREAD_ENV_VARS})
        self._modules = len(sys.modules)
        try:
            from threadpoolctl import ThreadpoolController

            controller = ThreadpoolController()
            self._known = {lib.filepath for lib in controller.lib_controllers}
            self._limits = controller.limit(limits=self.n)
        except (ImportError, OSError, RuntimeError, ValueError) as exc:  # a cap never fails the task
            log.warning("rmq: could not cap native thread pools to %d: %s", self.n, exc)
        torch = sys.modules.get("torch")
        self._torch_threads = None
        if torch is not None:
            try:
                self._torch_threads = torch.get_num_threads()
                torch.set_num_threads(self.n)
            except (RuntimeError, ValueError) as exc:
                log.warning("rmq: could not cap torch threads to %d: %s", self.n, exc)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for name, value in self._env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._env = {}
        torch = sys.modules.get("torch")
        if torch is not None:
            threads = self._torch_threads or default_threads("torch", os.environ, self.cpu_count)
            try:
                torch.set_num_threads(threads)
            except (RuntimeError, ValueError) as err:
                log.warning("rmq: could not restore torch threads to %d: %s", threads, err)
        self._torch_threads = None
        if self._limits is not None:
            self._limits.restore_original_limits()
            self._limits = None
        if self._known is not None and len(sys.modules) != self._modules:
            self._reset_new_libraries(self._known)  # an import may have loaded a native pool
        self._known = None

    def _reset_new_libraries(self, known: set[str]) -> None:
        try:
            from threadpoolctl import ThreadpoolController

            for lib in ThreadpoolController().lib_controllers:
                if lib.filepath not in known:
                    lib.set_num_threads(default_threads(lib.internal_api, os.environ, self.cpu_count))
        except (ImportError, OSError, RuntimeError, ValueError) as exc:
            log.warning("rmq: could not reset thread pools loaded under a cap of %d: %s", self.n, exc)


def _cpu_seconds() -> float:
    """CPU time of this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ThreadCapGuard(Concern):
    """Caps a task's native threads to its ``cpu=`` slots and records the CPU seconds it used.

    Counters: ``cpu.task_seconds`` (all tasks) and ``cpu.by_task.<task name>``.
    """

    name = "thread_caps"

    def __init__(self, clock: Callable[[], float] = _cpu_seconds) -> None:
        self.clock = clock

    def applies(self, declaration: Any) -> bool:
        return declaration.cpu_slots > 0

    def enter(self, ctx: TaskContext) -> None:
        caps = ThreadCaps(ctx.declaration.cpu_slots)
        caps.__enter__()
        ctx.state[self.name] = (caps, self.clock(), time.monotonic())

    def exit(self, ctx: TaskContext, failed: bool) -> None:
        entry = ctx.state.pop(self.name, None)
        if entry is None:
            return
        caps, cpu_start, wall_start = entry
        caps.__exit__(None, None, None)
        used = max(0.0, self.clock() - cpu_start)
        ctx.state["cpu_seconds"] = used
        ctx.state["wall_seconds"] = time.monotonic() - wall_start
        rt = ctx.runtime or runtime.current()
        if rt is not None:
            rt.stats.incr("cpu", "task_seconds", n=used)
            rt.stats.incr("cpu", "by_task", ctx.task_name, n=used)
