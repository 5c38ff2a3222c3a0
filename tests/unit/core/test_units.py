"""Sizes, durations, rates, priorities and ratios as users write them (docs/configuration.md#value-syntax)."""

from __future__ import annotations

import pytest

from rmq.core.errors import ConfigError
from rmq.core.units import (
    Rate,
    format_bytes,
    parse_duration,
    parse_priority,
    parse_rate,
    parse_ratio,
    parse_size,
    parse_size_or_percent,
)

MiB = 1024**2
GiB = 1024**3


# --- sizes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * MiB),
        ("2GB", 2 * 1000**3),
        ("1.5GiB", int(1.5 * GiB)),
        ("2GiB", 2 * GiB),
        ("64kb", 64_000),
        ("10 MiB", 10 * MiB),
        ("1gib", GiB),
        ("100", 100),
        ("7B", 7),
        (4096, 4096),
    ],
)
def test_parse_size_accepts_what_users_write(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", [-1, "-1", "lots", 0, "0", True, False, None, "2 GiBs", "", "1e9", [1]])
def test_parse_size_refuses_bad_values_with_a_clear_message(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(bad, "memory")
    assert str(info.value) == f"memory must be a size like '2GiB', got {bad!r}"


def test_parse_size_message_matches_the_spec_example() -> None:
    with pytest.raises(ConfigError, match=r"^memory must be a size like '2GiB', got '-1'$"):
        parse_size("-1", "memory")


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_size("lots")


def test_parse_size_zero_allowed_only_when_asked() -> None:
    assert parse_size(0, "margin", allow_zero=True) == 0
    assert parse_size("0MiB", "margin", allow_zero=True) == 0


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_parse_size_non_finite_floats_are_config_errors(bad: float) -> None:
    with pytest.raises(ConfigError, match="memory must be a size"):
        parse_size(bad, "memory")


# --- durations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250ms", 0.25),
        ("24h", 86400.0),
        ("15m", 900.0),
        ("15min", 900.0),
        ("2s", 2.0),
        ("1d", 86400.0),
        ("1.5", 1.5),
        (3, 3.0),
        (0.1, 0.1),
    ],
)
def test_parse_duration_accepts_what_users_write(text: object, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [-1, "-5s", "soon", 0, "0s", True, None, "5 weeks"])
def test_parse_duration_refuses_bad_values(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(bad, "rmq_monitor_interval")
    assert str(info.value) == f"rmq_monitor_interval must be a duration like '250ms' or '24h', got {bad!r}"


def test_parse_duration_zero_allowed_only_when_asked() -> None:
    assert parse_duration("0s", "wait", allow_zero=True) == 0.0


def test_parse_duration_nan_is_refused() -> None:
    with pytest.raises(ConfigError):
        parse_duration(float("nan"), "rmq_monitor_interval")


# --- rates -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "count", "period_s"),
    [("10/s", 10, 1.0), ("100/m", 100, 60.0), ("5000/h", 5000, 3600.0), ("3/d", 3, 86400.0), ("7 / S", 7, 1.0)],
)
def test_parse_rate_accepts_what_users_write(text: str, count: int, period_s: float) -> None:
    rate = parse_rate(text)
    assert rate == Rate(count, period_s)
    assert rate.interval_s == pytest.approx(period_s / count)


def test_rate_prints_back_as_written() -> None:
    assert [str(parse_rate(t)) for t in ("10/s", "100/m", "5000/h")] == ["10/s", "100/m", "5000/h"]
    assert parse_rate(Rate(2, 1.0)) == Rate(2, 1.0)


@pytest.mark.parametrize("bad", ["10 per s", "0/s", "10/fortnight", "ten/s", "-1/s", 10, None, "10"])
def test_parse_rate_refuses_bad_values(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rate(bad, "rate_limits['x']")
    assert str(info.value) == f"rate_limits['x'] must be a rate like '10/s', '100/m' or '5000/h', got {bad!r}"


# --- priorities --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [("high", 8), ("normal", 5), ("low", 2), ("HIGH", 8), (0, 0), (9, 9), (5, 5), ("7", 7)],
)
def test_parse_priority_accepts_names_and_0_to_9(value: object, expected: int) -> None:
    assert parse_priority(value) == expected


def test_priority_names_are_ordered_larger_first() -> None:
    assert parse_priority("high") > parse_priority("normal") > parse_priority("low")


@pytest.mark.parametrize("bad", ["urgent", 10, -1, "-1", True, 5.0, None])
def test_parse_priority_refuses_bad_values(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_priority(bad, "priority")
    assert str(info.value) == (
        f"priority must be 'high', 'normal', 'low' or an integer 0-9 (larger runs first), got {bad!r}"
    )


def test_parse_priority_refuses_a_numeric_string_out_of_range() -> None:
    with pytest.raises(ConfigError, match=r"^priority must be .* 0-9 .*got '?10'?$"):
        parse_priority("10", "priority")


# --- ratios and budgets ------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [(0.85, 0.85), ("0.85", 0.85), ("85%", 0.85), (1, 1.0), ("100%", 1.0)])
def test_parse_ratio(value: object, expected: float) -> None:
    assert parse_ratio(value) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [0, 1.5, "150%", "0%", "much", True, None, -0.1])
def test_parse_ratio_refuses_out_of_range(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^rmq_admit_ratio must be a fraction in \(0, 1\]"):
        parse_ratio(bad, "rmq_admit_ratio")


def test_parse_size_or_percent() -> None:
    assert parse_size_or_percent("90%", "rmq_memory_budget") == ("percent", pytest.approx(0.9))
    assert parse_size_or_percent("6GiB", "rmq_memory_budget") == ("bytes", 6.0 * GiB)
    assert parse_size_or_percent(1000, "rmq_memory_budget") == ("bytes", 1000.0)


@pytest.mark.parametrize("bad", ["0", 0, "lots", "-1GiB"])
def test_parse_size_or_percent_refuses_bad_budgets(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size_or_percent(bad, "rmq_memory_budget")
    assert str(info.value) == (
        f"rmq_memory_budget must be a size like '6GiB' or a percentage like '90%', got {bad!r}"
    )


@pytest.mark.parametrize(
    ("n", "text"),
    [(None, "-"), (0, "0B"), (1023, "1023B"), (1024, "1.0KiB"), (1536 * MiB, "1.5GiB"), (3 * 1024**4, "3.0TiB")],
)
def test_format_bytes(n: int | None, text: str) -> None:
    assert format_bytes(n) == text
