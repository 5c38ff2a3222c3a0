"""Which messages of a governed task are copies that must check the backend and take a run claim."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rmq.celery.task import GovernedTask


def request(redelivered: bool = False, **headers) -> SimpleNamespace:
    return SimpleNamespace(delivery_info={"redelivered": redelivered}, headers=headers,
                           rmq_deferrals=headers.get("rmq_deferrals"), rmq_kills=headers.get("rmq_kills"))


@pytest.mark.parametrize(
    ("req", "is_copy"),
    [
        (request(), False),  # a first delivery
        (request(redelivered=True), True),  # back after its process or worker died
        (request(rmq_deferrals=2), True),  # sent by a counted deferral
        (request(rmq_deferrals=0), True),  # sent by an uncounted one (rate limit, a copy waiting its turn)
        (request(rmq_kills=1), True),  # a re-run after a memory kill
        # Celery puts custom headers on the request as attributes, and may keep them in .headers only
        (SimpleNamespace(delivery_info=None, headers=None, rmq_deferrals=0), True),
        (SimpleNamespace(delivery_info={}, headers={"rmq_kills": 1}), True),
        (SimpleNamespace(delivery_info={}, headers={"other": 1}), False),
    ],
)
def test_copies_are_recognised(req: SimpleNamespace, is_copy: bool) -> None:
    assert GovernedTask._is_copy(req) is is_copy
