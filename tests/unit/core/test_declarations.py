"""Task declarations validated at decoration time (docs/design.md#declarations; bad input: docs/guarantees.md#r4)."""

from __future__ import annotations

import dataclasses

import pytest

from rmq.core.declarations import CLEANUP_POLICIES, RMQ_OPTIONS, TaskDeclaration, parse_declaration
from rmq.core.errors import ConfigError
from rmq.core.units import Rate

GiB = 1024**3
MiB = 1024**2


def test_nothing_declared_gives_the_defaults() -> None:
    d = parse_declaration()
    assert d == TaskDeclaration()
    assert d.memory_bytes is None  # learned later
    assert (d.cpu_slots, d.disk_bytes, d.heavy, d.priority, d.session) == (0, 0, False, None, None)
    assert d.cleanup == "after_task" and d.hygiene is True and d.network is False
    assert d.rate_limits == {} and d.concurrency == {}


def test_the_spec_example_declaration() -> None:
    d = parse_declaration(
        memory="2GiB", cpu=2, disk="1GiB", heavy=True, priority="high", session=True,
        rate_limits={"tts-api": "10/s"}, concurrency={"gpu-api": 2},
    )
    assert d.memory_bytes == 2 * GiB
    assert d.cpu_slots == 2
    assert d.disk_bytes == GiB
    assert d.heavy is True
    assert d.priority == 8
    assert d.session == "session_id"
    assert d.rate_limits == {"tts-api": Rate(10, 1.0)}
    assert d.concurrency == {"gpu-api": 2}
    assert d.as_dict() == {
        "memory_bytes": 2 * GiB, "cpu_slots": 2, "disk_bytes": GiB, "heavy": True, "priority": 8,
        "session": "session_id", "cleanup": "after_task", "rate_limits": {"tts-api": "10/s"},
        "concurrency": {"gpu-api": 2}, "network": False, "hygiene": True,
    }


def test_declaration_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse_declaration(memory=1).memory_bytes = 2  # type: ignore[misc]


def test_rmq_options_are_exactly_the_parse_arguments() -> None:
    import inspect

    params = set(inspect.signature(parse_declaration).parameters) - {"session_arg"}
    assert set(RMQ_OPTIONS) == params


# --- bad input (docs/guarantees.md#r4): each bad value is a ConfigError naming argument and value ---
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"memory": -1}, "memory must be a size like '2GiB', got -1"),
        ({"memory": "-1"}, "memory must be a size like '2GiB', got '-1'"),
        ({"memory": "lots"}, "memory must be a size like '2GiB', got 'lots'"),
        ({"memory": 0}, "memory must be a size like '2GiB', got 0"),
        ({"cpu": 0}, "cpu must be a whole number of CPU slots >= 1, got 0"),
        ({"priority": "urgent"},
         "priority must be 'high', 'normal', 'low' or an integer 0-9 (larger runs first), got 'urgent'"),
        ({"rate_limits": {"x": "10 per s"}},
         "rate_limits['x'] must be a rate like '10/s', '100/m' or '5000/h', got '10 per s'"),
    ],
)
def test_section7_bad_declarations(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_declaration(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("memory", ["512MiB", "2GB", "1.5GiB", 1024])
def test_memory_sizes(memory: object) -> None:
    assert parse_declaration(memory=memory).memory_bytes > 0


@pytest.mark.parametrize("cpu", [-1, 1.5, "2", True, False])
def test_bad_cpu(cpu: object) -> None:
    with pytest.raises(ConfigError, match=rf"^cpu must be .*got {cpu!r}$"):
        parse_declaration(cpu=cpu)


@pytest.mark.parametrize("cpu", [1, 2, 64])
def test_good_cpu(cpu: int) -> None:
    assert parse_declaration(cpu=cpu).cpu_slots == cpu


@pytest.mark.parametrize("disk", [-1, "lots", 0])
def test_bad_disk(disk: object) -> None:
    with pytest.raises(ConfigError, match=r"^disk must be a size"):
        parse_declaration(disk=disk)


@pytest.mark.parametrize(("priority", "expected"), [("high", 8), ("normal", 5), ("low", 2), (0, 0), (9, 9)])
def test_priorities(priority: object, expected: int) -> None:
    assert parse_declaration(priority=priority).priority == expected


@pytest.mark.parametrize("priority", [10, -1, "urgent", True])
def test_bad_priorities(priority: object) -> None:
    with pytest.raises(ConfigError, match=r"^priority must be"):
        parse_declaration(priority=priority)


@pytest.mark.parametrize(("flag", "value"), [("heavy", "yes"), ("network", 1), ("hygiene", None)])
def test_flags_must_be_booleans(flag: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^{flag} must be True or False, got {value!r}$"):
        parse_declaration(**{flag: value})


# --- sessions and cleanup ----------------------------------------------------------------------------
def test_session_true_uses_the_configured_argument_name() -> None:
    assert parse_declaration(session=True).session == "session_id"
    assert parse_declaration(session=True, session_arg="job").session == "job"


@pytest.mark.parametrize("session", [False, None])
def test_session_off(session: object) -> None:
    assert parse_declaration(session=session).session is None


def test_session_by_argument_name() -> None:
    assert parse_declaration(session="pipeline_id").session == "pipeline_id"


@pytest.mark.parametrize("session", ["not a name", "", "1abc", 1, "a-b"])
def test_bad_session(session: object) -> None:
    with pytest.raises(ConfigError, match=rf"^session must be True, False or an argument name, got {session!r}$"):
        parse_declaration(session=session)


@pytest.mark.parametrize("cleanup", CLEANUP_POLICIES)
def test_cleanup_policies(cleanup: str) -> None:
    assert parse_declaration(session=True, cleanup=cleanup).cleanup == cleanup


@pytest.mark.parametrize("cleanup", ["never", "", None, "KEEP"])
def test_bad_cleanup(cleanup: object) -> None:
    with pytest.raises(ConfigError, match=r"^cleanup must be one of \('after_task', 'keep'\), got "):
        parse_declaration(cleanup=cleanup)


# --- rate limits and concurrency ---------------------------------------------------------------------
def test_rate_limits() -> None:
    d = parse_declaration(rate_limits={"tts-api": "10/s", "asr": "100/m", "llm": "5000/h"})
    assert d.rate_limits == {"tts-api": Rate(10, 1.0), "asr": Rate(100, 60.0), "llm": Rate(5000, 3600.0)}


@pytest.mark.parametrize(
    ("rate_limits", "pattern"),
    [
        (["tts-api"], r"^rate_limits must be a dict"),
        ("10/s", r"^rate_limits must be a dict"),
        ({"tts api": "10/s"}, r"^rate_limits keys must be non-empty names without spaces, got 'tts api'$"),
        ({"": "10/s"}, r"^rate_limits keys must be non-empty names"),
        ({"x" * 101: "10/s"}, r"^rate_limits keys must be non-empty names"),
        ({"x": "0/s"}, r"^rate_limits\['x'\] must be a rate"),
    ],
)
def test_bad_rate_limits(rate_limits: object, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_declaration(rate_limits=rate_limits)


def test_concurrency() -> None:
    assert parse_declaration(concurrency={"gpu-api": 2, "db": 1}).concurrency == {"gpu-api": 2, "db": 1}


@pytest.mark.parametrize(
    ("concurrency", "pattern"),
    [
        ({"gpu-api": 0}, r"^concurrency\['gpu-api'\] must be an integer >= 1, got 0$"),
        ({"gpu-api": -2}, r"^concurrency\['gpu-api'\] must be an integer >= 1, got -2$"),
        ({"gpu-api": 1.5}, r"^concurrency\['gpu-api'\] must be an integer >= 1, got 1.5$"),
        ({"gpu-api": "2"}, r"^concurrency\['gpu-api'\] must be an integer >= 1, got '2'$"),
        ({"gpu-api": True}, r"^concurrency\['gpu-api'\] must be an integer >= 1, got True$"),
        ({"gpu api": 2}, r"^concurrency keys must be non-empty names without spaces"),
        ([("gpu-api", 2)], r"^concurrency must be a dict"),
    ],
)
def test_bad_concurrency(concurrency: object, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_declaration(concurrency=concurrency)
