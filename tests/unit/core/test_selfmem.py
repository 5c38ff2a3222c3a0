"""This process's RSS and its kernel-kept peak, read the way admission and hygiene read them."""

from __future__ import annotations

import os

from rmq.core.selfmem import own_rss_bytes, peak_rss_bytes, reset_peak_rss

MiB = 1 << 20


def test_the_peak_holds_a_spike_already_given_back_until_it_is_reset() -> None:
    assert reset_peak_rss()
    start = own_rss_bytes()
    block = b"x" * (64 * MiB)  # written, so resident
    del block
    peak = peak_rss_bytes()
    assert peak is not None and peak - start >= 60 * MiB, (peak - start) / MiB
    assert own_rss_bytes() - start < 32 * MiB  # the spike is gone from the RSS
    assert reset_peak_rss()
    peak = peak_rss_bytes()
    assert peak is not None and peak - own_rss_bytes() < 8 * MiB  # a new peak starts from the RSS now


def test_a_forked_child_reads_and_resets_its_own_peak_not_its_parent_s() -> None:
    """The descriptors are kept open: a child must read its own ``/proc/self``, not the parent's."""
    assert reset_peak_rss()
    parent_peak = peak_rss_bytes()
    assert parent_peak is not None
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            start = own_rss_bytes()
            block = b"y" * (96 * MiB)
            del block
            peak = peak_rss_bytes() or 0
            reset = reset_peak_rss()
            after = peak_rss_bytes() or 0
            os.write(w, f"{peak - start} {int(reset)} {after} {own_rss_bytes()}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        spike, reset, after, rss = (int(x) for x in fh.read().split())
    os.waitpid(child, 0)
    assert spike >= 90 * MiB  # the child's own spike
    assert reset == 1 and after - rss < 8 * MiB  # and its own reset
    assert (peak_rss_bytes() or 0) - parent_peak < 32 * MiB  # the parent's peak never saw the child's spike
