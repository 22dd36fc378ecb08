"""Throughput benchmarks behind ``python -m vhdcore bench``.

One run generates its own chains (:func:`vhdcore._workloads.make_chain`) in a
temporary directory and measures, several repetitions each with the median
reported, everything from the machine's own memory copy bandwidth (the
physical limit) up to the whole imaging pipeline.  One module per job:

* ``run``: :func:`run_bench`, every area in turn, the report;
* ``context``: the settings of a run, its workloads and results (``BenchRun``);
* ``timing``: the median timing helpers every area uses;
* ``machine``: the machine's facts, its other load, the page cache (cold runs);
* ``report``: :class:`Result`, the targets (PASS/MISS), :func:`format_report`;
* ``kernels``: memory copy, the kernel's verbs and its pure-Python twin;
* ``engine``: chain read, flatten and ``cat -o`` vs ``qemu-img convert``,
  coalesce in place and vs ``vhd-util`` (``coalesce_peer``: its workloads);
* ``imaging``: lz4, upload, the stages, the pipeline, ``image`` vs ``swift upload``;
* ``memory``: peak memory of flatten and imaging in a child process;
* ``repo``: the content-addressed repository's targets.

Every figure is reported in GB/s (10**9 bytes per second) next to a ratio to
a reference measured in the same run (memory copy, the peer, the twin, the
slowest pipeline stage) and, where there is one, its target with PASS or
MISS.  Ratios carry over between machines; absolute GB/s do not.

Directory targets are written without fsync and flatten/coalesce run with
``durable=False``: the figures are those of the engine with the data in the
page cache, not of the disk under it (the peer comparisons count the final
fsync on both sides).
"""
from __future__ import annotations

from .context import DEFAULT_SIZE, MEMORY_SIZE, QUICK_SIZE
from .kernels import twin_kernels
from .machine import machine_info
from .memory import measure_peak_memory
from .report import TARGETS, Result, format_report
from .run import run_bench

__all__ = [
    "DEFAULT_SIZE",
    "MEMORY_SIZE",
    "QUICK_SIZE",
    "TARGETS",
    "Result",
    "format_report",
    "machine_info",
    "measure_peak_memory",
    "run_bench",
    "twin_kernels",
]
