"""One run of ``vhdcore bench``: its settings, its workloads and the
results recorded so far (:class:`BenchRun`), which every measured area
(``kernels``, ``engine``, ``imaging``, ``repo``, ``memory``) adds to."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .._workloads import Workload, make_chain
from ..vhd.format import SECTOR
from .machine import fsync_paths
from .report import TARGETS, GiB, MiB, Result, check, target_text

__all__ = ["BLOCK", "BenchRun", "DEFAULT_REPS", "DEFAULT_SIZE", "MEMORY_SIZE", "NSECTORS",
           "QUICK_REPS", "QUICK_SIZE", "REPO_MEMORY_SIZE", "SEGMENT", "THREADS"]

#: virtual size of the throughput workloads (``--size``)
DEFAULT_SIZE = 256 * MiB
QUICK_SIZE = 96 * MiB
#: virtual size of the sparse chain of the memory check
MEMORY_SIZE = 8 * GiB
#: virtual size of the sparse chain of the repository's memory check
REPO_MEMORY_SIZE = 2040 << 30  # the VHD limit: just under 2 TiB
#: repetitions per measurement (the median is reported)
DEFAULT_REPS = 7
QUICK_REPS = 5

BLOCK = 2 * MiB
NSECTORS = BLOCK // SECTOR
THREADS = 2
#: segment size of the upload and imaging measurements: small enough that a
#: workload of 96 MiB still has several segments to overlap
SEGMENT = 8 * MiB


class BenchRun:
    """The settings of one run, its working directory and its results."""

    def __init__(self, work: Path, size: int, reps: int, memory_size: int,
                 say: Callable[[str], None]) -> None:
        self.work = work
        self.size = size
        self.reps = reps
        self.memory_size = memory_size
        self.say = say
        self.results: list[Result] = []
        #: GB/s of the 2 MiB memory copy: the reference of the "memcpy" ratios
        self.memcpy = 0.0
        self.settle_seconds = 0.0
        #: (seconds, merged bytes) of the scattered coalesce with the twin
        self.twin_coalesce = (0.0, 0)

    def add(self, name: str, title: str, group: str, nbytes: int, seconds: float, *,
            ratio: float | None = None, ratio_to: str = "", note: str = "",
            reps: int | None = None,
            peak_bytes: int | None = None) -> Result:
        """Record one figure, checked against its target (if it has one)."""
        r = Result(name, title, group, int(nbytes), float(seconds), reps or self.reps, ratio,
                   ratio_to, target_text(name), None, note, peak_bytes)
        tgt = TARGETS.get(name)
        if tgt is not None:
            kind = tgt[0]
            value = {"ratio": ratio, "gbps": r.gbps,
                     "mib": None if peak_bytes is None else peak_bytes / MiB}[kind]
            r.passed = check(name, value)
        self.results.append(r)
        return r

    def workloads(self) -> dict[str, Workload]:
        """The chains every area measures on, generated and written back."""
        self.say(f"generating workloads of {self.size // MiB} MiB ...")
        made = {}
        for kind in ("full", "scattered", "sparse", "realistic"):
            # scattered: every base block allocated ("a full base"), so that the
            # child's 4 KiB writes land in existing parent blocks
            made[kind] = make_chain(self.work / "chains" / kind, kind, size=self.size,
                                    layers=2 if kind == "scattered" else 3, seed=1,
                                    fill=1.0 if kind == "scattered" else 0.6)
        # the same writes over a parent that lacks 40% of the blocks: each of
        # those is allocated and written whole (2 MiB) by the coalesce
        made["scattered-holes"] = make_chain(self.work / "chains" / "scattered-holes",
                                             "scattered", size=self.size, layers=2, seed=1)
        self.settle(p for w in made.values() for p in w.paths)
        return made

    def settle(self, paths: Iterable[Path]) -> None:
        """Write back the generated files now (fsync), so that the kernel's
        flusher threads do not compete with the measurements later (they
        share the same few CPUs)."""
        t = time.perf_counter()
        fsync_paths(paths)
        self.settle_seconds += time.perf_counter() - t
