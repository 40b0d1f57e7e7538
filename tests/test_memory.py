"""Giving freed memory back (attribution.memory). What it saves on a real run is measured in
``benchmarks/attribution.py --scale`` (``peak_rss_mb_F<width>`` with and without it); here: glibc
accepts the settings, and bad input gets its sentence."""

from __future__ import annotations

import sys

import pytest

from attribution import memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._glibc() is None, reason="glibc only")
def test_glibc_accepts_the_threshold_and_the_trim():
    assert memory.mmap_large_allocations(1.0) is True  # mallopt returns 1 only for a known parameter
    assert memory.trim() is True


def test_a_threshold_must_be_positive():
    with pytest.raises(ValueError, match="threshold_mb must be > 0"):
        memory.mmap_large_allocations(0)
