"""``vhdcore demo``: the main job on a built-in synthetic chain, no server needed.

Builds a chain of three VHDs (a few hundred MiB of OS-disk-like data, some
blocks zero, some overwritten by later snapshots), images it to a local
directory target, restores the image and checks that the restored disk reads
exactly like the chain.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from ._workloads import make_chain
from .chain import Chain
from .errors import IntegrityError
from .imaging import ProgressCallback, create_image
from .store import restore

__all__ = ["run_demo"]

MiB = 1024 * 1024


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with Chain.open(path) as c:
        for v in c.iter_raw(8 * MiB):
            h.update(v)
    return h.hexdigest()


def run_demo(workdir: str | None = None, *, size: int = 384 * MiB, threads: int = 2,
             progress: ProgressCallback | None = None,
             say: Callable[[str], None] = print, keep: bool = False) -> dict[str, Any]:
    """Run the demo; returns its figures.  Raises IntegrityError if the
    restored image does not read exactly like the source chain."""
    own = workdir is None
    work = workdir or tempfile.mkdtemp(prefix="vhdcore-demo-")
    try:
        src = os.path.join(work, "chain")
        say(f"building a {size // MiB} MiB chain of 3 VHDs in {src} ...")
        t = time.perf_counter()
        wl = make_chain(src, "realistic", size=size, layers=3, seed=2026)
        build = time.perf_counter() - t
        files = sum(os.path.getsize(p) for p in wl.paths)
        target = "file://" + os.path.join(work, "images", "demo-image")
        os.makedirs(os.path.join(work, "images"), exist_ok=True)
        say(f"imaging {wl.leaf.name} ({files // MiB} MiB of VHD files) to {target} ...")
        res = create_image(wl.leaf, target, threads=threads, progress=progress, replace=True)
        restored = os.path.join(work, "restored.vhd")
        say("restoring the image and comparing it with the chain ...")
        t = time.perf_counter()
        restore(target, restored, overwrite=True)
        restore_s = time.perf_counter() - t
        want, got = _digest(str(wl.leaf)), _digest(restored)
        if want != got:
            raise IntegrityError(f"restored image reads differently from the chain "
                                 f"(sha256 {got} != {want})")
        rule = files / 1e9 * 120
        figures = {
            "virtual_size": res.virtual_size, "vhd_files_bytes": files,
            "stream_bytes": res.stream_size, "stored_bytes": res.compressed_size,
            "blocks_stored": res.blocks_stored, "segments": res.segments,
            "image_seconds": round(res.seconds, 2), "stage_seconds":
            {k: round(v, 2) for k, v in res.stage_seconds.items()},
            "restore_seconds": round(restore_s, 2), "build_seconds": round(build, 2),
            "rule_of_thumb_seconds": round(rule, 1), "sha256": want, "verified": True,
        }
        say(f"ok: {files // MiB} MiB of VHD -> {res.compressed_size / MiB:.1f} MiB stored "
            f"in {res.segments} segments, imaged in {res.seconds:.1f} s "
            f"(rule of thumb: {rule:.0f} s), restored in {restore_s:.1f} s; "
            f"the restored disk is identical (sha256 {want[:16]}...)")
        return figures
    finally:
        if own and not keep:
            shutil.rmtree(work, ignore_errors=True)
