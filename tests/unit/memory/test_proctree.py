"""A task's whole process tree read from a fake /proc (docs/design.md#task-trees)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rmq.memory.meter import ProcessTreeMeter
from rmq.memory.proctree import TREE_ENV, ProcFS, TreeTracker

MiB = 1024**2
PAGE = os.sysconf("SC_PAGE_SIZE")
MAIN = 100


class FakeProc:
    """Writes ``proc/<pid>/...`` files: threads with their children, stat, statm, smaps_rollup, environ."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, pid: int, ppid: int, rss: int = 10 * MiB, private: int | None = None, start: int = 1000,
            state: str = "S", env: dict[str, str] | None = None, threads: int = 1) -> None:
        base = self.root / "proc" / str(pid)
        for i in range(threads):
            (base / "task" / str(pid + i)).mkdir(parents=True, exist_ok=True)
            (base / "task" / str(pid + i) / "children").write_text("")
        rest = [state, str(ppid)] + ["0"] * 17 + [str(start)] + ["0"] * 10
        (base / "stat").write_text(f"{pid} (py thon) " + " ".join(rest) + "\n")
        (base / "statm").write_text(f"999 {rss // PAGE} 0 0 0 0 0\n")
        private = rss if private is None else private
        (base / "smaps_rollup").write_text(
            f"00400000-ff [rollup]\nRss: {rss // 1024} kB\nPss: 1 kB\nPrivate_Clean: 0 kB\n"
            f"Private_Dirty: {private // 1024} kB\n")
        (base / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in (env or {}).items()))
        if pid != ppid and (self.root / "proc" / str(ppid)).exists():
            self.adopt(ppid, pid)

    def adopt(self, parent: int, child: int, thread: int | None = None) -> None:
        """List ``child`` among ``parent``'s children (on its thread ``thread``)."""
        path = self.root / "proc" / str(parent) / "task" / str(thread or parent) / "children"
        path.write_text(path.read_text() + f"{child} ")

    def orphan(self, parent: int, child: int, new_parent: int = MAIN) -> None:
        """``parent`` exits: ``child`` moves to ``new_parent`` (the subreaper)."""
        for f in (self.root / "proc" / str(parent) / "task").glob("*/children"):
            f.write_text(" ".join(x for x in f.read_text().split() if x != str(child)))
        self.adopt(new_parent, child)

    def remove(self, pid: int) -> None:
        for f in (self.root / "proc").glob("*/task/*/children"):
            f.write_text(" ".join(x for x in f.read_text().split() if x != str(pid)))
        for f in sorted((self.root / "proc" / str(pid)).rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        (self.root / "proc" / str(pid)).rmdir()


def worker(tmp_path: Path) -> FakeProc:
    """A main process with two pool processes (11, 12), each with a watcher thread."""
    fp = FakeProc(tmp_path)
    fp.add(MAIN, 1, rss=80 * MiB, start=10, threads=3)
    fp.add(11, MAIN, rss=50 * MiB, private=20 * MiB, start=20, threads=2)
    fp.add(12, MAIN, rss=50 * MiB, private=20 * MiB, start=21, threads=2)
    return fp


def test_descendants_on_any_thread_and_at_any_depth_belong_to_their_pool_process(tmp_path: Path) -> None:
    fp = worker(tmp_path)
    fp.add(200, 11, rss=300 * MiB, private=296 * MiB, start=50)  # an encoder the task runs
    fp.add(201, 200, rss=40 * MiB, start=51)  # its own helper
    fp.add(300, 12, start=60)
    fp.adopt(12, 300, thread=13)  # started from the task's second thread
    (tmp_path / "proc/12/task/12/children").write_text("")
    trees = TreeTracker(ProcFS(tmp_path), MAIN).scan([11, 12])
    assert sorted(trees.members[11]) == [200, 201] and trees.members[12] == [300]
    assert trees.strays == {} and trees.zombies == []


def test_a_double_forked_descendant_keeps_its_owner_once_seen(tmp_path: Path) -> None:
    fp = worker(tmp_path)
    fp.add(200, 11, start=50)
    fp.add(201, 200, start=51)
    tracker = TreeTracker(ProcFS(tmp_path), MAIN)
    tracker.scan([11, 12])
    # the intermediate exits: its child is reparented to the main process (the subreaper)
    fp.orphan(200, 201)
    fp.remove(200)
    trees = tracker.scan([11, 12])
    assert trees.members[11] == [201]
    assert tracker.tree_now(11) == [201]
    # the pool process is killed: what it had turns up as a stray of pid 11
    fp.remove(11)
    trees = tracker.scan([12])
    assert trees.strays == {201: 11}


def test_an_unseen_orphan_is_attributed_by_its_marker_only_to_a_pool_process_older_than_it(tmp_path: Path) -> None:
    fp = worker(tmp_path)
    tracker = TreeTracker(ProcFS(tmp_path), MAIN)
    tracker.scan([11, 12])
    fp.add(400, MAIN, start=70, env={"PATH": "/bin", TREE_ENV: "11"})  # daemonized between two scans
    fp.add(401, MAIN, start=71, env={TREE_ENV: "12"})
    fp.add(402, MAIN, start=5, env={TREE_ENV: "12"})  # older than pool process 12: a reused pid
    fp.add(403, MAIN, start=72)  # no marker: a multiprocessing fork that daemonized
    trees = tracker.scan([11, 12])
    assert trees.members == {11: [400], 12: [401]}
    assert trees.strays == {402: 0, 403: 0}


def test_ended_children_of_the_main_process_are_zombies_to_reap_but_pool_processes_never(tmp_path: Path) -> None:
    fp = worker(tmp_path)
    fp.add(500, MAIN, start=80, state="Z")
    fp.add(13, MAIN, start=81, state="Z")  # a pool process that died: the pool reaps it
    trees = TreeTracker(ProcFS(tmp_path), MAIN).scan([11, 12, 13])
    assert trees.zombies == [500]


def test_the_meter_counts_each_tree_without_shared_pages(tmp_path: Path) -> None:
    fp = worker(tmp_path)
    fp.add(200, 11, rss=300 * MiB, private=296 * MiB, start=50)
    fp.add(201, 200, rss=60 * MiB, private=10 * MiB, start=51)  # forked without exec: shares pages
    fp.add(600, MAIN, rss=30 * MiB, start=90)  # a stray of unknown owner
    meter = ProcessTreeMeter(MAIN, uss_interval_s=10, proc_root=tmp_path)
    r = meter.sample([11, 12])
    assert r.descendants == {11: {200: 296 * MiB, 201: 10 * MiB}}
    assert r.children == {11: 20 * MiB + 306 * MiB, 12: 20 * MiB}
    assert r.rss[11] == 50 * MiB and r.tree_bytes(11) == 306 * MiB and r.tree_bytes(12) == 0
    assert r.strays == {600: 30 * MiB} and r.stray_owner == {600: 0}
    assert r.worker_bytes == 80 * MiB + 326 * MiB + 20 * MiB + 30 * MiB
    # a descendant that ends is dropped, and what was kept open for it closed
    fp.remove(201)
    r = meter.sample([11, 12])
    assert r.descendants == {11: {200: 296 * MiB}} and 201 not in meter.fs.kept()


def test_a_real_subprocess_of_a_child_counts_in_the_childs_tree() -> None:
    # Given a forked child (a pool process) running a subprocess that holds 120 MiB
    code = "import time; b = b'\\1' * (120 << 20); print('ready', flush=True); time.sleep(60)"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
            assert proc.stdout is not None
            proc.stdout.readline()
            os.write(write, f"{proc.pid}\n".encode())
            proc.wait()
        finally:
            os._exit(0)
    os.close(write)
    try:
        sub = int(os.read(read, 64))
        # When the meter samples the child
        reading = ProcessTreeMeter(os.getpid(), uss_interval_s=0).sample([pid])
        # Then the subprocess's memory is part of the child's tree
        assert list(reading.descendants[pid]) == [sub]
        assert reading.descendants[pid][sub] > 110 * MiB
        assert reading.children[pid] > 110 * MiB
    finally:
        os.close(read)
        for p in (locals().get("sub"), pid):
            if p:
                try:
                    os.kill(p, 9)
                except ProcessLookupError:
                    pass
        os.waitpid(pid, 0)
        time.sleep(0)
