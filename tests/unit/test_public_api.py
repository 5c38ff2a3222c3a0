"""What users write keeps working after the package moved into layers: the public names, the public
module paths, and the import strings of the old flat layout (aliases for one release)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
from kombu.utils.imports import symbol_by_name

import rmq


def test_the_public_names_resolve() -> None:
    from rmq.celery.autoscale import ResourceAutoscaler  # noqa: F401
    from rmq.celery.task import GovernedTask, governed_task
    from rmq.celery.wiring import install
    from rmq.network.throttle import throttle

    assert rmq.install is install and rmq.governed_task is governed_task and rmq.GovernedTask is GovernedTask
    assert rmq.throttle is throttle
    assert rmq.models.register and rmq.models.use and rmq.models.get
    assert issubclass(rmq.BudgetExceeded, rmq.RmqError) and issubclass(rmq.ConfigError, ValueError)


def test_the_public_modules_import_by_their_documented_paths() -> None:
    from rmq.celery.signals import alert as celery_alert
    from rmq.core.errors import MemoryBudgetExceeded as core_error
    from rmq.errors import MemoryBudgetExceeded
    from rmq.http import client
    from rmq.network.http_registry import client as registry_client
    from rmq.signals import alert

    assert alert is celery_alert and MemoryBudgetExceeded is core_error and client is registry_client
    assert rmq.http.client is client and rmq.signals.alert is alert and rmq.errors.RmqError is rmq.RmqError


@pytest.mark.parametrize(("old", "new"), [
    ("rmq.request:GovernedRequest", "rmq.celery.request:GovernedRequest"),
    ("rmq.autoscale:ResourceAutoscaler", "rmq.celery.autoscale:ResourceAutoscaler"),
])
def test_old_import_strings_still_load_and_say_where_the_class_went(old: str, new: str) -> None:
    module = old.split(":")[0]
    sys.modules.pop(module, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert symbol_by_name(old) is symbol_by_name(new)  # what Celery does with the setting
    assert any(issubclass(w.category, DeprecationWarning) and new.split(":")[0] in str(w.message) for w in caught)


def test_what_install_sets_uses_the_new_paths() -> None:
    from celery import Celery

    from rmq.celery.task import GovernedTask

    app = Celery("public-api", broker="redis://127.0.0.1:1/0", set_as_current=False)
    rmq.install(app)
    app.loader.import_default_modules()
    assert app.conf.worker_autoscaler == "rmq.celery.autoscale:ResourceAutoscaler"
    assert GovernedTask.Request == "rmq.celery.request:GovernedRequest"


def test_importing_rmq_does_nothing_heavy() -> None:
    heavy = ("celery", "kombu", "billiard", "psutil", "redis")
    code = f"import rmq, sys; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
