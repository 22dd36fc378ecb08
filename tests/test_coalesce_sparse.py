"""Coalesce writes only what the child has (issue 15): new parent blocks are
placed in fresh space and written sparsely, a parent sector is compared only
where it is cached, checkpoints follow the child's data; every result is
checked against a model (a plain buffer receiving the same writes) and by
``vhdcore check``."""
from __future__ import annotations

import os

import numpy as np
import pytest

from _builders import read_all
from vhdcore import coalesce as co
from vhdcore.bench.machine import evict
from vhdcore.check import check_file
from vhdcore.coalesce import coalesce
from vhdcore.disk import VhdFile, create_differencing, create_dynamic

MiB = 1024 * 1024


def errors_of(problems):
    return [p for p in problems if p.severity == "error"]


def _chain(tmp_path, size, parent_writes, child_writes):
    model = bytearray(size)
    create_dynamic(tmp_path / "p.vhd", size).close()
    with VhdFile.open(tmp_path / "p.vhd", writable=True) as p:
        for off, data in parent_writes:
            p.write_sectors(off // 512, data)
            model[off : off + len(data)] = data
    create_differencing(tmp_path / "c.vhd", tmp_path / "p.vhd").close()
    with VhdFile.open(tmp_path / "c.vhd", writable=True) as c:
        for off, data in child_writes:
            c.write_sectors(off // 512, data)
            model[off : off + len(data)] = data
    return bytes(model)


def test_new_parent_blocks_are_written_sparsely(tmp_path):
    rng = np.random.default_rng(3)
    size = 16 * MiB
    child = [(b * 2 * MiB + k * 64 * 1024, rng.bytes(4096)) for b in (1, 3, 4, 6)
             for k in range(0, 32, 5)]
    model = _chain(tmp_path, size, [(0, rng.bytes(2 * MiB))], child)
    before = os.stat(tmp_path / "p.vhd").st_blocks * 512
    res = coalesce(tmp_path / "c.vhd")
    assert res.blocks_allocated == 4
    assert res.sectors_written == len(child) * 8
    assert read_all(tmp_path / "p.vhd") == model
    assert errors_of(check_file(tmp_path / "p.vhd")) == []
    grown = os.stat(tmp_path / "p.vhd").st_blocks * 512 - before
    # the child's 28 pages, 4 bitmaps, BAT and footer pages; zero-filling
    # would have cost 4 x 2 MiB
    assert grown < 1 * MiB, grown
    with VhdFile.open(tmp_path / "p.vhd") as p:
        for b in (1, 3, 4, 6):
            off = p.block_offset(b)
            assert off is not None and (off + p.bitmap_size) % 4096 == 0
            assert b"conectix" not in bytes(p.mv[off : off + p.bitmap_size])


def test_old_footer_in_the_gap_is_zeroed(tmp_path):
    size = 8 * MiB
    model = _chain(tmp_path, size, [(0, b"\x01" * 4096)], [(4 * MiB, b"\x02" * 4096)])
    with VhdFile.open(tmp_path / "p.vhd") as p:
        old_footer = p.footer_offset
    coalesce(tmp_path / "c.vhd")
    with open(tmp_path / "p.vhd", "rb") as f:
        f.seek(old_footer)
        assert f.read(512) == bytes(512)
    assert read_all(tmp_path / "p.vhd") == model


def _evict(path):
    evict([path])


@pytest.mark.skipif(not hasattr(os, "POSIX_FADV_DONTNEED") or co._mincore() is None,
                    reason="needs posix_fadvise and mincore")
def test_resident_sectors_follow_the_page_cache(tmp_path):
    import mmap

    _chain(tmp_path, 4 * MiB, [(0, b"\x07" * 2 * MiB)], [])
    with VhdFile.open(tmp_path / "p.vhd") as p:
        p.map_advice = mmap.MADV_RANDOM
        p._map()
        off = p.block_offset(0) + p.bitmap_size
        _evict(tmp_path / "p.vhd")
        res = co._resident_sectors(p, off, 4096)
        assert res is not None and not any(res)
        k = 1000  # touch one sector: its page (8 sectors or fewer) becomes cached
        assert bytes(p.mv[off + k * 512 : off + k * 512 + 512]) == b"\x07" * 512
        res = co._resident_sectors(p, off, 4096)
        bits = np.unpackbits(np.frombuffer(bytes(res), np.uint8))[:4096]
        assert bits[k] == 1 and 1 <= bits.sum() <= 8


def test_equal_sectors_are_compared_only_when_cached(tmp_path, monkeypatch):
    same = [(256 * 1024, b"\x07" * 4096)]
    for cached in (True, False):
        d = tmp_path / str(cached)
        d.mkdir()
        model = _chain(d, 4 * MiB, [(0, b"\x07" * MiB)], same + [(512 * 1024, bytes(4096))])
        if not cached:
            # as after a cache drop: no parent page is cached
            monkeypatch.setattr(co, "_resident_sectors",
                                lambda vhd, offset, n: bytearray(-(-n // 8)))
        res = coalesce(d / "c.vhd")
        assert read_all(d / "p.vhd") == model
        if cached:
            assert (res.sectors_skipped_equal, res.sectors_written) == (8, 8)
        else:
            # nothing of the parent was read to be compared: written as is
            assert (res.sectors_skipped_equal, res.sectors_written) == (0, 16)


def test_batches_follow_the_child_data(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    child = [(b * 2 * MiB, rng.bytes(64 * 1024)) for b in range(8)]
    model = _chain(tmp_path, 16 * MiB, [], child)
    with VhdFile.open(tmp_path / "c.vhd") as c:
        todo = [int(b) for b in c.allocated_blocks()]
        assert co._batches(c, todo, None) == [(0, 8)]
        assert co._batches(c, todo, 3) == [(0, 3), (3, 6), (6, 8)]
        monkeypatch.setattr(co, "_BATCH_BYTES", 128 * 1024)
        assert co._batches(c, todo, None) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    ops = []
    real = co._write_json_atomic
    monkeypatch.setattr(co, "_write_json_atomic",
                        lambda path, obj, durable=True: (ops.append(obj["stage"]),
                                                         real(path, obj, durable)))
    coalesce(tmp_path / "c.vhd")
    # the start, three checkpoints inside, the end
    assert ops == ["merging"] * 4 + ["merged"]
    assert read_all(tmp_path / "p.vhd") == model


def test_prefetch_asks_for_the_parent_bitmaps(tmp_path, monkeypatch):
    """The prefetch thread asks for each merged block's parent bitmap where
    the parent has that block (a cold fault on it otherwise waited behind the
    merge's writes), for no block the parent lacks, and the result is exact."""
    from vhdcore import _io
    from vhdcore.ops import readahead

    rng = np.random.default_rng(9)
    child = [(b * 2 * MiB + 8192, rng.bytes(4096)) for b in range(6)]
    model = _chain(tmp_path, 12 * MiB, [(2 * MiB, rng.bytes(4096)), (8 * MiB, rng.bytes(4096))],
                   child)
    with VhdFile.open(tmp_path / "p.vhd") as p:
        want = {(p.block_offset(b), p.bitmap_size) for b in (1, 4)}
        assert all(p.block_offset(b) is None for b in (0, 2, 3, 5))
    asked = []
    real = _io.will_need
    monkeypatch.setattr(readahead._io, "will_need",
                        lambda fd, off, n: (asked.append((os.readlink(f"/proc/self/fd/{fd}"), off, n)),
                                            real(fd, off, n)))
    coalesce(tmp_path / "c.vhd")
    parent = os.path.realpath(tmp_path / "p.vhd")
    got = {(off, n) for path, off, n in asked if path == parent}
    assert got == want
    assert read_all(tmp_path / "p.vhd") == model
