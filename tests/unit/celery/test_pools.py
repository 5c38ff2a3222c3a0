"""Only prefork pools are governed; every other pool gets one line naming it."""

from __future__ import annotations

import pytest
from celery.concurrency import get_implementation
from celery.concurrency.prefork import TaskPool as PreforkPool

from rmq.celery.pools import pool_name, refusal


def test_prefork_and_its_subclasses_are_governed() -> None:
    class MyPool(PreforkPool):
        pass

    assert refusal(get_implementation("prefork")) is None
    assert refusal(get_implementation("processes")) is None
    assert refusal(MyPool) is None


@pytest.mark.parametrize("name", ["solo", "threads"])
def test_other_pools_are_refused_by_name(name: str) -> None:
    message = refusal(get_implementation(name))
    assert message is not None and message.startswith(f"the {name} pool cannot be governed: ")
    assert "--pool prefork" in message and "\n" not in message


def test_an_unknown_pool_is_named_by_its_import_path() -> None:
    class Odd:
        pass

    assert pool_name(Odd).endswith(":test_an_unknown_pool_is_named_by_its_import_path.<locals>.Odd")
    assert "rmq governs tasks through the processes of a prefork pool" in (refusal(Odd) or "")
