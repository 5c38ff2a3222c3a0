"""The ``rmq_*`` configuration: defaults, environment overrides, refusals."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import pytest

from rmq.core.config import KEYS, RmqConfig, load_config
from rmq.core.errors import ConfigError

GiB = 1024**3
MiB = 1024**2


def test_defaults() -> None:
    cfg = load_config({}, {})
    assert cfg.memory_budget == ("percent", pytest.approx(0.9))
    assert cfg.monitor_interval == pytest.approx(0.25)
    assert cfg.monitor_interval <= 0.25  # the governor samples at least 4 times a second (docs/design.md#governor)
    assert (cfg.unload_ratio, cfg.unload_target_ratio) == (0.80, 0.70)
    assert (cfg.pause_ratio, cfg.resume_ratio, cfg.kill_ratio) == (0.85, 0.75, 0.95)
    assert cfg.admit_ratio == cfg.pause_ratio == 0.85
    assert cfg.memory_kill_retries == 2
    assert cfg.heavy_queue == "rmq.heavy"
    assert cfg.heavy_memory_threshold == GiB
    assert cfg.default_task_memory == 32 * MiB
    assert cfg.default_priority == 5
    assert cfg.failed_session_ttl == 3600.0
    assert cfg.session_max_age == 86400.0
    assert cfg.cleanup_interval == 900.0
    assert (cfg.disk_high_ratio, cfg.disk_low_ratio) == (0.80, 0.70)
    assert (cfg.alert_memory_ratio, cfg.alert_cpu_percent, cfg.alert_disk_ratio) == (0.85, 90, 0.80)
    assert cfg.monitor_beat_interval == 60.0
    assert cfg.session_arg == "session_id"
    assert cfg.cpu_slots is None and cfg.redis_url is None and cfg.metrics_port is None
    assert cfg.session_root_path == os.path.join(tempfile.gettempdir(), "rmq-sessions")


def test_every_key_is_a_field_and_every_default_parses() -> None:
    names = {f.name for f in dataclasses.fields(RmqConfig)} - {"explicit"}
    assert names == set(KEYS)
    assert set(load_config({}, {}).as_dict()) == names


def test_conf_values_are_parsed() -> None:
    cfg = load_config(
        {
            "rmq_memory_budget": "6GiB",
            "rmq_monitor_interval": "100ms",
            "rmq_cpu_slots": 4,
            "rmq_default_priority": "high",
            "rmq_session_root": "/srv/sessions",
            "rmq_alert_cpu_percent": "75%",
            "broker_url": "redis://x",  # non-rmq keys are none of our business
        },
        {},
    )
    assert cfg.memory_budget == ("bytes", 6.0 * GiB)
    assert cfg.monitor_interval == pytest.approx(0.1)
    assert cfg.cpu_slots == 4
    assert cfg.default_priority == 8
    assert cfg.session_root_path == "/srv/sessions"
    assert cfg.alert_cpu_percent == 75.0


def test_percent_budget() -> None:
    assert load_config({"rmq_memory_budget": "75%"}, {}).memory_budget == ("percent", pytest.approx(0.75))


def test_env_beats_conf_and_conf_beats_default() -> None:
    conf = {"rmq_memory_budget": "6GiB", "rmq_max_deferrals": 5}
    cfg = load_config(conf, {"RMQ_MEMORY_BUDGET": "2GiB"})
    assert cfg.memory_budget == ("bytes", 2.0 * GiB)
    assert cfg.max_deferrals == 5
    assert load_config({}, {"RMQ_MAX_DEFERRALS": "7"}).max_deferrals == 7


def test_env_strings_for_optional_and_bool_like_keys() -> None:
    cfg = load_config({"rmq_cpu_slots": 3, "rmq_redis_url": "redis://a"}, {"RMQ_CPU_SLOTS": "none",
                                                                          "RMQ_REDIS_URL": ""})
    assert cfg.cpu_slots is None and cfg.redis_url is None


def test_unknown_rmq_env_vars_are_ignored() -> None:
    cfg = load_config({}, {"RMQ_TEST_REDIS_URL": "redis://127.0.0.1:6379", "RMQ_WHATEVER": "x"})
    assert cfg == load_config({}, {})


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMQ_MAX_DEFERRALS", "11")
    assert load_config({}).max_deferrals == 11


def test_accepts_an_object_with_items_like_celery_conf() -> None:
    class Conf:
        def items(self):
            return [("rmq_heavy_queue", "big"), ("task_acks_late", True)]

    assert load_config(Conf(), {}).heavy_queue == "big"


def test_unknown_rmq_key_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown rmq setting 'rmq_memory_budjet'"):
        load_config({"rmq_memory_budjet": "2GiB"}, {})


@pytest.mark.parametrize("budget", ["0", 0, "lots", "-1GiB", "0%", "150%"])
def test_bad_memory_budget_is_refused_naming_key_and_value(budget: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"rmq_memory_budget": budget}, {})
    assert "rmq_memory_budget" in str(info.value)
    assert repr(budget) in str(info.value)


def test_bad_env_value_names_the_env_variable() -> None:
    with pytest.raises(ConfigError, match=r"^RMQ_MEMORY_BUDGET must be .*got '0'$"):
        load_config({}, {"RMQ_MEMORY_BUDGET": "0"})


@pytest.mark.parametrize(
    ("conf", "words"),
    [
        ({"rmq_pause_ratio": 0.95}, "thresholds out of order"),  # pause == kill
        ({"rmq_pause_ratio": 0.97}, "thresholds out of order"),  # pause > kill
        ({"rmq_resume_ratio": 0.85}, "rmq_resume_ratio (0.85) must be below rmq_pause_ratio (0.85)"),
        ({"rmq_resume_ratio": 0.9}, "rmq_resume_ratio"),
        ({"rmq_unload_target_ratio": 0.80}, "rmq_unload_target_ratio (0.8) must be below rmq_unload_ratio"),
        ({"rmq_unload_target_ratio": 0.9}, "rmq_unload_target_ratio"),
        ({"rmq_unload_ratio": 0.9}, "thresholds out of order"),  # unload above pause
        ({"rmq_admit_ratio": 0.96}, "rmq_admit_ratio (0.96) must not exceed rmq_kill_ratio (0.95)"),
        ({"rmq_disk_low_ratio": 0.8}, "rmq_disk_low_ratio"),
    ],
)
def test_thresholds_out_of_order_are_refused(conf: dict, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(conf, {})
    assert words in str(info.value)


def test_thresholds_moved_together_are_accepted() -> None:
    cfg = load_config(
        {"rmq_unload_ratio": 0.6, "rmq_unload_target_ratio": 0.5, "rmq_pause_ratio": 0.7,
         "rmq_resume_ratio": 0.65, "rmq_kill_ratio": 0.9, "rmq_admit_ratio": 0.9},
        {},
    )
    assert (cfg.unload_ratio, cfg.pause_ratio, cfg.kill_ratio, cfg.admit_ratio) == (0.6, 0.7, 0.9, 0.9)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("rmq_max_deferrals", -1),
        ("rmq_max_deferrals", 1.5),
        ("rmq_max_deferrals", True),
        ("rmq_max_deferrals", "many"),
        ("rmq_cpu_slots", 0),
        ("rmq_learn_window", 0),
        ("rmq_heavy_queue", ""),
        ("rmq_heavy_queue", 3),
        ("rmq_monitor_interval", "0ms"),
        ("rmq_alert_cpu_percent", 0),
        ("rmq_alert_cpu_percent", "120%"),
        ("rmq_alert_hysteresis", 1.0),
        ("rmq_default_priority", "urgent"),
        ("rmq_kill_ratio", 1.2),
    ],
)
def test_bad_values_name_key_and_value(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({key: value}, {})
    message = str(info.value)
    assert message.startswith(f"{key} must be")
    assert message.endswith(f"got {value!r}")


def test_config_is_frozen() -> None:
    cfg = load_config({}, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kill_ratio = 0.5  # type: ignore[misc]
