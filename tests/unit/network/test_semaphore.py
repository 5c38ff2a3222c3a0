"""Cluster semaphores against a real Redis: permits up to the limit, leases that lapse."""

from __future__ import annotations

import threading
import time

import redis as redis_lib

from rmq.network.semaphore import ClusterSemaphore


def test_semaphore_grants_up_to_the_limit_and_frees_on_release(client):
    sem = ClusterSemaphore(client, lease_s=30)
    assert sem.acquire("gpu", 2, "a") and sem.acquire("gpu", 2, "b")
    assert not sem.acquire("gpu", 2, "c")
    assert sem.acquire("gpu", 2, "a")  # a holder that holds renews, it takes no second permit
    assert sem.holders("gpu") == 2
    sem.release("gpu", "a")
    assert sem.holders("gpu") == 1 and sem.acquire("gpu", 2, "c")


def test_a_lease_that_is_not_renewed_lapses(client, poll):
    sem = ClusterSemaphore(client, lease_s=0.3)
    assert sem.acquire("gpu", 1, "dead")
    assert not sem.acquire("gpu", 1, "next")
    assert poll(lambda: sem.acquire("gpu", 1, "next"), timeout_s=3)
    assert not sem.renew("gpu", "dead")


def test_acquire_all_takes_every_permit_or_none(client):
    sem = ClusterSemaphore(client, lease_s=30)
    assert sem.acquire("b", 1, "other")
    assert sem.acquire_all({"a": 5, "b": 1}, "me") == "b"
    assert sem.holders("a") == 0


def test_concurrent_threads_never_exceed_the_limit(client):
    sem = ClusterSemaphore(client, lease_s=30)
    active, peak, lock = [0], [0], threading.Lock()

    def worker(i: int) -> None:
        c = redis_lib.Redis(connection_pool=client.connection_pool)
        mine = ClusterSemaphore(c, 30)
        for n in range(15):
            holder = f"{i}:{n}"
            while not mine.acquire("gpu", 2, holder):
                time.sleep(0.002)
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.003)
            with lock:
                active[0] -= 1
            mine.release("gpu", holder)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert peak[0] == 2 and sem.holders("gpu") == 0
