"""The governor's hands on a Celery worker: pause and resume fetching, kill a pool process, keep
unacked messages fresh, reap dead pool processes. Celery glue, built by the bootstep."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from rmq.memory.governor import kill_pid

__all__ = ["CeleryActuator"]

log = logging.getLogger("rmq.worker")


class CeleryActuator:
    """The governor's hands on a Celery worker. Pause/resume and unacked touching run on the
    worker's event loop (a timer); kills and pid reads are safe from the governor thread."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.want_paused = False
        self.paused_queues: list[str] = []
        self._is_paused = False
        #: when unacked messages were last touched (monotonic), by the event loop or the keeper thread
        self.last_touch = time.monotonic()
        self._paused_total_s = 0.0
        self._paused_at: float | None = None
        # a scrape reads both while the event loop updates them: a torn read could count a pause
        # twice, and the counter would go down on the next scrape
        self._paused_lock = threading.Lock()

    @property
    def paused_seconds(self) -> float:
        """Seconds the worker has spent paused since it started, the current pause included."""
        with self._paused_lock:
            paused_at, total = self._paused_at, self._paused_total_s
        return total + (time.monotonic() - paused_at if paused_at is not None else 0.0)

    @property
    def is_paused(self) -> bool:
        """Whether the worker has really stopped fetching (the governor's wish, applied)."""
        return self._is_paused

    def pool_pids(self) -> list[int]:
        try:
            procs = list(self.worker.pool._pool._pool)
        except AttributeError:
            return []
        return [p.pid for p in procs if p.pid and p.pid != os.getpid()]

    def pool_slots(self) -> dict[int, int]:
        """pid -> the pool process's index: billiard gives a replacement the index of the process it
        replaces, so metrics labelled by it do not change when processes are recycled."""
        try:
            procs = list(self.worker.pool._pool._pool)
        except AttributeError:
            return {}
        return {p.pid: int(p.index) for p in procs
                if p.pid and p.pid != os.getpid() and getattr(p, "index", None) is not None}

    def consumed_queues(self) -> list[str]:
        """The queues this worker consumes; while paused, those it will consume again on resume."""
        if self._is_paused:
            return list(self.paused_queues)
        task_consumer = getattr(getattr(self.worker, "consumer", None), "task_consumer", None)
        return sorted(q.name for q in list(getattr(task_consumer, "queues", None) or ()))

    def pause(self) -> None:
        self.want_paused = True

    def resume(self) -> None:
        self.want_paused = False

    def kill(self, pid: int) -> None:
        if pid != os.getpid():
            kill_pid(pid)

    def apply_pause_state(self) -> None:
        """On the event loop: cancel or re-add the task queues to match the governor."""
        if self.want_paused == self._is_paused:
            return
        consumer: Any = getattr(self.worker, "consumer", None)  # not None once it has a task consumer
        task_consumer = getattr(consumer, "task_consumer", None)
        if task_consumer is None:
            return
        if self.want_paused:
            self.paused_queues = [q.name for q in task_consumer.queues]
            for name in self.paused_queues:
                consumer.cancel_task_queue(name)
            self._is_paused = True
            with self._paused_lock:
                self._paused_at = time.monotonic()
        else:
            for name in self.paused_queues:
                consumer.add_task_queue(name)
            self.paused_queues = []
            self._is_paused = False
            with self._paused_lock:
                if self._paused_at is not None:
                    self._paused_total_s += time.monotonic() - self._paused_at
                    self._paused_at = None

    def touch_unacked(self) -> None:
        """On Redis, keep this worker's unacked messages fresh so that a short visibility
        timeout redelivers the messages of a dead worker quickly but never those of a live one."""
        consumer = getattr(self.worker, "consumer", None)
        channel: Any = getattr(getattr(consumer, "task_consumer", None), "channel", None)
        qos = getattr(channel, "qos", None)
        key = getattr(channel, "unacked_index_key", None)
        delivered = getattr(qos, "_delivered", None)
        self.last_touch = time.monotonic()
        if not delivered or key is None:
            return
        now = time.time()
        try:
            # Not channel.client: that is the connection with the consumer's pending BRPOP, and a
            # command sent on it would read the BRPOP's reply (a message) as its own and lose it.
            with channel.conn_or_acquire() as client:
                # XX: a tag acked meanwhile (by the main thread, when a keeper thread touches) stays gone
                client.zadd(key, {tag: now for tag in list(delivered)}, xx=True)
        except Exception as exc:  # a broken connection is the consumer's to fix
            log.debug("rmq could not touch unacked messages: %r", exc)

    def touch_if_stale(self, every_s: float) -> None:
        """From a thread: touch when the event loop has not for 1.5 intervals. The loop stops
        before the pool has drained (warm shutdown) and sleeps through a soft shutdown; a running
        task's message must stay fresh all the same."""
        if time.monotonic() - self.last_touch >= 1.5 * every_s:
            self.touch_unacked()

    def reap_exited(self) -> None:
        """On the event loop: finish pool processes that died but that Celery's exit-pipe check
        missed (the pipe closes before the process can be reaped; Celery then waits for its
        5 s maintenance timer, which delays the redelivery of the lost task)."""
        pool: Any = getattr(getattr(self.worker, "pool", None), "_pool", None)  # not None once it has processes
        for proc in list(getattr(pool, "_pool", None) or ()):
            popen = getattr(proc, "_popen", None)
            if popen is not None and popen.poll() is not None:
                pool.maintain_pool()
                return
