"""Helpers the benchmarks import."""
from __future__ import annotations


def gbps(benchmark, nbytes: int) -> None:
    """Record bytes processed so results read as GB/s (stats in seconds)."""
    benchmark.extra_info["bytes"] = nbytes
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median:
        benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.median / 1e9, 3)
