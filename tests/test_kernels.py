"""Tests of the merge kernel: the compiled ``vhdcore._merge`` and its twin ``vhdcore._merge_py``.

* The ``kernel`` fixture runs each behaviour test against both implementations,
  with expected values worked out by hand.
* Hypothesis property tests check that the compiled kernel agrees with the twin
  *and* with a naive sector-by-sector model written here, on random bitmaps
  (all clear, all set, random, long runs; bits after ``nsectors`` and bytes past
  the end that must be left alone) and random blocks of 0..4096 sectors.
* Error tests, a GIL-release test (no clock: another thread sees a call half
  done) and an API-equality test.

Under ``VHDCORE_IMPORT_POLICY=python`` only the twin is tested; otherwise a
missing compiled kernel is a failure, not a skip.
"""
from __future__ import annotations

import array
import importlib
import inspect
import mmap
import os
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhdcore import _merge_py, kernels

SECTOR = 512
POLICY = os.environ.get("VHDCORE_IMPORT_POLICY", "default").strip().lower() or "default"

try:
    NATIVE = importlib.import_module("vhdcore._merge")
    NATIVE_ERROR: ImportError | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    NATIVE = None
    NATIVE_ERROR = exc


def _native_or_skip():
    if POLICY == "python":
        pytest.skip("VHDCORE_IMPORT_POLICY=python: only the pure-Python twin is under test")
    if NATIVE is None:
        pytest.fail(f"the compiled kernel vhdcore._merge is not built: {NATIVE_ERROR}")
    return NATIVE


@pytest.fixture(scope="module", params=["cython", "python"])
def kernel(request):
    """Each kernel implementation in turn."""
    if request.param == "python":
        return _merge_py
    return _native_or_skip()


@pytest.fixture(scope="module")
def native():
    """The compiled kernel (for tests comparing it with the twin)."""
    return _native_or_skip()


# ---------------------------------------------------------------------------
# helpers: bitmaps, sector data and a naive model, independent of both kernels


def pack(bits, nbytes: int | None = None) -> bytearray:
    """Sector bits -> VHD bitmap bytes (sector 0 is the MSB of byte 0)."""
    out = bytearray(nbytes if nbytes is not None else (len(bits) + 7) // 8)
    for s, b in enumerate(bits):
        if b:
            out[s >> 3] |= 0x80 >> (s & 7)
    return out


def bit(bm, s: int) -> int:
    return (bm[s >> 3] >> (7 - (s & 7))) & 1


def set_bit(bm: bytearray, s: int) -> None:
    bm[s >> 3] |= 0x80 >> (s & 7)


def clear_bit(bm: bytearray, s: int) -> None:
    bm[s >> 3] &= 0xFF ^ (0x80 >> (s & 7))


def sec(buf, s: int) -> bytes:
    return bytes(buf[s * SECTOR : (s + 1) * SECTOR])


def fill(*values: int) -> bytes:
    """One sector of each value."""
    return b"".join(bytes([v]) * SECTOR for v in values)


def expand(tags) -> bytes:
    """Sector data from one tag per sector: 0 is an all-zero sector, an odd tag
    one non-zero byte at a tag-dependent offset (anywhere in the sector), an
    even tag a sector of non-zero bytes."""
    t = np.asarray(tags, dtype=np.uint32)
    out = np.zeros((t.size, SECTOR), dtype=np.uint8)
    full = (t != 0) & (t % 2 == 0)
    pattern = np.arange(SECTOR, dtype=np.uint32)[None, :] * 31 + t[full, None] * 7
    out[full] = (pattern % 251 + 1).astype(np.uint8)
    single = np.nonzero(t % 2 == 1)[0]
    out[single, (t[single] >> 1) % SECTOR] = (t[single] % 255 + 1).astype(np.uint8)
    return out.tobytes()


NSECTORS = st.one_of(
    st.sampled_from([0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 511, 512, 513, 4032, 4095, 4096]),
    st.integers(0, 4096),
)


@st.composite
def bitmaps(draw, n: int) -> bytes:
    """A bitmap for n sectors: all clear, all set, random or long runs.  The
    bits after n and a few bytes past the end are random: kernels must leave
    them alone and never read them as sectors."""
    kind = draw(st.sampled_from(("zero", "one", "random", "runs")))
    if kind == "zero":
        bits = [0] * n
    elif kind == "one":
        bits = [1] * n
    elif kind == "random":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        bits = list(rng.random(n) < draw(st.sampled_from((0.03, 0.5, 0.97))))
    else:
        value = draw(st.booleans())
        bits = []
        for length in draw(st.lists(st.integers(1, 700), max_size=24)):
            bits += [value] * length
            value = not value
        bits = (bits + [value] * n)[:n]
    bm = pack(bits)
    if n % 8:
        bm[-1] |= draw(st.integers(0, 255)) & (0xFF >> (n % 8))
    return bytes(bm) + draw(st.binary(max_size=9))


@st.composite
def tag_arrays(draw, n: int) -> np.ndarray:
    kind = draw(st.sampled_from(("zero", "dense", "sparse")))
    if kind == "zero":
        return np.zeros(n, dtype=np.uint32)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tags = rng.integers(0, 4096, n).astype(np.uint32)
    if kind == "sparse":
        tags[rng.random(n) < 0.8] = 0
    return tags


@st.composite
def blocks(draw, n: int) -> bytes:
    """n sectors of data plus a few bytes past the end."""
    return expand(draw(tag_arrays(n))) + draw(st.binary(max_size=7))


# ---------------------------------------------------------------------------
# the API


def test_same_names_and_signatures(native):
    assert native.KERNEL_NAMES == _merge_py.KERNEL_NAMES
    public = {name for name in dir(native) if not name.startswith("_")}
    assert public == set(_merge_py.KERNEL_NAMES) | {"KERNEL_NAMES"}
    for name in _merge_py.KERNEL_NAMES:
        want = inspect.signature(getattr(_merge_py, name)).parameters.values()
        got = inspect.signature(getattr(native, name)).parameters.values()
        assert [(p.name, p.kind, p.default) for p in got] == [
            (p.name, p.kind, p.default) for p in want
        ], name
        assert getattr(native, name).__doc__, name


def test_selector_follows_policy():
    expected = "python" if POLICY == "python" else "cython"
    assert kernels.backend == expected
    impl = _merge_py if expected == "python" else NATIVE
    for name in kernels.KERNEL_NAMES:
        assert getattr(kernels, name) is getattr(impl, name)


# ---------------------------------------------------------------------------
# behaviour, with hand-computed expectations, for both implementations


def test_overlay_newest_wins(kernel):
    src_bm = bytes([0b1111_0000])  # sectors 0-3 in the older layer
    out_bm = bytearray([0b0110_0000])  # sectors 1, 2 already from a younger one
    src = fill(0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17)
    out = bytearray(fill(0, 0xA1, 0xA2, 0, 0, 0, 0, 0))
    assert kernel.overlay(src_bm, src, out_bm, out, 8) == 2
    assert out_bm == bytes([0b1111_0000])
    assert out == fill(0x10, 0xA1, 0xA2, 0x13, 0, 0, 0, 0)


def test_overlay_full_block_onto_empty(kernel):
    n = 4096
    src = expand(np.arange(n) * 2 + 2)
    out_bm, out = bytearray(n // 8), bytearray(n * SECTOR)
    assert kernel.overlay(b"\xff" * (n // 8), src, out_bm, out, n) == n
    assert out_bm == b"\xff" * (n // 8)
    assert out == src


def test_overlay_run_across_word_boundary(kernel):
    n = 128
    src_bm = bytearray(16)
    src_bm[7], src_bm[8] = 0x0F, 0xF0  # sectors 60..67
    src = expand(np.arange(n) * 2 + 2)
    out_bm, out = bytearray(16), bytearray(n * SECTOR)
    assert kernel.overlay(bytes(src_bm), src, out_bm, out, n) == 8
    assert out_bm == src_bm
    assert out[: 60 * SECTOR] == bytes(60 * SECTOR)
    assert out[60 * SECTOR : 68 * SECTOR] == src[60 * SECTOR : 68 * SECTOR]
    assert out[68 * SECTOR :] == bytes((n - 68) * SECTOR)


def test_overlay_keeps_bits_and_bytes_after_nsectors(kernel):
    out_bm = bytearray([0b0000_0101, 0x5A])  # bits 5 and 7 are past nsectors=5
    out = bytearray(fill(0, 0, 0, 0, 0, 0xEE))
    assert kernel.overlay(b"\xff\xff", fill(1, 2, 3, 4, 5, 6), out_bm, out, 5) == 5
    assert out_bm == bytes([0b1111_1101, 0x5A])
    assert out == fill(1, 2, 3, 4, 5, 0xEE)


def test_overlay_nothing_to_do(kernel):
    assert kernel.overlay(b"", b"", bytearray(), bytearray(), 0) == 0
    out_bm, out = bytearray(b"\xff"), bytearray(fill(*range(8)))
    assert kernel.overlay(b"\xff", fill(*range(10, 18)), out_bm, out, 8) == 0
    assert out == fill(*range(8))


def test_overlay_full(kernel):
    out_bm = bytearray([0b1000_0001, 0b0100_0001])  # sectors 0, 7, 9; the 0x01 is past n=10
    out = bytearray(fill(*range(0xA0, 0xAA), 0xEE))
    src = fill(*range(0x10, 0x1B))
    assert kernel.overlay_full(src, out_bm, out, 10) == 7
    assert out_bm == bytes([0xFF, 0b1100_0001])
    assert out == fill(0xA0, *range(0x11, 0x17), 0xA7, 0x18, 0xA9, 0xEE)
    assert kernel.overlay_full(src, out_bm, out, 10) == 0


def test_fill_unset(kernel):
    bm = bytes([0b1100_0011, 0b1010_0000])  # clear: 2, 3, 4, 5, 9, 11
    data = bytearray(fill(*[0xEE] * 13))
    assert kernel.fill_unset(bm, data, 12) == 6
    assert data == fill(0xEE, 0xEE, 0, 0, 0, 0, 0xEE, 0xEE, 0xEE, 0, 0xEE, 0, 0xEE)
    assert kernel.fill_unset(b"", bytearray(), 0) == 0


def test_bitmap_or(kernel):
    dst = bytearray([0x10, 0x01, 0x80])
    assert kernel.bitmap_or(bytes([0x0F, 0xF0, 0x01]), dst, 2) is None
    assert dst == bytes([0x1F, 0xF1, 0x80])
    kernel.bitmap_or(b"\xff", dst, 0)
    assert dst == bytes([0x1F, 0xF1, 0x80])
    a, b = bytes(range(1, 20)), bytearray(range(100, 119))
    kernel.bitmap_or(a, b, 19)
    assert b == bytes(x | y for x, y in zip(range(1, 20), range(100, 119)))


@pytest.mark.parametrize(
    ("bm", "n", "count"),
    [
        (b"", 0, 0),
        (b"\xff\x80", 9, 9),
        (b"\xff\x80", 8, 8),
        (b"\xff\x80", 16, 9),
        (b"\x00\x7f", 9, 0),
        (b"\xff" * 9, 65, 65),
        (b"\xaa" * 512, 4096, 2048),
        (b"\x00" * 7 + b"\x01\x80", 72, 2),
    ],
)
def test_bitmap_count(kernel, bm, n, count):
    assert kernel.bitmap_count(bm, n) == count


@pytest.mark.parametrize(
    ("bm", "n", "runs"),
    [
        (b"", 0, []),
        (b"\xf0\x0f", 16, [(0, 4), (12, 4)]),
        (b"\xf0\x0f", 12, [(0, 4)]),
        (b"\xaa\x80", 9, [(0, 1), (2, 1), (4, 1), (6, 1), (8, 1)]),
        (b"\xff" * 512, 4096, [(0, 4096)]),
        (b"\x00" * 7 + b"\x01\x80", 72, [(63, 2)]),
        (b"\x00" * 8 + b"\x04", 70, [(69, 1)]),
        (b"\x00" * 16, 128, []),
        (b"\xff" * 8 + b"\x00" * 7 + b"\x01", 128, [(0, 64), (127, 1)]),
        (b"\x7f" + b"\xff" * 15 + b"\x7f", 129, [(1, 127)]),
    ],
)
def test_find_runs(kernel, bm, n, runs):
    need = 2 * (n // 2 + 1)
    buf = np.full(need, 0xDEADBEEF, dtype=np.uint32)
    assert kernel.find_runs(bm, n, buf) == len(runs)
    assert [tuple(int(v) for v in buf[i : i + 2]) for i in range(0, 2 * len(runs), 2)] == runs
    assert (buf[2 * len(runs) :] == 0xDEADBEEF).all()


def test_find_runs_into_array(kernel):
    buf = array.array("I", [0] * 10)
    assert kernel.find_runs(b"\x81", 8, buf) == 2
    assert list(buf[:4]) == [0, 1, 7, 1]


def test_is_zero(kernel):
    assert kernel.is_zero(b"") is True
    assert kernel.is_zero(bytes(1000)) is True
    assert kernel.is_zero(bytes(999) + b"\x01") is False
    data = b"\x01" + bytes(300) + b"\x02"
    assert kernel.is_zero(data) is False
    assert kernel.is_zero(data, 1, 300) is True
    assert kernel.is_zero(data, 1) is False
    assert kernel.is_zero(data, 1, 301) is False
    assert kernel.is_zero(data, 0, 0) is True
    assert kernel.is_zero(data, len(data)) is True
    assert kernel.is_zero(data, len(data), 0) is True


def test_is_zero_sees_every_byte(kernel):
    for pos in range(0, 1100):
        buf = bytearray(1100)
        buf[pos] = 0x40
        assert kernel.is_zero(buf) is False, pos
        assert kernel.is_zero(buf, 0, pos) is True, pos
        assert kernel.is_zero(buf, pos + 1) is True, pos
        assert kernel.is_zero(buf, pos, 1) is False, pos


def test_clear_zero_sectors(kernel):
    bm = bytearray([0b1110_1010])  # sectors 0, 1, 2 set; the low 1010 is past n=4
    data = bytes(SECTOR) + bytes(SECTOR - 1) + b"\x01" + bytes(SECTOR) + fill(7)
    assert kernel.clear_zero_sectors(bm, data, 4) == 1
    assert bm == bytes([0b0100_1010])
    assert kernel.clear_zero_sectors(bytearray(), b"", 0) == 0


def test_clear_zero_sectors_full_block(kernel):
    n = 4096
    bm = bytearray(b"\xff" * (n // 8))
    data = bytearray(n * SECTOR)
    data[100 * SECTOR + 511] = 1  # sector 100, its last byte
    data[4095 * SECTOR] = 1  # sector 4095, its first byte
    assert kernel.clear_zero_sectors(bm, data, n) == 2
    assert [s for s in range(n) if bit(bm, s)] == [100, 4095]


def test_drop_equal_sectors(kernel):
    bm = bytearray([0b1111_0000])
    ref_bm = bytes([0b1011_0000])  # sector 1 is not in the reference
    data = fill(1, 2, 3, 4)
    ref = bytearray(fill(1, 2, 3, 4))
    ref[3 * SECTOR - 1] = 0  # sector 2 differs in its last byte
    assert kernel.drop_equal_sectors(bm, data, ref_bm, ref, 4) == 2
    assert bm == bytes([0b0110_0000])
    assert kernel.drop_equal_sectors(bytearray(), b"", b"", b"", 0) == 0


def test_fingerprint(kernel):
    # published XXH3-64 (seed 0) of the empty input
    assert kernel.fingerprint(b"") == 0x2D06800538D394C2
    data = bytes(range(256)) * 8192
    fp = kernel.fingerprint(data)
    assert isinstance(fp, int) and 0 <= fp < 2**64
    assert kernel.fingerprint(bytearray(data)) == fp
    assert kernel.fingerprint(memoryview(data)) == fp
    assert kernel.fingerprint(data[:-1] + b"\x00") != fp


def test_buffer_kinds(kernel, tmp_path):
    """Read-only mmap views, bytes, numpy arrays and anonymous mmaps all work."""
    n = 16
    src_file = tmp_path / "layer.bin"
    src_file.write_bytes(fill(*range(1, n + 1)) + b"\xc0\x01")
    with open(src_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with memoryview(mm) as mv:
            out_bm = np.zeros(2, dtype=np.uint8)
            out = mmap.mmap(-1, n * SECTOR)
            with memoryview(out) as out_mv:
                assert kernel.overlay(mv[n * SECTOR :], mv[: n * SECTOR], out_bm, out_mv, n) == 3
                assert kernel.is_zero(mv, n * SECTOR - 1) is False
                assert kernel.bitmap_count(mv[n * SECTOR :], n) == 3
            assert out[: 2 * SECTOR] == fill(1, 2)
            assert out[15 * SECTOR :] == fill(16)
            assert out[2 * SECTOR : 15 * SECTOR] == bytes(13 * SECTOR)
            out.close()
        assert out_bm.tolist() == [0xC0, 0x01]
        # numpy arrays of another dtype are read as their bytes, like np.frombuffer
        assert kernel.bitmap_count(np.array([0xFFFF], dtype=np.uint16), 16) == 16


# ---------------------------------------------------------------------------
# errors: same exception types from both implementations


def _readonly_outputs():
    arr = np.zeros(4096, dtype=np.uint8)
    arr.flags.writeable = False
    return [
        pytest.param(lambda n: bytes(n), id="bytes"),
        pytest.param(lambda n: memoryview(bytearray(n)).toreadonly(), id="readonly-memoryview"),
        pytest.param(lambda n: arr[:n], id="readonly-ndarray"),
    ]


def _outputs_calls():
    """(name, call(out_factory)) where the factory makes the output being tested."""
    n = 8
    bm, data = b"\xff", fill(*range(n))
    return [
        ("overlay.out_bitmap", lambda k, o: k.overlay(bm, data, o(1), bytearray(data), n)),
        ("overlay.out_data", lambda k, o: k.overlay(bm, data, bytearray(1), o(len(data)), n)),
        ("overlay_full.out_bitmap", lambda k, o: k.overlay_full(data, o(1), bytearray(data), n)),
        ("overlay_full.out_data", lambda k, o: k.overlay_full(data, bytearray(1), o(len(data)), n)),
        ("fill_unset.data", lambda k, o: k.fill_unset(b"\x00", o(len(data)), n)),
        ("bitmap_or.dst", lambda k, o: k.bitmap_or(bm, o(1), 1)),
        ("clear_zero_sectors.bitmap", lambda k, o: k.clear_zero_sectors(o(1), data, n)),
        ("drop_equal_sectors.bitmap", lambda k, o: k.drop_equal_sectors(o(1), data, bm, data, n)),
    ]


@pytest.mark.parametrize("make", _readonly_outputs())
@pytest.mark.parametrize(("name", "call"), _outputs_calls(), ids=[c[0] for c in _outputs_calls()])
def test_readonly_output_is_valueerror(kernel, make, name, call):
    with pytest.raises(ValueError):
        call(kernel, make)


def test_readonly_mmap_output_is_valueerror(kernel, tmp_path):
    f = tmp_path / "ro.bin"
    f.write_bytes(bytes(2 * SECTOR))
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with pytest.raises(ValueError):
            kernel.overlay(b"\xc0", fill(1, 2), bytearray(1), mm, 2)
        with memoryview(mm) as mv, pytest.raises(ValueError):
            kernel.fill_unset(b"\x00", mv, 2)
    assert f.read_bytes() == bytes(2 * SECTOR)


def test_readonly_runs_is_valueerror(kernel):
    runs = np.zeros(10, dtype=np.uint32)
    runs.flags.writeable = False
    with pytest.raises(ValueError):
        kernel.find_runs(b"\xff", 8, runs)
    with pytest.raises(ValueError):
        kernel.find_runs(b"\xff", 8, bytes(40))


def _size_errors():
    bm, data = b"\xff\xff", fill(*range(1, 10))
    short = data[:-1]
    n = 9
    return {
        "overlay-negative": lambda k: k.overlay(bm, data, bytearray(2), bytearray(data), -1),
        "overlay-src-bitmap": lambda k: k.overlay(bm[:1], data, bytearray(2), bytearray(data), n),
        "overlay-out-bitmap": lambda k: k.overlay(bm, data, bytearray(1), bytearray(data), n),
        "overlay-src-data": lambda k: k.overlay(bm, short, bytearray(2), bytearray(data), n),
        "overlay-out-data": lambda k: k.overlay(bm, data, bytearray(2), bytearray(short), n),
        "overlay_full-negative": lambda k: k.overlay_full(data, bytearray(2), bytearray(data), -8),
        "overlay_full-bitmap": lambda k: k.overlay_full(data, bytearray(1), bytearray(data), n),
        "overlay_full-src": lambda k: k.overlay_full(short, bytearray(2), bytearray(data), n),
        "overlay_full-out": lambda k: k.overlay_full(data, bytearray(2), bytearray(short), n),
        "fill_unset-negative": lambda k: k.fill_unset(bm, bytearray(data), -1),
        "fill_unset-bitmap": lambda k: k.fill_unset(bm[:1], bytearray(data), n),
        "fill_unset-data": lambda k: k.fill_unset(bm, bytearray(short), n),
        "bitmap_or-negative": lambda k: k.bitmap_or(bm, bytearray(2), -1),
        "bitmap_or-src": lambda k: k.bitmap_or(bm[:1], bytearray(2), 2),
        "bitmap_or-dst": lambda k: k.bitmap_or(bm, bytearray(1), 2),
        "bitmap_count-negative": lambda k: k.bitmap_count(bm, -1),
        "bitmap_count-bitmap": lambda k: k.bitmap_count(bm, 17),
        "find_runs-negative": lambda k: k.find_runs(bm, -1, np.zeros(10, np.uint32)),
        "find_runs-bitmap": lambda k: k.find_runs(bm[:1], n, np.zeros(10, np.uint32)),
        "find_runs-runs": lambda k: k.find_runs(bm, n, np.zeros(9, np.uint32)),
        "find_runs-runs-empty": lambda k: k.find_runs(b"", 0, np.zeros(1, np.uint32)),
        "is_zero-negative-offset": lambda k: k.is_zero(data, -1),
        "is_zero-offset-past-end": lambda k: k.is_zero(data, len(data) + 1),
        "is_zero-length-past-end": lambda k: k.is_zero(data, 1, len(data)),
        "is_zero-length-past-end-at-0": lambda k: k.is_zero(b"", 0, 1),
        "clear_zero_sectors-negative": lambda k: k.clear_zero_sectors(bytearray(bm), data, -2),
        "clear_zero_sectors-bitmap": lambda k: k.clear_zero_sectors(bytearray(1), data, n),
        "clear_zero_sectors-data": lambda k: k.clear_zero_sectors(bytearray(bm), short, n),
        "drop_equal-negative": lambda k: k.drop_equal_sectors(bytearray(bm), data, bm, data, -1),
        "drop_equal-bitmap": lambda k: k.drop_equal_sectors(bytearray(1), data, bm, data, n),
        "drop_equal-ref-bitmap": lambda k: k.drop_equal_sectors(bytearray(bm), data, bm[:1], data, n),
        "drop_equal-data": lambda k: k.drop_equal_sectors(bytearray(bm), short, bm, data, n),
        "drop_equal-ref-data": lambda k: k.drop_equal_sectors(bytearray(bm), data, bm, short, n),
    }


@pytest.mark.parametrize("case", sorted(_size_errors()))
def test_bad_sizes_are_valueerror(kernel, case):
    with pytest.raises(ValueError):
        _size_errors()[case](kernel)


def test_failed_call_writes_nothing(kernel):
    out_bm, out = bytearray(2), bytearray(fill(*range(9)))
    with pytest.raises(ValueError):
        kernel.overlay(b"\xff\xff", fill(*range(8)), out_bm, out, 9)  # src data one sector short
    assert out_bm == bytes(2) and out == fill(*range(9))


def test_none_is_typeerror(kernel):
    with pytest.raises(TypeError):
        kernel.bitmap_count(None, 0)
    with pytest.raises(TypeError):
        kernel.fill_unset(b"", None, 0)


# ---------------------------------------------------------------------------
# the GIL


def test_releases_gil(kernel):
    """Another Python thread runs *while* a native call is in progress.

    No clock is involved.  ``clear_zero_sectors`` clears the bits of a large
    bitmap word by word, front to back (the data is untouched anonymous
    memory: zeros that cost no RAM).  A watcher thread, which needs the GIL to
    run a line of Python, looks for the half-done state: the first word
    cleared and the last still set.  Were the GIL held for the whole call,
    the watcher could only ever see the bitmap before or after the call, never
    between; seeing the middle proves the call released it.  Scheduling can
    make the watcher miss the window, so a few rounds are tried: a kernel
    that keeps the GIL never passes, whatever the machine's load.
    """
    if kernel is _merge_py:
        pytest.skip("the pure-Python twin makes no GIL promise")
    nsectors = 1 << 20  # 512 MiB of data, a 128 KiB bitmap
    mm = mmap.mmap(-1, nsectors * SECTOR)
    bitmap = bytearray(b"\xff" * (nsectors // 8))
    seen = threading.Event()
    started = threading.Event()
    done = threading.Event()

    def watch():
        started.set()
        while not done.is_set():
            if bitmap[0] == 0 and bitmap[-1] == 0xFF:
                seen.set()
                return

    rounds = 0
    try:
        with memoryview(mm) as data:
            while not seen.is_set() and rounds < 20:
                rounds += 1
                bitmap[:] = b"\xff" * len(bitmap)
                done.clear()
                th = threading.Thread(target=watch, daemon=True)
                th.start()
                started.wait()
                left = kernel.clear_zero_sectors(bitmap, data, nsectors)
                done.set()
                th.join()
                assert left == 0 and not any(bitmap)
    finally:
        mm.close()
    assert seen.is_set(), f"no Python thread ran during {rounds} native calls: the GIL was held"


# ---------------------------------------------------------------------------
# property tests: each implementation == naive model, and native == twin

PROPS = settings(max_examples=60, deadline=None)


def agree(kernel, fn):
    """fn(kernel); for the compiled kernel, also fn(twin), and the two must agree."""
    got = fn(kernel)
    if kernel is not _merge_py:
        assert got == fn(_merge_py)
    return got


@PROPS
@given(st.data())
def test_overlay_agrees(kernel, data):
    n = data.draw(NSECTORS)
    src_bm, out_bm0 = data.draw(bitmaps(n)), data.draw(bitmaps(n))
    src, out0 = data.draw(blocks(n)), data.draw(blocks(n))

    def run(impl):
        out_bm, out = bytearray(out_bm0), bytearray(out0)
        return impl.overlay(src_bm, src, out_bm, out, n), out_bm, out

    got = agree(kernel, run)
    exp_bm, exp = bytearray(out_bm0), bytearray(out0)
    copied = 0
    for s in range(n):
        if bit(src_bm, s) and not bit(out_bm0, s):
            exp[s * SECTOR : (s + 1) * SECTOR] = sec(src, s)
            set_bit(exp_bm, s)
            copied += 1
    assert got == (copied, exp_bm, exp)


@PROPS
@given(st.data())
def test_overlay_full_agrees(kernel, data):
    n = data.draw(NSECTORS)
    out_bm0 = data.draw(bitmaps(n))
    src, out0 = data.draw(blocks(n)), data.draw(blocks(n))

    def run(impl):
        out_bm, out = bytearray(out_bm0), bytearray(out0)
        return impl.overlay_full(src, out_bm, out, n), out_bm, out

    got = agree(kernel, run)
    exp_bm, exp = bytearray(out_bm0), bytearray(out0)
    copied = 0
    for s in range(n):
        if not bit(out_bm0, s):
            exp[s * SECTOR : (s + 1) * SECTOR] = sec(src, s)
            set_bit(exp_bm, s)
            copied += 1
    assert got == (copied, exp_bm, exp)


@PROPS
@given(st.data())
def test_fill_unset_agrees(kernel, data):
    n = data.draw(NSECTORS)
    bm, data0 = data.draw(bitmaps(n)), data.draw(blocks(n))

    def run(impl):
        buf = bytearray(data0)
        return impl.fill_unset(bm, buf, n), buf

    got = agree(kernel, run)
    exp = bytearray(data0)
    unset = [s for s in range(n) if not bit(bm, s)]
    for s in unset:
        exp[s * SECTOR : (s + 1) * SECTOR] = bytes(SECTOR)
    assert got == (len(unset), exp)


@PROPS
@given(st.data())
def test_bitmap_count_and_runs_agree(kernel, data):
    n = data.draw(NSECTORS)
    bm = data.draw(bitmaps(n))
    bits = [bit(bm, s) for s in range(n)]
    assert agree(kernel, lambda impl: impl.bitmap_count(bm, n)) == sum(bits)

    def run(impl):
        buf = np.full(2 * (n // 2 + 1), 0xA5A5A5A5, dtype=np.uint32)
        return impl.find_runs(bm, n, buf), buf.tobytes()

    nruns, buf = agree(kernel, run)
    runs, s = [], 0
    while s < n:
        if bits[s]:
            e = s
            while e < n and bits[e]:
                e += 1
            runs.append((s, e - s))
            s = e
        else:
            s += 1
    got = np.frombuffer(buf, dtype=np.uint32)
    assert nruns == len(runs)
    assert [tuple(int(v) for v in got[i : i + 2]) for i in range(0, 2 * nruns, 2)] == runs
    assert (got[2 * nruns :] == 0xA5A5A5A5).all()


@PROPS
@given(st.binary(max_size=80), st.binary(max_size=80), st.integers(0, 80))
def test_bitmap_or_agrees(kernel, src, dst0, nbytes):
    nbytes = min(nbytes, len(src), len(dst0))

    def run(impl):
        dst = bytearray(dst0)
        impl.bitmap_or(src, dst, nbytes)
        return dst

    got = agree(kernel, run)
    assert got == bytes(a | b for a, b in zip(src[:nbytes], dst0[:nbytes])) + dst0[nbytes:]


@PROPS
@given(st.data())
def test_is_zero_agrees(kernel, data):
    buf = bytearray(data.draw(st.integers(0, 70_000)))
    for pos in data.draw(st.lists(st.integers(0, max(0, len(buf) - 1)), max_size=3)):
        if buf:
            buf[pos] = data.draw(st.integers(1, 255))
    offset = data.draw(st.integers(0, len(buf)))
    length = data.draw(st.one_of(st.just(-1), st.integers(0, len(buf) - offset)))
    got = agree(kernel, lambda impl: impl.is_zero(buf, offset, length))
    end = len(buf) if length < 0 else offset + length
    assert got is (not any(buf[offset:end]))


@PROPS
@given(st.data())
def test_clear_zero_sectors_agrees(kernel, data):
    n = data.draw(NSECTORS)
    bm0, blk = data.draw(bitmaps(n)), data.draw(blocks(n))

    def run(impl):
        bm = bytearray(bm0)
        return impl.clear_zero_sectors(bm, blk, n), bm

    got = agree(kernel, run)
    exp = bytearray(bm0)
    for s in range(n):
        if bit(bm0, s) and not any(sec(blk, s)):
            clear_bit(exp, s)
    assert got == (sum(bit(exp, s) for s in range(n)), exp)


@PROPS
@given(st.data())
def test_drop_equal_sectors_agrees(kernel, data):
    n = data.draw(NSECTORS)
    bm0, ref_bm = data.draw(bitmaps(n)), data.draw(bitmaps(n))
    tags = data.draw(tag_arrays(n))
    ref_tags = tags.copy()
    p = data.draw(st.sampled_from((0.0, 0.1, 0.5, 1.0)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    change = rng.random(n) < p
    ref_tags[change] = (ref_tags[change] + rng.integers(1, 4095, int(change.sum()))) % 4096
    blk, ref = expand(tags), expand(ref_tags)

    def run(impl):
        bm = bytearray(bm0)
        return impl.drop_equal_sectors(bm, blk, ref_bm, ref, n), bm

    got = agree(kernel, run)
    exp, dropped = bytearray(bm0), 0
    for s in range(n):
        if bit(bm0, s) and bit(ref_bm, s) and sec(blk, s) == sec(ref, s):
            clear_bit(exp, s)
            dropped += 1
    assert got == (dropped, exp)


@PROPS
@given(st.binary(max_size=5000))
def test_fingerprint_agrees(kernel, blob):
    agree(kernel, lambda impl: impl.fingerprint(blob))
