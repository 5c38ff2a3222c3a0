"""rmq's pages inside Flower's Tornado application (rmq/celery/flower/), served in-process.

The pages' data source is replaced by a fixed view here; the real one (``inspect stats`` on real
workers, through ``rmq flower``, seen in a browser) is tests/integration/test_flower_resources.py.
"""

from __future__ import annotations

import asyncio
import base64
import time
from types import SimpleNamespace
from typing import Any

import celery
import flower.urls
from flower.app import Flower
from flower.options import options as flower_options
from tornado.testing import AsyncHTTPTestCase

from rmq.celery.flower.app import NAV_LINK, RmqFlower, add_nav_link
from rmq.celery.flower.handlers import ResourcesSource

VIEW = {"time": 1.0, "workers": [{"hostname": "w1@h", "governed": False, "note": "x"}], "errors": []}


class FixedSource:
    """The view the pages get, and the workers they asked about."""

    def __init__(self, view: dict) -> None:
        self.view_value = view
        self.asked: list[str | None] = []

    async def view(self, worker: str | None = None) -> dict:
        self.asked.append(worker)
        return self.view_value


def _options(**overrides: Any) -> SimpleNamespace:
    values = {name: flower_options[name] for name in flower_options.as_dict()}
    return SimpleNamespace(**{**values, "basic_auth": [], "auth": "", "url_prefix": "", **overrides})


class _FlowerCase(AsyncHTTPTestCase):
    flower_class: type = RmqFlower
    overrides: dict[str, Any] = {}
    view: dict = VIEW

    def get_app(self) -> Any:
        opts = _options(**self.overrides)
        settings = dict(flower.urls.settings)
        if opts.url_prefix:
            settings["static_url_prefix"] = f"/{opts.url_prefix}/static/"
        capp = celery.Celery("rmq-flower-test", broker="memory://", set_as_current=False)
        self.flower_app = self.flower_class(options=opts, capp=capp, io_loop=self.io_loop, **settings)
        if isinstance(self.flower_app, RmqFlower):
            self.source = FixedSource(self.view)
            self.flower_app.rmq_resources = self.source
        return self.flower_app

    def get(self, path: str, auth: str | None = None, **kwargs: Any) -> Any:
        headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
        return self.fetch(path, headers=headers, raise_error=False, follow_redirects=False, **kwargs)


class TestPagesAndLink(_FlowerCase):
    view = {"time": 1.0, "errors": [], "workers": [
        {"hostname": "</script><script>alert(1)</script>", "governed": False, "note": "<b>"}]}

    def test_flowers_own_pages_link_to_the_resources_page(self) -> None:
        body = self.get("/workers").body.decode()
        assert 'href="/rmq/resources"' in body and ">Resources</a>" in body
        # the link sits in the navigation list, after Flower's own items
        nav = body[body.index('href="/broker"'):]
        assert nav.index('href="/rmq/resources"') < nav.index("</ul>")

    def test_the_pages_render_and_mark_their_tab_active(self) -> None:
        page = self.get("/rmq/resources")
        assert page.code == 200
        body = page.body.decode()
        assert 'class="nav-link active" href="/rmq/resources"' in body
        assert 'data-url="/rmq/data/resources"' in body and "/rmq/static/resources.js" in body
        worker = self.get("/rmq/resources/w1%40h")
        assert worker.code == 200 and 'data-url="/rmq/data/resources/w1%40h"' in worker.body.decode()
        assert self.source.asked == [None, "w1@h"]
        assert self.get("/rmq/static/resources.js").code == 200

    def test_the_embedded_view_cannot_end_its_script_element(self) -> None:
        body = self.get("/rmq/resources").body.decode()
        assert "<script>alert(1)" not in body and "\\u003c/script\\u003e\\u003cscript\\u003ealert(1)" in body

    def test_the_data_is_json_and_not_cached_by_the_browser(self) -> None:
        data = self.get("/rmq/data/resources/w1%40h")
        assert data.code == 200 and data.headers["Content-Type"].startswith("application/json")
        assert data.headers["Cache-Control"] == "no-store"
        assert self.source.asked == ["w1@h"]

    def test_nothing_but_reading_is_answered(self) -> None:
        for path in ("/rmq/resources", "/rmq/data/resources", "/rmq/data/resources/w1%40h"):
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                reply = self.get(path, method=method, body=b"{}", allow_nonstandard_methods=True)
                assert reply.code == 405, (method, path, reply.code)
        assert self.source.asked == []


class TestBasicAuth(_FlowerCase):
    overrides = {"basic_auth": ["ops:s3cret"]}

    def test_the_pages_and_their_data_need_flowers_credentials(self) -> None:
        for path in ("/rmq/resources", "/rmq/resources/w1%40h", "/rmq/data/resources", "/rmq/data/resources/w1%40h"):
            assert self.get(path).code == 401, path
            assert self.get(path, auth="ops:wrong").code == 401, path
            assert self.get(path, auth="ops:s3cret").code == 200, path
        assert self.source.asked == [None, "w1@h", None, "w1@h"]  # only the authenticated requests


class TestUrlPrefix(_FlowerCase):
    overrides = {"url_prefix": "flower"}

    def test_the_pages_live_under_flowers_prefix(self) -> None:
        assert self.get("/flower/rmq/resources").code == 200
        assert self.get("/flower/rmq/data/resources").code == 200
        assert self.get("/rmq/resources").code == 404
        body = self.get("/flower/workers").body.decode()
        assert 'href="/flower/rmq/resources"' in body
        page = self.get("/flower/rmq/resources").body.decode()
        assert 'data-url="/flower/rmq/data/resources"' in page and "/flower/rmq/static/resources.js" in page


class TestPlainFlower(_FlowerCase):
    flower_class = Flower

    def test_plain_flower_has_neither_the_pages_nor_the_link(self) -> None:
        assert self.get("/rmq/resources").code == 404
        assert "/rmq/resources" not in self.get("/workers").body.decode()


def test_a_navbar_without_a_list_is_left_as_it_is(caplog) -> None:
    assert add_nav_link("<nav>no list</nav>") == "<nav>no list</nav>"
    assert "no <ul> list" in caplog.text
    assert add_nav_link("<ul><li>a</li></ul><ul></ul>") == "<ul><li>a</li>" + NAV_LINK + "</ul><ul></ul>"


class _Inspect:
    def __init__(self, control: _Control, kwargs: dict) -> None:
        self.control, self.kwargs = control, kwargs

    def stats(self) -> dict:
        self.control.calls.append(self.kwargs)
        if self.control.fail:
            raise ConnectionError("broker down")
        time.sleep(0.05)  # long enough for concurrent page requests to overlap
        return {"w1@h": {"rmq": {"error": "rmq is not running in this worker"}}}


class _Control:
    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.fail = False

    def inspect(self, **kwargs: Any) -> _Inspect:
        return _Inspect(self, kwargs)


def test_the_source_asks_once_per_ttl_whatever_the_number_of_pages() -> None:
    control = _Control()
    clock = SimpleNamespace(t=100.0)
    source = ResourcesSource(SimpleNamespace(control=control), timeout_s=0.5, ttl_s=1.5, clock=lambda: clock.t)

    async def scenario() -> list[dict]:
        views = await asyncio.gather(*(source.view() for _ in range(5)), source.view("w1@h"))
        clock.t += 1.0
        views.append(await source.view())  # still fresh: no new request
        clock.t += 1.0
        views.append(await source.view())  # stale: asked again
        return views

    views = asyncio.run(scenario())
    assert control.calls == [{"timeout": 0.5, "destination": None, "limit": None},
                             {"timeout": 0.5, "destination": ["w1@h"], "limit": 1},
                             {"timeout": 0.5, "destination": None, "limit": None}]
    assert all(v["workers"][0]["note"] == "rmq answered with an error: rmq is not running in this worker"
               for v in views)


def test_a_broker_that_fails_gives_a_view_with_the_error() -> None:
    control = _Control()
    control.fail = True
    view = asyncio.run(ResourcesSource(SimpleNamespace(control=control), timeout_s=0.5).view())
    assert view["workers"] == [] and view["errors"] == ["inspect stats failed: ConnectionError: broker down"]


def test_the_parts_of_flower_rmq_flower_relies_on_exist() -> None:
    # a Flower release without them would show here rather than as a broken `rmq flower`
    import flower.command
    import flower.views

    assert isinstance(flower.command.Flower, type) and issubclass(RmqFlower, flower.command.Flower)
    assert callable(flower.app.rewrite_handler) and callable(flower.views.BaseHandler.get_current_user)
    templates = flower.urls.settings["template_path"]
    with open(f"{templates}/base.html") as fh:
        base = fh.read()
    for block in ("navbar", "container", "extra_scripts"):
        assert f"{{% block {block} %}}" in base, block
    with open(f"{templates}/navbar.html") as fh:
        assert "</ul>" in fh.read()
