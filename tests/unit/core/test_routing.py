"""Queues and priorities that mean the same on every broker (docs/design.md#declarations)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rmq.core.routing import choose_queue, from_wire_priority, to_wire_priority, transport_kind

GiB = 1024**3


def fake_app(broker_url: object) -> SimpleNamespace:
    return SimpleNamespace(conf=SimpleNamespace(broker_url=broker_url))


# --- wire priorities ---------------------------------------------------------------------------------
def test_redis_flips_priorities_so_high_runs_first() -> None:
    # kombu's Redis transport serves 0 first: the user's 9 ("most urgent") must travel as 0
    assert to_wire_priority(9, "redis") == 0
    assert to_wire_priority(0, "redis") == 9
    assert to_wire_priority(8, "redis") < to_wire_priority(2, "redis")  # high before low


@pytest.mark.parametrize("kind", ["amqp", "pyamqp"])
def test_amqp_keeps_priorities_as_they_are(kind: str) -> None:
    assert [to_wire_priority(p, kind) for p in range(10)] == list(range(10))


@pytest.mark.parametrize("kind", ["redis", "amqp"])
def test_wire_round_trip(kind: str) -> None:
    for p in range(10):
        wire = to_wire_priority(p, kind)
        assert 0 <= wire <= 9
        assert from_wire_priority(wire, kind) == p


# --- transport kind ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://127.0.0.1:6379/0", "redis"),
        ("rediss://user:pw@host:6380/1", "redis"),
        ("redis+socket:///tmp/redis.sock", "redis"),
        ("sentinel://host:26379", "redis"),
        ("amqp://guest:guest@127.0.0.1:5672//", "amqp"),
        ("pyamqp://guest@localhost//", "pyamqp"),
        (None, "amqp"),  # Celery's default broker
        (["redis://a:6379/0", "redis://b:6379/0"], "redis"),
    ],
)
def test_transport_kind(url: object, kind: str) -> None:
    assert transport_kind(fake_app(url)) == kind


@pytest.mark.parametrize("url", ["amqp://guest@h//", "pyamqp://guest@h//", None])
def test_amqp_family_urls_keep_user_priorities(url: object) -> None:
    kind = transport_kind(fake_app(url))
    assert to_wire_priority(8, kind) == 8


def test_transport_kind_is_cached_on_the_app() -> None:
    app = fake_app("redis://localhost:6379/0")
    assert transport_kind(app) == "redis"
    app.conf.broker_url = "amqp://localhost//"
    assert transport_kind(app) == "redis"
    assert app._rmq_transport_kind == "redis"


# --- queue choice ------------------------------------------------------------------------------------
def test_heavy_flag_routes_to_the_heavy_queue() -> None:
    assert choose_queue(True, None, GiB, "rmq.heavy") == "rmq.heavy"
    assert choose_queue(True, 1, GiB, "big") == "big"


def test_memory_at_or_above_threshold_is_heavy() -> None:
    assert choose_queue(False, GiB, GiB, "rmq.heavy") == "rmq.heavy"
    assert choose_queue(False, 2 * GiB, GiB, "rmq.heavy") == "rmq.heavy"


def test_light_tasks_get_no_explicit_queue() -> None:
    assert choose_queue(False, GiB - 1, GiB, "rmq.heavy") is None
    assert choose_queue(False, None, GiB, "rmq.heavy") is None  # undeclared memory is not heavy
