"""Per-process counters aggregated by the governor (COMMON.md snapshot "counters" and "processes")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rmq.core.procstats import ProcessStats, merge_counters, read_all


def proc_file(directory: Path) -> Path:
    return directory / f"proc-{os.getpid()}.json"


def test_incr_nests_and_sums() -> None:
    stats = ProcessStats(None)
    stats.incr("admitted")
    stats.incr("admitted")
    stats.incr("models", "hits")
    stats.incr("models", "load_seconds", n=1.5)
    stats.incr("models", "evictions", "pressure", n=2)
    assert stats.counters == {
        "admitted": 2,
        "models": {"hits": 1, "load_seconds": 1.5, "evictions": {"pressure": 2}},
    }


def test_flush_writes_counters_and_gauges(tmp_path: Path) -> None:
    stats = ProcessStats(str(tmp_path))
    stats.incr("models", "hits", n=3)
    stats.set_gauge("models", [{"name": "whisper", "bytes": 10}])
    stats.flush()
    data = json.loads(proc_file(tmp_path).read_text())
    assert data == {
        "pid": os.getpid(),
        "counters": {"models": {"hits": 3}},
        "gauges": {"models": [{"name": "whisper", "bytes": 10}]},
    }
    assert not list(tmp_path.glob("*.tmp"))


def test_flush_is_throttled_and_force_overrides(tmp_path: Path) -> None:
    stats = ProcessStats(str(tmp_path), min_interval_s=3600)
    stats.incr("admitted")
    stats.flush(force=True)
    stats.incr("admitted")
    stats.flush()  # within the interval: not written
    assert json.loads(proc_file(tmp_path).read_text())["counters"] == {"admitted": 1}
    stats.flush(force=True)
    assert json.loads(proc_file(tmp_path).read_text())["counters"] == {"admitted": 2}


def test_flush_without_changes_writes_nothing(tmp_path: Path) -> None:
    stats = ProcessStats(str(tmp_path), min_interval_s=0)
    stats.flush(force=True)
    assert not proc_file(tmp_path).exists()
    stats.incr("x")
    stats.flush()
    proc_file(tmp_path).unlink()
    stats.flush(force=True)  # nothing changed since the last write
    assert not proc_file(tmp_path).exists()


def test_flush_without_a_directory_or_after_it_vanished(tmp_path: Path) -> None:
    ProcessStats(None).incr("x")
    ProcessStats(None).flush(force=True)  # no directory: a no-op
    stats = ProcessStats(str(tmp_path / "gone"))
    stats.incr("x")
    stats.flush(force=True)  # the runtime dir vanished during shutdown: no exception
    assert not (tmp_path / "gone").exists()


def test_read_all_collects_every_process(tmp_path: Path) -> None:
    mine = ProcessStats(str(tmp_path))
    mine.incr("models", "hits")
    mine.flush()
    code = (
        "import sys; from rmq.core.procstats import ProcessStats; "
        "s = ProcessStats(sys.argv[1]); s.incr('models', 'hits', n=4); s.set_gauge('g', 1); s.flush()"
    )
    root = str(Path(__file__).resolve().parents[3])
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60,
                   env=dict(os.environ, PYTHONPATH=root))
    (tmp_path / "proc-999.json.tmp").write_text("{half")  # a write in progress
    (tmp_path / "proc-998.json").write_text("{broken")
    (tmp_path / "notes.txt").write_text("not ours")
    found = read_all(str(tmp_path))
    assert len(found) == 2 and os.getpid() in found
    [other] = [pid for pid in found if pid != os.getpid()]
    assert found[other]["gauges"] == {"g": 1}
    assert merge_counters(v["counters"] for v in found.values()) == {"models": {"hits": 5}}


def test_read_all_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert read_all(str(tmp_path / "nope")) == {}


def test_merge_counters_sums_nested_dicts() -> None:
    merged = merge_counters(
        [
            {"admitted": 1, "models": {"hits": 2, "evictions": {"lru": 1}}, "http": {"api": {"requests": 3}}},
            {"admitted": 2, "models": {"hits": 1, "misses": 4, "evictions": {"lru": 2, "pressure": 1}}},
            {"models": {"load_seconds": 0.5}, "note": "strings are not counters"},
        ]
    )
    assert merged == {
        "admitted": 3,
        "models": {"hits": 3, "misses": 4, "load_seconds": 0.5, "evictions": {"lru": 3, "pressure": 1}},
        "http": {"api": {"requests": 3}},
    }


def test_merge_of_nothing_is_empty() -> None:
    assert merge_counters([]) == {}
