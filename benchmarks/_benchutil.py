"""Helpers the benchmarks import."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _tests_helpers():
    """tests/_helpers.py, the one place that decides what a missing server means."""
    name = "_vhdcore_tests_helpers"
    module = sys.modules.get(name)
    if module is None:
        path = Path(__file__).resolve().parents[1] / "tests" / "_helpers.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def server_missing(why: str) -> None:
    """Skip, or fail under ``VHDCORE_REQUIRE_SERVERS=1`` (see tests/_helpers.py)."""
    _tests_helpers().server_missing(why)


def gbps(benchmark, nbytes: int) -> None:
    """Record bytes processed so results read as GB/s (stats in seconds)."""
    benchmark.extra_info["bytes"] = nbytes
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median:
        benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.median / 1e9, 3)
