"""``rmq flower``: the Resources pages on two real workers, seen through Debian's headless Chromium.

Chromium is installed with apt when it is missing (as root on Debian, as the docker test does for
docker-compose); elsewhere the browser test skips and says why. With ``RMQ_FLOWER_SCREENSHOTS`` set
to a directory, the PNGs the test takes are saved there (docs/flower-resources.png is made that way).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid

import httpx
import pytest
import redis as redis_lib
from tornado.websocket import websocket_connect

from rmq.testing.processes import terminate
from rmq.testing.redis import free_port
from rmq.testing.worker import wait_until

from .conftest import ROOT, TESTS_DIR, taskapp_env

pytestmark = pytest.mark.integration

BUDGET = "400MiB"
USER, PASSWORD = "ops", "s3cret"


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    # root on a Debian machine: install Debian's chromium (a few minutes the first time)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "fonts-dejavu-core"],
                   env=env, capture_output=True, timeout=900)
    return shutil.which("chromium")


def _app(redis_url):
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import monitorapp  # noqa: F401  (registers the test tasks)

    from workers.app import make_app

    return make_app(broker=redis_url, backend=redis_url)


class _RmqFlower:
    """``rmq flower -A monitorapp`` with basic auth on a free loopback port, stopped by PID."""

    def __init__(self, broker: str, *flower_args: str) -> None:
        self.port = free_port()
        fd, self.log_path = tempfile.mkstemp(prefix="rmq-flower-", suffix=".log")
        argv = [sys.executable, "-m", "rmq.cli", "flower", "-A", "monitorapp", f"--port={self.port}",
                "--address=127.0.0.1", f"--basic-auth={USER}:{PASSWORD}", *flower_args]
        self.proc = subprocess.Popen(argv, env={**os.environ, **taskapp_env(broker)}, cwd=ROOT, stdout=fd,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        os.close(fd)
        self.base = f"http://127.0.0.1:{self.port}"

    def get(self, path: str, auth: bool = True) -> httpx.Response | None:
        if self.proc.poll() is not None:
            with open(self.log_path) as fh:
                raise RuntimeError(f"rmq flower exited {self.proc.returncode}:\n{fh.read()[-3000:]}")
        try:
            return httpx.get(self.base + path, auth=(USER, PASSWORD) if auth else None, timeout=10)
        except httpx.TransportError:
            return None  # not listening yet

    def stop(self) -> None:
        terminate(self.proc)
        os.unlink(self.log_path)


class _Browser:
    """Headless Chromium kept open on a page, driven over the DevTools protocol (one short websocket
    connection per command, with Tornado's client, which Flower already brings), stopped by PID."""

    def __init__(self, chromium: str, url: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="rmq-chromium-")
        self.port = free_port()
        argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--hide-scrollbars", f"--user-data-dir={self.profile}", "--window-size=1500,1000",
                f"--remote-debugging-port={self.port}", url]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)
        self.ws_url = wait_until(self._page, 60, interval=0.2, what="chromium's DevTools endpoint")

    def _page(self) -> str | None:
        assert self.proc.poll() is None, f"chromium exited {self.proc.returncode}"
        try:
            targets = httpx.get(f"http://127.0.0.1:{self.port}/json/list", timeout=5).json()
        except (httpx.TransportError, ValueError):
            return None
        pages = [t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"]
        return pages[0] if pages else None

    def call(self, method: str, **params: object) -> dict:
        async def once() -> dict:
            conn = await websocket_connect(self.ws_url, connect_timeout=10, max_message_size=64 << 20)
            try:
                await conn.write_message(json.dumps({"id": 1, "method": method, "params": params}))
                while True:
                    message = await asyncio.wait_for(conn.read_message(), 30)
                    assert message is not None, f"chromium closed the DevTools connection during {method}"
                    reply = json.loads(message)
                    if reply.get("id") == 1:
                        assert "error" not in reply, reply
                        return reply["result"]
            finally:
                conn.close()

        return asyncio.run(once())

    def text(self, selector: str) -> str:
        """The text of the element ``selector`` selects ("" when there is none)."""
        expr = f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''"
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"]["value"]

    def rows(self) -> dict[str, str]:
        """The text of each worker's row of the page."""
        expr = ("JSON.stringify(Object.fromEntries([...document.querySelectorAll('tr[data-worker]')]"
                ".map(r => [r.dataset.worker, r.innerText.replace(/\\s+/g, ' ')])))")
        return json.loads(self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"]["value"])

    def screenshot(self, path: str) -> None:
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def stop(self) -> None:
        terminate(self.proc)
        shutil.rmtree(self.profile, ignore_errors=True)


def _stats(app, node: str) -> dict:
    return (app.control.inspect(destination=[node], timeout=3).stats() or {})[node]["rmq"]


def _shown(browser: _Browser, expected: dict[str, int], paused: str, calm: str) -> dict[str, str] | None:
    """The page's rows once they show ``expected`` admitted counts, ``paused`` in the pause zone and
    ``calm`` in none."""
    rows = browser.rows()
    counts = all(re.search(rf"\badmitted {n}\b", rows.get(node, "")) for node, n in expected.items())
    zones = " pause paused (" in rows.get(paused, "") and " ok no " in rows.get(calm, "")
    return rows if counts and zones else None


@pytest.mark.timeout(1500)  # the first run may install chromium
def test_the_resources_page_shows_both_workers_the_pause_zone_and_the_admitted_counts(
        redis_url, start_worker, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed and could not be installed here (needs root and apt)")
    app = _app(redis_url)
    tag = uuid.uuid4().hex[:6]
    env = taskapp_env(redis_url, memory_budget=BUDGET, memory_kill_retries=0)
    # Given two governed workers, each on a queue of its own, and rmq flower with basic auth
    hot = start_worker(app="monitorapp", env=env, concurrency=2, hostname=f"hot-{tag}@%h", queues=[f"hot-{tag}"])
    calm = start_worker(app="monitorapp", env=env, concurrency=2, hostname=f"calm-{tag}@%h", queues=[f"calm-{tag}"])
    flower = _RmqFlower(redis_url)
    release = f"rmq-test-release-{tag}"
    client = redis_lib.Redis.from_url(redis_url)
    browser = None
    shots = os.environ.get("RMQ_FLOWER_SCREENSHOTS")
    try:
        hot.wait_ready(app)
        calm.wait_ready(app)
        wait_until(lambda: flower.get("/rmq/resources"), 30, interval=0.3, what="rmq flower to listen")

        # Flower's basic auth protects rmq's pages and their data, and Flower's own pages link to them
        for path in ("/rmq/resources", f"/rmq/resources/{hot.node_name}", "/rmq/data/resources",
                     f"/rmq/data/resources/{hot.node_name}"):
            assert flower.get(path, auth=False).status_code == 401, path
            assert flower.get(path).status_code == 200, path
        assert 'href="/rmq/resources"' in flower.get("/workers").text

        # and the Resources page is open in the browser before any task runs
        page_url = f"http://{USER}:{PASSWORD}@127.0.0.1:{flower.port}/rmq/resources"
        browser = _Browser(chromium, page_url)
        wait_until(lambda: {hot.node_name, calm.node_name} <= set(browser.rows()), 30, interval=0.3,
                   what="both workers on the page")

        # When tasks run on both workers and one of them grows the hot worker into the pause zone
        for i in range(3):
            app.tasks["m.noop"].apply_async((i,), queue=f"calm-{tag}").get(timeout=30)
        app.tasks["m.noop"].apply_async((0,), queue=f"hot-{tag}").get(timeout=30)
        holder = app.tasks["m.hold_ratio_until"].apply_async((0.88, redis_url, release), queue=f"hot-{tag}")
        wait_until(lambda: _stats(app, hot.node_name)["paused"], 30, interval=0.2,
                   what="the hot worker to pause")
        expected = {hot.node_name: 2, calm.node_name: 3}
        admitted = wait_until(
            lambda: (lambda got: got if got == expected else None)(
                {n: _stats(app, n)["counters"]["admitted"] for n in expected}),
            10, interval=0.2, what=f"inspect stats to count {expected} admitted")
        assert _stats(app, hot.node_name)["memory"]["zone"] == "pause"

        # Then the page, refreshing itself, shows both workers, the pause zone and inspect stats' counts
        rows = wait_until(lambda: _shown(browser, admitted, hot.node_name, calm.node_name), 20, interval=0.5,
                          what=f"the page to show {admitted} admitted and the pause zone")
        assert "paused (" not in rows[calm.node_name], rows
        assert browser.call("Runtime.evaluate", expression="document.getElementById('rmq-errors').hidden",
                            returnByValue=True)["result"]["value"] is True
        wait_until(lambda: "hot-" in browser.text("#rmq-chart"), 5, what="the memory chart")
        png = tmp_path / "flower-resources.png"
        browser.screenshot(str(png))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

        # And the worker's view lists the holder's reservation: declared, and used beyond it
        browser.call("Page.navigate", url=f"{page_url}/{hot.node_name}")
        wait_until(lambda: holder.id in browser.text("#rmq-reservations"), 20, interval=0.3,
                   what="the holder's reservation on the worker's page")
        assert "64.0MiB" in browser.text("#rmq-reservations")

        # When the holder ends and a task runs away on the hot worker, the governor kills it
        client.set(release, 1)
        assert holder.get(timeout=30) >= 0.85
        bad = app.tasks["m.runaway"].apply_async(queue=f"hot-{tag}")
        bad.get(timeout=60, propagate=False)
        assert type(bad.result).__name__ == "MemoryBudgetExceeded", repr(bad.result)

        # Then the worker's view lists the kill with its figures
        kills = wait_until(lambda: (lambda t: t if bad.id in t else None)(browser.text("#rmq-kills")), 20,
                           interval=0.3, what="the kill on the worker's page")
        assert "m.runaway" in kills and "32.0MiB" in kills, kills
        [kill] = flower.get(f"/rmq/data/resources/{hot.node_name}").json()["workers"][0]["recent_kills"]
        assert kill["task_id"] == bad.id and kill["declared_bytes"] == 32 * 1024 * 1024
        assert kill["observed_bytes"] > kill["declared_bytes"] and kill["budget_bytes"] == 400 * 1024 * 1024
        if shots:
            browser.screenshot(os.path.join(shots, "flower-worker.png"))

        # When the calm worker stops, its row leaves the Resources page
        browser.call("Page.navigate", url=page_url)
        wait_until(lambda: calm.node_name in browser.rows(), 20, interval=0.3, what="the calm worker's row")
        calm.stop()
        wait_until(lambda: calm.node_name not in browser.rows(), 20, interval=0.3,
                   what="the stopped worker to leave the page")
        assert hot.node_name in browser.rows()
        if shots:
            shutil.copyfile(png, os.path.join(shots, "flower-resources.png"))
    finally:
        client.set(release, 1)
        if browser is not None:
            browser.stop()
        flower.stop()
