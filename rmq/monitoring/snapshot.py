"""The governor's snapshot: what ``inspect stats`` shows under ``rmq``.

Built on demand (a stats request, a metrics scrape), never on the governor's hot path. A scrape
(:meth:`SnapshotBuilder.scrape`) only reads: it comes from a network thread that anyone who can reach
the port may drive, so it deletes no file and takes no ledger lock (a thread of the main process
sharing the governor's lock descriptor would otherwise drop the governor's lock when it unlocks).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from typing import Any

import psutil

from rmq.core import procstats
from rmq.core.runtime import Runtime
from rmq.memory.governor import Governor
from rmq.memory.probes import CgroupMemory, HostProbe

__all__ = ["SnapshotBuilder"]


class SnapshotBuilder:
    """Assembles the snapshot from the governor, the ledger and the pool processes' counters."""

    def __init__(self, rt: Runtime, governor: Governor, hostname: str | None = None) -> None:
        self.rt = rt
        self.governor = governor
        self.hostname = hostname or socket.gethostname()
        #: more sections by name (the bootstep makes this the runtime's ``snapshot_parts``, where the
        #: monitoring concern and the autoscaler add theirs)
        self.extra: dict[str, Any] = {}
        self._retired: dict[str, Any] = {}
        self._net_last: tuple[float, int, int] | None = None
        self._lock = threading.Lock()
        self._net_lock = threading.Lock()
        psutil.cpu_percent(None)  # prime the CPU reading
        #: the worker's memory cgroup, limited or not, for the kernel's OOM-kill count
        budget = getattr(governor, "budget", None)  # a test's stand-in governor may have none
        self._cgroup: CgroupMemory | None = budget.cgroup if budget is not None else None
        if self._cgroup is None:
            try:
                self._cgroup = HostProbe().memory_cgroup()
            except (OSError, ValueError):  # no readable cgroup: the count stays 0
                self._cgroup = None

    def _memory(self) -> dict[str, Any]:
        """The governor's memory section, with the ladder's lines in bytes and the kernel's OOM kills."""
        memory = self.governor.memory_snapshot()
        config, budget = self.rt.config, getattr(self.governor, "budget", None)
        if budget is not None and "lines" not in memory:
            # the governor's own lines when it reports them (they follow its accounting mode), else the config's
            ratios = memory.get("line_ratios")
            if not isinstance(ratios, dict):
                ratios = {"admit": config.admit_ratio, "unload": config.unload_ratio,
                          "unload_target": config.unload_target_ratio, "pause": config.pause_ratio,
                          "resume": config.resume_ratio, "kill": config.kill_ratio}
            memory["lines"] = {name: budget.line(ratio) for name, ratio in ratios.items()
                               if isinstance(ratio, int | float)}
        if memory.get("oom_kills") is None:  # the governor counts only a limited cgroup's; any cgroup counts here
            try:
                memory["oom_kills"] = self._cgroup.oom_kills() if self._cgroup is not None else 0
            except (OSError, ValueError):
                memory["oom_kills"] = 0
        return memory

    def _pool(self) -> dict[str, Any]:
        """What the actuator tells of the pool and the consumer (a fake actuator may tell nothing)."""
        act = self.governor.actuator
        slots = getattr(act, "pool_slots", None)
        queues = getattr(act, "consumed_queues", None)
        return {
            "pool_slots": {str(pid): slot for pid, slot in (slots() if slots else {}).items()},
            "consumed_queues": list(queues() if queues else []),
            "paused_seconds": round(float(getattr(act, "paused_seconds", 0.0)), 3),
        }

    def _network(self) -> dict[str, float]:
        now = time.monotonic()
        io = psutil.net_io_counters()
        with self._net_lock:
            last, self._net_last = self._net_last, (now, io.bytes_sent, io.bytes_recv)
        if last is None or now - last[0] <= 0:
            return {"sent_bytes_per_s": 0.0, "recv_bytes_per_s": 0.0}
        dt = now - last[0]
        return {
            "sent_bytes_per_s": round((io.bytes_sent - last[1]) / dt, 1),
            "recv_bytes_per_s": round((io.bytes_recv - last[2]) / dt, 1),
        }

    def _disk(self, reserved: int) -> dict[str, Any]:
        root = self.rt.config.session_root_path
        probe = root if os.path.isdir(root) else os.path.dirname(root) or "/"
        try:
            usage = shutil.disk_usage(probe)
        except OSError:
            return {"root": root, "total_bytes": 0, "used_bytes": 0, "free_bytes": 0, "ratio": 0.0,
                    "reserved_bytes": reserved}
        return {
            "root": root,
            "total_bytes": usage.total,
            "used_bytes": usage.used,
            "free_bytes": usage.free,
            "ratio": round(usage.used / usage.total, 4) if usage.total else 0.0,
            "reserved_bytes": reserved,
        }

    def child_files(self, live_pids: set[int], fold: bool = True) -> dict[int, dict[str, Any]]:
        """Counters of pool processes; files of dead ones are folded into a retired total.

        With ``fold=False`` nothing is changed: dead processes' files are returned with the rest.
        """
        files = procstats.read_all(self.rt.runtime_dir)
        files.pop(os.getpid(), None)  # the main process's own counters are read from memory (solo pool)
        for pid, data in list(files.items()):
            if fold and pid not in live_pids:
                self._retired = procstats.merge_counters([self._retired, data.get("counters", {})])
                try:
                    os.unlink(os.path.join(self.rt.runtime_dir, f"proc-{pid}.json"))
                except OSError:
                    pass
                del files[pid]
        return files

    def scrape(self) -> dict[str, Any]:
        """The snapshot for a metrics scrape: the same figures, read without changing anything."""
        return self.build(read_only=True)

    def build(self, read_only: bool = False) -> dict[str, Any]:
        """The whole snapshot; its sections are described in ``docs/design.md#monitoring``.

        ``read_only``: read the ledger's table without its lock (a torn slot shows for one scrape
        at worst) and leave dead processes' counter files in place, counted as they are.
        """
        gov = self.governor
        entries = self.rt.ledger.entries_unlocked() if read_only else self.rt.ledger.entries()
        live = set(gov.actuator.pool_pids())
        with self._lock:  # stats requests and metrics scrapes may build at the same time
            files = self.child_files(live, fold=not read_only)
            retired = self._retired
        main_counters = dict(self.rt.stats.counters)
        counters = procstats.merge_counters(
            [retired, main_counters, *(d.get("counters", {}) for d in files.values())]
        )
        counters["killed"] = gov.counters["killed"]
        counters["unload_requests"] = gov.counters["unload_requests"]
        counters["pauses"] = gov.counters["pauses"]
        counters["dead_released"] = gov.counters["dead_released"]
        counters["strays_killed"] = gov.counters.get("strays_killed", 0)  # what a killed task's tree left
        counters["reaped"] = gov.counters.get("reaped", 0)  # descendants the main process adopted and reaped
        counters.setdefault("admitted", 0)
        counters.setdefault("deferred", {})
        cpu_used = sum(e.cpu_slots for e in entries)
        snap: dict[str, Any] = {
            "hostname": self.hostname,
            "pid": os.getpid(),
            "time": time.time(),
            "memory": self._memory(),
            "cpu": {
                "slots": gov.cpu_slots,
                "slots_used": cpu_used,
                "percent": psutil.cpu_percent(None),
                "load1": os.getloadavg()[0],
            },
            "disk": self._disk(sum(e.disk_bytes for e in entries)),
            "network": self._network(),
            "paused": bool(getattr(gov.actuator, "is_paused", gov.paused)),
            "paused_queues": list(getattr(gov.actuator, "paused_queues", [])),
            **self._pool(),
            "reservations": [e.as_dict() for e in entries],
            "processes": {str(pid): d.get("gauges", {}) for pid, d in files.items() if pid in live},
            "counters": counters,
            "governor": {
                "interval_s": self.rt.config.monitor_interval,
                "ticks": gov.ticks,
                "tick_seconds": round(gov.tick_seconds, 4),
            },
        }
        for key, part in self.extra.items():
            try:
                snap[key] = part()
            except Exception as exc:  # one broken part must not hide the rest
                snap[key] = {"error": repr(exc)}
        return snap
