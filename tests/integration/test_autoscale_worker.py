"""rmq's autoscaler on real workers (``--autoscale=MAX,MIN``) on real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psutil
import pytest

from rmq.testing.worker import wait_until

from .conftest import ROOT, TESTS_DIR, taskapp_env

if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

import scaleapp  # noqa: E402,F401  (registers the scale.* tasks)

from workers.app import make_app  # noqa: E402

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _uss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_full_info().uss
    except psutil.Error:
        return 0


def _procs(w) -> list[int]:
    """Live pool processes (an ended one stays a zombie for a moment)."""
    return [p for p in w.pool_pids() if _alive(p)]


@pytest.fixture
def scale(redis_url, unique, start_worker):
    """Start a ``-A scaleapp`` worker with ``--autoscale`` on its own queue; returns (client, worker)."""
    queue = f"scale.{unique}"
    client = make_app(broker=redis_url, backend=redis_url, queue=queue)

    def start(autoscale: str, extra: tuple[str, ...] = (), **rmq: object):
        env = {**taskapp_env(redis_url, memory_budget="1GiB", **rmq), "RMQ_APP_QUEUE": queue}
        low = int(autoscale.split(",")[1])
        return start_worker(client, app="scaleapp", env=env, queues=[queue], concurrency=max(1, low),
                            extra_args=[f"--autoscale={autoscale}", *extra])

    yield client, start
    client.close()


def _stats(client, w) -> dict:
    return client.control.inspect(destination=[w.node_name], timeout=3).stats()[w.node_name]


class _PoolSampler:
    """Counts the live pool processes every 100 ms, and notes when each one went (epoch)."""

    def __init__(self, w) -> None:
        self.w, self.peak, self.samples = w, 0, []
        self.seen: set[int] = set()
        self.gone_at: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            live = set(_procs(self.w))
            now = time.time()
            for pid in self.seen - live:
                self.gone_at.setdefault(pid, now)
            self.seen |= live
            self.samples.append(len(live))
            self.peak = max(self.peak, len(live))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)


def test_a_burst_grows_the_pool_to_max_and_back_to_min_after_the_keepalive(scale):
    client, start = scale
    w = start("6,1", autoscale_keepalive="3s")
    assert len(_procs(w)) == 1

    with _PoolSampler(w) as sampler:
        # When a burst of 40 light tasks arrives
        results = [client.tasks["scale.light"].delay(0.75) for _ in range(40)]
        done = [r.get(timeout=90) for r in results]
        # Then the pool grew to MAX and never beyond, and every task ran
        assert len(done) == 40
        assert sampler.peak == 6, sampler.samples
        assert len({d["pid"] for d in done}) == 6
        # And it goes back to MIN once the processes sat idle for the keep-alive, not before
        wait_until(lambda: len(_procs(w)) == 1, 20, interval=0.1, what="the pool back at 1")
        time.sleep(0.2)  # one more sample of the sampler
    last_end: dict[int, float] = {}
    for d in done:
        last_end[d["pid"]] = max(last_end.get(d["pid"], 0.0), d["ended"])
    assert len(sampler.gone_at) == 5
    stats = _stats(client, w)
    ended = {pid: c["time"] for c in stats["autoscaler"]["changes"] if c["action"] == "shrink" for pid in c["pids"]}
    assert set(ended) == set(sampler.gone_at)
    for pid, at in ended.items():
        assert at - last_end[pid] >= 3.0, (pid, at - last_end[pid])
    for view in (stats["autoscaler"], stats["rmq"]["autoscaler"]):  # inspect stats, and the rmq snapshot
        assert (view["max"], view["min"], view["current"]) == (6, 1, 1)
        assert view["last_change"]["action"] == "shrink"
        assert "idle for 3s" in view["last_change"]["reason"]
        assert view["grown"] == 5 and view["shrunk"] == 5


def test_heavy_declarations_cap_growth_while_light_work_still_gets_processes(scale):
    client, start = scale
    # 300 MiB declarations under a 1 GiB budget (admit line 870 MiB): two fit beside an idle worker
    # (a prefetch of 4 per process lets the worker see light work behind the heavy backlog)
    w = start("6,1", extra=("--prefetch-multiplier=4",), autoscale_keepalive="30s", admission_wait="0.5s",
              defer_countdown="1s")
    heavy = [client.tasks["scale.heavy"].delay(3.0, 280) for _ in range(6)]  # honest: learned ~ declared
    wait_until(lambda: len(_procs(w)) >= 2, 15, what="a second process for the second heavy task")
    with _PoolSampler(w) as sampler:
        wait_until(lambda: _stats(client, w)["autoscaler"]["backlog"] >= 3, 10, what="heavy backlog")
        time.sleep(2.0)  # a few autoscaler ticks with heavy work waiting: the pool must stay at 2
    assert sampler.peak == 2, sampler.samples
    reason = _stats(client, w)["autoscaler"]["reason"]
    assert "no room under the admit line" in reason, reason

    # When light work arrives behind the heavy backlog, it still gets processes
    with _PoolSampler(w) as sampler:
        light = [client.tasks["scale.light"].delay(0.5) for _ in range(20)]
        light_done = [r.get(timeout=90) for r in light]
    assert sampler.peak > 2, sampler.samples
    heavy_done = [r.get(timeout=120) for r in heavy]
    events = sorted([(d["started"], 1) for d in heavy_done] + [(d["ended"], -1) for d in heavy_done])
    running = overlap = 0
    for _, delta in events:
        running += delta
        overlap = max(overlap, running)
    assert overlap <= 2 and len(light_done) == 20


def test_the_pause_zone_ends_idle_model_holders_first_and_their_memory_leaves(scale):
    client, start = scale
    # Unload and pause at 80 %; the unload target just below, so the unload rung frees one model
    # per process and the holder still holds the other when the pause begins. Resume well below:
    # the one model unloaded (120 MiB, 12 % of the budget) must not end the pause before the
    # autoscaler's next look.
    w = start("4,2", autoscale_keepalive="60s", unload_ratio=0.80, unload_target_ratio=0.79,
              pause_ratio=0.80, resume_ratio=0.55)
    burst = [client.tasks["scale.light"].delay(1.0) for _ in range(8)]
    wait_until(lambda: len(_procs(w)) == 4, 20, what="the pool at 4")
    [r.get(timeout=30) for r in burst]

    # Given one idle process holding two unpinned 120 MiB models, and a task that presses the
    # worker into the pause zone from another process
    loading = client.tasks["scale.load_models"].delay(["scale.model_a", "scale.model_b"], 2.0)
    wait_until(lambda: loading.state == "STARTED", 15, what="the model loads to start")
    press = client.tasks["scale.press"].delay(0.80, 5.0, 2.5)
    holder = loading.get(timeout=30)["pid"]
    before = {pid: _uss(pid) for pid in _procs(w)}  # sampled from outside
    assert before[holder] >= 230 * MiB, before[holder] / MiB

    # When the worker enters the pause zone
    wait_until(lambda: not _alive(holder) and len(_procs(w)) == 2, 20, what="idle processes ended down to MIN")
    after = {pid: _uss(pid) for pid in _procs(w)}
    press_pid = press.get(timeout=60)["pid"]

    # Then the holder went first (still holding a model), and the pool stopped at MIN, the busy one kept
    change = _stats(client, w)["autoscaler"]["last_change"]
    assert change["action"] == "shrink" and "pause zone" in change["reason"], change
    assert change["pids"][0] == holder and change["count"] == 2, change
    assert len(after) == 2 and press_pid in after
    # and the memory of the ended processes left the worker: the pool besides the pressing task
    # holds at least the holder's whole footprint (models included) less than before
    rest_before = sum(v for pid, v in before.items() if pid != press_pid)
    rest_after = sum(v for pid, v in after.items() if pid != press_pid)
    assert rest_before - rest_after >= 0.9 * before[holder], (rest_before / MiB, rest_after / MiB)


# "a,b", "abc" and "1,2,3" fail in Celery's own option parsing before the worker exists (a
# traceback or a usage message): rmq.install() checks the command line first.
BAD_CELERY = ["6,-1", "-1", "0", "a,b", "abc", "1,2,3"]


def _bad_value_run(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.Popen(argv, env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()  # a worker that started anyway: stop it by PID
        proc.communicate(timeout=10)
        pytest.fail(f"{argv} did not exit")
    return proc.returncode, out + err


def _assert_one_clear_line(code: int, output: str, value: str) -> None:
    lines = [line for line in output.splitlines() if line.startswith("rmq:")]
    assert code == 2, output
    assert "Traceback" not in output, output
    assert len(lines) == 1 and "--autoscale" in lines[0] and repr(value) in lines[0], output


@pytest.mark.parametrize("value", BAD_CELERY)
def test_bad_autoscale_values_stop_celery_worker_with_status_2_and_one_line(redis_url, value):
    env = {**taskapp_env(redis_url), "RMQ_APP_QUEUE": "scale.bad"}
    code, output = _bad_value_run(
        [sys.executable, "-m", "celery", "-A", "scaleapp", "worker", f"--autoscale={value}", "-l", "WARNING",
         "--without-mingle", "--without-gossip"], env)
    _assert_one_clear_line(code, output, value)


@pytest.mark.parametrize("value", ["6,-1", "a,b", "0", "1,2,3"])
def test_bad_autoscale_values_stop_rmq_worker_with_status_2_and_one_line(redis_url, value):
    env = {**taskapp_env(redis_url)}
    code, output = _bad_value_run(
        [sys.executable, "-m", "rmq.cli", "worker", "-A", "scaleapp", f"--autoscale={value}", "--dry-run"], env)
    _assert_one_clear_line(code, output, value)


def test_autoscale_min_first_is_accepted_as_celery_accepts_it(redis_url, test_app, start_worker):
    # Celery sorts 1,6 into 6,1; rmq used to refuse it
    code, output = _bad_value_run(
        [sys.executable, "-m", "rmq.cli", "worker", "-A", "scaleapp", "--autoscale=1,6", "--dry-run"],
        taskapp_env(redis_url))
    assert code == 0 and "--autoscale=1,6" in output, output
    w = start_worker(test_app, app="scaleapp", env={**taskapp_env(redis_url), "RMQ_APP_QUEUE": "scale.sorted"},
                     concurrency=1, extra_args=["--autoscale=1,6"])
    stats = test_app.control.inspect(destination=[w.node_name], timeout=5).stats()[w.node_name]
    assert stats["autoscaler"]["max"] == 6 and stats["autoscaler"]["min"] == 1, stats.get("autoscaler")
