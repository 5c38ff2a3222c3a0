"""This process's RSS and its kernel-kept peak, read the way admission and hygiene read them."""

from __future__ import annotations

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
