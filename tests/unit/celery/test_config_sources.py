"""rmq settings read the way Celery reads its own: namespaces, settings objects and modules, case."""

from __future__ import annotations

import sys
import types

import pytest
from celery import Celery

from rmq.core.config import load_config
from rmq.core.errors import ConfigError

GiB = 1024**3


def _app(obj: object, namespace: str | None = None) -> Celery:
    app = Celery("cfg", broker="memory://", set_as_current=False)
    app.config_from_object(obj, namespace=namespace)
    return app


class DjangoSettings:
    DEBUG = True
    CELERY_TASK_ACKS_LATE = True
    CELERY_RMQ_MEMORY_BUDGET = "1GiB"
    CELERY_RMQ_MAX_DEFERRALS = 7
    RMQ_NOT_OURS = "a Django setting of the project's own"


def test_django_style_namespaced_settings_are_read() -> None:
    app = _app(DjangoSettings, namespace="CELERY")
    assert app.conf.task_acks_late is True  # Celery's own mapping, for comparison
    cfg = load_config(app.conf, {})
    assert cfg.memory_budget == ("bytes", 1.0 * GiB)
    assert cfg.max_deferrals == 7


def test_a_namespaced_settings_module_given_by_name_is_read(monkeypatch) -> None:
    module = types.ModuleType("rmq_test_settings_mod")
    module.CELERY_RMQ_HEAVY_QUEUE = "big"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rmq_test_settings_mod", module)
    app = _app("rmq_test_settings_mod", namespace="CELERY")
    assert load_config(app.conf, {}).heavy_queue == "big"


def test_a_lower_case_namespace_reads_lower_case_keys() -> None:
    class Settings:
        celery_rmq_heavy_queue = "big"

    assert load_config(_app(Settings, namespace="celery").conf, {}).heavy_queue == "big"


def test_plain_rmq_keys_are_read_under_a_namespace_too_and_the_namespaced_one_wins() -> None:
    class Settings:
        rmq_heavy_queue = "plain"
        rmq_max_deferrals = 3
        CELERY_RMQ_HEAVY_QUEUE = "spaced"

    cfg = load_config(_app(Settings, namespace="CELERY").conf, {})
    assert (cfg.heavy_queue, cfg.max_deferrals) == ("spaced", 3)


def test_app_conf_changes_beat_the_config_object_as_in_celery() -> None:
    app = _app(DjangoSettings, namespace="CELERY")
    app.conf.rmq_max_deferrals = 9
    assert load_config(app.conf, {}).max_deferrals == 9


def test_an_unknown_namespaced_rmq_key_is_refused() -> None:
    class Settings:
        CELERY_RMQ_MEMORY_BUDJET = "1GiB"

    with pytest.raises(ConfigError, match=r"unknown rmq setting 'CELERY_RMQ_MEMORY_BUDJET'"):
        load_config(_app(Settings, namespace="CELERY").conf, {})


def test_the_environment_beats_a_namespaced_key() -> None:
    cfg = load_config(_app(DjangoSettings, namespace="CELERY").conf, {"RMQ_MEMORY_BUDGET": "2GiB"})
    assert cfg.memory_budget == ("bytes", 2.0 * GiB)


def test_a_bad_namespaced_value_names_the_key_as_written() -> None:
    class Settings:
        CELERY_RMQ_MEMORY_BUDGET = "lots"

    with pytest.raises(ConfigError, match=r"^CELERY_RMQ_MEMORY_BUDGET must be .*got 'lots'$"):
        load_config(_app(Settings, namespace="CELERY").conf, {})


def test_upper_case_keys_of_an_old_style_config_are_read() -> None:
    class Settings:
        BROKER_URL = "memory://"
        RMQ_MEMORY_BUDGET = "3GiB"

    assert load_config(_app(Settings).conf, {}).memory_budget == ("bytes", 3.0 * GiB)


def test_an_unknown_upper_case_key_is_refused_without_a_namespace() -> None:
    class Settings:
        RMQ_MEMORY_BUDJET = "3GiB"

    with pytest.raises(ConfigError, match=r"unknown rmq setting 'RMQ_MEMORY_BUDJET'"):
        load_config(_app(Settings).conf, {})


def test_one_key_in_both_cases_with_different_values_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"rmq_heavy_queue and RMQ_HEAVY_QUEUE are both set"):
        load_config({"rmq_heavy_queue": "a", "RMQ_HEAVY_QUEUE": "b"}, {})
    assert load_config({"rmq_heavy_queue": "a", "RMQ_HEAVY_QUEUE": "a"}, {}).heavy_queue == "a"


def test_lower_case_keys_of_a_settings_object_are_read() -> None:
    class Settings:
        rmq_memory_budget = "4GiB"

    assert load_config(_app(Settings).conf, {}).memory_budget == ("bytes", 4.0 * GiB)
