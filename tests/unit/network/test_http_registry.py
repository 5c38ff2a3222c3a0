"""The process's named HTTP clients: one per name, settings checked, closed with the process (no network)."""

from __future__ import annotations

import pytest

from rmq.core.errors import ConfigError
from rmq.network.http_registry import client, close_all, stats


@pytest.fixture(autouse=True)
def _isolated():
    yield
    close_all()


def test_one_client_per_name_and_conflicts_are_errors():
    a = client("conf", base_url="http://x.test", rate="5/s", redis=object())
    assert client("conf") is a  # leaving settings out reuses the client
    assert client("conf", rate="5/s", timeout=10) is a  # same values (10 s is the default)
    with pytest.raises(ConfigError, match=r"rate=Rate\(count=5.*rate=Rate\(count=10"):
        client("conf", rate="10/s")
    with pytest.raises(ConfigError, match="base_url"):
        client("conf", base_url="http://y.test")
    with pytest.raises(ConfigError, match="redis"):
        client("conf", redis=object())
    assert client("other") is not a


@pytest.mark.parametrize("kwargs, word", [
    ({"rate": "10 per s"}, "rate"), ({"rate": 5}, "rate"), ({"concurrency": 0}, "concurrency"),
    ({"concurrency": True}, "concurrency"), ({"retries": -1}, "retries"), ({"timeout": "soon"}, "timeout"),
    ({"timeout": 0}, "timeout"), ({"max_wait": "-1s"}, "max_wait"), ({"base_url": 3}, "base_url"),
])
def test_bad_settings_name_the_argument(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        client("bad", **kwargs)
    assert "bad" not in stats()  # nothing was made


@pytest.mark.parametrize("name", ["", "a b", "x\0y", 3, "n" * 201])
def test_bad_names(name):
    with pytest.raises(ConfigError, match="name"):
        client(name)


def test_limits_without_redis_outside_a_worker_are_refused_at_once():
    with pytest.raises(ConfigError, match="redis="):
        client("noredis", base_url="http://x.test", rate="5/s")
    with pytest.raises(ConfigError, match="redis="):
        client("noredis", concurrency=2)
    assert client("noredis").rate is None  # no limits: no Redis needed


def test_runtime_exit_hook_closes_this_process_clients(stub_runtime):
    rt = stub_runtime()
    c = client("hooked", base_url="http://x.test")
    assert rt.process_exit_hooks and client("hooked") is c
    client("hooked2")
    assert len(rt.process_exit_hooks) == 1  # registered once
    for hook in rt.process_exit_hooks:
        hook(rt)
    assert c.closed and stats() == {}
    assert client("hooked") is not c  # a later use makes a fresh one
