"""The pressure signal reaching idle pool processes: a thread that watches a generation counter.

The governor bumps a generation counter in the ledger's shared control block, with the bytes
to free, when the worker crosses its unload line. Each pool process runs a
:class:`PressureWatcher` that notices the new generation within ``interval_s`` and unloads
models (``on_pressure`` is wired to ``models.cache().relieve``), even when no task runs there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["PressureWatcher"]

logger = logging.getLogger("rmq.models")


class PressureWatcher:
    """Calls ``on_pressure(bytes_to_free)`` once per new generation of a pressure reading.

    Args:
        read_generation: returns ``(generation, bytes_to_free)``; the generation grows each
            time the governor asks for memory back.
        on_pressure: called in the watcher thread with ``bytes_to_free``.
        interval_s: polling period (default 0.1 s).

    The generation current at ``start()`` counts as seen: a process that starts after a
    pressure episode has nothing loaded to give back for it.
    """

    def __init__(
        self,
        read_generation: Callable[[], tuple[int, int]],
        on_pressure: Callable[[int], object],
        interval_s: float = 0.1,
    ) -> None:
        self.read_generation = read_generation
        self.on_pressure = on_pressure
        self.interval_s = interval_s
        self.last_generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the daemon thread (no-op if running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        try:
            self.last_generation = self.read_generation()[0]
        except Exception:
            logger.warning("pressure watcher: first reading failed", exc_info=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rmq-model-pressure", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread and wait up to ``timeout_s`` for it."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    @property
    def running(self) -> bool:
        """True while the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def poll_once(self) -> bool:
        """Read once; call ``on_pressure`` if the generation is new. True if it was called."""
        generation, bytes_to_free = self.read_generation()
        if generation == self.last_generation:
            return False
        first = self.last_generation is None
        self.last_generation = generation
        if first:
            return False
        self.on_pressure(int(bytes_to_free))
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll_once()
            except Exception:  # a bad reading or a failing unload must not kill the watcher
                logger.warning("pressure watcher: poll failed", exc_info=True)
