"""Fuzzing: mutated VHD chains against info, check, cat, flatten and coalesce,
under both kernel backends.

Inputs are valid chains (small ones vhdcore writes, and the shared fixture
chains when present) with flipped bytes, extreme field values, damaged BAT
entries and bitmaps, truncations at structure boundaries and appended
garbage (see ``_mutate.draw_mutations``).  Every outcome must be correct
output or a ``VhdError``; each input runs under a time bound and a bound on
Python-visible allocations, and a separate campaign runs in a subprocess
with a capped address space.

``VHDCORE_FUZZ_EXAMPLES=N`` runs N examples per source and backend instead
of the default (and random instead of fixed seeds); ``VHDCORE_FUZZ_SAVE=DIR``
keeps every failing input there (add it to ``tests/corpus``).
``VHDCORE_FUZZ_REPORT=FILE`` appends outcome counts as JSON lines.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from _builders import build_chain
from _helpers import FIXTURE_META, SHARED_FIXTURES
from _mutate import (
    TARGETS,
    ContractViolation,
    Draw,
    Hang,
    Sample,
    apply_mutations,
    built_samples_in,
    draw_mutations,
    layout_of,
    memory_bound,
    run_targets,
    save_failure,
    time_bound,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
KiB = 1024

_ENV_EXAMPLES = os.environ.get("VHDCORE_FUZZ_EXAMPLES", "").strip()
EXAMPLES = int(_ENV_EXAMPLES) if _ENV_EXAMPLES else 250
FIXTURE_EXAMPLES = int(_ENV_EXAMPLES) if _ENV_EXAMPLES else 30
#: per input: wall-clock bound (a hang is a bug) and Python allocation bound
TIME_BOUND = float(os.environ.get("VHDCORE_FUZZ_TIME_BOUND", "60"))
MEMORY_BOUND = 160 * 1024 * 1024

SETTINGS = {
    "deadline": None,
    # fixed seeds in normal runs (a CI failure is reproducible); random ones
    # and the example database when VHDCORE_FUZZ_EXAMPLES asks for a campaign
    "derandomize": not _ENV_EXAMPLES,
    "database": None if not _ENV_EXAMPLES else settings.default.database,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                              HealthCheck.data_too_large],
}


# ------------------------------------------------------------------ samples
@pytest.fixture(scope="session")
def built_samples(tmp_path_factory) -> list[Sample]:
    return built_samples_in(tmp_path_factory.mktemp("fuzz-built"))


@pytest.fixture(scope="session")
def fixture_samples(tmp_path_factory) -> list[Sample]:
    if not FIXTURE_META:
        return []
    root = tmp_path_factory.mktemp("fuzz-fixtures")
    out = []
    for name, meta in sorted(FIXTURE_META.items()):
        d = root / name
        d.mkdir()
        for f in meta["chain_base_to_leaf"]:
            with gzip.open(SHARED_FIXTURES / name / (f + ".gz"), "rb") as src:
                (d / f).write_bytes(src.read())
        out.append(Sample(name, d, list(meta["chain_base_to_leaf"])))
    return out


def _fallback_fixture_like(root: Path) -> list[Sample]:
    """Without the shared fixtures: larger chains built by vhdcore (2 MiB
    blocks, as the fixtures have), so the fuzz still runs."""
    d = root / "fallback"
    d.mkdir()
    build_chain(d, size=6 * 1024 * KiB, depth=3, writes_per_layer=8, seed=17)
    return [Sample("fallback", d, ["d0.vhd", "d1.vhd", "d2.vhd"])]


# ------------------------------------------------------------------ one example
REPORT: dict[tuple[str, str], Counter] = {}


def _report(source: str, backend: str, outcome: dict[str, str]) -> None:
    c = REPORT.setdefault((source, backend), Counter())
    c["inputs"] += 1
    for target, result in outcome.items():
        c[f"{target}:{'ok' if result == 'ok' else 'error'}"] += 1


def fuzz_one(d: Draw, sample: Sample, workdir: Path, backend: str) -> dict[str, str]:
    """Mutate one or two files of ``sample``, lay the chain out in ``workdir``
    and run every target on it."""
    files = sample.files
    which = [files[-1]]
    if len(files) > 1 and d.bool(2):
        which = [d.choice(files[:-1])] + ([files[-1]] if d.bool(2) else [])
    replaced: dict[str, bytes] = {}
    mutations: dict[str, list] = {}
    for fname in which:
        data = sample.data(fname)
        lay = layout_of(sample.dir / fname)
        muts = draw_mutations(d, data, lay)
        mutations[fname] = muts
        replaced[fname] = apply_mutations(data, muts)
    parent = files[-2:-1]
    sample.write(workdir, replaced, copy=parent)
    other = "python" if backend == "cython" else "cython"
    try:
        with time_bound(TIME_BOUND), memory_bound(MEMORY_BOUND):
            outcome = run_targets(workdir, sample.leaf, TARGETS, other_backend=other)
    except (ContractViolation, Hang, AssertionError) as exc:
        keep = os.environ.get("VHDCORE_FUZZ_SAVE")
        if keep:
            saved = save_failure(Path(keep), sample, replaced, mutations, exc)
            raise AssertionError(f"{exc} (input kept in {saved}; mutations {mutations})") from exc
        raise AssertionError(f"{exc} (sample {sample.name}, mutations {mutations})") from exc
    return outcome.results


@pytest.fixture
def quick_fsync(monkeypatch):
    """The fuzz tests durability nowhere: skip the fsyncs (they dominate the
    time of small writes on a real disk)."""
    from vhdcore import _io

    monkeypatch.setattr(_io.os, "fsync", lambda fd: None)


def _run_campaign(samples, source, backend, tmp_path_factory, n):
    @settings(max_examples=n, **SETTINGS)
    @given(data=st.data())
    def campaign(data):
        d = Draw(data)
        sample = d.choice(samples)
        workdir = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
        try:
            _report(source, backend, fuzz_one(d, sample, workdir, backend))
        finally:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)

    campaign()
    _write_report(source, backend)


def _write_report(source: str, backend: str) -> None:
    path = os.environ.get("VHDCORE_FUZZ_REPORT")
    c = REPORT.get((source, backend))
    if path and c:
        with open(path, "a") as f:
            f.write(json.dumps({"source": source, "backend": backend, **c}) + "\n")


def test_fuzz_built_chains(built_samples, kernel_backend, tmp_path_factory, quick_fsync):
    """Mutated small chains written by vhdcore (dynamic, fixed base, short
    last block, relinked leaf)."""
    _run_campaign(built_samples, "built", kernel_backend, tmp_path_factory, EXAMPLES)
    assert REPORT[("built", kernel_backend)]["inputs"] >= 1


def test_fuzz_fixture_chains(fixture_samples, kernel_backend, tmp_path_factory, quick_fsync):
    """Mutated third-party chains (blktap, qemu layouts); chains vhdcore
    builds with 2 MiB blocks when the shared fixtures are absent."""
    samples = fixture_samples or _fallback_fixture_like(tmp_path_factory.mktemp("fallback"))
    _run_campaign(samples, "fixtures", kernel_backend, tmp_path_factory, FIXTURE_EXAMPLES)
    assert REPORT[("fixtures", kernel_backend)]["inputs"] >= 1


# ------------------------------------------------------------------ truncation
@pytest.mark.parametrize("name", ["dyn3", "fixed2", "short", "relinked"])
def test_truncation_at_every_structure_boundary(built_samples, name, kernel_backend, tmp_path,
                                                quick_fsync):
    """Each file of the chain cut at every structure boundary (and one byte
    either side), with and without recomputed checksums."""
    sample = next(s for s in built_samples if s.name == name)
    n = 0
    for fname in sample.files:
        data = sample.data(fname)
        lay = layout_of(sample.dir / fname)
        for cut in lay.boundaries():
            for fix in (False, True):
                muts = [("truncate", cut)] + ([("fix",)] if fix else [])
                wd = tmp_path / f"t{n}"
                n += 1
                sample.write(wd, {fname: apply_mutations(data, muts)}, copy=sample.files[-2:-1])
                try:
                    with time_bound(TIME_BOUND):
                        run_targets(wd, sample.leaf, TARGETS)
                except AssertionError as exc:
                    raise AssertionError(f"{fname} cut at {cut} (fix={fix}): {exc}") from exc
    assert n > 20


# ------------------------------------------------------------------ corpus
def _corpus_cases() -> list:
    if not CORPUS.is_dir():
        return []
    cases = sorted(p.name for p in CORPUS.iterdir()
                   if p.is_dir() or p.name.endswith((".vhd", ".vhd.gz")))
    return cases


@pytest.mark.parametrize("case", _corpus_cases() or [pytest.param("none", marks=pytest.mark.skip)])
def test_corpus(case, kernel_backend, tmp_path):
    """Every input that ever broke the contract, as a regression test: a
    single file (``NAME.vhd`` or ``NAME.vhd.gz``) or a directory holding a
    chain (its leaf named in ``leaf.txt``)."""
    src = CORPUS / case
    wd = tmp_path / "c"
    wd.mkdir()
    if src.is_dir():
        leaf = (src / "leaf.txt").read_text().strip()
        for f in src.iterdir():
            if f.name.endswith(".gz"):
                (wd / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
            elif f.suffix == ".vhd":
                (wd / f.name).write_bytes(f.read_bytes())
    else:
        leaf = case.removesuffix(".gz")
        raw = src.read_bytes()
        (wd / leaf).write_bytes(gzip.decompress(raw) if case.endswith(".gz") else raw)
    other = "python" if kernel_backend == "cython" else "cython"
    with time_bound(TIME_BOUND), memory_bound(MEMORY_BOUND):
        run_targets(wd, leaf, TARGETS, other_backend=other)


def test_corpus_files_are_small():
    for p in CORPUS.rglob("*"):
        if p.is_file():
            assert p.stat().st_size <= 64 * KiB, f"{p.name} is larger than 64 KiB"


# ------------------------------------------------------------------ memory, in a subprocess
CAMPAIGN = r"""
import gc, json, os, random, resource, shutil, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from _mutate import (Draw, Sample, apply_mutations, draw_mutations, layout_of, run_targets,
                     limit_address_space, time_bound, TARGETS)
import vhdcore._io as _io
_io.os.fsync = lambda fd: None
root = Path(sys.argv[2])
samples = [Sample(s["name"], Path(s["dir"]), s["files"]) for s in json.loads(sys.argv[3])]
n, seed = int(sys.argv[4]), int(sys.argv[5])
rnd = random.Random(seed)
d = Draw(rnd)
# warm up (imports, first-use allocations), then cap the address space
w = Path(tempfile.mkdtemp(dir=root))
samples[0].write(w, copy=samples[0].files)
run_targets(w, samples[0].leaf, TARGETS)
shutil.rmtree(w)
def rss():
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
rss0 = rss()
cap = limit_address_space(int(sys.argv[6]))
outcomes = {}
for i in range(n):
    s = d.choice(samples)
    fname = s.files[-1] if len(s.files) == 1 or d.bool(5) else d.choice(s.files)
    data = s.data(fname)
    muts = draw_mutations(d, data, layout_of(s.dir / fname))
    w = Path(tempfile.mkdtemp(dir=root))
    s.write(w, {fname: apply_mutations(data, muts)}, copy=s.files[-2:-1])
    try:
        with time_bound(60):
            res = run_targets(w, s.leaf, TARGETS).results
    except BaseException as exc:
        print(json.dumps({"failed": f"{type(exc).__name__}: {exc}", "sample": s.name,
                          "file": fname, "mutations": repr(muts)}))
        sys.exit(1)
    for k, v in res.items():
        outcomes[f"{k}:{'ok' if v == 'ok' else 'error'}"] = outcomes.get(
            f"{k}:{'ok' if v == 'ok' else 'error'}", 0) + 1
    shutil.rmtree(w)
rss1 = rss()
print(json.dumps({"inputs": n, "rss_before": rss0, "rss_after": rss1, "cap": cap,
                  "outcomes": outcomes}))
"""

#: the most the resident set may grow over a whole campaign, and the address
#: space allowed beyond the warmed-up process (blocks of up to 256 MiB are
#: legal, so a few block-sized buffers must fit)
RSS_GROWTH_BOUND = 64 * 1024 * 1024
ADDRESS_SPACE_EXTRA = 3 * 1024 * 1024 * 1024


def test_fuzz_memory_bounded_in_subprocess(built_samples, tmp_path):
    """A seeded campaign in a subprocess whose address space is capped: no
    input may need more (a MemoryError or a failed mmap is a failure), and
    the resident set may not grow past a fixed bound over the whole run (no
    leak: mappings, buffers and files are released)."""
    n = max(30, EXAMPLES * 4 // 5)
    spec = json.dumps([{"name": s.name, "dir": str(s.dir), "files": s.files}
                       for s in built_samples])
    seed = random.randrange(1 << 30) if _ENV_EXAMPLES else 20240611
    proc = subprocess.run(
        [sys.executable, "-c", CAMPAIGN, str(HERE), str(tmp_path), spec, str(n), str(seed),
         str(ADDRESS_SPACE_EXTRA)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(HERE), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 0, f"seed {seed}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["inputs"] == n
    assert res["rss_after"] - res["rss_before"] <= RSS_GROWTH_BOUND, res
    path = os.environ.get("VHDCORE_FUZZ_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"source": "built, capped subprocess", "backend": "default",
                                **res}) + "\n")
