"""`rmq status` rendering of a cluster view: rich table, plain text, JSON."""

from __future__ import annotations

import copy
import io
import json
import re
from typing import Any

import pytest
from rich.console import Console

from rmq.monitoring.status import memory_bar, render_json, render_plain, render_table

NOW = 1_700_000_000.0
GiB = 1 << 30


def sample_view() -> dict[str, Any]:
    snap = {
        "hostname": "w1@box",
        "pid": 4242,
        "time": NOW - 2,
        "memory": {
            "budget_bytes": 4 * GiB,
            "budget_source": "cgroup-v2",
            "worker_bytes": 3 * GiB,
            "children": {"101": 1 * GiB, "102": 2 * GiB},
            "host_total_bytes": 16 * GiB,
            "host_available_bytes": 8 * GiB,
            "peak_bytes": 3 * GiB,
            "ratio": 0.75,
            "zone": "unload",
        },
        "cpu": {"slots": 4, "slots_used": 3, "percent": 71.5, "load1": 2.5},
        "disk": {"root": "/srv/sessions", "total_bytes": 100 * GiB, "used_bytes": 50 * GiB, "ratio": 0.5},
        "network": {"sent_bytes_per_s": 1024, "recv_bytes_per_s": 2048},
        "paused": True,
        "paused_queues": ["heavy"],
        "reservations": [{"pid": 101, "task_id": "t1", "memory_bytes": 512 << 20}],
        "processes": {
            "101": {"models": [{"name": "bert", "size_bytes": 400 << 20}]},
            "102": {"models": ["tiny"]},
        },
        "counters": {
            "admitted": 120,
            "deferred": {"memory": 3, "cpu": 1},
            "killed": 1,
            "unloaded": 2,
            "sessions_cleaned": 5,
            "alerts": 1,
            "models": {"hits": 10, "misses": 2, "evictions": {"pressure": 1}},
            "http": {"api": {"requests": 7, "errors": 1}},
        },
        "alerts": ["memory"],
    }
    calm = {"hostname": "w2@box", "pid": 7, "time": NOW - 1, "memory": {"ratio": 0.1}, "cpu": {"percent": 3}}
    return {
        "time": NOW,
        "workers": {"w1@box": snap, "w2@box": calm, "w3@box": None},
        "queues": {"celery": 12, "heavy": 0, "rmq.heavy": 345},
        "alerts": [
            {
                "name": "backlog_growing",
                "subject": "celery",
                "hostname": "cluster",
                "message": "celery grows",
            },
        ],
    }


def rendered(view: dict[str, Any]) -> str:
    out = io.StringIO()
    Console(file=out, width=160, force_terminal=True, color_system="truecolor").print(
        render_table(view, now=NOW)
    )
    return out.getvalue()


def test_table_shows_every_worker_its_bars_and_the_queue_depths():
    text = rendered(sample_view())

    for host in ("w1@box", "w2@box", "w3@box"):
        assert host in text
    assert "\u2588" * 15 + "\u2591" * 5 in text  # memory 75 % of a 20-wide bar
    assert "\u2588" * 2 + "\u2591" * 18 in text  # w2 at 10 %
    assert "3.0GiB of 4.0GiB budget" in text
    assert "zone unload" in text
    assert "72%  slots 3/4" in text
    assert "bert (400.0MiB)" in text and "tiny" in text
    assert "yes: heavy" in text
    assert "admitted 120" in text and "deferred 4 (memory 3, cpu 1)" in text
    assert "hits 10, misses 2" in text
    assert "requests 7, errors 1" in text
    assert "no rmq data" in text  # w3 answered without rmq stats
    plain_lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).split() for line in text.splitlines()]
    for queue, depth in (("celery", "12"), ("heavy", "0"), ("rmq.heavy", "345")):
        assert [queue, depth] in plain_lines  # a "queue  depth" row of the queues table
    assert "backlog_growing (celery)" in text and "celery grows" in text
    assert "\x1b[" in text  # coloured on a terminal


def test_plain_rendering_has_no_colours_and_ascii_bars():
    text = render_plain(sample_view(), now=NOW)

    assert "\x1b" not in text
    assert "#" * 15 + "." * 5 + " 75%" in text
    assert "w1@box  pid 4242  (2s ago)" in text
    assert "rmq.heavy" in text and "345" in text
    assert text.isascii()


def test_missing_fields_render_as_dashes_not_errors():
    view = {"time": NOW, "workers": {"w9": {"hostname": "w9"}}, "queues": {"q": None}}
    text = render_plain(view, now=NOW)
    assert "w9" in text
    assert "-%  slots -/-" in text


@pytest.mark.parametrize(
    ("ratio", "width", "expected"),
    [
        (0.0, 10, "." * 10),
        (0.5, 10, "#" * 5 + "." * 5),
        (1.7, 10, "#" * 10),
        (-0.2, 4, "...."),
        (None, 4, "...."),
    ],
)
def test_memory_bar(ratio, width, expected):
    assert memory_bar(ratio, width, ascii=True) == expected
    assert len(memory_bar(ratio, width)) == width


def test_json_round_trip():
    view = sample_view()
    text = render_json(view)
    assert json.loads(text) == view
    assert json.loads(render_json(copy.deepcopy(json.loads(text)))) == view


def test_queues_show_their_consumers_and_a_backlog_nobody_consumes() -> None:
    # Given a view where rmq.heavy holds messages and no worker consumes it
    view = sample_view()
    view["queues"] = {"celery": 0, "rmq.heavy": 3}
    view["consumers"] = {"celery": ["w1@box"]}
    # When it is rendered, Then each queue names its consumers, and the heavy backlog says nobody takes it
    lines = render_plain(view, now=NOW, width=160).splitlines()
    heavy = next(line for line in lines if "rmq.heavy" in line)
    celery = next(line for line in lines if "| celery " in line)
    assert "3" in heavy and "none: nothing consumes it" in heavy
    assert "w1@box" in celery
