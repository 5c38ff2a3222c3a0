"""Start and stop real ``celery worker`` subprocesses by PID, and wait for them to answer."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from rmq.core.runtime import runtime_base, runtime_dir_prefix

__all__ = ["WorkerProcess", "wait_until"]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what or predicate}")
        time.sleep(interval)


class WorkerProcess:
    """One ``python -m celery -A APP worker`` subprocess.

    Args:
        app: the ``-A`` argument (``workers.app``).
        env: extra environment (broker URL, ``RMQ_*`` settings).
        queues: ``-Q`` queues (default: the app's default queue).
        concurrency: pool processes.
        pool: ``prefork`` by default.
        hostname: node name (unique by default).
        extra_args: more ``celery worker`` flags.
        prefix: argv before python, e.g. a cgroup wrapper ``["sh", "-c", "...; exec \\"$@\\"", "sh"]``.
    """

    def __init__(
        self,
        app: str = "workers.app",
        env: dict[str, str] | None = None,
        queues: Sequence[str] | None = None,
        concurrency: int = 2,
        pool: str = "prefork",
        hostname: str | None = None,
        extra_args: Sequence[str] = (),
        prefix: Sequence[str] = (),
        loglevel: str = "INFO",
        cwd: str | None = None,
    ) -> None:
        self.app = app
        self.env = dict(env or {})
        self.queues = list(queues or [])
        self.concurrency = concurrency
        self.pool = pool
        self.hostname = hostname or f"w{uuid.uuid4().hex[:8]}@%h"
        self.extra_args = list(extra_args)
        self.prefix = list(prefix)
        self.loglevel = loglevel
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = ""
        self._known_children: set[int] = set()
        #: the warm shutdown did not end within ``stop``'s timeout: the worker was SIGKILLed
        self.stop_timed_out = False
        self._stop_requested = False

    @property
    def node_name(self) -> str:
        """The node name as workers report it (``%h`` expanded)."""
        import socket

        return self.hostname.replace("%h", socket.gethostname())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        argv = [*self.prefix, sys.executable, "-m", "celery", "-A", self.app, "worker",
                "--pool", self.pool, "-c", str(self.concurrency), "-n", self.hostname,
                "-l", self.loglevel, "--without-mingle", "--without-gossip"]
        if self.queues:
            argv += ["-Q", ",".join(self.queues)]
        return argv + self.extra_args

    def start(self) -> WorkerProcess:
        """Start the subprocess (logs go to a temporary file, see ``log()``)."""
        self._stop_requested = self.stop_timed_out = False
        fd, self.log_path = tempfile.mkstemp(prefix="rmq-worker-", suffix=".log")
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            self.argv(), env=env, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.cwd
        )
        os.close(fd)
        return self

    def log(self) -> str:
        """Everything the worker wrote so far."""
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def wait_ready(self, client_app: Any, timeout: float = 60.0) -> WorkerProcess:
        """Wait until the worker answers a ping (and its pool is up).

        A ping sent before the worker listens is lost and costs its whole reply timeout, so at INFO
        level or below the log is watched for Celery's ``<node> ready.`` line (written once the
        remote-control consumer is up) and the ping follows it; without that line (a quieter
        log level), a ping goes out every second.
        """
        announces = self.loglevel.upper() in ("DEBUG", "INFO")
        announcement = f"{self.node_name} ready."
        last_ping = [-1e9]

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            now = time.monotonic()
            if now - last_ping[0] < 1.0 and not (announces and announcement in self.log()):
                return False
            last_ping[0] = now
            try:
                replies = client_app.control.ping(destination=[self.node_name], timeout=0.5) or []
            except (OSError, *client_app.connection_for_write().connection_errors):
                # kombu shares one connection pool per broker URL across the apps of a process: a pooled
                # connection the broker dropped fails once, then reconnects on the next use
                return False
            return bool(replies) and len(self.pool_pids()) >= min(1, self.concurrency)

        try:
            wait_until(ready, timeout, interval=0.05, what=f"worker {self.node_name} to answer")
        except TimeoutError as exc:  # what the worker was doing is in its log: say it where the test fails
            raise TimeoutError(f"{exc}; its log ends:\n{self.log()[-3000:]}") from None
        return self

    def pool_pids(self) -> list[int]:
        """PIDs of the worker's pool processes (direct children)."""
        if self.proc is None:
            return []
        try:
            kids = [p.pid for p in psutil.Process(self.proc.pid).children()]
        except psutil.Error:
            return []
        self._known_children.update(kids)
        return kids

    def tree_rss(self) -> int:
        """RSS of the main process plus USS of its children, sampled from outside."""
        try:
            main = psutil.Process(self.pid)
            total = main.memory_info().rss
            for child in main.children(recursive=True):
                try:
                    total += child.memory_full_info().uss
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return 0

    def runtime_dirs(self) -> list[str]:
        """The worker's runtime directories that exist now (:func:`rmq.core.runtime.runtime_base`, named
        by its pid): a warm shutdown removes its own, a killed worker cannot."""
        if self.proc is None:
            return []
        base = runtime_base(self.env.get("RMQ_RUNTIME_DIR") or os.environ.get("RMQ_RUNTIME_DIR"))
        return glob.glob(os.path.join(base, runtime_dir_prefix(self.proc.pid) + "*"))

    def request_stop(self) -> None:
        """Send SIGTERM (a warm shutdown) without waiting: several workers then stop side by side,
        each taking its own time (a pool process lingers a second after it exits)."""
        if self.proc is None or self._stop_requested:
            return
        self._stop_requested = True  # once: a second SIGTERM is not what a user sends
        self.pool_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Warm shutdown (SIGTERM), then SIGKILL; also ends pool processes left behind, by PID, and
        removes the runtime directory of a worker that was killed."""
        if self.proc is None:
            return None
        self.request_stop()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop_timed_out = True
            self.proc.kill()
            self.proc.wait(5)
        for pid in self._known_children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for path in self.runtime_dirs():  # the worker is gone: nothing of its own uses it any more
            shutil.rmtree(path, ignore_errors=True)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the main process only (a crash); pool children are ended by ``stop``."""
        self.pool_pids()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def finish(self) -> str | None:
        """Stop (as :meth:`stop`) and delete the log. With ``RMQ_KEEP_WORKER_LOGS`` set to a directory
        (or ``1``: ``<tmp>/rmq-worker-logs``) a copy is kept there first, and always (in
        ``<tmp>/rmq-worker-logs``) when the warm shutdown timed out; returns its path."""
        self.stop()
        kept = None
        keep = os.environ.get("RMQ_KEEP_WORKER_LOGS") or ("1" if self.stop_timed_out else "")
        if keep and self.log_path and os.path.exists(self.log_path):
            directory = keep if keep not in ("1", "true", "yes") else os.path.join(tempfile.gettempdir(),
                                                                                 "rmq-worker-logs")
            os.makedirs(directory, exist_ok=True)
            kept = os.path.join(directory, f"{self.node_name.split('@')[0]}.log")
            shutil.copyfile(self.log_path, kept)
        try:
            os.unlink(self.log_path)
        except OSError:
            pass
        return kept

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.finish()
