"""The lease keeper against a real Redis: held permits outlive their lease, discarded ones do not."""

from __future__ import annotations

import time

from rmq.network.lease_keeper import LeaseKeeper
from rmq.network.semaphore import ClusterSemaphore


def test_lease_keeper_keeps_permits_alive_until_discarded(client, poll):
    sem = ClusterSemaphore(client, lease_s=0.4)
    keeper = LeaseKeeper(sem)
    assert sem.acquire("gpu", 1, "me")
    keeper.add("gpu", "me", 1)
    keeper.start()
    try:
        time.sleep(1.0)  # 2.5 leases
        assert sem.holders("gpu") == 1 and not sem.acquire("gpu", 1, "other")
        keeper.discard("gpu", "me")
        assert poll(lambda: sem.acquire("gpu", 1, "other"), timeout_s=3)
    finally:
        keeper.stop()


def test_lease_keeper_retakes_a_lapsed_permit_when_there_is_room(client):
    sem = ClusterSemaphore(client, lease_s=30)
    keeper = LeaseKeeper(sem)
    keeper.add("gpu", "me", 1)  # as after Redis lost the key
    assert keeper.renew_now() == 1 and sem.holders("gpu") == 1


def test_a_renewal_racing_a_release_never_retakes_the_permit(client):
    sem = ClusterSemaphore(client, lease_s=30)
    keeper = LeaseKeeper(sem)
    assert sem.acquire("gpu", 1, "me")
    keeper.add("gpu", "me", 1)
    stale = keeper._snapshot()  # the keeper thread read its list just before the task ended
    keeper.discard("gpu", "me")
    sem.release("gpu", "me")
    keeper._snapshot = lambda: stale  # type: ignore[method-assign]
    assert keeper.renew_now() == 0 and sem.holders("gpu") == 0
