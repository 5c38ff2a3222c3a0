"""Kernel wake-ups for the memory governor: the kernel says when the worker's memory crosses a line.

cgroup v1: one eventfd per usage threshold (``memory.usage_in_bytes``) and one for OOM
(``memory.oom_control``), registered through ``cgroup.event_control``; a threshold fires when usage
crosses it in either direction, not when it is already above at registration. cgroup v2:
``memory.events`` polled for POLLPRI (the counters ``high``, ``max``, ``oom``, ``oom_kill``) and a
PSI trigger on ``memory.pressure``.

:meth:`KernelEvents.hold_oom` makes the kernel slow a burst instead of killing, so rmq picks the
victim: v1 disables the cgroup's OOM killer (tasks then sleep in the cgroup's OOM wait queue until
memory is freed), v2 sets ``memory.high`` just under ``memory.max`` (tasks are throttled in reclaim).
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Iterable

from rmq.memory.probes import CgroupMemory, read_cgroup_file

__all__ = ["KernelEvents", "open_kernel_events"]

log = logging.getLogger("rmq.memory.kernel_events")

#: memory.events counters that wake the governor (``low`` and ``oom_group_kill`` do not)
V2_COUNTERS = ("high", "max", "oom", "oom_kill")
#: the kernel refuses PSI windows above 10 s
PSI_MAX_WINDOW_US = 10_000_000
#: without CAP_SYS_RESOURCE the kernel only accepts PSI windows that are multiples of 2 s
PSI_UNPRIVILEGED_STEP_US = 2_000_000
#: v2 hold without an explicit ``high_bytes``: memory.high this fraction under memory.max
DEFAULT_HIGH_MARGIN = 0.05
PAGE = 4096

_EVENTFD_FLAGS = getattr(os, "EFD_NONBLOCK", 0) | getattr(os, "EFD_CLOEXEC", 0)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _counters(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


class KernelEvents:
    """Wakes the governor when the kernel sees the worker's memory cross a line or run out.

    One thread may block in :meth:`wait` while another calls :meth:`set_thresholds`, :meth:`close`,
    :meth:`hold_oom` or :meth:`release_oom`. All file descriptors stay open for the object's life.

    Attributes:
        mode: ``"eventfd"`` (v1), ``"psi+events"`` (v2; the PSI trigger may be missing, see
            ``reason``) or ``"none"`` (``wait`` just sleeps).
        reason: why this mode, in words.
        thresholds: the usage thresholds asked for, in bytes (v2 keeps them; the kernel has none).
        threshold_reason: why v1 refused the thresholds, else ``None``.
        hold_reason: why the last :meth:`hold_oom` returned False, else ``None``.
        psi_trigger: the PSI trigger armed (``"some <stall_us> <window_us>"``), else ``None``.
    """

    def __init__(
        self,
        cgroup: CgroupMemory | None,
        thresholds: Iterable[int] = (),
        *,
        high_bytes: int | None = None,
        psi_stall_us: int = 100_000,
        psi_window_us: int = 1_000_000,
    ) -> None:
        wanted = self._checked_thresholds(thresholds)
        _positive_int("psi_window_us", psi_window_us)
        _positive_int("psi_stall_us", psi_stall_us)
        if psi_window_us > PSI_MAX_WINDOW_US or psi_stall_us > psi_window_us:
            raise ValueError(f"need psi_stall_us <= psi_window_us <= {PSI_MAX_WINDOW_US}, "
                             f"got {psi_stall_us} and {psi_window_us}")
        self.cgroup = cgroup
        self.thresholds: tuple[int, ...] = ()
        self.threshold_reason: str | None = None
        self.hold_reason: str | None = None
        self.psi_trigger: str | None = None
        self._high_bytes = None if high_bytes is None else self._checked_high(high_bytes)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._hold_lock = threading.Lock()
        self._held: tuple[str, str] | None = None  # (file, value to restore)
        self._stopped = threading.Event()
        self._polling = False
        self._closed = False
        self._gone = False
        self._fds: dict[int, str] = {}  # fd -> what it reports ("threshold", "oom", "events", "psi", "wake")
        self._threshold_fds: dict[int, int] = {}  # threshold bytes -> its eventfd
        self._worker_fds: dict[int, int] = {}  # the same, on the worker's cgroup (watch_worker)
        self._pending: tuple[int, ...] | None = None  # thresholds set_thresholds_soon will write
        self._pending_set = threading.Event()
        self._writer: threading.Thread | None = None
        self._closable: list[int] = []  # retired eventfds for the writer thread to close
        self._worker_control_fd = self._worker_usage_fd = -1
        self.worker_thresholds: tuple[int, ...] = ()
        self._plain_fds: list[int] = []  # files kept open for the registrations
        self._retired: list[int] = []  # eventfds to close once no poll() uses them
        self._control_fd = self._usage_fd = -1
        self._wake_fd = -1
        self._events_fd = -1
        self._events_seen: dict[str, int] = {}
        self.mode = "none"
        if cgroup is None:
            self.reason = "no memory cgroup: nothing to watch"
        elif not hasattr(os, "eventfd"):
            self.reason = "no eventfd on this platform (Linux only)"
        else:
            try:
                self._wake_fd = os.eventfd(0, _EVENTFD_FLAGS)
                self._fds[self._wake_fd] = "wake"
                self.mode, self.reason = self._open_v1(cgroup) if cgroup.version == 1 else self._open_v2(
                    cgroup, psi_stall_us, psi_window_us)
            except OSError as exc:
                self._close_fds()
                self.mode = "none"
                where = f" ({exc.filename})" if exc.filename else ""
                self.reason = f"cgroup v{cgroup.version} at {cgroup.path}: {exc.strerror or exc}{where}"
        self.set_thresholds(wanted)

    # --- opening ----------------------------------------------------------------------------------

    def _open_v1(self, cg: CgroupMemory) -> tuple[str, str]:
        self._control_fd = os.open(cg.path / "cgroup.event_control", os.O_WRONLY | os.O_CLOEXEC)
        self._plain_fds.append(self._control_fd)
        self._usage_fd = os.open(cg.path / "memory.usage_in_bytes", os.O_RDONLY | os.O_CLOEXEC)
        self._plain_fds.append(self._usage_fd)
        oom_control = os.open(cg.path / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        self._plain_fds.append(oom_control)
        oom_fd = os.eventfd(0, _EVENTFD_FLAGS)
        self._fds[oom_fd] = "oom"
        try:
            os.write(self._control_fd, f"{oom_fd} {oom_control}\n".encode())
        except OSError as exc:
            exc.filename = str(cg.path / "cgroup.event_control")
            raise
        return "eventfd", "cgroup v1: eventfd thresholds on memory.usage_in_bytes and memory.oom_control"

    def _open_v2(self, cg: CgroupMemory, stall_us: int, window_us: int) -> tuple[str, str]:
        self._events_fd = os.open(cg.path / "memory.events", os.O_RDONLY | os.O_CLOEXEC)
        self._fds[self._events_fd] = "events"
        self._events_seen = _counters(self._read_events())
        try:
            psi = self._open_psi(cg, stall_us, window_us)
        except OSError as exc:
            return "psi+events", f"cgroup v2: poll on memory.events; no PSI trigger on memory.pressure ({exc.strerror})"
        return "psi+events", f"cgroup v2: poll on memory.events and PSI trigger '{psi}' on memory.pressure"

    def _open_psi(self, cg: CgroupMemory, stall_us: int, window_us: int) -> str:
        fd = os.open(cg.path / "memory.pressure", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            try:
                trigger = f"some {stall_us} {window_us}"
                os.write(fd, trigger.encode() + b"\0")
            except OSError:
                if window_us % PSI_UNPRIVILEGED_STEP_US == 0:
                    raise
                # unprivileged (no CAP_SYS_RESOURCE): the same stall ratio over the next 2 s multiple
                wider = min(PSI_MAX_WINDOW_US, -(-window_us // PSI_UNPRIVILEGED_STEP_US) * PSI_UNPRIVILEGED_STEP_US)
                trigger = f"some {max(1, stall_us * wider // window_us)} {wider}"
                os.write(fd, trigger.encode() + b"\0")
        except BaseException:
            os.close(fd)
            raise
        self._fds[fd] = "psi"
        self.psi_trigger = trigger
        return trigger

    # --- thresholds -------------------------------------------------------------------------------

    @staticmethod
    def _checked_thresholds(thresholds: Iterable[int]) -> tuple[int, ...]:
        return tuple(sorted({_positive_int("threshold", t) for t in thresholds}))

    def set_thresholds(self, thresholds: Iterable[int]) -> None:
        """(Re)register usage thresholds in bytes.

        v1: one eventfd per threshold; kept thresholds keep their eventfd. v2: kept in
        ``thresholds`` only (the kernel has no usage thresholds; ``high`` and PSI wake instead).
        A kernel refusal is logged and left in ``threshold_reason``; it does not raise.

        Raises:
            ValueError: a threshold is not a positive int (nothing changes).
        """
        wanted = self._checked_thresholds(thresholds)
        with self._lock:
            self.thresholds = wanted
            if self.mode != "eventfd" or self._closed:
                return
        errors = self._register(self._threshold_fds, self._control_fd, self._usage_fd, wanted, "threshold")
        with self._lock:
            self._refused(errors)

    def set_thresholds_soon(self, thresholds: Iterable[int]) -> None:
        """:meth:`set_thresholds` on a thread of its own, the latest call winning: each threshold the
        kernel adds or drops waits for an RCU grace period (``synchronize_rcu``), and a refit that moved
        four of them kept the governor's tick 40-160 ms from its next kill.

        Raises:
            ValueError: a threshold is not a positive int (nothing changes).
        """
        wanted = self._checked_thresholds(thresholds)
        with self._lock:
            if self._closed:
                return
            self._pending = wanted
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_pending, name="rmq-thresholds", daemon=True)
                self._writer.start()
        self._pending_set.set()

    def _write_pending(self) -> None:
        """The writer thread: closes the eventfds the waiter is done with, and writes the latest
        thresholds asked for, both slow (an RCU grace period each) and so never under the lock the
        waiter takes on its way out of :meth:`wait`."""
        while not self._stopped.is_set():
            self._pending_set.wait()
            self._pending_set.clear()
            with self._lock:
                wanted, self._pending = self._pending, None
                closable, self._closable = self._closable, []
            for fd in closable:
                os.close(fd)
            if wanted is not None and not self._stopped.is_set():
                self.set_thresholds(wanted)

    def watch_worker(self, worker: CgroupMemory, thresholds: Iterable[int]) -> None:
        """v1: also wake at ``thresholds`` of ``worker``'s own count (``"worker"``), the cgroup the
        watched one sits in. The thresholds on the watched cgroup (the pools) stand for the worker's
        lines only as long as the rest of the worker (its main process) keeps the size they were set
        for; grown since, it takes the worker over a line, and up to its kernel limit, while the
        pools' thresholds stay silent. Nothing on v2 (no thresholds there) or without events.

        Raises:
            ValueError: a threshold is not a positive int (nothing changes).
        """
        wanted = self._checked_thresholds(thresholds)
        with self._lock:
            self.worker_thresholds = wanted
            if self.mode != "eventfd" or self._closed or worker.version != 1:
                return
            try:
                if self._worker_control_fd < 0:
                    self._worker_control_fd = os.open(worker.path / "cgroup.event_control", os.O_WRONLY | os.O_CLOEXEC)
                    self._plain_fds.append(self._worker_control_fd)
                    self._worker_usage_fd = os.open(worker.path / "memory.usage_in_bytes", os.O_RDONLY | os.O_CLOEXEC)
                    self._plain_fds.append(self._worker_usage_fd)
            except OSError as exc:
                self._refused([f"the worker's cgroup {worker.path}: {exc.strerror}"], clears=False)
                return
        errors = self._register(self._worker_fds, self._worker_control_fd, self._worker_usage_fd, wanted, "worker")
        with self._lock:
            self._refused(errors, clears=False)

    def _register(self, table: dict[int, int], control_fd: int, usage_fd: int, wanted: tuple[int, ...],
                  kind: str) -> list[str]:
        """Make ``table`` (threshold -> eventfd) hold exactly ``wanted``; returns the refusals. The
        registrations are written outside the lock (one caller at a time: the governor's start, then
        the writer thread), since each waits for an RCU grace period."""
        with self._lock:
            for threshold in set(table) - set(wanted):
                fd = table.pop(threshold)
                del self._fds[fd]
                self._retire(fd)
            missing = [t for t in wanted if t not in table]
        errors, made = [], {}
        for threshold in missing:
            fd = os.eventfd(0, _EVENTFD_FLAGS)
            try:
                os.write(control_fd, f"{fd} {usage_fd} {threshold}\n".encode())
            except OSError as exc:
                os.close(fd)
                errors.append(f"{threshold}: {exc.strerror}")
                continue
            made[threshold] = fd
        with self._lock:
            for threshold, fd in made.items():
                if self._closed:  # closed meanwhile: never handed to the waiter
                    os.close(fd)
                    continue
                table[threshold] = fd
                self._fds[fd] = kind
        return errors

    def _refused(self, errors: list[str], clears: bool = True) -> None:
        """Log and keep the refusals (``clears``: none clears an earlier one), and have the waiter
        take the new fds."""
        if errors or clears:
            self.threshold_reason = f"cgroup.event_control refused thresholds {', '.join(errors)}" if errors else None
        if errors:
            log.warning("rmq: %s", self.threshold_reason)
        if self._polling:
            os.eventfd_write(self._wake_fd, 1)  # the waiter re-reads the fd set

    def _retire(self, fd: int) -> None:
        """Close ``fd`` now, or after the running poll() (closing it under poll() could let the
        number be reused by another open)."""
        if self._polling:
            self._retired.append(fd)
        elif self._writer is not None and not self._closed:  # see _close_retired
            self._closable.append(fd)
            self._pending_set.set()
        else:
            os.close(fd)

    # --- waiting ----------------------------------------------------------------------------------

    def wait(self, timeout_s: float) -> list[str]:
        """Block until a kernel event, :meth:`close` or ``timeout_s``; return what woke it.

        Returns:
            ``[]`` on timeout or close; else some of ``"threshold"``, ``"worker"``, ``"oom"`` (v1), ``"high"``,
            ``"max"``, ``"oom"``, ``"oom_kill"``, ``"psi"`` (v2), or ``["removed"]`` once when the
            cgroup's directory is gone (later waits just sleep).
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        if self.mode == "none" or self._gone:
            self._stopped.wait(max(0.0, timeout_s))
            return []
        with self._lock:
            if self._closed:
                return []
            self._polling = True
            fds = dict(self._fds)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                poller = select.poll()
                for fd, kind in fds.items():
                    poller.register(fd, select.POLLPRI if kind in ("events", "psi") else select.POLLIN)
                woke: list[str] = []
                for fd, _ in poller.poll(max(1, int(remaining * 1000 + 0.999))):
                    kind = fds[fd]
                    if kind == "events":
                        woke += self._events_increase()
                    elif kind == "psi":
                        woke.append("psi")
                    else:
                        _drain(fd)
                        if kind != "wake":
                            woke.append(kind)
                if woke and self.cgroup is not None and not self.cgroup.path.is_dir():
                    self._gone = True  # the kernel signals every eventfd once when the cgroup goes
                    return ["removed"]
                if woke:
                    return list(dict.fromkeys(woke))
                with self._lock:
                    if self._closed:
                        return []
                    fds = dict(self._fds)
                    self._close_retired()
        finally:
            with self._lock:
                self._polling = False
                self._close_retired()
                if self._closed:
                    self._close_fds()
                self._idle.notify_all()

    def _read_events(self) -> str:
        os.lseek(self._events_fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._events_fd, 4096):
            chunks.append(chunk)
        return b"".join(chunks).decode()

    def _events_increase(self) -> list[str]:
        """Re-read memory.events (which also re-arms its poll) and name the counters that grew."""
        try:
            now = _counters(self._read_events())
        except OSError:
            return ["removed"] if self.cgroup is not None and not self.cgroup.path.is_dir() else []
        grew = [key for key in V2_COUNTERS if now.get(key, 0) > self._events_seen.get(key, 0)]
        self._events_seen = now
        return grew

    # --- holding off the OOM killer ---------------------------------------------------------------

    @staticmethod
    def _checked_high(high_bytes: int) -> int:
        return _positive_int("high_bytes", high_bytes)

    def set_high(self, high_bytes: int) -> None:
        """v2: the ``memory.high`` that :meth:`hold_oom` sets; applied now if already holding."""
        value = self._checked_high(high_bytes)
        with self._hold_lock:
            self._high_bytes = value
            if self._held is not None and self._held[0] == "memory.high" and self.cgroup is not None:
                try:
                    (self.cgroup.path / "memory.high").write_text(str(value))
                except OSError as exc:
                    log.warning("rmq: cannot move memory.high of %s to %d: %s", self.cgroup.path, value, exc)

    def hold_oom(self) -> bool:
        """Slow bursts instead of letting the kernel kill: v1 ``oom_kill_disable`` 1, v2
        ``memory.high`` to ``high_bytes`` (default 5% under ``memory.max``). The old value is
        remembered for :meth:`release_oom`. Returns False, with ``hold_reason``, when not allowed:
        no kernel events (mode ``"none"``), the write refused, v2 without a limit or ``high_bytes``,
        or v1 with this process inside the cgroup (it could end up waiting with the workers).
        """
        with self._hold_lock:
            if self._held is not None:
                return True
            cg = self.cgroup
            if cg is None or self.mode == "none" or self._closed:
                self.hold_reason = f"no kernel events ({self.reason}): nothing would wake rmq to choose a victim"
                return False
            if cg.version == 1:
                if self._contains_this_process(cg):
                    # it would wait in the OOM queue with the workers, and nobody would pick a victim
                    self.hold_reason = (f"this process (pid {os.getpid()}) is inside {cg.path}: holding the "
                                        "OOM killer off could leave it waiting for memory with the workers")
                    return False
                name = "memory.oom_control"
                new = "1"
            else:
                name = "memory.high"
                high = self._high_bytes
                if high is None and cg.limit_bytes is not None:
                    high = int(cg.limit_bytes * (1 - DEFAULT_HIGH_MARGIN)) // PAGE * PAGE
                if high is None:
                    self.hold_reason = "memory.max is unlimited and no high_bytes was given"
                    return False
                new = str(high)
            try:
                text = (cg.path / name).read_text()
                old = str(_counters(text).get("oom_kill_disable", 0)) if cg.version == 1 else text.strip()
                (cg.path / name).write_text(new)
            except OSError as exc:
                self.hold_reason = f"cannot write {new} to {cg.path / name}: {exc.strerror}"
                return False
            self._held = (name, old)
            self.hold_reason = None
            return True

    @staticmethod
    def _contains_this_process(cg: CgroupMemory) -> bool:
        pid = str(os.getpid())
        for procs in cg.path.rglob("cgroup.procs"):
            try:
                if pid in procs.read_text().split():
                    return True
            except OSError:
                continue
        return False

    def release_oom(self) -> None:
        """Restore what :meth:`hold_oom` changed; does nothing when not holding."""
        with self._hold_lock:
            if self._held is None or self.cgroup is None:
                return
            name, old = self._held
            self._held = None
            try:
                (self.cgroup.path / name).write_text(old)
            except OSError as exc:
                if self.cgroup.path.is_dir():
                    log.warning("rmq: cannot restore %s of %s to %s: %s", name, self.cgroup.path, old, exc)

    @property
    def holding(self) -> bool:
        """Whether :meth:`hold_oom` is in effect."""
        return self._held is not None

    def under_oom(self) -> bool:
        """v1: the cgroup is out of memory and its tasks wait (``under_oom 1``); v2: always False."""
        if self.cgroup is None or self.cgroup.version != 1:
            return False
        try:
            return _counters(read_cgroup_file(self.cgroup.path / "memory.oom_control")).get("under_oom", 0) == 1
        except OSError:
            return False

    def oom_kills(self) -> int:
        """Kernel OOM kills counted by the cgroup (0 without one)."""
        return 0 if self.cgroup is None else self.cgroup.oom_kills()

    # --- closing ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Restore any hold, wake a blocked :meth:`wait` and close every fd (unregistering the
        kernel events). Idempotent."""
        with self._lock:
            already, self._closed = self._closed, True
            self._stopped.set()
            self._pending_set.set()  # the threshold writer, if any, sees _stopped and ends
        self.release_oom()  # after _closed is set, so no hold_oom can slip in behind it
        if already:
            return
        with self._lock:
            if self._polling:
                os.eventfd_write(self._wake_fd, 1)
                self._idle.wait_for(lambda: not self._polling, timeout=2.0)
            if not self._polling:  # else the waiter closes them on its way out
                self._close_fds()

    def _close_retired(self) -> None:
        """Close the eventfds the waiter no longer polls (call under the lock): on the writer thread
        when there is one (closing a registered eventfd unregisters it, an RCU grace period, which the
        governor's thread should not wait for on its way out of :meth:`wait`), else now."""
        if self._writer is not None and not self._closed:
            self._closable += self._retired
            self._pending_set.set()
        else:
            for fd in self._retired:
                os.close(fd)
        self._retired.clear()

    def _close_fds(self) -> None:
        self._close_retired()
        for fd in self._closable:
            os.close(fd)
        self._closable.clear()
        for fd in [*self._fds, *self._plain_fds]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._plain_fds.clear()
        self._threshold_fds.clear()
        self._worker_fds.clear()

    def __enter__(self) -> KernelEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<KernelEvents {self.mode}: {self.reason}>"


def open_kernel_events(
    cgroup: CgroupMemory | None,
    thresholds: Iterable[int] = (),
    *,
    high_bytes: int | None = None,
    psi_stall_us: int = 100_000,
    psi_window_us: int = 1_000_000,
) -> KernelEvents:
    """:class:`KernelEvents` for ``cgroup``; where the kernel won't, mode ``"none"`` with the reason.

    Never raises OSError (no cgroup, missing files, EACCES, ... all give mode ``"none"``).

    Raises:
        ValueError: bad thresholds or PSI figures.
    """
    return KernelEvents(cgroup, thresholds, high_bytes=high_bytes, psi_stall_us=psi_stall_us,
                        psi_window_us=psi_window_us)
