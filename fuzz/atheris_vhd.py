"""Coverage-guided fuzzing of vhdcore with atheris, for long runs.

The fuzzer's bytes drive the same structure-aware mutations as the test
suite (``tests/_mutate.py``): which small chain to start from, which of its
files to damage and how (flipped bytes, extreme field values, BAT entries,
bitmaps, truncation at structure boundaries).  Every entry point then runs
on the result -- info, check, cat (under both kernels), flatten, coalesce --
and anything but correct output or a ``VhdError`` is a crash that atheris
reports and saves.

Run (see docs/fuzzing.md)::

    pip install atheris
    python fuzz/atheris_vhd.py -max_total_time=3600 -rss_limit_mb=4096 fuzz/corpus
    python fuzz/atheris_vhd.py crash-<hash>          # replay one finding

``VHDCORE_FUZZ_SAVE=DIR`` also keeps each failing chain as files (for
``tests/corpus``).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

with atheris.instrument_imports(include=["vhdcore", "_mutate"]):
    from _mutate import (
        TARGETS,
        ContractViolation,
        Draw,
        Hang,
        apply_mutations,
        built_samples_in,
        draw_mutations,
        layout_of,
        run_targets,
        save_failure,
        time_bound,
    )

    from vhdcore import _io

_io.os.fsync = lambda fd: None  # durability is not what is fuzzed here
ROOT = Path(tempfile.mkdtemp(prefix="vhdcore-atheris-"))
(ROOT / "samples").mkdir()
SAMPLES = built_samples_in(ROOT / "samples")


class _Source:
    """Integers for ``Draw`` from the fuzzer's bytes."""

    def __init__(self, fdp: atheris.FuzzedDataProvider) -> None:
        self.fdp = fdp

    def randint(self, lo: int, hi: int) -> int:
        return self.fdp.ConsumeIntInRange(lo, hi)


def TestOneInput(data: bytes) -> None:
    d = Draw(_Source(atheris.FuzzedDataProvider(data)))
    sample = d.choice(SAMPLES)
    names = [sample.leaf] if len(sample.files) == 1 or d.bool(5) else [d.choice(sample.files)]
    replaced, mutations = {}, {}
    for fname in names:
        raw = sample.data(fname)
        muts = draw_mutations(d, raw, layout_of(sample.dir / fname))
        mutations[fname] = muts
        replaced[fname] = apply_mutations(raw, muts)
    work = Path(tempfile.mkdtemp(dir=ROOT))
    try:
        sample.write(work, replaced, copy=sample.files[-2:-1])
        with time_bound(float(os.environ.get("VHDCORE_FUZZ_TIME_BOUND", "60"))):
            run_targets(work, sample.leaf, TARGETS, other_backend="python")
    except (ContractViolation, Hang) as exc:
        keep = os.environ.get("VHDCORE_FUZZ_SAVE")
        if keep:
            save_failure(Path(keep), sample, replaced, mutations, exc)
        raise RuntimeError(f"{exc} (sample {sample.name}, mutations {mutations})") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    try:
        atheris.Fuzz()
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    main()
