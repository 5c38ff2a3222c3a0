"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from rmq.celery import autoscale
from rmq.memory import scaling


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The lines rmq would exit with: ``exit_with_line`` records its line and raises SystemExit
    instead of ending the test process (``os._exit``)."""
    said: list[str] = []

    def fake_exit(message: str, status: int = 2, now: bool = False) -> None:
        said.append(message)
        raise SystemExit(status)

    for module in (autoscale, scaling):
        monkeypatch.setattr(module, "exit_with_line", fake_exit)
    return said
