"""The Resources pages and their data, as Flower handlers: read-only, behind Flower's authentication.

Each page embeds the current view (so it shows without waiting for a poll) and then polls its data
URL every few seconds. The data is ``inspect stats`` shaped by :func:`rmq.monitoring.resources.resources_view`:
a stats request goes to the workers at most once per ``ttl_s`` whatever the number of open pages,
and no handler here sends anything else to a worker.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from flower.views import BaseHandler
from tornado import web

from rmq.monitoring.resources import resources_view

__all__ = ["ResourcesData", "ResourcesSource", "ResourcesView", "WorkerResourcesView"]

#: how often an open page asks for fresh data (the page's own history chart samples at this rate)
POLL_S = 2.0


class ResourcesSource:
    """``inspect stats`` for the pages: one request in flight per worker (or all), reused for ``ttl_s``."""

    def __init__(self, capp: Any, timeout_s: float, ttl_s: float = 1.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capp = capp
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.clock = clock
        self._cache: dict[str, tuple[float, asyncio.Future[dict[str, Any]]]] = {}

    async def view(self, worker: str | None = None) -> dict[str, Any]:
        """The view of every worker that answers, or of ``worker`` alone."""
        now = self.clock()
        for key, (at, _) in list(self._cache.items()):  # names come from URLs: keep only fresh ones
            if now - at > self.ttl_s:
                del self._cache[key]
        key = worker or ""
        if key not in self._cache:
            future = asyncio.get_running_loop().run_in_executor(None, self._ask, worker)
            self._cache[key] = (now, future)
        return await asyncio.shield(self._cache[key][1])

    def _ask(self, worker: str | None) -> dict[str, Any]:
        errors = []
        try:
            inspect = self.capp.control.inspect(timeout=self.timeout_s, destination=[worker] if worker else None,
                                                limit=1 if worker else None)
            replies = inspect.stats() or {}
        except Exception as exc:  # the broker is down: the page says so and keeps polling
            replies, errors = {}, [f"inspect stats failed: {type(exc).__name__}: {exc}"]
        return resources_view(replies, time.time(), errors)


def _script_json(value: Any) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>`` or ``<!--`` can end it early)."""
    return json.dumps(value, default=str).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class _Page(BaseHandler):
    template = ""

    async def _render(self, worker: str | None, data_url: str) -> None:
        view = await self.application.rmq_resources.view(worker)
        self.render(self.template, rmq_view=_script_json(view), rmq_data_url=data_url, rmq_worker=worker or "",
                    rmq_poll_ms=int(POLL_S * 1000), rmq_js=self.reverse_url("rmq-static", "resources.js"),
                    rmq_css=self.reverse_url("rmq-static", "resources.css"),
                    rmq_page_url=self.reverse_url("rmq-resources"))


class ResourcesView(_Page):
    """``/rmq/resources``: one row per worker."""

    template = "rmq_resources.html"

    @web.authenticated
    async def get(self) -> None:
        await self._render(None, self.reverse_url("rmq-data"))


class WorkerResourcesView(_Page):
    """``/rmq/resources/<worker>``: one worker's reservations and recent kills."""

    template = "rmq_worker.html"

    @web.authenticated
    async def get(self, name: str) -> None:
        await self._render(name, self.reverse_url("rmq-worker-data", name))


class ResourcesData(BaseHandler):
    """The pages' data as JSON (``/rmq/data/resources``, ``/rmq/data/resources/<worker>``)."""

    @web.authenticated
    async def get(self, name: str | None = None) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write(await self.application.rmq_resources.view(name))
