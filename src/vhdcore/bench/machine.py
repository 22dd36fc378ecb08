"""The machine a run of ``vhdcore bench`` measures: the facts a figure
depends on (CPUs, versions, file system, other load), and the page cache
(write back, drop, or evict one file's pages) for the cold runs."""
from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from .. import kernels
from .._version import __version__

__all__ = ["NO_DROP_CACHES_ENV", "can_drop_caches", "cpu_busy", "drop_caches", "evict",
           "fs_type", "fsync_paths", "machine_info", "usable_cpus"]

_DROP_CACHES = "/proc/sys/vm/drop_caches"
#: set to 1 so that no run drops the machine's page cache (cold runs then
#: evict only their own files' pages, as without root)
NO_DROP_CACHES_ENV = "VHDCORE_BENCH_NO_DROP_CACHES"


def can_drop_caches() -> bool:
    """Whether this run drops the page cache before a cold run: the process
    may (root on Linux) and ``VHDCORE_BENCH_NO_DROP_CACHES`` is not set."""
    if os.environ.get(NO_DROP_CACHES_ENV, "") not in ("", "0"):
        return False
    return os.access(_DROP_CACHES, os.W_OK)


def drop_caches() -> None:
    """Write everything back and drop the page cache (clean pages, dentries
    and inodes), so that the next run reads from storage."""
    os.sync()
    with open(_DROP_CACHES, "w") as f:
        f.write("3\n")


def fsync_paths(paths: Iterable[Path]) -> None:
    """Write the files back (fsync each)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict(paths: Iterable[Path]) -> None:
    """Write the files back and drop their pages from the page cache
    (``posix_fadvise(DONTNEED)``): cold for these files only."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def fs_type(path: Path) -> str:
    """File system type of the directory (from /proc/self/mounts), or "?"."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1:3] for line in f]
    except OSError:
        return "?"
    real = os.path.realpath(path)
    best, kind = "", "?"
    for mnt, fstype in mounts:
        mnt = mnt.replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
            best, kind = mnt, fstype
    return kind


def _qemu_version() -> str | None:
    qemu = shutil.which("qemu-img")
    if not qemu:
        return None
    try:
        return subprocess.run([qemu, "--version"], capture_output=True, text=True,
                              check=False).stdout.splitlines()[0]
    except (OSError, IndexError):
        return None


def machine_info() -> dict[str, Any]:
    """The facts a figure depends on (no paths)."""
    import lz4

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "lz4": getattr(lz4, "__version__", "?"),
        "xxhash": xxhash.VERSION,
        "vhdcore": __version__,
        "backend": kernels.backend,
        "qemu_img": _qemu_version(),
        "load_average": _load_average(),
    }


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return idle, sum(fields)


def cpu_busy(seconds: float = 0.5) -> float | None:
    """Share of the machine's CPU time (0..1) that was not idle during
    ``seconds`` (this process sleeps meanwhile): other work on the machine."""
    a = _cpu_times()
    if a is None:
        return None
    time.sleep(seconds)
    b = _cpu_times()
    if b is None or b[1] <= a[1]:
        return None
    return round(1.0 - (b[0] - a[0]) / (b[1] - a[1]), 3)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
