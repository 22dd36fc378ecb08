"""How every figure of ``vhdcore bench`` is timed: the median of several
repetitions (after a warm-up), with set-up and clean-up outside the timing.
The one home of these helpers: the engine, imaging and repository
benchmarks all time through them."""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["alternate", "median_calls", "median_op", "timed_call"]


def median_calls(fn: Callable[[], object], reps: int, min_seconds: float = 0.02) -> float:
    """Median seconds of one call of a fast ``fn``: each repetition loops
    enough calls to last about ``min_seconds``."""
    fn()
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt >= min_seconds / 4 or n >= 1 << 20:
            break
        n *= 4
    n = max(1, int(n * min_seconds / max(dt, 1e-9)))
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t) / n)
    return statistics.median(samples)


def median_op(fn: Callable[..., object], reps: int,
              setup: Callable[[], tuple[Any, ...]] | None = None,
              cleanup: Callable[[], object] | None = None, warmup: bool = True,
              cpu: list[float] | None = None) -> float:
    """Median seconds of ``fn(*setup())``; ``setup`` and ``cleanup`` run
    outside the timing, around each repetition (and the warm-up).  ``cpu``,
    if given, receives the median CPU seconds of the process (all threads)."""
    samples = []
    cpus = []
    for i in range(reps + (1 if warmup else 0)):
        args = setup() if setup is not None else ()
        gc.collect()
        c = time.process_time()
        t = time.perf_counter()
        fn(*args)
        dt = time.perf_counter() - t
        dc = time.process_time() - c
        if cleanup is not None:
            cleanup()
        if i or not warmup:
            samples.append(dt)
            cpus.append(dc)
    if cpu is not None:
        cpu.append(statistics.median(cpus))
    return statistics.median(samples)


def timed_call(fn: Callable[..., Any], *args: Any, **kw: Any) -> tuple[float, Any]:
    """Seconds of one call of ``fn(*args, **kw)``, and what it returned."""
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def alternate(sides: Mapping[str, Callable[[], object]], reps: int, *, warmup: bool = False,
              setup: Callable[[str], object] | None = None,
              cleanup: Callable[[str], object] | None = None) -> dict[str, float]:
    """Median seconds of each side, the sides run in turn, repetition by
    repetition, so that the machine's moods hit them alike (the first round
    is a warm-up when ``warmup``).  ``setup(key)`` and ``cleanup(key)`` run
    around each call, outside the timing."""
    samples: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(reps + (1 if warmup else 0)):
        for key, fn in sides.items():
            if setup is not None:
                setup(key)
            gc.collect()
            dt, _ = timed_call(fn)
            if cleanup is not None:
                cleanup(key)
            if i or not warmup:
                samples[key].append(dt)
    return {k: statistics.median(v) for k, v in samples.items()}
