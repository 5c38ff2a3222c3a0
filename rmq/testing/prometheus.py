"""A Prometheus server of one's own (the machine's ``prometheus``, Debian's package), for tests that
check metrics, dashboard queries and alert rules against real scrapes.

The server listens on a free loopback port, keeps its data in a temporary directory and is stopped
by PID. It is not installed from here: the project's ``scripts/install_prometheus`` installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from rmq.testing.processes import terminate
from rmq.testing.redis import free_port

__all__ = ["PrometheusServer", "ensure_prometheus", "prometheus_binaries"]


def prometheus_binaries() -> tuple[str, str] | None:
    """``(prometheus, promtool)`` on PATH, or None when either is missing."""
    server, tool = shutil.which("prometheus"), shutil.which("promtool")
    return (server, tool) if server and tool else None


def ensure_prometheus(install_script: str | None = None, timeout_s: float = 600.0) -> tuple[str, str] | str:
    """``(prometheus, promtool)``, running ``install_script`` first when they are missing; else why not.

    Returns a one-line reason (a string) when they cannot be had, for a test to skip with.
    """
    found = prometheus_binaries()
    if found is not None or not install_script:
        return found or "prometheus and promtool are not on PATH"
    try:
        out = subprocess.run([install_script], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{install_script} failed: {exc}"
    found = prometheus_binaries()
    if found is None:
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit {out.returncode}"]
        return f"prometheus could not be installed ({install_script}): {last[0]}"
    return found


class PrometheusServer:
    """``prometheus`` scraping ``jobs`` every ``scrape_interval`` with ``rule_files`` loaded.

    Args:
        jobs: ``{job name: ["host:port", ...]}`` (static targets).
        rule_files: rule files to load (copied into the server's directory).
        scrape_interval: also the rule evaluation interval.
    """

    def __init__(self, jobs: dict[str, Sequence[str]], rule_files: Sequence[str] = (),
                 scrape_interval: str = "1s") -> None:
        found = prometheus_binaries()
        if found is None:
            raise FileNotFoundError("prometheus and promtool are not on PATH (scripts/install_prometheus)")
        self.binary = found[0]
        self.jobs = {name: list(targets) for name, targets in jobs.items()}
        self.rule_files = list(rule_files)
        self.scrape_interval = scrape_interval
        self.port = 0
        self.dir = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> str:
        rules = []
        for i, path in enumerate(self.rule_files):
            target = os.path.join(self.dir, f"rules-{i}.yml")
            shutil.copyfile(path, target)
            rules.append(target)
        # JSON is YAML: no YAML writer needed
        return json.dumps({
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval,
                       "scrape_timeout": self.scrape_interval},
            "rule_files": rules,
            "scrape_configs": [{"job_name": name, "static_configs": [{"targets": targets}]}
                               for name, targets in self.jobs.items()],
        }, indent=2)

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        """Start the server and wait until it is ready."""
        self.dir = tempfile.mkdtemp(prefix="rmq-prometheus-")
        config = os.path.join(self.dir, "prometheus.yml")
        with open(config, "w") as fh:
            fh.write(self._config())
        self.port = free_port()
        log = open(os.path.join(self.dir, "prometheus.log"), "wb")  # the child keeps its own descriptor
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.dir}/data",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"prometheus was not ready within {timeout_s:.0f}s")
            time.sleep(0.2)

    def log(self) -> str:
        """What the server printed."""
        try:
            with open(os.path.join(self.dir, "prometheus.log"), errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; returns ``data``; raises on an error answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # a bad query answers 400 with the reason
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise ValueError(f"prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        data = self.api("query", query=expr)
        result = data["result"]
        return result if data["resultType"] == "vector" else [{"metric": {}, "value": result}]

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict[str, Any]]:
        """A range query's matrix (``[{"metric": {...}, "values": [[t, "v"], ...]}]``)."""
        return list(self.api("query_range", query=expr, start=str(start), end=str(end), step=step)["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts pending or firing (``labels``, ``state``, ``annotations``, ``value``)."""
        return list(self.api("alerts")["alerts"])

    def targets_up(self) -> dict[str, bool]:
        """``{scrape url: last scrape succeeded}`` of every active target."""
        return {t["scrapeUrl"]: t["health"] == "up" for t in self.api("targets")["activeTargets"]}

    def stop(self) -> None:
        """Stop the server by PID and remove its directory."""
        terminate(self.proc)
        self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""
