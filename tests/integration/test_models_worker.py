"""The model cache inside a real worker, bad input included (docs/guarantees.md#r4).

One worker, two pool processes, three 400 MiB synthetic models (one pinned) and a 1.3 GiB
budget: models are admitted up to the unload line (0.80 x budget = 1065 MiB), where two of them
fit beside the idle worker (~100-150 MiB) and two running tasks' declarations, and three never
do. (At 1.2 GiB the unload line, 983 MiB, sits within the idle worker's run-to-run spread of two
models plus two tasks, so whether the second model fits would depend on the run.)

Tasks are sent one at a time; a task lands on a chosen pool process because the test keeps the
other one busy (Celery's fair scheduling only hands work to an idle process). Memory is sampled
from outside (USS of each pool process, psutil); what each process holds comes from the tasks'
own reports and the per-process ``models`` gauges in ``inspect stats``.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import pytest
import redis as redis_lib

from rmq.core.errors import ModelLoadError, ModelNotRegistered
from rmq.testing.worker import WorkerProcess, wait_until

from .conftest import TESTS_DIR, taskapp_env

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
MODEL = 400 * MiB
BUDGET = "1.3GiB"
P, A, B = "mt.pinned", "mt.alpha", "mt.beta"


def uss(pid: int) -> int:
    """A pool process's unique set size, read from outside."""
    return int(psutil.Process(pid).memory_full_info().uss)


class Bench:
    """A worker of ``modelapp`` and the means to put tasks on one of its two pool processes."""

    def __init__(self, app: Any, worker: WorkerProcess, redis_url: str) -> None:
        self.app = app
        self.w = worker
        self.r = redis_lib.Redis.from_url(redis_url)
        self.pids = sorted(worker.pool_pids())
        self.trace: list[str] = []

    # readings ------------------------------------------------------------------------
    def stats(self) -> dict:
        replies = self.app.control.inspect(destination=[self.w.node_name], timeout=3).stats() or {}
        return replies[self.w.node_name]["rmq"]

    def inspect_rmq(self) -> dict:
        """What ``celery inspect rmq`` shows for this worker."""
        replies = self.app.control.broadcast("rmq", destination=[self.w.node_name], reply=True, timeout=3)
        return next(r[self.w.node_name] for r in replies if self.w.node_name in r)

    def holdings(self) -> dict[int, list[str]]:
        """Models each pool process holds, LRU first, from the ``processes.<pid>.models`` gauges."""
        procs = self.stats()["processes"]
        return {pid: [m["name"] for m in procs.get(str(pid), {}).get("models", [])] for pid in self.pids}

    def wait_holdings(self, expected: dict[int, list[str]], timeout: float = 10) -> dict[int, list[str]]:
        def check() -> dict[int, list[str]] | None:
            got = self.holdings()
            return got if all(sorted(got[p]) == sorted(v) for p, v in expected.items()) else None

        try:
            return wait_until(check, timeout, interval=0.2, what=f"holdings {expected}")
        except TimeoutError:
            raise AssertionError(f"holdings {self.holdings()} never became {expected}; {self.diag()}") from None

    def diag(self) -> str:
        """The worker's and the governor's view, for failure messages."""
        from rmq.monitoring.queues import redis_queue_depth

        st = self.stats()
        insp = self.app.control.inspect(destination=[self.w.node_name], timeout=3)
        return (
            f"queue depth {redis_queue_depth(self.r, 'celery')}, unacked {self.r.hlen('unacked')}, "
            f"reserved {insp.reserved()}, scheduled {insp.scheduled()}, "
            f"paused {st['paused']}, memory {st['memory']}, counters {st['counters']}, "
            f"reservations {st['reservations']}, processes {st['processes']}, USS {self.uss()}"
        )

    def uss(self) -> dict[int, int]:
        return {pid: uss(pid) for pid in self.pids}

    # steering ---------------------------------------------------------------------------
    def _started_pid(self, key: str, timeout: float = 30) -> int:
        try:
            raw = wait_until(lambda: self.r.get(f"{key}:pid"), timeout, what=f"{key} to start")
        except TimeoutError:
            active = self.app.control.inspect(destination=[self.w.node_name], timeout=3).active()
            raise AssertionError(f"{key} never started; active {active}; {self.diag()}") from None
        return int(raw)

    def release(self, key: str) -> None:
        self.r.set(f"{key}:go", 1, ex=300)

    def occupy_all_but(self, target: int) -> tuple[str, Any]:
        """Keep the other pool process busy with a blocker; returns (key, result) to release it."""
        assert target in self.pids, (target, self.pids)
        on_target: list[tuple[str, Any]] = []
        while True:
            key = f"blk-{uuid.uuid4().hex[:8]}"
            res = self.app.tasks["mt.block"].delay(key)
            pid = self._started_pid(key)
            if pid != target:
                break
            on_target.append((key, res))  # landed on the target: the next blocker goes to the other
            assert len(on_target) < 2, "a blocker landed twice on the same busy process"
        for k, r in on_target:
            self.release(k)
            r.get(timeout=30)
        return key, res

    def start_on(self, target: int, name: str, *args: Any, others_busy: bool = False, **kwargs: Any) -> Any:
        """Send ``name`` so that it runs in pool process ``target``; returns its AsyncResult.

        ``others_busy``: the other process already runs a task that waits for the test.
        """
        if others_busy:
            return self.app.tasks[name].apply_async(args, kwargs)
        key, blocker = self.occupy_all_but(target)
        res = self.app.tasks[name].apply_async(args, kwargs)
        hold = kwargs.get("hold")
        if hold:
            assert self._started_pid(hold) == target
        else:
            try:
                wait_until(lambda: res.state != "PENDING", 60, interval=0.05, what=f"{name} to start")
            except TimeoutError:
                raise AssertionError(f"{name}{args} never started; {self.diag()}") from None
        self.release(key)
        assert blocker.get(timeout=30) != target
        return res

    def run_on(self, target: int, name: str, *args: Any, **kwargs: Any) -> dict:
        res = self.start_on(target, name, *args, **kwargs)
        out = res.get(timeout=90)
        assert out["pid"] == target, (out, target)
        return out

    def note(self, line: str) -> None:
        self.trace.append(line)


def names(out: dict) -> list[str]:
    return [m["name"] for m in out["held"]]


@contextmanager
def log_on_failure(w: WorkerProcess) -> Iterator[None]:
    """Print the worker's log if the block fails (the file is deleted when the test ends)."""
    try:
        yield
    except BaseException:
        print(f"\n----- worker log ({w.node_name}) -----\n{w.log()[-30000:]}")
        raise


@pytest.fixture
def model_app(redis_url):
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import modelapp  # noqa: F401  (registers the tasks and models)

    from workers.app import make_app

    app = make_app(broker=redis_url, backend=redis_url)
    yield app
    app.close()


def test_pressure_unloads_lru_unpinned_models_everywhere_and_never_leased_ones(redis_url, model_app, start_worker):
    w = start_worker(
        model_app, app="modelapp", concurrency=2,
        # a governor reading every 100 ms: mt.pressure grows 8 MiB per reading (~18 of them)
        env=taskapp_env(redis_url, memory_budget=BUDGET, model_load_wait="1500ms", defer_countdown="1s",
                        monitor_interval="100ms"),
    )  # fmt: skip
    bench = Bench(model_app, w, redis_url)
    with log_on_failure(w):
        _scenario(bench)


def _scenario(bench: Bench) -> None:
    assert len(bench.pids) == 2
    x, y = bench.pids
    wait_until(lambda: bench.stats()["memory"]["idle_bytes"] > 0, 10, what="an idle reading")
    mem = bench.stats()["memory"]
    budget, idle = mem["budget_bytes"], mem["idle_bytes"]
    model_line = 0.80 * budget  # models are admitted up to the unload line
    # Given: two models and two tasks fit beside the idle worker under the unload line; three never do
    assert idle + 2 * MODEL + 2 * 32 * MiB < model_line - 32 * MiB, mem
    assert idle + 3 * MODEL > model_line, mem
    print(f"\nbudget {budget / MiB:.0f} MiB, idle worker {idle / MiB:.0f} MiB, pool processes x={x} y={y}")

    # 1. x uses alpha, then y uses beta: alpha is the worker's least recently used model
    assert names(bench.run_on(x, "mt.infer", A)) == [A]
    assert names(bench.run_on(y, "mt.infer", B)) == [B]
    bench.wait_holdings({x: [A], y: [B]})

    # 2. a task in y pushes the worker past the unload line: idle x unloads alpha; beta, used
    #    more recently, stays in y (the freed 400 MiB take the worker below the unload target)
    before, requests0 = bench.uss(), bench.stats()["counters"]["unload_requests"]
    out = bench.run_on(y, "mt.pressure", 0.81)
    bench.wait_holdings({x: [], y: [B]})
    after = bench.uss()
    assert bench.stats()["counters"]["unload_requests"] > requests0
    bench.note(f"2. pressure (y grew {out['grown_mib']} MiB, worker at {out['worker_bytes'] / budget:.0%}): idle x "
               f"unloaded {A} (LRU), USS {before[x] / MiB:.0f} -> {after[x] / MiB:.0f} MiB; y kept {B}")
    assert before[x] - after[x] >= 0.9 * MODEL
    assert names(out) == [B] and "unloaded model 'mt.beta'" not in bench.w.log()

    # 3. x loads the pinned model beside y's beta
    assert names(bench.run_on(x, "mt.infer", P)) == [P]
    # 4. alpha does not fit in y: y unloads its own beta, which is enough: nobody else is asked
    before, requests0 = bench.uss(), bench.stats()["counters"]["unload_requests"]
    assert names(bench.run_on(y, "mt.infer", A)) == [A]
    bench.wait_holdings({x: [P], y: [A]})
    after = bench.uss()
    assert bench.stats()["counters"]["unload_requests"] == requests0
    assert abs(after[x] - before[x]) < 0.1 * MODEL
    bench.note(f"4. load {A} in y: y unloaded its own {B} and loaded {A} (USS {before[y] / MiB:.0f} -> "
               f"{after[y] / MiB:.0f} MiB); x with pinned {P}: {before[x] / MiB:.0f} -> {after[x] / MiB:.0f} MiB")

    # 5. beta does not fit in x, which holds only the pinned model: idle y is asked, unloads alpha
    before = bench.uss()
    assert names(bench.run_on(x, "mt.infer", B)) == [P, B]
    bench.wait_holdings({x: [P, B], y: []})
    after = bench.uss()
    bench.note(f"5. load {B} in x: idle y asked, unloaded {A}, USS {before[y] / MiB:.0f} -> {after[y] / MiB:.0f} MiB")
    assert before[y] - after[y] >= 0.9 * MODEL

    # 6. pressure while x's own task leases beta: neither the pinned nor the leased model goes ...
    hold, then = f"hold-{uuid.uuid4().hex[:8]}", f"then-{uuid.uuid4().hex[:8]}"
    requests0 = bench.stats()["counters"]["unload_requests"]
    res = bench.start_on(x, "mt.pressure", 0.81, hold=hold, lease=B, then_hold=then)
    wait_until(lambda: bench.stats()["counters"]["unload_requests"] >= requests0 + 2, 20,
               what="two unload requests while beta is leased")  # fmt: skip
    leased = {m["name"]: m["leased"] for m in bench.inspect_rmq()["processes"][str(x)]["models"]}
    assert leased == {P: False, B: True}, bench.diag()
    # ... and once the lease ends (the memory still held), the next pressure round takes beta
    bench.release(hold)
    bench.wait_holdings({x: [P], y: []})
    bench.release(then)
    out = res.get(timeout=60)
    assert names(out) == [P, B] and [m["name"] for m in out["after"]] == [P], out
    bench.note(f"6. pressure (x grew {out['grown_mib']} MiB) while x leased {B}: kept {names(out)} through "
               f"{bench.stats()['counters']['unload_requests'] - requests0} unload signals; lease over -> "
               f"{[m['name'] for m in out['after']]}")

    # 7. a load that cannot fit while the only unpinned model is leased elsewhere is deferred;
    #    it succeeds once the lease ends (x still busy: its watcher thread does the unloading)
    hold, busy = f"hold-{uuid.uuid4().hex[:8]}", f"busy-{uuid.uuid4().hex[:8]}"
    held = bench.start_on(x, "mt.infer", B, hold=hold, then_hold=busy)
    deferred0 = bench.stats()["counters"]["deferred"].get("model_memory", 0)
    waiting = bench.start_on(y, "mt.infer", A, others_busy=True)
    wait_until(lambda: bench.stats()["counters"]["deferred"].get("model_memory", 0) > deferred0, 30,
               what="the alpha load to be deferred")  # fmt: skip
    assert sorted(bench.holdings()[x]) == sorted([P, B])
    bench.release(hold)
    out = waiting.get(timeout=60)
    assert out["pid"] == y and names(out) == [A], out
    bench.release(busy)
    out = held.get(timeout=60)
    assert {m["name"]: m["loads"] for m in out["held"]} == {P: 1, B: 2}, out
    assert [m["name"] for m in out["after"]] == [P], out
    bench.wait_holdings({x: [P], y: [A]})
    stats = bench.stats()
    deferred = stats["counters"]["deferred"].get("model_memory", 0) - deferred0
    bench.note(f"7. load {A} in y while x leased {B}: deferred {deferred}x, loaded once the lease ended")

    # Then the counters say what happened: 7 loads, 5 evictions (1 by admission, 4 by pressure)
    counters = stats["counters"]["models"]
    bench.note(f"counters: {counters}")
    print("\n".join(bench.trace))
    assert counters["loads"] == 7 and counters.get("load_errors", 0) == 0, counters
    assert counters["evictions"] == {"admission": 1, "pressure": 4}, counters
    assert counters["hits"] == 1  # step 6 leased the resident beta
    assert counters["denied"] == deferred >= 1
    assert counters["misses"] == 7 + deferred
    assert counters["bytes_loaded"] == 7 * MODEL and counters["bytes_unloaded"] == 5 * MODEL
    assert "unloaded model 'mt.pinned'" not in bench.w.log()
    gauges = stats["processes"]
    assert [(m["name"], m["loads"]) for m in gauges[str(x)]["models"]] == [(P, 1)]
    assert [(m["name"], m["loads"]) for m in gauges[str(y)]["models"]] == [(A, 2)]  # steps 4 and 7


def test_unknown_model_and_failing_loader_fail_the_task_and_the_worker_keeps_serving(
    redis_url, model_app, start_worker
):
    # the bad-input rows of the model cache (docs/guarantees.md#r4), in a real worker
    # (one pool process: the same cache throughout)
    w = start_worker(model_app, app="modelapp", concurrency=1, env=taskapp_env(redis_url, memory_budget="1GiB"))
    with log_on_failure(w):
        res = model_app.tasks["mt.get_unknown"].delay()
        with pytest.raises(ModelNotRegistered) as err:
            res.get(timeout=30)
        assert err.value.name == "nope" and str(err.value) == "model 'nope' is not registered"

        res = model_app.tasks["mt.use_broken"].delay()
        with pytest.raises(ModelLoadError) as err:
            res.get(timeout=30)
        assert "loading model 'mt.broken' failed: FileNotFoundError" in str(err.value)
        tb = res.traceback or ""
        assert "FileNotFoundError: weights not found: /nonexistent/mt.broken.bin" in tb, tb
        assert "The above exception was the direct cause of the following exception" in tb, tb

        # the cache is still consistent: a good model loads, the broken one fails the same way again
        out = model_app.tasks["mt.infer"].delay("mt.small").get(timeout=30)
        assert names(out) == ["mt.small"] and out["synthetic"] is True
        with pytest.raises(ModelLoadError):
            model_app.tasks["mt.use_broken"].delay().get(timeout=30)
        assert model_app.tasks["mt.infer"].delay("mt.small").get(timeout=30)["pid"] == out["pid"]

        # a model that could never fit beside an idle worker fails at once instead of deferring
        res = model_app.tasks["mt.infer"].delay("mt.huge")
        with pytest.raises(ModelLoadError) as err:
            res.get(timeout=30)
        assert "cannot load 'mt.huge': it needs 4.0GiB but an idle worker leaves room for" in str(err.value)

        def snapshot() -> dict:
            return model_app.control.inspect(destination=[w.node_name], timeout=3).stats()[w.node_name]["rmq"]

        # counters reach the governor within a second (pool processes flush them periodically)
        expected = {"misses": 4, "loads": 1, "hits": 1, "load_errors": 2}
        wait_until(lambda: {k: snapshot()["counters"].get("models", {}).get(k) for k in expected} == expected, 10,
                   what=f"model counters {expected}")  # fmt: skip
        snap = snapshot()
        assert not snap["counters"]["deferred"], snap["counters"]
        assert [r["task_name"] for r in snap["reservations"]] == ["model:mt.small"]  # none left by failures
