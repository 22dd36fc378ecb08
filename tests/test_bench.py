"""``python -m vhdcore bench``: a smoke run on a tiny workload, the report's
shape, the exit-code contract and the kernel patching it relies on."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from vhdcore import _merge_py, bench, cli, kernels

#: every figure the report must carry (the peer only where qemu-img is installed)
EXPECTED = [
    "memcpy.block", "memcpy.stream",
    "kernel.overlay_full", "kernel.overlay_scattered", "kernel.find_runs", "kernel.is_zero",
    "kernel.clear_zero_sectors", "kernel.fingerprint", "kernel.merge_scattered",
    "twin.overlay_full", "twin.overlay_scattered", "twin.find_runs", "twin.is_zero",
    "twin.clear_zero_sectors", "twin.merge_scattered", "twin.coalesce_scattered",
    "read.chain", "flatten.raw", "flatten.vhd",
    "coalesce.full", "coalesce.scattered", "coalesce.scattered_holes",
    "lz4.1thread", "lz4.2threads", "upload.directory",
    "imaging.stage_scan", "imaging.stage_upload", "imaging.sha256", "imaging.pipeline",
    "imaging.cpu_bound", "imaging.virtual",
    "memory.flatten", "memory.flatten_anon", "memory.imaging", "memory.imaging_anon",
    "memory.imaging_large_segments",
    "repo.first_image", "repo.incremental_time", "repo.incremental_growth",
    "repo.clone_growth", "repo.restore", "memory.repo",
    "coalesce.vs_vhd_util.random4k.cold", "coalesce.vs_vhd_util.random4k.warm",
    "coalesce.vs_vhd_util.blocks.cold", "coalesce.vs_vhd_util.blocks.warm",
    "coalesce.vs_vhd_util.random4k.warm_whole",
]


@pytest.fixture(scope="module")
def report() -> dict:
    """One real run, as small as the command allows (a few seconds)."""
    proc = subprocess.run(
        [sys.executable, "-m", "vhdcore", "bench", "--quick", "--json", "--size", "16M",
         "--reps", "1", "--memory-size", "1G"],
        capture_output=True, text=True, timeout=300, check=False,
        # a smoke test: cold rows evict their own files' pages only, never the
        # whole machine's page cache
        env={**os.environ, "VHDCORE_BENCH_NO_DROP_CACHES": "1"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_report_has_every_result_with_positive_numbers(report):
    by_name = {r["name"]: r for r in report["results"]}
    want = EXPECTED + (["peer.qemu_img"] if shutil.which("qemu-img") else [])
    assert sorted(set(want) - set(by_name)) == []
    for r in report["results"]:
        assert r["bytes"] > 0 and r["seconds"] > 0 and r["gbps"] > 0, r
        assert math.isfinite(r["gbps"])
        if r["ratio"] is not None:
            assert r["ratio"] > 0, r
        assert r["verdict"] in ("PASS", "MISS", "info", "n/a")
        assert r["pass"] in (True, False, None)
        assert (r["verdict"] == "PASS") == (r["pass"] is True)
        assert (r["verdict"] == "MISS") == (r["pass"] is False)
        if r["name"].startswith("memory."):
            assert r["peak_bytes"] > 0
    for name in bench.TARGETS:
        if name in ("flatten.raw", "flatten.raw_cold", "flatten.vhd_cold") and (
                not shutil.which("qemu-img")
                or (name.endswith("_cold") and not os.access("/proc/sys/vm/drop_caches", os.W_OK))):
            # the peer (or dropping the page cache) is missing: unchecked
            assert by_name[name]["verdict"] == "n/a"
            continue
        if name.startswith("coalesce.vs_vhd_util.") and not os.environ.get(
                "VHDCORE_BENCH_VHD_UTIL"):
            # the peer is not installed: vhdcore's side is measured, no ratio
            assert by_name[name]["verdict"] == "n/a" and by_name[name]["ratio"] is None
            continue
        assert by_name[name]["target"], name
        assert by_name[name]["verdict"] in ("PASS", "MISS"), name
    summary = report["summary"]
    checked = [r for r in report["results"] if r["pass"] is not None]
    assert summary["pass"] + summary["miss"] == len(checked)


def test_report_describes_the_machine(report):
    m = report["machine"]
    assert m["cpu_count"] >= 1 and m["python"] and m["numpy"]
    assert m["backend"] == kernels.backend
    s = report["settings"]
    assert s["size"] == 16 * 1024 * 1024 and s["reps"] == 1
    assert s["memcpy_gbps"] > 0


def test_table_names_every_result(report):
    text = bench.format_report(report)
    for r in report["results"]:
        assert r["name"] in text
    assert "PASS" in text or "MISS" in text
    assert f"{report['summary']['pass']} PASS, {report['summary']['miss']} MISS" in text


def _fake_report(passed: bool) -> dict:
    r = bench.Result("coalesce.full", "coalesce", "coalesce", 10**9, 1.0, 1, 1.0, "memcpy",
                     ">= 1 GB/s", passed)
    checked = [r]
    return {"machine": bench.machine_info(), "settings": {"size": 1, "reps": 1,
                                                           "workdir_fs": "?",
                                                           "memcpy_gbps": 1.0},
            "results": [x.to_json() for x in checked],
            "summary": {"pass": int(passed), "miss": int(not passed), "unchecked": [],
                        "seconds": 1.0}}


@pytest.mark.parametrize("passed", [True, False])
@pytest.mark.parametrize("strict", [False, True])
def test_exit_code_is_zero_on_a_miss_unless_strict(monkeypatch, capsys, passed, strict):
    monkeypatch.setattr(bench, "run_bench", lambda **kw: _fake_report(passed))
    argv = ["bench", "--quick"] + (["--strict"] if strict else [])
    code = cli.main(argv)
    out = capsys.readouterr().out
    assert ("1 PASS, 0 MISS" if passed else "0 PASS, 1 MISS") in out
    assert code == (1 if strict and not passed else 0)


def test_twin_kernels_patches_and_restores():
    before = {n: getattr(kernels, n) for n in kernels.KERNEL_NAMES}
    with bench.twin_kernels():
        for n in kernels.KERNEL_NAMES:
            assert getattr(kernels, n) is getattr(_merge_py, n)
    assert {n: getattr(kernels, n) for n in kernels.KERNEL_NAMES} == before
    with pytest.raises(RuntimeError), bench.twin_kernels():
        raise RuntimeError("boom")
    assert {n: getattr(kernels, n) for n in kernels.KERNEL_NAMES} == before


def _cached_pages(path) -> list[bool]:
    """Which pages of ``path`` are in the page cache (``mincore``)."""
    import mmap

    from vhdcore.ops.coalesce_block import _resident_pages

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        pages = _resident_pages(mm, 0, -(-len(mm) // mmap.PAGESIZE))
    if pages is None:
        pytest.skip("no mincore here")
    return [bool(v) for v in pages]


def _data_extents_of(path) -> list[tuple[int, int]]:
    from vhdcore.bench.coalesce_peer import _data_extents

    fd = os.open(path, os.O_RDONLY)
    try:
        return _data_extents(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def test_peer_warm_up_caches_the_data_not_the_holes(tmp_path):
    """The coalesce comparison's warm-up reads a sparse file's data extents
    only (a whole read would cache a zeroed page for every page of its
    holes); ``whole=True`` reads every byte."""
    from vhdcore.bench.coalesce_peer import warm
    from vhdcore.bench.machine import evict

    page = 4096
    p = tmp_path / "sparse"
    with open(p, "wb") as f:
        f.write(b"\1" * 16 * page)           # pages 0-15: data
        f.seek(1024 * page)
        f.write(b"\2" * page)                # page 1024: data, a hole before it
        f.truncate(2048 * page)              # a hole at the end
    evict([p])
    if any(_cached_pages(p)):
        pytest.skip("this filesystem keeps the pages cached (tmpfs?)")
    if _data_extents_of(p) == [(0, 2048 * page)]:
        pytest.skip("this filesystem reports no holes")
    warm([p])
    cached = _cached_pages(p)
    assert all(cached[:16]) and cached[1024]
    assert not any(cached[16:1024]) and not any(cached[1025:])
    evict([p])
    warm([p], whole=True)
    assert all(_cached_pages(p))

