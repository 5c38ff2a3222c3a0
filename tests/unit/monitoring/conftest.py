"""A stand-in for the parts of a Celery app that monitoring uses: its conf and its event dispatcher."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest


class FakeDispatcher:
    """Records what ``send`` got, as Celery's event dispatcher would send it."""

    def __init__(self, connection: Any, hostname: str, enabled: bool, buffer_while_offline: bool) -> None:
        self.connection = connection
        self.hostname = hostname
        self.sent: list[tuple[str, dict]] = []
        self.closed = False

    def send(self, type_: str, retry: bool, retry_policy: dict, **fields: Any) -> None:
        self.sent.append((type_, fields))

    def close(self) -> None:
        self.closed = True


class FakeConnection:
    connection_errors = (ConnectionError,)
    channel_errors = ()

    def __init__(self) -> None:
        self.released = False

    def release(self) -> None:
        self.released = True


class FakeApp:
    """``app.events.Dispatcher``, ``app.connection_for_write()`` and ``app.conf``."""

    def __init__(self) -> None:
        self.dispatchers: list[FakeDispatcher] = []
        self.events = self
        self.conf = SimpleNamespace(
            task_default_queue="celery", task_queues=None, broker_url="memory://", result_backend=None
        )

    def Dispatcher(self, connection: Any, **kwargs: Any) -> FakeDispatcher:  # noqa: N802 (Celery's name)
        self.dispatchers.append(FakeDispatcher(connection, **kwargs))
        return self.dispatchers[-1]

    def connection_for_write(self) -> FakeConnection:
        return FakeConnection()

    def sent(self) -> list[tuple[str, dict]]:
        """Every event sent, all dispatchers together."""
        return [event for dispatcher in self.dispatchers for event in dispatcher.sent]


@pytest.fixture
def events_app() -> FakeApp:
    return FakeApp()
