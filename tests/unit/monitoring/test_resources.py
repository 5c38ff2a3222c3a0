"""The Resources view (rmq/monitoring/resources.py): ``inspect stats`` replies to the page's rows."""

from __future__ import annotations

from rmq.monitoring.resources import resources_view, worker_row

MiB = 1024 * 1024
NOW = 1_800_000_000.0


def _snapshot(**memory) -> dict:
    """A worker's rmq snapshot as ``inspect stats`` carries it (the fields the page reads)."""
    return {
        "hostname": "w1@h", "pid": 4242, "time": NOW - 2.5,
        "memory": {
            "budget_bytes": 400 * MiB, "budget_source": "configured", "worker_bytes": 352 * MiB,
            "peak_bytes": 360 * MiB, "ratio": 0.88, "zone": "pause", "admit_line_bytes": 340 * MiB,
            "line_ratios": {"admit": 0.85, "unload": 0.8, "pause": 0.85, "resume": 0.75, "kill": 0.95},
            "oom_kills": 1,
            "recent_kills": [
                {"task_id": "a", "task_name": "t.old", "pid": 7, "observed_bytes": 300 * MiB,
                 "declared_bytes": 32 * MiB, "budget_bytes": 400 * MiB, "worker_bytes": 390 * MiB, "time": NOW - 90},
                {"task_id": "b", "task_name": "t.new", "pid": 8, "observed_bytes": 310 * MiB,
                 "declared_bytes": 32 * MiB, "budget_bytes": 400 * MiB, "worker_bytes": 392 * MiB, "time": NOW - 5},
            ],
            **memory,
        },
        "cpu": {"slots": 4, "slots_used": 1, "percent": 12.5, "load1": 0.3},
        "disk": {"root": "/srv/sessions", "total_bytes": 1000, "used_bytes": 250, "free_bytes": 750, "ratio": 0.25,
                 "reserved_bytes": 0},
        "paused": True, "paused_queues": ["rmq.heavy"],
        "reservations": [{"pid": 11, "task_id": "r1", "task_name": "media.encode", "kind": "task",
                          "memory_bytes": 64 * MiB, "cpu_slots": 1, "disk_bytes": 0, "used_bytes": 80 * MiB}],
        "processes": {
            "12": {"models": [{"name": "whisper", "size_bytes": 120 * MiB, "pinned": False, "leased": True}]},
            "11": {"hygiene": {"baseline_bytes": 1}},
        },
        "counters": {"admitted": 17, "killed": 2, "deferred": {"memory": 3, "cpu": 1}, "pauses": 1},
    }


def test_a_governed_worker_row_carries_what_the_page_shows() -> None:
    row = worker_row("w1@h", {"pid": 4242, "rmq": _snapshot()}, NOW)
    assert row["governed"] and row["hostname"] == "w1@h" and row["pid"] == 4242
    assert row["age_s"] == 2.5
    assert row["memory"] == {
        "worker_bytes": 352 * MiB, "budget_bytes": 400 * MiB, "budget_source": "configured",
        "peak_bytes": 360 * MiB, "ratio": 0.88, "zone": "pause",
        "lines": {"admit": 0.85, "unload": 0.8, "pause": 0.85, "kill": 0.95},
    }
    assert row["paused"] is True and row["paused_queues"] == ["rmq.heavy"]
    assert row["cpu"] == {"slots": 4, "slots_used": 1, "percent": 12.5}
    assert row["disk"]["root"] == "/srv/sessions" and row["disk"]["ratio"] == 0.25
    # models resident per pool process; processes holding none are left out
    assert row["models"] == [{"pid": "12", "models": [
        {"name": "whisper", "size_bytes": 120 * MiB, "pinned": False, "leased": True}]}]
    assert row["counters"] == {"admitted": 17, "deferred": {"memory": 3, "cpu": 1}, "deferred_total": 4,
                               "killed": 2, "oom_kills": 1}
    assert row["reservations"] == [{"task_name": "media.encode", "task_id": "r1", "kind": "task", "pid": 11,
                                    "declared_bytes": 64 * MiB, "used_bytes": 80 * MiB, "cpu_slots": 1,
                                    "disk_bytes": 0}]
    # the newest kill first, with how long ago it was
    assert [(k["task_id"], k["ago_s"]) for k in row["recent_kills"]] == [("b", 5.0), ("a", 90.0)]
    assert row["recent_kills"][0]["observed_bytes"] == 310 * MiB


def test_workers_without_rmq_or_with_an_error_are_listed_with_the_reason() -> None:
    view = resources_view({"plain@h": {"pid": 1}, "broken@h": {"rmq": {"error": "rmq is not running"}},
                           "w1@h": {"rmq": _snapshot()}}, NOW)
    rows = {r["hostname"]: r for r in view["workers"]}
    assert [r["hostname"] for r in view["workers"]] == ["broken@h", "plain@h", "w1@h"]  # sorted
    assert rows["plain@h"] == {"hostname": "plain@h", "governed": False,
                               "note": "not governed by rmq (no rmq part in its stats)"}
    assert rows["broken@h"]["note"] == "rmq answered with an error: rmq is not running"
    assert rows["w1@h"]["governed"]


def test_only_workers_that_answered_have_a_row_and_errors_are_kept() -> None:
    before = resources_view({"w1@h": {"rmq": _snapshot()}, "w2@h": {"rmq": _snapshot()}}, NOW)
    after = resources_view({"w1@h": {"rmq": _snapshot()}}, NOW + 2, ["inspect stats failed: x"])
    assert [r["hostname"] for r in before["workers"]] == ["w1@h", "w2@h"]
    assert [r["hostname"] for r in after["workers"]] == ["w1@h"]  # w2 stopped: its row goes
    assert after["errors"] == ["inspect stats failed: x"] and after["time"] == NOW + 2
    assert resources_view(None, NOW) == {"time": NOW, "workers": [], "errors": []}


def test_a_snapshot_from_an_older_worker_still_shows_its_admit_line_and_unknown_figures_as_none() -> None:
    snap = _snapshot()
    for key in ("line_ratios", "oom_kills", "recent_kills", "peak_bytes"):
        del snap["memory"][key]
    snap["counters"] = {"admitted": "many", "deferred": {"memory": None}}  # not numbers: not shown as such
    del snap["time"]
    row = worker_row("old@h", {"rmq": snap}, NOW)
    assert row["memory"]["lines"] == {"admit": 0.85}
    assert row["memory"]["peak_bytes"] is None and row["age_s"] is None
    assert row["counters"] == {"admitted": 0, "deferred": {}, "deferred_total": 0, "killed": 0, "oom_kills": None}
    assert row["recent_kills"] == []
