"""A worker whose ledger has no free slot: tasks wait like tasks that do not fit, never FAILURE."""

from __future__ import annotations

import glob
import os
import time

import pytest

from rmq.core.ledger import KIND_TASK, Entry, Ledger, LedgerFull
from rmq.testing.worker import wait_until

from .conftest import taskapp_env

pytestmark = pytest.mark.integration


def test_a_task_that_finds_the_ledger_full_waits_and_then_runs(redis_url, test_app, start_worker, tmp_path) -> None:
    # Given a worker whose ledger's every slot is held (a large host: many pool processes and
    # resident models); here held by this test's process, which the governor sees alive
    start_worker(test_app, app="taskapp", env=taskapp_env(redis_url, runtime_dir=str(tmp_path)), concurrency=1)
    [path] = glob.glob(os.path.join(str(tmp_path), "rmq-*", "ledger"))
    ledger = Ledger(os.path.dirname(path))
    held = []
    try:
        with ledger.locked(), pytest.raises(LedgerFull):
            while True:
                held.append(ledger.add_unlocked(Entry(KIND_TASK, os.getpid(), 0, task_id=f"filler-{len(held)}",
                                                      name="filler")))
        # When a governed task arrives
        result = test_app.send_task("t.sleep", args=[0.1])
        # Then it waits (it does not end in FAILURE) ...
        time.sleep(2.0)
        assert result.state != "FAILURE", result.result
        assert not result.ready()
        # ... and runs once slots are free again
        for e in held:
            ledger.remove(e)
        held.clear()
        assert result.get(timeout=30)["pid"] > 0
        assert wait_until(lambda: ledger.entries() == [], 5)
    finally:
        for e in held:
            ledger.remove(e)
        ledger.close()
