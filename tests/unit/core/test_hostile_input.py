"""Hostile input: any value gives a value or a ConfigError naming the argument and the value.

Huge and non-finite numbers, non-ASCII digits, absurd settings: every parser (sizes, durations,
rates, priorities, ratios, integers, URLs), every ``rmq_*`` key and every decorator option.
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmq.core.config import KEYS, load_config
from rmq.core.declarations import RMQ_OPTIONS, TaskDeclaration, parse_declaration
from rmq.core.errors import ConfigError
from rmq.core.units import (
    MAX_DURATION_S,
    MAX_SIZE_BYTES,
    Rate,
    parse_duration,
    parse_priority,
    parse_rate,
    parse_ratio,
    parse_size,
    parse_size_or_percent,
)

HUGE_DIGITS = "9" * 400  # float() of it is inf
PAST_INT_LIMIT = "9" * 5000  # int() of it raises ValueError (Python's 4300-digit limit)

#: values that broke a parser once, or are built to
NASTY: list[Any] = [
    HUGE_DIGITS, PAST_INT_LIMIT, 10**400, -(10**400), 10**5000, 2**63, 2**64,
    float("inf"), float("-inf"), float("nan"), 1e300, -0.0,
    "1e400MiB", "1e400", "inf", "nan", "Infinity", HUGE_DIGITS + "ms", HUGE_DIGITS + "MiB", HUGE_DIGITS + "/s",
    PAST_INT_LIMIT + "/s", PAST_INT_LIMIT + "%", "0." + PAST_INT_LIMIT, "٣", "³", "３", "١٢", "٣MiB", "５s",
    "\u20005", "5\u2003", "1_000", "0x10", "\x00", "", " ", "+5", "-0", Decimal("1e400"), Decimal("NaN"),
    Fraction(1, 3), 3 + 0j, b"5", [], {}, object(), "http://[::1", "http://h:99999/x", "redis+socket:///x",
]

values = st.one_of(
    st.sampled_from(NASTY),
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
    st.from_regex(r"\A\s{0,2}[-+]?[0-9٣³３.]{0,40}(e[0-9]{1,4})?\s{0,2}[a-zA-Z%/]{0,4}[a-z]{0,3}\s?\Z"),
    st.integers(min_value=2**60, max_value=10**600),
    st.decimals(), st.fractions(), st.binary(max_size=8),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _id(value: object) -> str:
    try:
        return repr(value)[:24]
    except ValueError:
        return "int-past-the-digit-limit"


def _named(message: str, what: str, value: object) -> None:
    """The message names the argument and (the start of) the value."""
    assert what in message, message
    try:
        shown = repr(value)
    except ValueError:  # an int past the digit limit has no repr: the message says what it is
        assert "int" in message, message
        return
    assert shown[:30] in message, message
    assert len(message) < 400, message  # a 5000-digit value is cut short, not copied in full


# --- the named cases: huge, non-finite and non-ASCII numbers ---
@pytest.mark.parametrize("bad", [HUGE_DIGITS, PAST_INT_LIMIT, HUGE_DIGITS + "MiB", "1e400MiB", 10**400,
                                 2**63, float("inf"), float("nan"), 1e300], ids=_id)
def test_a_huge_or_non_finite_size_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^memory must be"):
        parse_size(bad, "memory")


def test_the_largest_size_is_what_the_ledger_holds() -> None:
    assert parse_size(MAX_SIZE_BYTES, "disk") == MAX_SIZE_BYTES == 2**63 - 1
    assert parse_size("1000TiB", "disk") == 1000 * 1024**4


@pytest.mark.parametrize("bad", [10**400, -(10**400), HUGE_DIGITS + "s", "1e400s", float("inf"), 1e300,
                                 MAX_DURATION_S + 1, "3651d"], ids=_id)
def test_a_huge_or_non_finite_duration_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^rmq_kill_backoff must be"):
        parse_duration(bad, "rmq_kill_backoff")


def test_the_longest_duration_is_ten_years() -> None:
    assert parse_duration("3650d", "x") == MAX_DURATION_S == 3650 * 86400.0


@pytest.mark.parametrize("bad", [HUGE_DIGITS + "/s", PAST_INT_LIMIT + "/s", "1000000001/s", "٣/s", "３/s"], ids=_id)
def test_a_huge_or_non_ascii_rate_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^rate_limits\['x'\] must be"):
        parse_rate(bad, "rate_limits['x']")


@pytest.mark.parametrize("bad", ["٣", "³", "３", "\u20005", PAST_INT_LIMIT, "0" * 5000 + "10", 10**5000], ids=_id)
def test_a_non_ascii_or_huge_priority_is_a_config_error(bad: object) -> None:
    """Only ASCII digits: a priority is 0-9 as users type it in code or a config file; Arabic-Indic or
    full-width digits, which ``int()`` reads and superscripts, which it refuses, are not what anyone
    means to put on a message, and the sizes and durations parsers read ASCII digits only too."""
    with pytest.raises(ConfigError, match=r"^priority must be"):
        parse_priority(bad, "priority")


@pytest.mark.parametrize("bad", [10**5000, 2, -1, 1.0, "maybe"], ids=_id)
def test_a_boolean_setting_takes_true_false_or_their_words_only(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^rmq_share_heap must be true or false"):
        load_config({"rmq_share_heap": bad}, {})


def test_leading_zeros_and_ascii_spaces_still_make_a_priority() -> None:
    assert parse_priority(" 007 ") == 7


@pytest.mark.parametrize("bad", [10**400, Fraction(10**400), Decimal("1e400"), "1e400", "٠.٥", "0.8_5"], ids=_id)
def test_a_huge_or_non_ascii_ratio_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^rmq_admit_ratio must be"):
        parse_ratio(bad, "rmq_admit_ratio")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("rmq_max_deferrals", float("inf")),
        ("rmq_max_deferrals", 10**400),
        ("rmq_max_deferrals", "٣"),
        ("rmq_max_deferrals", "1_000"),
        ("rmq_leak_window", 10**30),
        ("rmq_cpu_slots", 2**31),
        ("rmq_metrics_port", 65536),
        ("rmq_memory_budget", HUGE_DIGITS),
        ("rmq_memory_budget", 10**400),
        ("rmq_admit_ratio", 10**400),
        ("rmq_alert_cpu_percent", 10**400),
        ("rmq_alert_hysteresis", 10**400),
        ("rmq_monitor_interval", 10**400),
        ("rmq_default_priority", "³"),
        ("rmq_default_priority", PAST_INT_LIMIT),
        ("rmq_heavy_queue", 10**5000),
        ("rmq_alert_webhook", "http://[::1"),
        ("rmq_alert_webhook", "http://h:99999/x"),
        ("rmq_alert_webhook", "http://exa mple.com/x"),
        ("rmq_redis_url", "redis+socket:///tmp/r.sock"),
        ("rmq_redis_url", "localhost:6379"),
        ("rmq_redis_url", "redis://h:99999/0"),
        ("rmq_session_arg", "not an identifier"),
    ],
    ids=_id,
)
def test_absurd_settings_are_config_errors(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({key: value}, {})
    _named(str(info.value), key, value)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("memory", HUGE_DIGITS),
        ("memory", float("inf")),
        ("disk", 10**400),
        ("disk", "1e400MiB"),
        ("cpu", 2**31),
        ("priority", "٣"),
        ("priority", "³"),
        ("rate_limits", {"api": HUGE_DIGITS + "/s"}),
        ("rate_limits", {10**5000: "1/s"}),
        ("concurrency", {"api": 2**31}),
        ("concurrency", {10**5000: 1}),
    ],
    ids=_id,
)
def test_absurd_declarations_are_config_errors(option: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_declaration(**{option: value})
    assert option in str(info.value)


# --- the fuzz ------------------------------------------------------------------------------------
PARSERS: dict[str, Any] = {
    "size": lambda v: parse_size(v, "what"),
    "size0": lambda v: parse_size(v, "what", allow_zero=True),
    "duration": lambda v: parse_duration(v, "what"),
    "duration0": lambda v: parse_duration(v, "what", allow_zero=True),
    "rate": lambda v: parse_rate(v, "what"),
    "priority": lambda v: parse_priority(v, "what"),
    "ratio": lambda v: parse_ratio(v, "what"),
    "size_or_percent": lambda v: parse_size_or_percent(v, "what"),
}


def _valid(kind: str, result: object) -> bool:
    if kind.startswith("size") and kind != "size_or_percent":
        return isinstance(result, int) and 0 <= result <= MAX_SIZE_BYTES
    if kind.startswith("duration"):
        return isinstance(result, float) and 0 <= result <= MAX_DURATION_S
    if kind == "rate":
        return isinstance(result, Rate) and result.count >= 1 and result.period_s > 0
    if kind == "priority":
        return isinstance(result, int) and 0 <= result <= 9
    if kind == "ratio":
        return isinstance(result, float) and 0 < result <= 1
    assert isinstance(result, tuple)
    return result[0] in ("bytes", "percent") and math.isfinite(result[1])


@FUZZ
@given(kind=st.sampled_from(sorted(PARSERS)), value=values)
def test_every_parser_gives_a_value_or_a_config_error(kind: str, value: object) -> None:
    try:
        result = PARSERS[kind](value)
    except ConfigError as exc:
        _named(str(exc), "what", value)
    else:
        assert _valid(kind, result), (kind, value, result)


@FUZZ
@given(key=st.sampled_from(sorted(KEYS)), value=values, from_env=st.booleans())
def test_every_setting_gives_a_config_or_a_config_error(key: str, value: object, from_env: bool) -> None:
    name = f"RMQ_{key.upper()}" if from_env else f"rmq_{key}"
    if from_env and not isinstance(value, str):
        value = str(value) if not isinstance(value, int) or abs(value) < 10**4000 else PAST_INT_LIMIT
    conf, environ = ({}, {name: value}) if from_env else ({name: value}, {})
    try:
        load_config(conf, environ)
    except ConfigError as exc:
        message = str(exc)
        if message.startswith(f"{name} must be"):
            _named(message, name, value)
        else:  # thresholds out of order: names the key and the parsed value
            assert f"rmq_{key}" in message, message


@FUZZ
@given(option=st.sampled_from(RMQ_OPTIONS), value=values, in_dict=st.booleans())
def test_every_decorator_option_gives_a_declaration_or_a_config_error(option: str, value: object,
                                                                       in_dict: bool) -> None:
    if in_dict and option in ("rate_limits", "concurrency"):
        value = {"api": value}
    try:
        declaration = parse_declaration(**{option: value})
    except ConfigError as exc:
        assert str(exc).startswith(option), str(exc)
        assert len(str(exc)) < 400, str(exc)
    else:
        assert isinstance(declaration, TaskDeclaration)
        assert 0 <= declaration.cpu_slots < 2**31 and 0 <= declaration.disk_bytes <= MAX_SIZE_BYTES
        assert declaration.memory_bytes is None or 0 < declaration.memory_bytes <= MAX_SIZE_BYTES
