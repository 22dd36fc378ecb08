"""Unit tests of fsmap's building blocks on synthetic data (no external tools)."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhdcore._fs import _ranges as R
from vhdcore._fs.common import FsUnsafe
from vhdcore._fs.crc import crc16_raw, crc16_rows, crc32c, crc32c_raw, crc32c_rows
from vhdcore._fs.journal import JBD2_MAGIC, replay
from vhdcore.fsmap import DiskMap


# -- ranges ----------------------------------------------------------------------
def _to_set(s, e):
    out = set()
    for a, b in zip(np.asarray(s).tolist(), np.asarray(e).tolist()):
        out.update(range(a, b))
    return out


ranges_st = st.lists(
    st.tuples(st.integers(0, 200), st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=12,
)


def _split(rs):
    return (np.array([a for a, _ in rs], dtype=np.int64), np.array([b for _, b in rs], dtype=np.int64))


def _is_normal(s, e):
    s, e = np.asarray(s), np.asarray(e)
    return bool((e > s).all() and (s[1:] > e[:-1]).all())


@settings(max_examples=300, deadline=None)
@given(ranges_st, ranges_st)
def test_range_ops_match_set_model(a, b):
    A, B = _split(a), _split(b)
    sa, sb = _to_set(*A), _to_set(*B)
    for got, want in (
        (R.normalize(*A), sa),
        (R.union(A, B), sa | sb),
        (R.difference(A, B), sa - sb),
        (R.intersection(A, B), sa & sb),
    ):
        assert _is_normal(*got)
        assert _to_set(*got) == want
    assert R.overlaps_any(A, B) == bool(sa & sb)
    assert _to_set(*R.clip(A, 50, 120)) == {x for x in sa if 50 <= x < 120}


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=64), st.integers(0, 7))
def test_zero_bit_runs_match_reference(data, cut):
    nbits = max(0, len(data) * 8 - cut)
    s, e = R.zero_bit_runs(np.frombuffer(data, dtype=np.uint8), nbits, base=1000)
    want = {1000 + i for i in range(nbits) if not (data[i // 8] >> (i % 8)) & 1}
    assert _to_set(s, e) == want
    assert _is_normal(s, e)


def test_zero_bit_runs_refuses_short_bitmap():
    with pytest.raises(ValueError):
        R.zero_bit_runs(np.zeros(1, np.uint8), 9)


def test_align_inward():
    s, e = R.align_inward((np.array([1, 1024, 5000]), np.array([1023, 2048, 5100])), 512)
    assert s.tolist() == [1024] and e.tolist() == [2048]


# -- crc -------------------------------------------------------------------------
def test_crc_known_values():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc16_raw(0xFFFF, b"123456789") == 0x4B37  # CRC-16/MODBUS
    assert crc16_raw(0, b"123456789") == 0xBB3D  # CRC-16/ARC
    # iSCSI test vector: 32 bytes of zeros
    assert crc32c(bytes(32)) == 0x8A9136AA


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(min_size=7, max_size=7), min_size=1, max_size=8), st.integers(0, 2**32 - 1))
def test_crc_rows_match_scalar(rows, seed):
    arr = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), 7)
    got = crc32c_rows(np.uint32(seed), arr).tolist()
    assert got == [crc32c_raw(seed, r) for r in rows]
    got16 = crc16_rows(np.uint16(seed & 0xFFFF), arr).tolist()
    assert got16 == [crc16_raw(seed & 0xFFFF, r) for r in rows]


# -- DiskMap helpers ---------------------------------------------------------------
def _dmap(ranges, size):
    s, e = R.normalize(*_split(ranges))
    return DiskMap(size=size, table="none", partitions=[], warnings=[], _starts=s, _ends=e)


def test_diskmap_block_helpers():
    bs = 4096
    size = 10 * bs + 1024
    d = _dmap([(bs, 2 * bs), (3 * bs + 512, 4 * bs), (5 * bs, 8 * bs + 1024), (10 * bs, size)], size)
    assert d.free == [(bs, bs), (3 * bs + 512, bs - 512), (5 * bs, 3 * bs + 1024), (10 * bs, 1024)]
    assert d.free_bytes == bs + (bs - 512) + 3 * bs + 1024 + 1024
    states = d.block_states(bs)
    assert states.tolist() == [0, 2, 0, 1, 0, 2, 2, 2, 1, 0, 2]
    assert d.free_bitmap_for_block(0, bs) is None
    assert d.free_bitmap_for_block(1, bs) == b"\xff"
    assert d.free_bitmap_for_block(3, bs) == b"\x7f"
    assert d.free_bitmap_for_block(8, bs) == b"\xc0"
    assert list(d.free_sectors_in(3 * bs, 3 * bs)) == [(3 * bs + 512, bs - 512), (5 * bs, bs)]
    assert d.is_free(6 * bs, bs) and not d.is_free(3 * bs, bs)
    js = d.to_json()
    assert js["free_bytes"] == d.free_bytes and js["free_ranges"] == 4


@settings(max_examples=100, deadline=None)
@given(ranges_st, st.sampled_from([512, 1024, 4096]))
def test_block_states_match_reference(rs, bs):
    rs = [(a * 512, b * 512) for a, b in rs]
    size = 260 * 512
    d = _dmap([(a, min(b, size)) for a, b in rs if a < size], size)
    free = _to_set(d._starts // 512, d._ends // 512)
    n = -(-size // bs)
    per = bs // 512
    want = []
    for k in range(n):
        sec = [x for x in range(k * per, min((k + 1) * per, size // 512))]
        f = sum(1 for x in sec if x in free)
        want.append(0 if f == 0 else 2 if f == len(sec) else 1)
    assert d.block_states(bs).tolist() == want
    for k in range(n):
        bm = d.free_bitmap_for_block(k, bs)
        bits = [x in free for x in range(k * per, (k + 1) * per)]
        if not any(bits):
            assert bm is None
        else:
            got = np.unpackbits(np.frombuffer(bm, np.uint8)).astype(bool).tolist()
            assert got[:per] == bits and not any(got[per:])


# -- jbd2 replay on synthetic journals ---------------------------------------------
BS = 1024


def _hdr(btype, seq):
    return struct.pack(">III", JBD2_MAGIC, btype, seq)


def _jsb(maxlen, first, seq, start, incompat=0):
    b = bytearray(BS)
    b[0:12] = _hdr(4, 0)
    struct.pack_into(">IIIII", b, 12, BS, maxlen, first, seq, start)
    struct.pack_into(">III", b, 0x24, 0, incompat, 0)
    return bytes(b)


def _desc(seq, tags, last=True):
    """32-bit tags without checksums: blocknr(4) csum(2) flags(2)."""
    b = bytearray(BS)
    b[0:12] = _hdr(1, seq)
    off = 12
    for i, (blk, escape) in enumerate(tags):
        flags = (1 if escape else 0) | (2 if i else 0) | (8 if last and i == len(tags) - 1 else 0)
        struct.pack_into(">IHH", b, off, blk, 0, flags)
        off += 8
        if not i:
            off += 16
    return bytes(b)


def _revoke(seq, blocks):
    b = bytearray(BS)
    b[0:12] = _hdr(5, seq)
    struct.pack_into(">I", b, 12, 16 + 4 * len(blocks))
    for i, blk in enumerate(blocks):
        struct.pack_into(">I", b, 16 + 4 * i, blk)
    return bytes(b)


def _commit(seq):
    return _hdr(2, seq) + bytes(BS - 12)


def _data(tag):
    return bytes([tag]) * BS


def _journal(blocks, maxlen=64):
    j = {i: bytes(BS) for i in range(maxlen)}
    j.update(blocks)
    return lambda n: j[n]


def test_replay_applies_committed_and_honours_revoke():
    rd = _journal(
        {
            0: _jsb(64, 1, 10, 1),
            1: _desc(10, [(100, False), (101, False)]),
            2: _data(1),
            3: _data(2),
            4: _commit(10),
            5: _revoke(11, [100]),
            6: _desc(11, [(102, False)]),
            7: _data(3),
            8: _commit(11),
            9: _desc(12, [(101, False), (103, False)]),  # never committed
            10: _data(9),
            11: _data(9),
        }
    )
    ov, notes = replay(rd, 64, BS, 1000)
    assert sorted(ov.entries) == [101, 102]
    assert ov.get(101) == _data(2) and ov.get(102) == _data(3)
    assert ov.transactions == 2
    assert any("uncommitted" in n for n in notes)


def test_revoke_does_not_cancel_a_later_write():
    rd = _journal(
        {
            0: _jsb(64, 1, 5, 1),
            1: _revoke(5, [100]),
            2: _commit(5),
            3: _desc(6, [(100, False)]),
            4: _data(7),
            5: _commit(6),
        }
    )
    ov, _ = replay(rd, 64, BS, 1000)
    assert ov.get(100) == _data(7)


def test_escaped_block_gets_its_magic_back():
    rd = _journal({0: _jsb(64, 1, 1, 1), 1: _desc(1, [(50, True)]), 2: bytes(BS), 3: _commit(1)})
    ov, _ = replay(rd, 64, BS, 1000)
    assert ov.get(50)[:4] == struct.pack(">I", JBD2_MAGIC) and ov.get(50)[4:] == bytes(BS - 4)


def test_log_wraps_around():
    rd = _journal(
        {
            0: _jsb(16, 1, 3, 14),
            14: _desc(3, [(7, False), (8, False)]),
            15: _data(1),
            1: _data(2),
            2: _commit(3),
            3: _commit(999),
        },
        maxlen=16,
    )
    ov, _ = replay(rd, 16, BS, 1000)
    assert ov.get(7) == _data(1) and ov.get(8) == _data(2)


def test_journal_that_would_loop_is_refused():
    tags = [(200 + i, False) for i in range(40)]
    rd = _journal({0: _jsb(16, 1, 1, 1), 1: _desc(1, tags, last=False)}, maxlen=16)
    with pytest.raises(FsUnsafe, match="loops"):
        replay(rd, 16, BS, 1000)


def test_journal_refusals():
    with pytest.raises(FsUnsafe, match="unknown incompatible"):
        replay(_journal({0: _jsb(64, 1, 1, 1, incompat=0x80)}), 64, BS, 1000)
    with pytest.raises(FsUnsafe, match="does not fit"):
        replay(_journal({0: _jsb(64, 1, 1, 1)}), 32, BS, 1000)
    with pytest.raises(FsUnsafe, match="block size"):
        replay(_journal({0: _jsb(64, 1, 1, 1)}), 64, 4096, 1000)
    with pytest.raises(FsUnsafe, match="past the filesystem"):
        rd = _journal({0: _jsb(64, 1, 1, 1), 1: _desc(1, [(5000, False)]), 3: _commit(1)})
        replay(rd, 64, BS, 1000)
    with pytest.raises(FsUnsafe, match="unexpected type"):
        replay(_journal({0: _jsb(64, 1, 1, 1), 1: _hdr(9, 1) + bytes(BS - 12)}), 64, BS, 1000)
    with pytest.raises(FsUnsafe, match="fast-commit"):
        rd = _journal({0: _jsb(64, 1, 1, 1, incompat=0x20), 0 + 60: b"\1" * BS})
        j = bytearray(rd(0))
        struct.pack_into(">I", j, 0x54, 4)
        blocks = {0: bytes(j), 60: b"\1" * BS}
        replay(_journal(blocks), 64, BS, 1000)


def test_empty_journal_gives_empty_overlay():
    ov, notes = replay(_journal({0: _jsb(64, 1, 1, 0)}), 64, BS, 1000)
    assert len(ov) == 0 and "empty" in notes[0]
