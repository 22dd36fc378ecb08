"""One run of ``vhdcore bench``: every area measured in turn, the results
ordered and summed up into the report (JSON-ready)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._version import __version__
from .engine import measure_coalesce, measure_flatten
from .imaging import measure_imaging
from .kernels import measure_kernels, measure_memcpy, measure_twin_operations
from .memory import measure_memory
from .repo import measure_repo, measure_repo_memory
from .context import (BLOCK, DEFAULT_REPS, DEFAULT_SIZE, MEMORY_SIZE, QUICK_REPS, QUICK_SIZE,
                      SEGMENT, THREADS, BenchRun)
from .machine import cpu_busy, fs_type, machine_info
from .report import Result

__all__ = ["run_bench"]

_ORDER = ["machine", "kernel", "twin", "read", "flatten", "coalesce", "lz4", "upload",
          "imaging", "repo", "memory"]


def _measure_all(b: BenchRun, memory_check: bool) -> None:
    wl = b.workloads()
    measure_memcpy(b)
    measure_kernels(b)
    measure_twin_operations(b, wl)
    measure_flatten(b, wl)
    measure_coalesce(b, wl)
    measure_imaging(b, wl)
    measure_repo(b, wl)
    if memory_check:
        measure_memory(b)
        measure_repo_memory(b)


def _summary(results: list[Result], t0: float) -> dict[str, Any]:
    checked = [r for r in results if r.passed is not None]
    return {"pass": sum(1 for r in checked if r.passed),
            "miss": sum(1 for r in checked if not r.passed),
            "unchecked": [r.name for r in results if r.target and r.passed is None],
            "seconds": round(time.perf_counter() - t0, 1)}


def run_bench(*, size: int | None = None, quick: bool = False, reps: int | None = None,
              memory_size: int | None = None, memory: bool = True,
              workdir: str | os.PathLike[str] | None = None,
              say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every measurement once and return the report (JSON-ready): the
    machine facts, the settings, the list of results and a PASS/MISS summary.

    ``size``: virtual size of the workloads (default 256 MiB, 96 MiB with
    ``quick``); ``reps``: repetitions per figure (median; 7, quick 5);
    ``memory_size``: virtual size of the sparse chain of the memory check
    (at least 8 GiB unless set; ``memory=False`` skips the check).
    """
    say = say or (lambda msg: None)
    size = int(size or (QUICK_SIZE if quick else DEFAULT_SIZE))
    size = max(BLOCK, -(-size // BLOCK) * BLOCK)
    reps = int(reps or (QUICK_REPS if quick else DEFAULT_REPS))
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    memory_size = int(memory_size or MEMORY_SIZE)
    t0 = time.perf_counter()
    busy_before = cpu_busy()
    work = Path(tempfile.mkdtemp(prefix="vhdcore-bench-", dir=workdir))
    fs = fs_type(work)
    try:
        b = BenchRun(work, size, reps, memory_size, say)
        _measure_all(b, memory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = b.results
    results.sort(key=lambda r: _ORDER.index(r.group) if r.group in _ORDER else len(_ORDER))
    machine = machine_info()
    machine["cpu_busy_before"] = busy_before
    return {
        "tool": f"vhdcore {__version__} bench",
        "machine": machine,
        "settings": {"size": size, "reps": reps, "quick": quick, "threads": THREADS,
                     "segment_size": SEGMENT, "memory_size": memory_size if memory else None,
                     "workdir_fs": fs, "memcpy_gbps": round(b.memcpy, 3),
                     "fsync_generated_seconds": round(b.settle_seconds, 2)},
        "results": [r.to_json() for r in results],
        "summary": _summary(results, t0),
    }
