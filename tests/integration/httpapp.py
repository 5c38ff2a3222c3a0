"""Test app: a governed task that calls a local API through ``rmq.http``."""

from __future__ import annotations

import os

import workers.tasks  # noqa: F401  (the reference tasks)
from rmq import governed_task
from workers.app import make_app

app = make_app()
app.set_current()


@governed_task(memory="32MiB", name="h.call")
def call(i: int) -> dict:
    """One translation request through the per-process pooled client (5/s across the cluster)."""
    from rmq import http

    api = http.client("api", base_url=os.environ["HTTPAPP_URL"], rate="5/s", concurrency=2)
    got = api.post("/translate", json={"text": f"hello {i}", "target": "reverse"}).json()
    return {"pid": os.getpid(), "translation": got["translation"]}
