"""Model cache policy (docs/design.md#models) with fake memory readings, a fake clock and fake reservers."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import types
import weakref

import pytest

from rmq import models
from rmq.core import runtime as rt_mod
from rmq.core.errors import ConfigError, Defer, ModelLoadError, ModelNotRegistered
from rmq.core.procstats import ProcessStats
from rmq.memory import trim as memtrim
from rmq.models import ModelCache, Registry
from rmq.testing.synthetic_models import SyntheticModel, synthetic_loader

MiB = 2**20


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def tick(self, s: float = 1.0) -> None:
        self.t += s


class Memory:
    """A fake process-memory reading that loaders grow."""

    def __init__(self) -> None:
        self.bytes = 100 * MiB

    def __call__(self) -> int:
        return self.bytes


class Model:
    def __init__(self, name: str) -> None:
        self.name = name
        self.unloaded = False

    def unload(self) -> None:
        self.unloaded = True


class Env:
    """A registry, a cache on fake readings, and a log of loads and unloads."""

    def __init__(self, **cache_kw) -> None:
        self.registry = Registry()
        self.clock = Clock()
        self.memory = Memory()
        self.events: list[str] = []
        self.load_calls: dict[str, int] = {}
        cache_kw.setdefault("trim", False)
        self.cache = ModelCache(self.registry, memory_probe=self.memory, clock=self.clock, **cache_kw)

    def add(self, name: str, size: object = None, grows: int = 0, **kw) -> None:
        def load() -> Model:
            self.load_calls[name] = self.load_calls.get(name, 0) + 1
            self.events.append(f"load {name}")
            self.memory.bytes += grows
            return Model(name)

        def unload(model: Model) -> None:
            self.events.append(f"unload {name}")
            model.unload()

        kw.setdefault("unload", unload)
        self.registry.register(name, size=size, loader=load, **kw)

    def get(self, name: str):
        self.clock.tick()
        return self.cache.get(name)


class RecordingReserver:
    def __init__(self, answers: list[bool] | None = None) -> None:
        self.answers = list(answers or [])
        self.calls: list[tuple[str, int, float]] = []
        self.released: list[str] = []

    def reserve(self, key: str, size_bytes: int, timeout_s: float) -> bool:
        self.calls.append((key, size_bytes, timeout_s))
        return self.answers.pop(0) if self.answers else True

    def release(self, key: str) -> None:
        self.released.append(key)


# -- registration ---------------------------------------------------------------------------


def test_register_as_decorator_and_call_validates_and_does_nothing_else():
    reg = Registry()
    threads = threading.active_count()
    calls = []

    @reg.register("whisper_base", size="1.5GiB", pinned=True)
    def load_whisper():
        calls.append(1)

    assert load_whisper.__name__ == "load_whisper"  # the decorator returns the loader
    spec = reg.get("whisper_base")
    assert (spec.size_bytes, spec.pinned, spec.loader) == (int(1.5 * 2**30), True, load_whisper)
    assert reg.register("other", loader=load_whisper) is load_whisper
    assert reg.get("other").size_bytes is None
    assert calls == [] and threading.active_count() == threads


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"name": "m", "size": "lots"}, ["size", "'lots'"]),
        ({"name": "m", "size": -1}, ["size", "-1"]),
        ({"name": "m", "size": 0}, ["size", "0"]),
        ({"name": "", "size": None}, ["name", "''"]),
        ({"name": 3, "size": None}, ["name", "3"]),
        ({"name": "m", "pinned": "yes"}, ["pinned", "'yes'"]),
        ({"name": "m", "unload": "close"}, ["unload", "'close'"]),
        ({"name": "m", "loader": 42}, ["loader", "42"]),
    ],
)
def test_register_refuses_bad_arguments_naming_them(kwargs, words):
    reg = Registry()
    kwargs = {"loader": lambda: None, **kwargs}
    with pytest.raises(ConfigError) as err:
        reg.register(**kwargs)
    for word in words:
        assert word in str(err.value)
    assert reg.names() == []


def test_register_duplicate_name_refused_unless_same_loader_or_module_reload():
    reg = Registry()

    def load():
        return 1

    reg.register("m", loader=load)
    reg.register("m", loader=load)  # same loader: fine

    def reloaded():  # a module reload re-creates the function: same module and qualname
        return 2

    reloaded.__qualname__ = load.__qualname__
    reg.register("m", size="1MiB", loader=reloaded)
    assert reg.get("m").loader is reloaded and reg.get("m").size_bytes == MiB

    def other():
        return 3

    with pytest.raises(ConfigError, match="already registered"):
        reg.register("m", loader=other)
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("lam", loader=lambda: 1)
        reg.register("lam", loader=lambda: 2)


def test_unknown_name_raises_model_not_registered():
    env = Env()
    with pytest.raises(ModelNotRegistered, match="'nope' is not registered"):
        env.cache.get("nope")
    with pytest.raises(ModelNotRegistered), env.cache.use("nope"):
        pass
    assert env.cache.snapshot() == []


# -- loading, hits, sizes -------------------------------------------------------------------


def test_get_loads_once_then_hits_and_snapshot_reports_it():
    env = Env()
    env.add("a", size="10MiB", pinned=True)
    first = env.get("a")
    assert env.get("a") is first
    assert env.load_calls == {"a": 1}
    assert (env.cache.counters["misses"], env.cache.counters["hits"], env.cache.counters["loads"]) == (
        1,
        1,
        1,
    )
    [snap] = env.cache.snapshot()
    assert snap == {
        "name": "a",
        "size_bytes": 10 * MiB,
        "size_source": "declared",
        "pinned": True,
        "leased": False,
        "leases": 0,
        "last_used": env.clock.t,
        "loads": 1,
    }


def test_size_declared_wins_else_measured_from_memory_growth():
    env = Env()
    env.add("declared", size="10MiB", grows=50 * MiB)
    env.add("measured", grows=30 * MiB)
    env.get("declared")
    env.get("measured")
    sizes = {m["name"]: (m["size_bytes"], m["size_source"]) for m in env.cache.snapshot()}
    assert sizes == {"declared": (10 * MiB, "declared"), "measured": (30 * MiB, "measured")}
    assert env.cache.held_bytes == 40 * MiB


def test_loader_error_is_chained_nothing_half_registered_and_a_later_get_retries():
    env = Env(reserver=RecordingReserver())
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("weights file missing")
        return Model("flaky")

    env.registry.register("flaky", size="5MiB", loader=flaky)
    with pytest.raises(ModelLoadError, match="'flaky'.*OSError: weights file missing") as err:
        env.cache.get("flaky")
    assert isinstance(err.value.__cause__, OSError)
    assert "flaky" not in env.cache and env.cache._loading == {}
    assert env.cache.counters["load_errors"] == 1 and env.cache.counters["loads"] == 0
    assert env.cache._reserver.released == ["model:flaky"]  # the reservation did not leak
    assert env.cache.get("flaky").name == "flaky"  # still usable: the next get loads again
    assert len(attempts) == 2


def test_loader_raising_defer_is_passed_through():
    env = Env()

    def load():
        raise Defer("upstream busy", 3.0, kind="rate_limit")

    env.registry.register("d", loader=load)
    with pytest.raises(Defer) as err:
        env.cache.get("d")
    assert err.value.kind == "rate_limit"


# -- eviction -------------------------------------------------------------------------------


def test_relieve_evicts_least_recently_used_first_by_clock():
    env = Env()
    for name in "abc":
        env.add(name, size="10MiB")
        env.get(name)
    env.get("a")  # a is now the most recently used
    assert env.cache.names() == ["b", "c", "a"]
    assert env.cache.relieve(1, "pressure") == 10 * MiB
    assert env.events[-1] == "unload b"
    assert env.cache.relieve(15 * MiB, "pressure") == 20 * MiB
    assert env.events[-2:] == ["unload c", "unload a"]
    assert env.cache.counters["evictions"] == {"pressure": 3}
    assert env.cache.counters["bytes_unloaded"] == 30 * MiB


def test_relieve_amounts_and_skips_pinned_and_leased():
    env = Env()
    env.add("pinned", size="100MiB", pinned=True)
    env.add("leased", size="100MiB")
    env.add("small", size="10MiB")
    env.add("medium", size="20MiB")
    for name in ("pinned", "leased", "small", "medium"):
        env.get(name)
    assert env.cache.relieve(0, "pressure") == 0
    with env.cache.use("leased"):
        assert env.cache.relieve(10**12, "pressure") == 30 * MiB
        assert sorted(env.cache.names()) == ["leased", "pinned"]
        assert env.cache.relieve(10**12, "pressure") == 0
        assert env.cache.evict("leased") is False  # not even explicitly while in use
        assert env.cache.close() == 100 * MiB  # close takes pinned ones, never leased ones
        assert env.cache.names() == ["leased"]
    assert env.cache.relieve(1, "pressure") == 100 * MiB
    assert env.cache.snapshot() == []


def test_lease_counts_and_releases():
    env = Env()
    env.add("m", size="1MiB")
    with env.cache.use("m") as m1, env.cache.use("m") as m2:
        assert m1 is m2
        [snap] = env.cache.snapshot()
        assert snap["leased"] and snap["leases"] == 2
    [snap] = env.cache.snapshot()
    assert not snap["leased"] and snap["leases"] == 0


def test_count_cap_evicts_lru_before_the_new_load():
    env = Env(max_count=2)
    for name in "abc":
        env.add(name, size="1MiB")
    env.get("a")
    env.get("b")
    env.get("c")
    assert env.events == ["load a", "load b", "unload a", "load c"]  # room made before loading
    assert env.cache.names() == ["b", "c"]
    assert env.cache.counters["evictions"] == {"cap": 1}


def test_memory_cap_counts_declared_and_measured_sizes():
    env = Env(max_memory_bytes=100 * MiB)
    env.add("a", size="40MiB")
    env.add("b", grows=40 * MiB)
    env.add("c", size="30MiB")
    env.get("a")
    env.get("b")
    env.get("c")  # 40 + 40 + 30 > 100: a (LRU) goes first
    assert env.cache.names() == ["b", "c"]
    env.get("b")
    env.get("a")  # 30 + 40 + 40 > 100: c goes
    assert env.cache.names() == ["b", "a"]


def test_measured_model_too_big_for_cap_evicts_others_after_load():
    env = Env(max_memory_bytes=100 * MiB)
    env.add("a", size="60MiB")
    env.add("big", grows=80 * MiB)  # unknown size until loaded
    env.get("a")
    env.get("big")
    assert env.events == ["load a", "load big", "unload a"]
    assert env.cache.names() == ["big"]


def test_pinned_models_over_cap_load_anyway_with_a_warning(caplog):
    env = Env(max_count=1, max_memory_bytes=100 * MiB)
    env.add("p1", size="80MiB", pinned=True)
    env.add("p2", size="80MiB", pinned=True)
    env.get("p1")
    with caplog.at_level(logging.WARNING, logger="rmq.models"):
        env.get("p2")
    assert sorted(env.cache.names()) == ["p1", "p2"]
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = record.getMessage()
    assert "rmq_models_max_count (2 > 1)" in message
    assert "rmq_models_max_memory (160.0MiB > 100.0MiB)" in message
    assert "p1 (pinned)" in message


def test_leased_model_kept_over_cap_then_evicted_when_released():
    env = Env(max_count=1)
    env.add("a", size="1MiB")
    env.add("b", size="1MiB")
    with env.cache.use("a"):
        env.get("b")
        assert sorted(env.cache.names()) == ["a", "b"]  # a is in use: both stay
    # releasing the lease counts as a use of a, so b is now the least recently used
    assert env.cache.names() == ["a"]
    assert env.events == ["load a", "load b", "unload b"]


def test_unload_hooks_order_and_references_dropped():
    class Closable:
        closed = False

        def close(self) -> None:
            self.closed = True

    class Plain:
        pass

    reg = Registry()
    hooked: list[object] = []
    reg.register("hook", size=1, loader=lambda: Model("hook"), unload=hooked.append)
    reg.register("own", size=1, loader=lambda: Model("own"))
    reg.register("closable", size=1, loader=Closable)
    reg.register("plain", size=1, loader=Plain)
    cache = ModelCache(reg, trim=False)
    objs = {name: cache.get(name) for name in ("hook", "own", "closable", "plain")}
    refs = {name: weakref.ref(obj) for name, obj in objs.items()}
    assert cache.relieve(1, "pressure") == 1 and cache.names() == ["own", "closable", "plain"]
    assert hooked and hooked[0] is objs["hook"] and not objs["hook"].unloaded  # hook replaces unload()
    cache.close()
    assert objs["own"].unloaded and objs["closable"].closed
    hooked.clear()
    del objs
    gc.collect()
    assert [name for name, ref in refs.items() if ref() is not None] == []


def test_unload_hook_raising_still_drops_the_model(caplog):
    reg = Registry()

    def bad_hook(model):
        raise RuntimeError("boom")

    reg.register("m", size="1MiB", loader=lambda: Model("m"), unload=bad_hook)
    reserver = RecordingReserver()
    cache = ModelCache(reg, trim=False, reserver=reserver)
    cache.get("m")
    with caplog.at_level(logging.WARNING, logger="rmq.models"):
        assert cache.relieve(1, "pressure") == MiB
    assert "m" not in cache and reserver.released == ["model:m"]
    assert "unload hook of model 'm' raised" in caplog.text


def test_unload_trims_only_when_trim_is_on(monkeypatch):
    calls = []
    monkeypatch.setattr(memtrim, "collect_and_trim", lambda: calls.append("trim"))
    for trim in (True, False):
        env = Env(trim=trim)
        env.add("m", size="1MiB")
        env.get("m")
        env.cache.relieve(1, "pressure")
    assert calls == ["trim"]


# -- concurrency ----------------------------------------------------------------------------


def test_two_threads_getting_the_same_model_load_it_once():
    reg = Registry()
    started, release = threading.Event(), threading.Event()
    loads = []

    def slow():
        loads.append(1)
        started.set()
        assert release.wait(5)
        return Model("slow")

    reg.register("slow", size="1MiB", loader=slow)
    cache = ModelCache(reg, trim=False)
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("slow"))) for _ in range(2)]
    threads[0].start()
    assert started.wait(5)
    threads[1].start()
    deadline = time.monotonic() + 5
    while cache.counters["misses"] < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    release.set()
    for t in threads:
        t.join(5)
    assert len(loads) == 1 and len(results) == 2 and results[0] is results[1]
    assert cache.counters["misses"] == 2 and cache.counters["loads"] == 1


def test_waiters_of_a_failed_load_get_a_chained_model_load_error():
    reg = Registry()
    started, release = threading.Event(), threading.Event()

    def failing():
        started.set()
        assert release.wait(5)
        raise ValueError("corrupt")

    reg.register("bad", loader=failing)
    cache = ModelCache(reg, memory_probe=lambda: 0, trim=False)
    errors: list[BaseException] = []

    def worker():
        try:
            cache.get("bad")
        except ModelLoadError as exc:
            errors.append(exc)

    t1 = threading.Thread(target=worker)
    t1.start()
    assert started.wait(5)
    t2 = threading.Thread(target=worker)
    t2.start()
    deadline = time.monotonic() + 5
    while cache.counters["misses"] < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    release.set()
    t1.join(5)
    t2.join(5)
    assert [type(e) for e in errors] == [ModelLoadError, ModelLoadError]
    assert all(isinstance(e.__cause__, ValueError) for e in errors)


def test_loading_one_model_does_not_block_getting_another():
    reg = Registry()
    got_b = threading.Event()
    reg.register("b", size="1MiB", loader=lambda: Model("b"))
    cache = ModelCache(reg, trim=False)

    def load_a():
        threading.Thread(target=lambda: (cache.get("b"), got_b.set())).start()
        assert got_b.wait(5), "get('b') blocked while 'a' was loading"
        return Model("a")

    reg.register("a", size="1MiB", loader=load_a)
    assert cache.get("a").name == "a"
    assert sorted(cache.names()) == ["a", "b"]


# -- admission through the reserver ---------------------------------------------------------


def test_reserver_gets_the_size_before_the_load_and_a_release_on_unload():
    reserver = RecordingReserver()
    env = Env(reserver=reserver)
    env.add("declared", size="10MiB")
    env.add("measured", grows=30 * MiB)
    env.get("declared")
    env.get("measured")
    assert reserver.calls == [("model:declared", 10 * MiB, 0.0), ("model:measured", 0, 0.0)]
    env.cache.close()
    assert sorted(reserver.released) == ["model:declared", "model:measured"]
    env.get("measured")  # a reload reserves what the last load measured
    assert reserver.calls[-1] == ("model:measured", 30 * MiB, 0.0)


def test_reserver_denial_evicts_own_lru_models_then_retries_with_wait():
    reserver = RecordingReserver([True, True, False, True])
    env = Env(reserver=reserver, load_wait_s=7.5)
    env.add("old", size="50MiB")
    env.add("pinned", size="50MiB", pinned=True)
    env.add("new", size="40MiB")
    env.get("old")
    env.get("pinned")
    env.get("new")
    assert reserver.calls[2:] == [("model:new", 40 * MiB, 0.0), ("model:new", 40 * MiB, 7.5)]
    assert env.events == ["load old", "load pinned", "unload old", "load new"]
    assert reserver.released == ["model:old"]
    assert env.cache.counters["evictions"] == {"admission": 1}


def test_reserver_denied_twice_defers_inside_a_task_and_fails_outside():
    for in_task, expected in ((True, Defer), (False, ModelLoadError)):
        reserver = RecordingReserver([False, False])
        env = Env(reserver=reserver, in_task=lambda v=in_task: v, defer_countdown_s=4.0)
        env.add("big", size="2GiB")
        with pytest.raises(expected) as err:
            env.get("big")
        assert "'big' needs 2.0GiB" in str(err.value)
        if in_task:
            assert err.value.kind == "model_memory" and err.value.countdown_s == 4.0
        assert env.load_calls == {} and env.cache.snapshot() == [] and env.cache._loading == {}
        assert env.cache.counters["denied"] == 1
        env.get("big")  # granted now (the fake says yes by default): the cache is still usable
        assert env.load_calls == {"big": 1}


# -- runtime counters, per-process cache ----------------------------------------------------


@pytest.fixture
def fake_runtime(tmp_path):
    singletons: dict[str, object] = {}

    def local(key, factory):
        if key not in singletons:
            singletons[key] = factory()
        return singletons[key]

    rt = types.SimpleNamespace(
        stats=ProcessStats(None),
        config=types.SimpleNamespace(
            models_max_memory=64 * MiB, models_max_count=3, model_load_wait=1.5, defer_countdown=2.5
        ),
        local=local,
    )
    rt_mod.set_current(rt)  # type: ignore[arg-type]
    yield rt
    rt_mod.set_current(None)


def test_counters_and_gauge_reach_the_runtime_stats(fake_runtime):
    env = Env()
    env.add("m", size="8MiB")
    env.get("m")
    env.get("m")
    env.cache.relieve(1, "pressure")
    counters = fake_runtime.stats.counters["models"]
    assert counters["hits"] == 1 and counters["misses"] == 1 and counters["loads"] == 1
    assert counters["load_seconds"] >= 0 and counters["evictions"] == {"pressure": 1}
    assert counters["bytes_unloaded"] == 8 * MiB
    assert fake_runtime.stats.gauges["models"] == []  # published after the unload


def test_models_cache_uses_runtime_config_in_a_worker(fake_runtime):
    models.set_reserver_factory(RecordingReserver)
    try:
        cache = models.cache()
        assert models.cache() is cache
        assert (cache.max_memory_bytes, cache.max_count, cache.load_wait_s, cache.defer_countdown_s) == (
            64 * MiB,
            3,
            1.5,
            2.5,
        )
        assert isinstance(cache._reserver, RecordingReserver)
    finally:
        models.set_reserver_factory(None)


def test_models_cache_is_per_process():
    cache = models.cache()
    assert models.cache() is cache
    child = os.fork()
    if child == 0:  # a forked child inherits the parent's cache object but must make its own
        os._exit(0 if models.cache() is not cache and models.cache() is models.cache() else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert models.cache() is cache


def test_module_level_register_get_use(unique):
    name = f"test-{unique}"
    models.register(name, size="1MiB", loader=lambda: Model(name))
    try:
        assert models.get(name).name == name
        with models.use(name) as m:
            [snap] = [s for s in models.cache().snapshot() if s["name"] == name]
            assert m.name == name and snap["leased"]
    finally:
        models.cache().evict(name)
        models.REGISTRY.unregister(name)


# -- synthetic models -----------------------------------------------------------------------


def test_synthetic_model_is_real_memory_and_says_synthetic():
    model = SyntheticModel("demo", "8MiB", small_objects_fraction=0.25)
    assert "synthetic" in repr(model) and "8.0MiB" in repr(model)
    assert sum(len(c) for c in model._chunks) == 6 * MiB
    assert len(model._records) > 500  # each: a list of 32 ints, a str, a bytes, a tuple
    assert model.infer(3) == model.infer(3)
    model.unload()
    assert not model.loaded and "unloaded" in repr(model)
    with pytest.raises(RuntimeError, match="unloaded"):
        model.infer(3)


def test_synthetic_loader_through_the_cache_measures_its_size():
    reg = Registry()
    reg.register("syn", loader=synthetic_loader("syn", "32MiB"))
    cache = ModelCache(reg)
    with cache.use("syn") as model:
        assert isinstance(model, SyntheticModel) and model.size_bytes == 32 * MiB
    [snap] = cache.snapshot()
    assert snap["size_source"] == "measured" and snap["size_bytes"] > 16 * MiB
    cache.close()
    assert not model.loaded
