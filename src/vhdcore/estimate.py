"""What imaging a chain will cost, before running it (``vhdcore estimate``).

The chain is scanned once (read and merged, no compression: several GB/s
from the page cache), which gives the exact size of the image stream after
coalescing and zero elision.  A sample of the stored blocks is compressed to
predict the compressed size and to measure this machine's lz4 throughput;
the prediction of the job's time is set next to the rule of thumb of two
minutes per GB of VHD.
"""
from __future__ import annotations

import os
import time
from typing import Any

from .chain import Chain
from .fsmap import fs_free_map
from .ops.stream import FreeMap, iter_image_blocks
from .vhd.layout import DynamicLayout
from .compress import compress_frame
from .vhd.file import PathLike

__all__ = ["estimate", "RULE_OF_THUMB_SECONDS_PER_GB"]

#: the published rule of thumb: two minutes per GB of VHD
RULE_OF_THUMB_SECONDS_PER_GB = 120.0
GB = 10**9


def _scan(chain: Chain, threads: int, fmap: FreeMap | None, sample_blocks: int,
          every: int) -> tuple[list[int], int, list[bytes], float]:
    """One pass over the chain: the blocks stored, the sectors set, a sample of
    the blocks (bitmap + data of every ``every``-th) and the seconds it took."""
    t = time.perf_counter()
    stored: list[int] = []
    sectors = 0
    samples: list[bytes] = []
    for blk in iter_image_blocks(chain, threads=threads, free_map=fmap):
        stored.append(blk.index)
        sectors += blk.sectors_set
        if blk.index % every == 0 and len(samples) < sample_blocks:
            samples.append(bytes(blk.bitmap) + bytes(blk.data))
    return stored, sectors, samples, time.perf_counter() - t


def _sample_compression(samples: list[bytes]) -> tuple[float, float]:
    """Compression ratio and single-thread lz4 speed (bytes/s) of the sample."""
    raw = comp = 0
    t = time.perf_counter()
    for s in samples:
        raw += len(s)
        comp += len(compress_frame(s))
    lz4_seconds = time.perf_counter() - t
    ratio = raw / comp if comp else 1.0
    lz4_rate = raw / lz4_seconds if lz4_seconds > 0 else 0.0
    return ratio, lz4_rate


def _without_fs_aware(chain: Chain, threads: int, layout: DynamicLayout, sample_blocks: int,
                      every: int) -> dict[str, Any]:
    """The figures of an image made without filesystem awareness."""
    s0, sec0, smp0, _ = _scan(chain, threads, None, sample_blocks, every)
    return {"blocks_stored": len(s0), "data_bytes": sec0 * 512,
            "stream_bytes": layout.stream_size(len(s0)),
            "expected_compressed_bytes": _compressed_guess(layout.stream_size(len(s0)), smp0)}


def _predict(stream: int, scan_seconds: float, ratio: float, lz4_rate: float, threads: int,
             upload_rate: float | None) -> float:
    """Seconds of a job: the scan, then the stream through lz4 on ``threads``
    (capped by the upload rate, in uncompressed bytes)."""
    pipeline_rate = lz4_rate * max(1, threads)
    if upload_rate:
        pipeline_rate = min(pipeline_rate, upload_rate * ratio)
    return scan_seconds + (stream / pipeline_rate if pipeline_rate else 0.0)


def _layers(chain: Chain) -> list[dict[str, Any]]:
    return [{"path": ly.path, "type": ly.footer.type_name, "file_size": ly.file_size,
             "allocated_bytes": ly.allocated_bytes()} for ly in chain.layers]


def estimate(leaf: PathLike, *, threads: int = 2, sample_blocks: int = 48,
             upload_rate: float | None = None, fs_aware: bool = True,
             free_map: FreeMap | None = None,
             chain_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scan the chain and predict the image: sizes per layer, bytes left after
    coalescing and zero elision (exact), expected compressed size (sampled),
    and time by the rule of thumb next to vhdcore's own prediction.

    ``upload_rate`` (bytes/s) caps the predicted upload speed (default: the
    upload keeps up with compression, as on a local directory target).

    ``fs_aware`` has the default of :func:`~vhdcore.imaging.create_image`,
    so the estimate is of what ``image`` stores with the same option; with it,
    the figures without filesystem awareness are reported too
    (``without_fs_aware``).
    """
    with Chain.open(leaf, **(chain_options or {})) as chain:
        layers = _layers(chain)
        vhd_bytes = sum(ly["file_size"] for ly in layers)
        fs_info = None
        if fs_aware and free_map is None:
            free_map, fs_info = fs_free_map(chain)
        candidates = chain.allocated_blocks()
        layout = DynamicLayout(chain.virtual_size, chain.block_size)
        every = max(1, len(candidates) // max(1, sample_blocks))
        without = None
        if free_map is not None:
            without = _without_fs_aware(chain, threads, layout, sample_blocks, every)
        stored, sectors, samples, scan_seconds = _scan(chain, threads, free_map, sample_blocks,
                                                       every)
        stream = layout.stream_size(len(stored))
        ratio, lz4_rate = _sample_compression(samples)
        expected_compressed = int(stream / ratio) if stored else len(compress_frame(bytes(1024)))
        scan_rate = chain.virtual_size / scan_seconds if scan_seconds > 0 else 0.0
        predicted = _predict(stream, scan_seconds, ratio, lz4_rate, threads, upload_rate)
        out: dict[str, Any] = {
            "leaf": os.fspath(leaf),
            "layers": layers,
            "depth": len(layers),
            "virtual_size": chain.virtual_size,
            "vhd_bytes": vhd_bytes,
            "allocated_bytes": sum(ly["allocated_bytes"] for ly in layers),
            "blocks_candidate": int(len(candidates)),
            "blocks_stored": len(stored),
            "data_bytes": sectors * 512,
            "stream_bytes": stream,
            "sample_blocks": len(samples),
            "compression_ratio": round(ratio, 3),
            "expected_compressed_bytes": expected_compressed,
            "rule_of_thumb_seconds": round(vhd_bytes / GB * RULE_OF_THUMB_SECONDS_PER_GB, 1),
            "predicted_seconds": round(predicted, 2),
            "measured": {"scan_bytes_per_s": round(scan_rate), "lz4_bytes_per_s_per_thread":
                         round(lz4_rate), "threads": threads,
                         "upload_bytes_per_s": upload_rate},
        }
        if fs_info is not None:
            out["filesystems"] = fs_info
        if without is not None:
            out["without_fs_aware"] = without
        return out


def _compressed_guess(stream: int, samples: list[bytes]) -> int:
    raw = sum(len(s) for s in samples)
    comp = sum(len(compress_frame(s)) for s in samples)
    return int(stream * comp / raw) if raw else 0
