"""Learned declarations: observed peaks per task name, kept in Redis (docs/design.md#learning)."""

from __future__ import annotations

import logging

import fakeredis
import pytest

from rmq.core import keys
from rmq.memory.learning import PeakLearner

MiB = 1024**2


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def learner(server: fakeredis.FakeServer, clock: Clock | None = None, **kw) -> PeakLearner:
    client = fakeredis.FakeRedis(server=server)
    return PeakLearner(lambda: client, clock=clock or Clock(), **kw)


def test_unknown_task_has_learned_nothing(server) -> None:
    assert learner(server).learned("media.transcribe") == 0


def test_the_first_peak_of_an_unknown_task_is_written_at_once(server) -> None:
    # its runs wait alone until it is known: the neighbours must not wait for a throttled flush
    lrn = learner(server)
    assert lrn.learned("media.new") == 0
    lrn.observe("media.new", 10 * MiB)
    assert fakeredis.FakeRedis(server=server).llen(keys.learned_peaks("media.new")) == 1


def test_an_unknown_value_is_read_again_soon_a_known_one_is_cached(server) -> None:
    clock = Clock()
    reader, writer = learner(server, clock, ttl_s=5.0, unknown_ttl_s=0.1), learner(server, clock)
    assert reader.learned("t") == 0
    writer.observe("t", 7 * MiB)
    clock.t += 0.2
    assert reader.learned("t") == 7 * MiB  # the unknown value was not kept for 5 s
    writer.observe("t", 9 * MiB)
    writer.flush(force=True)
    clock.t += 1.0
    assert reader.learned("t") == 7 * MiB  # a known value is cached for ttl_s


class CountingClient:
    """A fakeredis client that counts the reads of learned peaks (round trips on the task path)."""

    def __init__(self, server: fakeredis.FakeServer) -> None:
        self.client = fakeredis.FakeRedis(server=server)
        self.reads = 0

    def lrange(self, *args):
        self.reads += 1
        return self.client.lrange(*args)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_a_flush_within_the_learned_value_keeps_it_cached_a_larger_peak_is_read_at_once(server) -> None:
    clock = Clock()
    client = CountingClient(server)
    lrn = PeakLearner(lambda: client, clock=clock, ttl_s=5.0, q=1.0)
    lrn.observe("t", 100 * MiB)  # its first peak: written at once
    assert lrn.learned("t") == 100 * MiB
    reads = client.reads
    for _ in range(3):  # steady runs, one flush a second: no read before ttl_s
        lrn.observe("t", 90 * MiB)
        clock.t += 1.0
        lrn.flush()
        assert lrn.learned("t") == 100 * MiB
    assert client.reads == reads
    lrn.observe("t", 150 * MiB)  # a run above what was learned: the next admission must see it
    clock.t += 1.0
    lrn.flush()
    assert lrn.learned("t") == 150 * MiB
    assert client.reads == reads + 1


def test_observations_reach_redis_on_flush_and_give_a_percentile(server) -> None:
    lrn = learner(server, q=0.95)
    lrn._cache["media.transcribe"] = (1, 1000.0)  # known: observations wait for the flush
    for mib in range(1, 21):  # 1..20 MiB
        lrn.observe("media.transcribe", mib * MiB)
    assert fakeredis.FakeRedis(server=server).llen(keys.learned_peaks("media.transcribe")) == 0
    lrn.flush(force=True)
    stored = fakeredis.FakeRedis(server=server).lrange(keys.learned_peaks("media.transcribe"), 0, -1)
    assert len(stored) == 20
    assert lrn.learned("media.transcribe") == 19 * MiB  # nearest rank of q=0.95 over 20 values


def test_values_are_shared_with_another_learner(server) -> None:
    writer = learner(server)
    writer.observe("media.encode", 300 * MiB)
    writer.flush(force=True)
    # another worker (or a restarted one) on the same Redis
    assert learner(server).learned("media.encode") == 300 * MiB


def test_flush_is_throttled_unless_forced(server) -> None:
    clock = Clock(1000.0)
    lrn = learner(server, clock, flush_interval_s=1.0)
    lrn._cache["t"] = (1, clock.t)  # a known task: its observations are buffered
    lrn.observe("t", 1)
    lrn.flush()
    r = fakeredis.FakeRedis(server=server)
    assert r.llen(keys.learned_peaks("t")) == 1
    lrn.observe("t", 2)
    clock.t += 0.5
    lrn.flush()
    assert r.llen(keys.learned_peaks("t")) == 1  # too soon
    clock.t += 0.6
    lrn.flush()
    assert r.llen(keys.learned_peaks("t")) == 2


def test_window_keeps_only_recent_peaks(server) -> None:
    lrn = learner(server, window=5, q=1.0)
    for v in (900, 800, 1, 2, 3):
        lrn.observe("t", v)
    lrn.flush(force=True)
    for v in (4, 5, 6, 7, 8):
        lrn.observe("t", v)
    lrn.flush(force=True)
    r = fakeredis.FakeRedis(server=server)
    assert sorted(int(v) for v in r.lrange(keys.learned_peaks("t"), 0, -1)) == [4, 5, 6, 7, 8]
    assert lrn.learned("t") == 8  # the old 900 no longer counts


def test_learned_is_cached_for_ttl(server) -> None:
    clock = Clock()
    lrn = learner(server, clock, ttl_s=5.0, q=1.0)
    other = learner(server)
    other.observe("t", 100)
    other.flush(force=True)
    assert lrn.learned("t") == 100
    other.observe("t", 500)
    other.flush(force=True)
    clock.t += 4.9
    assert lrn.learned("t") == 100  # cached, no round trip
    clock.t += 0.2
    assert lrn.learned("t") == 500


def test_own_flush_invalidates_the_cache(server) -> None:
    lrn = learner(server, q=1.0)
    assert lrn.learned("t") == 0
    lrn.observe("t", 700)
    lrn.flush(force=True)
    assert lrn.learned("t") == 700


def test_unreachable_redis_learns_zero_and_warns(server, caplog) -> None:
    server.connected = False
    lrn = learner(server)
    with caplog.at_level(logging.WARNING, logger="rmq.memory.learning"):
        assert lrn.learned("media.transcribe") == 0
        lrn.observe("media.transcribe", 5)
        lrn.flush(force=True)  # must not raise
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not read learned peaks of media.transcribe" in m for m in messages)
    assert any("could not store learned peaks" in m for m in messages)


def test_redis_outage_keeps_the_last_known_value(server) -> None:
    clock = Clock()
    lrn = learner(server, clock, ttl_s=1.0, q=1.0)
    lrn.observe("t", 42)
    lrn.flush(force=True)
    assert lrn.learned("t") == 42
    server.connected = False
    clock.t += 2.0
    assert lrn.learned("t") == 42


def test_a_client_factory_that_raises_never_escapes(caplog) -> None:
    def broken():
        raise OSError("no route to host")

    lrn = PeakLearner(broken, clock=Clock())
    lrn.observe("t", 1)
    with caplog.at_level(logging.WARNING, logger="rmq.memory.learning"):
        lrn.flush(force=True)
        assert lrn.learned("t") == 0
    assert "no route to host" in caplog.text
