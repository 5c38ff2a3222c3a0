"""Cleanup of a session root: what goes and why, live leases respected, nothing outside the root
touched, dry runs, the config entry point and the report."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rmq.disk.cleanup as cleanup_mod
from rmq.core.config import load_config
from rmq.core.errors import ConfigError
from rmq.disk.cleanup import cleanup_from_config, format_report, plan_cleanup, run_cleanup
from rmq.disk.session_ids import validate_session_id
from rmq.disk.session_root import SessionRoot, is_live
from rmq.disk.sessions import SessionStore

from .helpers import DAY, NOW, age, make_session, outside_tree, snapshot, start_holder


def no_disk_pressure():
    return (1000, 0, 1000)


def run(root: Path, **kw):
    kw.setdefault("now", NOW)
    kw.setdefault("disk_usage", no_disk_pressure)
    return run_cleanup(root, **kw)


# --- links inside sessions ------------------------------------------------------------------


def test_symlinks_inside_a_session_are_unlinked_never_followed(tmp_path):
    # Given a session holding links to a file, a directory, the root's parent and dangling targets
    outside = outside_tree(tmp_path)
    root = tmp_path / "sessions"
    sess = make_session(root, "s", {"own.txt": 3, "nested/own2.txt": 4})
    (sess / "to_file").symlink_to(outside / "file.txt")
    (sess / "to_dir").symlink_to(outside / "dir")
    (sess / "nested" / "to_outside").symlink_to("../../../outside")
    (sess / "nested" / "to_root").symlink_to(root)
    (sess / "nested" / "to_parent").symlink_to("..")
    (sess / "chain").symlink_to(sess / "to_dir")  # link to a link
    (sess / "dangling").symlink_to(tmp_path / "nowhere")
    before = snapshot(outside)
    # When cleanup removes the session
    report = run(root, older_than_s=0)
    # Then the links are gone and every target survives unchanged
    assert report.removed_names == ["session_s"] and report.bytes_freed == 7
    assert not sess.exists() and not sess.is_symlink()
    assert snapshot(outside) == before
    assert root.is_dir()


def test_a_session_that_is_itself_a_symlink_is_unlinked(tmp_path):
    outside = outside_tree(tmp_path)
    root = tmp_path / "sessions"
    root.mkdir()
    (root / "session_evil").symlink_to(outside / "dir")
    before = snapshot(outside)
    report = run(root, older_than_s=-1)
    assert report.removed_names == ["session_evil"] and report.bytes_freed == 0
    assert not (root / "session_evil").is_symlink()
    assert snapshot(outside) == before


# --- policies ----------------------------------------------------------------------------


def test_age_policy_uses_the_newest_mtime_in_the_tree(tmp_path):
    old = make_session(tmp_path, "old", seconds_ago=2 * DAY)
    fresh_inside = make_session(tmp_path, "touched", {"a": 1, "deep/b": 1}, seconds_ago=2 * DAY)
    os.utime(fresh_inside / "deep" / "b", (NOW - 60, NOW - 60))
    make_session(tmp_path, "new", seconds_ago=3600)
    names = [c.name for c in plan_cleanup(tmp_path, NOW, DAY, 3600, no_disk_pressure, 0.8, 0.7)]
    assert names == ["session_old"]
    report = run(tmp_path, max_age_s=DAY)
    assert report.removed_names == ["session_old"] and report.reasons == {"age": 1}
    assert not old.exists()
    assert sorted(os.listdir(tmp_path)) == [".rmq", "session_new", "session_touched"]


def test_older_than_overrides_max_age(tmp_path):
    make_session(tmp_path, "a", seconds_ago=7200)
    assert plan_cleanup(tmp_path, NOW, DAY, 3600, no_disk_pressure, 0.8, 0.7) == []
    [c] = plan_cleanup(tmp_path, NOW, DAY, 3600, no_disk_pressure, 0.8, 0.7, older_than_s=3600)
    assert c.name == "session_a" and c.reason == "age"


def test_only_session_entries_directly_under_root_are_touched(tmp_path):
    for name in ["keep_me", "sessionX", ".hidden", "Session_caps"]:
        make_session(tmp_path, "tmp", seconds_ago=9 * DAY).rename(tmp_path / name)
    (tmp_path / "notes.txt").write_text("mine")
    age(tmp_path / "notes.txt", 9 * DAY)
    odd = ["session_", "session_with space", "session_ü", "session_a\nb", "session_..x"]
    for name in odd:
        make_session(tmp_path, "tmp", seconds_ago=9 * DAY).rename(tmp_path / name)
    (tmp_path / "session_file").write_text("a file")
    age(tmp_path / "session_file", 9 * DAY)
    others = {n: snapshot(tmp_path / n) for n in ["keep_me", "sessionX", ".hidden", "Session_caps"]}
    report = run(tmp_path, max_age_s=DAY)
    assert sorted(report.removed_names) == sorted([*odd, "session_file"])
    assert sorted(os.listdir(tmp_path)) == sorted(
        [".rmq", "keep_me", "sessionX", ".hidden", "Session_caps", "notes.txt"]
    )
    assert {n: snapshot(tmp_path / n) for n in others} == others


def test_failed_session_kept_for_its_ttl_then_removed(tmp_path):
    store = SessionStore(tmp_path)
    path = store.open("f", "t")
    (path / "log").write_text("boom")
    store.close("f", "t", failed=True, now=NOW)
    # within the TTL it stays, even with a tiny max age
    assert run(tmp_path, now=NOW + 3599, failed_ttl_s=3600, max_age_s=1).removed == 0
    assert path.is_dir()
    report = run(tmp_path, now=NOW + 3601, failed_ttl_s=3600)
    assert report.removed_names == ["session_f"] and report.reasons == {"failed": 1}
    with SessionRoot(tmp_path) as sr:
        assert sr.failed_markers() == {}


def test_failed_ttl_longer_than_max_age_keeps_it(tmp_path):
    store = SessionStore(tmp_path)
    store.open("f", "t")
    store.close("f", "t", failed=True, now=NOW)
    age(tmp_path / "session_f", 2 * DAY)
    assert run(tmp_path, now=NOW + 1.5 * DAY, max_age_s=DAY, failed_ttl_s=2 * DAY).removed == 0
    assert run(tmp_path, now=NOW + 2.5 * DAY, max_age_s=DAY, failed_ttl_s=2 * DAY).removed == 1


def test_keep_policy_session_removed_by_age_only(tmp_path):
    store = SessionStore(tmp_path)
    store.open("k", "t")
    store.close("k", "t", failed=False, policy="keep")
    real_now = os.stat(tmp_path / "session_k").st_mtime
    assert run(tmp_path, now=real_now + 3600, max_age_s=DAY).removed == 0
    assert run(tmp_path, now=real_now + DAY + 10, max_age_s=DAY).removed_names == ["session_k"]


class FakeDisk:
    """A disk whose used bytes are ``base`` plus the bytes still present under ``root``."""

    def __init__(self, root: Path, total: int, base: int) -> None:
        self.root, self.total, self.base = root, total, base

    def __call__(self):
        present = sum(
            os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(self.root) for f in files
        )
        used = self.base + present
        return (self.total, used, self.total - used)


def test_disk_pressure_removes_oldest_idle_until_below_low_ratio(tmp_path):
    # Given 4 idle sessions of 100 kB, all younger than max age, on a disk 85 % used
    for i, sid in enumerate(["d0", "d1", "d2", "d3"]):
        make_session(tmp_path, sid, {"blob": 100_000}, seconds_ago=3600 * (10 - i))  # d0 oldest
    disk = FakeDisk(tmp_path, total=1_000_000, base=450_000)
    assert disk()[1] == 850_000
    # When cleanup runs with 80 % / 70 %
    report = run(tmp_path, disk_usage=disk, max_age_s=DAY, high_ratio=0.8, low_ratio=0.7)
    # Then the two oldest go (850 -> 650 kB) and the rest stays
    assert report.removed_names == ["session_d0", "session_d1"]
    assert report.reasons == {"disk": 2} and report.bytes_freed == 200_000
    assert report.disk_ratio_before == pytest.approx(0.85)
    assert report.disk_ratio_after == pytest.approx(0.65)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("session_")) == ["session_d2", "session_d3"]


def test_disk_pressure_below_high_ratio_removes_nothing(tmp_path):
    make_session(tmp_path, "d0", {"blob": 100_000}, seconds_ago=3600)
    disk = FakeDisk(tmp_path, total=1_000_000, base=690_000)  # 79 %
    assert run(tmp_path, disk_usage=disk, high_ratio=0.8, low_ratio=0.7).removed == 0


def test_disk_pressure_counts_age_removals_first(tmp_path):
    make_session(tmp_path, "aged", {"blob": 150_000}, seconds_ago=2 * DAY)
    make_session(tmp_path, "young", {"blob": 100_000}, seconds_ago=60)
    disk = FakeDisk(tmp_path, total=1_000_000, base=600_000)  # 85 %; removing "aged" reaches 70 %
    plan = plan_cleanup(tmp_path, NOW, DAY, 3600, disk, 0.8, 0.75)
    assert [(c.name, c.reason) for c in plan] == [("session_aged", "age")]


# --- leases held by real processes -------------------------------------------------------


def test_live_lease_protects_an_ancient_session_until_its_holder_is_killed(tmp_path):
    # Given a session held by a live process, its files days old, and a full disk
    proc = start_holder(tmp_path, "busy")
    try:
        sess = tmp_path / "session_busy"
        (sess / "big").write_bytes(b"x" * 50_000)
        age(sess, 30 * DAY)
        make_session(tmp_path, "idle", seconds_ago=30 * DAY)
        full = FakeDisk(tmp_path, total=100_000, base=45_000)
        # When cleanup runs, Then only the idle one goes; the held one is reported as skipped
        assert [c.name for c in plan_cleanup(tmp_path, NOW, DAY, 3600, full, 0.8, 0.7)] == ["session_idle"]
        report = run(tmp_path, max_age_s=DAY, disk_usage=full)
        assert report.removed_names == ["session_idle"]
        assert report.skipped_live == 1  # wanted by age and by disk pressure, counted once
        assert (sess / "big").exists() and is_live(tmp_path, "busy")
        # When the holder is SIGKILLed, Then its lease no longer protects the session
        proc.kill()
        proc.wait(timeout=10)
        report = run(tmp_path, max_age_s=DAY)
        assert report.removed_names == ["session_busy"] and report.stale_leases_removed == 1
        assert os.listdir(tmp_path / ".rmq" / "leases") == []
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_session_reused_between_plan_and_removal_is_spared(tmp_path, monkeypatch):
    make_session(tmp_path, "r", seconds_ago=2 * DAY)
    store = SessionStore(tmp_path)
    real_plan = cleanup_mod._plan

    def plan_then_reuse(*args, **kwargs):
        result = real_plan(*args, **kwargs)
        store.open("r", "late-task")  # a task starts after the plan was made
        store.close("r", "late-task", failed=False, policy="keep")
        return result

    monkeypatch.setattr(cleanup_mod, "_plan", plan_then_reuse)
    report = run(tmp_path, max_age_s=DAY)
    assert report.removed == 0 and (tmp_path / "session_r").is_dir()


# --- dry run, config, report -------------------------------------------------------------


def test_dry_run_touches_nothing(tmp_path):
    root = tmp_path / "sessions"
    proc = start_holder(root, "dead")
    proc.kill()
    proc.wait(timeout=10)
    make_session(root, "old", {"a": 100}, seconds_ago=3 * DAY)
    age(root / "session_dead", 3 * DAY)
    (root / ".rmq" / "trash" / "leftover").mkdir()
    before = snapshot(tmp_path)
    report = run(root, max_age_s=DAY, dry_run=True, disk_usage=lambda: (1000, 900, 100))
    assert snapshot(tmp_path) == before
    assert report.dry_run and sorted(report.removed_names) == ["session_dead", "session_old"]
    assert report.bytes_freed == 100 and report.stale_leases_removed == 0
    assert report.disk_ratio_before == pytest.approx(0.9)
    assert report.disk_ratio_after == pytest.approx(0.8)  # projected
    assert "would remove 2 session(s)" in format_report(report)


def test_cleanup_on_missing_root_creates_nothing(tmp_path):
    for dry_run in (True, False):
        report = run(tmp_path / "none", dry_run=dry_run)
        assert report.removed == 0
    assert os.listdir(tmp_path) == []


def test_leftover_trash_is_emptied(tmp_path):
    SessionStore(tmp_path).open("x", "t")
    (tmp_path / ".rmq" / "trash" / "session_y.1.ab" / "d").mkdir(parents=True)
    (tmp_path / ".rmq" / "trash" / "session_y.1.ab" / "d" / "f").write_bytes(b"12345")
    report = run(tmp_path)
    assert os.listdir(tmp_path / ".rmq" / "trash") == []
    assert report.removed == 0 and (tmp_path / "session_x").is_dir()


def test_cleanup_from_config(tmp_path):
    root = tmp_path / "sessions"
    make_session(root, "a", seconds_ago=2 * 3600)
    make_session(root, "b", seconds_ago=60)
    config = load_config({"rmq_session_root": str(root), "rmq_session_max_age": "1h"}, environ={})
    dry = cleanup_from_config(config, dry_run=True, now=NOW)
    assert dry.removed_names == ["session_a"] and (root / "session_a").exists()
    assert 0 < dry.disk_ratio_before < 1  # real shutil.disk_usage
    report = cleanup_from_config(config, older_than_s=30, now=NOW)
    assert sorted(report.removed_names) == ["session_a", "session_b"]
    assert report.as_dict()["removed"] == 2


def test_format_report_says_what_happened(tmp_path):
    make_session(tmp_path, "a", {"f": 2048}, seconds_ago=2 * DAY)
    report = run(tmp_path, max_age_s=DAY, disk_usage=lambda: (1000, 500, 500))
    text = format_report(report)
    assert text.splitlines()[0] == (
        f"rmq cleanup {tmp_path}: removed 1 session(s), 2.0KiB freed (age 1); disk 50.0% -> 50.0%"
    )
    assert text.splitlines()[1] == "  removed: session_a"


# --- property: nothing outside the root ever changes -------------------------------------

NAMES = st.sampled_from(["a", "b", "c", ".d", "e e", "f\nf"])
KINDS = st.sampled_from(
    ["file", "dir", "link_file", "link_dir", "link_outside", "link_up", "link_root", "dangling", "link_in"]
)
TREE = st.lists(st.tuples(st.lists(NAMES, min_size=1, max_size=3), KINDS), max_size=14)


def build(sess: Path, ops, outside: Path, root: Path) -> None:
    sess.mkdir()
    for parts, kind in ops:
        path = sess.joinpath(*parts)
        if not all(
            p.is_dir() and not p.is_symlink()
            for p in [path.parent, *path.parent.parents]
            if sess in [p, *p.parents]
        ):
            continue
        if path.exists() or path.is_symlink():
            continue
        if kind == "file":
            path.write_text("x" * len(parts))
        elif kind == "dir":
            path.mkdir()
        else:
            target = {
                "link_file": outside / "file.txt",
                "link_dir": outside / "dir",
                "link_outside": Path("../" * len(parts)) / ".." / "outside",
                "link_up": Path(".."),
                "link_root": root,
                "dangling": outside / "missing",
                "link_in": sess,
            }[kind]
            path.symlink_to(target)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sid=st.one_of(st.text(max_size=140), st.from_regex(r"[A-Za-z0-9_-]{1,128}", fullmatch=True)), ops=TREE)
def test_property_cleanup_stays_inside_the_root(sid, ops):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        outside = outside_tree(base)
        root = base / "sessions"
        store = SessionStore(root)
        valid = re.fullmatch(r"[A-Za-z0-9_-]{1,128}", sid) is not None
        if not valid:
            with pytest.raises(ConfigError):
                validate_session_id(sid)
            with pytest.raises(ConfigError):
                store.open(sid, "t")
            assert not root.exists()
            return
        store.open(sid, "t")
        build_root = root / f"session_{sid}"
        shutil.rmtree(build_root)
        build(build_root, ops, outside, root)
        before = snapshot(outside)
        assert store.close(sid, "t", failed=False) == "removed"
        assert not build_root.exists() and not build_root.is_symlink()
        assert snapshot(outside) == before
        # and cleanup of a leftover copy of the same tree behaves the same
        build(build_root, ops, outside, root)
        report = run(root, older_than_s=-1)
        assert report.removed_names == [f"session_{sid}"] and not report.errors
        assert snapshot(outside) == before
        assert sorted(os.listdir(root)) == [".rmq"]


def test_disk_pressure_starts_at_the_high_ratio_itself(tmp_path):
    make_session(tmp_path, "d0", {"blob": 100_000}, seconds_ago=3 * 3600)
    make_session(tmp_path, "d1", {"blob": 100_000}, seconds_ago=2 * 3600)  # both idle beyond the 1 h minimum
    disk = FakeDisk(tmp_path, total=1_000_000, base=600_000)  # exactly 80 %
    report = run(tmp_path, disk_usage=disk, high_ratio=0.8, low_ratio=0.7)
    # 80 % -> 70 % is not below 70 %: both go, oldest first
    assert report.removed_names == ["session_d0", "session_d1"] and report.reasons == {"disk": 2}


def test_disk_pressure_when_the_disk_cannot_be_read_applies_age_only(tmp_path):
    make_session(tmp_path, "aged", seconds_ago=2 * DAY)
    make_session(tmp_path, "young", seconds_ago=60)

    def broken():
        raise OSError("statvfs failed")

    report = run(tmp_path, disk_usage=broken, max_age_s=DAY)
    assert report.removed_names == ["session_aged"] and report.disk_ratio_before is None


# --- odd entries directly under the root ----------------------------------------------------


ROOT_NAMES = st.sampled_from(
    ["session_.", "session_..", "session_", "session_a.b", "session_\n", "session_ x", "session_ok", "other"]
)
ROOT_KINDS = st.sampled_from(["dir", "file", "link_outside_dir", "link_outside_file", "link_root", "link_up", "fifo"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(st.tuples(ROOT_NAMES, ROOT_KINDS), max_size=8), failed=st.booleans())
def test_property_odd_root_entries_never_break_cleanup_or_escape(entries, failed):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        outside = outside_tree(base)
        root = base / "sessions"
        store = SessionStore(root)
        store.open("real", "t")
        store.close("real", "t", failed=failed)  # a failure marker too, sometimes
        for name, kind in entries:
            path = root / name
            if path.exists() or path.is_symlink():
                continue
            if kind == "dir":
                path.mkdir()
                (path / "f").write_text("x")
            elif kind == "file":
                path.write_text("x")
            elif kind == "fifo":
                os.mkfifo(path)
            else:
                path.symlink_to({"link_outside_dir": outside / "dir", "link_outside_file": outside / "file.txt",
                                 "link_root": root, "link_up": Path("..")}[kind])
        before = snapshot(outside)
        report = run(root, older_than_s=-1, failed_ttl_s=-1)
        assert not report.errors
        assert snapshot(outside) == before
        left = sorted(n for n in os.listdir(root) if n.startswith("session_"))
        assert left == []
        assert os.listdir(root / ".rmq" / "failed") == []


def test_disk_pressure_rmq_cannot_relieve_spares_recent_idle_sessions(tmp_path):
    # Given a shared filesystem 95 % full of other people's data, a `keep` session that waits
    # for its pipeline's next step (idle 5 min), one idle 20 min and one idle 3 h
    store = SessionStore(tmp_path)
    store.open("next-step", "t1")
    store.close("next-step", "t1", failed=False, policy="keep")
    age(tmp_path / "session_next-step", 300)
    make_session(tmp_path, "recent", {"blob": 1_000}, seconds_ago=1200)
    make_session(tmp_path, "old", {"blob": 1_000}, seconds_ago=3 * 3600)
    disk = FakeDisk(tmp_path, total=1_000_000, base=950_000)
    now = os.stat(tmp_path / "session_next-step").st_mtime + 300
    # When cleanup runs, twice (every 15 minutes)
    reports = [run(tmp_path, now=now, disk_usage=disk, max_age_s=DAY, high_ratio=0.8, low_ratio=0.7)
               for _ in range(2)]
    # Then only the session idle for longer than the minimum went, and only once
    assert [r.removed_names for r in reports] == [["session_old"], []]
    # and the `keep` session and the recent one are still there for their next task
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("session_")) == [
        "session_next-step", "session_recent"]
    # and the report says why the disk is still above the line
    assert reports[1].skipped_recent == 2
    assert "2 idle for less than 1h kept" in format_report(reports[1])
