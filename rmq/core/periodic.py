"""A daemon thread that runs one step at a fixed rate until it is stopped: the loop under the
governor, the alert loop, the lease keeper and each pool process's watcher.

A step that raises is logged and the loop goes on: these threads guard the worker and must outlive
a bad reading or a broker hiccup. The interval may change between steps (the governor samples
faster under pressure), so it is read again before each wait; the step's own time is taken off the
wait, so a step every 250 ms stays every 250 ms.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["PeriodicThread"]


class PeriodicThread:
    """Calls ``step()`` every ``interval_s`` seconds on a daemon thread, first after one interval.

    Args:
        name: the thread's name (shown by ``py-spy``, in logs and thread dumps).
        step: what to run; an exception is logged on ``logger`` and the loop continues.
        interval_s: seconds between the starts of two steps, or a callable read before each wait.
        logger: where a failed step is logged (default: this module's logger).
        what: the step in the log line ``rmq <what> failed`` (default: the thread's name).
        waiter: waits up to its argument in seconds instead of a plain sleep, and may return early
            (the governor waits on the kernel's memory events); ``wake`` makes it return, for stop.
    """

    def __init__(self, name: str, step: Callable[[], object], interval_s: float | Callable[[], float],
                 logger: logging.Logger | None = None, what: str | None = None,
                 waiter: Callable[[float], object] | None = None, wake: Callable[[], object] | None = None) -> None:
        self.name = name
        self.what = what or name
        self.step = step
        self._interval = interval_s if callable(interval_s) else (lambda: float(interval_s))
        self._log = logger or logging.getLogger(__name__)
        self._stop = threading.Event()
        self._waiter = waiter
        self._wake = wake
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (nothing when it already runs)."""
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop and wait up to ``timeout_s`` for the step in progress."""
        self._stop.set()
        if self._wake is not None:
            self._wake()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def _waited(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s``; ``True`` once the loop is stopped."""
        if self._waiter is None:
            return self._stop.wait(timeout_s)
        if not self._stop.is_set():
            self._waiter(timeout_s)
        return self._stop.is_set()

    def _run(self) -> None:
        spent = 0.0
        while not self._waited(max(0.0, self._interval() - spent)):
            started = time.perf_counter()
            try:
                self.step()
            except Exception:
                self._log.exception("rmq %s failed", self.what)
            spent = time.perf_counter() - started
