"""Flower's application class with rmq's pages, and the navigation link to them.

The handlers are added with Tornado's ``add_handlers``, which puts them before Flower's catch-all
"not found" handler, under Flower's URL prefix when it has one. The link is added to Flower's own
``navbar.html`` as it is loaded (:class:`PageTemplates`), so every Flower page shows it whatever
the Flower version's navigation looks like, as long as it is a ``<ul>`` list.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import flower.urls
from flower.app import Flower, rewrite_handler
from tornado.template import BaseLoader, Template
from tornado.web import StaticFileHandler, url

from rmq.celery.flower.handlers import ResourcesData, ResourcesSource, ResourcesView, WorkerResourcesView

__all__ = ["NAV_LINK", "PageTemplates", "RmqFlower", "add_nav_link", "rmq_handlers"]

log = logging.getLogger("rmq.celery.flower")

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "templates")
STATIC = os.path.join(HERE, "static")

#: the item added to Flower's navigation (a Tornado template fragment, rendered by Flower's navbar)
NAV_LINK = (
    '<li class="nav-item"><a class="nav-link{% if active_tab == \'rmq-resources\' %} active{% end %}"'
    ' href="{{ reverse_url(\'rmq-resources\') }}"'
    '{% if active_tab == \'rmq-resources\' %} aria-current="page"{% end %}>Resources</a></li>\n'
)


def add_nav_link(navbar: str) -> str:
    """Flower's navbar template with the Resources item after the items of its first list."""
    at = navbar.find("</ul>")
    if at < 0:
        log.warning("rmq flower: Flower's navbar has no <ul> list; the Resources page has no link "
                    "(it is at /rmq/resources)")
        return navbar
    return navbar[:at] + NAV_LINK + navbar[at:]


class PageTemplates(BaseLoader):
    """Flower's templates, with rmq's pages (``rmq_*.html``) beside them and the link in its navbar.

    Names are flat, as Flower's are: ``rmq_resources.html`` extends Flower's ``base.html``.
    """

    def __init__(self, flower_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.flower_dir = os.path.abspath(flower_dir)

    def resolve_path(self, name: str, parent_path: str | None = None) -> str:
        return name

    def _create_template(self, name: str) -> Template:
        own = os.path.join(TEMPLATES, name)
        path = own if name.startswith("rmq_") and os.path.isfile(own) else os.path.join(self.flower_dir, name)
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
        if name == "navbar.html":
            source = add_nav_link(source)
        return Template(source, name=name, loader=self)


def rmq_handlers() -> list[Any]:
    """rmq's routes; every page and data URL answers GET only (nothing here changes a worker)."""
    return [
        url(r"/rmq/resources", ResourcesView, name="rmq-resources"),
        url(r"/rmq/resources/(.+)", WorkerResourcesView, name="rmq-worker"),
        url(r"/rmq/data/resources", ResourcesData, name="rmq-data"),
        url(r"/rmq/data/resources/(.+)", ResourcesData, name="rmq-worker-data"),
        url(r"/rmq/static/(.*)", StaticFileHandler, {"path": STATIC}, name="rmq-static"),
    ]


class RmqFlower(Flower):
    """Flower, plus rmq's Resources pages and the link to them."""

    def __init__(self, options: Any = None, capp: Any = None, events: Any = None, io_loop: Any = None,
                 **kwargs: Any) -> None:
        kwargs["template_loader"] = PageTemplates(kwargs.get("template_path") or flower.urls.settings["template_path"])
        super().__init__(options=options, capp=capp, events=events, io_loop=io_loop, **kwargs)
        timeout_s = max(0.2, float(self.options.inspect_timeout) / 1000.0)
        #: the pages' data: ``inspect stats``, cached briefly and shared by every open page
        self.rmq_resources = ResourcesSource(self.capp, timeout_s)
        handlers = rmq_handlers()
        if self.options.url_prefix:
            handlers = [rewrite_handler(h, self.options.url_prefix) for h in handlers]
        self.add_handlers(r".*", handlers)

    def start_http_server(self) -> Any:
        port = super().start_http_server()
        prefix = "/" + self.options.url_prefix.strip("/") if self.options.url_prefix else ""
        log.info("rmq's Resources page: %s/rmq/resources", prefix)
        return port
