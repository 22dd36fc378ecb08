"""Test helpers for hostile input: structure-aware mutation of VHD files, a
harness that runs every reading and writing entry point on a (mutated) chain
and checks the outcome contract, and crafting of parent links.

The outcome contract: every entry point either gives correct output or
raises a :class:`~vhdcore.errors.VhdError` subclass.  Never another
exception, a crash, a hang or unbounded memory.  "Correct" is checked with
oracles that need no knowledge of the mutation: a flattened image reads the
same as the chain it came from, a coalesced parent reads what its child read
before, a failed coalesce leaves the child's view unchanged, ``check``
reports problems instead of raising, ``info`` output is JSON.

Mutations are plain tuples with absolute offsets, so that a failing one
prints as something that can be pasted into a regression test:

* ``("xor", offset, bytes)``: XOR bytes into the file;
* ``("put", offset, width, value)``: store a big-endian integer;
* ``("fill", start, end, byte)``: overwrite a range with one byte value;
* ``("truncate", length)``: cut the file;
* ``("extend", nbytes, byte)``: append bytes;
* ``("fix",)``: recompute the footer and dynamic header checksums.

:func:`draw_mutations` chooses them from a file's :class:`Layout` with any
source of integers (hypothesis' ``st.data()`` or :class:`random.Random`).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import resource
import shutil
import signal
import struct
import tracemalloc
import uuid as _uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vhdcore import kernels
from vhdcore.chain import Chain
from vhdcore.check import Problem, check_chain, check_file
from vhdcore.coalesce import coalesce, flatten
from vhdcore.disk import VhdFile
from vhdcore.errors import VhdError
from vhdcore.format import (
    BAT_UNUSED,
    FOOTER_SIZE,
    HEADER_SIZE,
    SECTOR,
    DynamicHeader,
    ParentLocator,
    checksum,
    encode_locator_path,
)

Mutation = tuple

# ------------------------------------------------------------------ fields
#: footer fields: name -> (offset, width)
FOOTER_FIELDS = {
    "features": (8, 4), "version": (12, 4), "data_offset": (16, 8), "timestamp": (24, 4),
    "original_size": (40, 8), "current_size": (48, 8), "cylinders": (56, 2), "heads": (58, 1),
    "disk_type": (60, 4), "saved_state": (84, 1), "hidden": (85, 1),
}
#: dynamic header fields: name -> (offset, width)
HEADER_FIELDS = {
    "data_offset": (8, 8), "table_offset": (16, 8), "version": (24, 4),
    "max_table_entries": (28, 4), "block_size": (32, 4), "parent_timestamp": (56, 4),
}
#: fields of each of the 8 parent locator entries (at 576 + 24*i of the header)
LOCATOR_FIELDS = {
    "code": (0, 4), "data_space": (4, 4), "data_length": (8, 4), "reserved": (12, 4),
    "data_offset": (16, 8),
}


@dataclass
class Layout:
    """Where the structures of a valid VHD file are."""

    size: int
    disk_type: int
    virtual_size: int
    header_at: int | None = None
    bat_at: int | None = None
    nblocks: int = 0
    max_table_entries: int = 0
    block_size: int = 0
    bitmap_size: int = 0
    blocks: list[tuple[int, int]] = field(default_factory=list)  # (block, offset of bitmap)
    locators: list[tuple[int, int, int]] = field(default_factory=list)  # (slot, offset, length)

    @property
    def dynamic(self) -> bool:
        return self.header_at is not None

    def regions(self) -> dict[str, list[tuple[int, int]]]:
        """Byte ranges of each kind of structure (non-empty kinds only)."""
        r: dict[str, list[tuple[int, int]]] = {
            "footer": [(self.size - FOOTER_SIZE, self.size)],
            "anywhere": [(0, self.size)],
        }
        if self.dynamic:
            assert self.header_at is not None and self.bat_at is not None
            r["footer_copy"] = [(0, FOOTER_SIZE)]
            r["header"] = [(self.header_at, self.header_at + HEADER_SIZE)]
            r["locator_entries"] = [(self.header_at + 576, self.header_at + 768)]
            r["bat"] = [(self.bat_at, self.bat_at + max(4, self.nblocks * 4))]
            if self.locators:
                r["locator_data"] = [(o, o + max(1, n)) for _, o, n in self.locators]
            if self.blocks:
                r["bitmap"] = [(o, o + self.bitmap_size) for _, o in self.blocks]
                r["block_data"] = [(o + self.bitmap_size, o + self.bitmap_size + self.block_size)
                                   for _, o in self.blocks]
        else:
            r["fixed_data"] = [(0, max(1, self.size - FOOTER_SIZE))]
        return {k: [(a, min(b, self.size)) for a, b in v if a < self.size] for k, v in r.items()
                if any(a < self.size for a, _ in v)}

    def boundaries(self) -> list[int]:
        """Every offset where a structure starts or ends, with its neighbours."""
        pts = {0, 1, 511, self.size}
        for spans in self.regions().values():
            for a, b in spans:
                pts.update((a, b))
        out = set()
        for p in pts:
            for d in (-1, 0, 1):
                if 0 <= p + d < self.size:
                    out.add(p + d)
        return sorted(out)


def layout_of(path: str | os.PathLike[str]) -> Layout:
    """The layout of a valid VHD file (read with vhdcore itself)."""
    with VhdFile.open(path) as v:
        lay = Layout(size=v.file_size, disk_type=v.disk_type, virtual_size=v.virtual_size)
        if v.header is not None and v.bat is not None:
            h = v.header
            lay.header_at = v.footer.data_offset
            lay.bat_at = h.table_offset
            lay.nblocks = v.nblocks
            lay.max_table_entries = h.max_table_entries
            lay.block_size = v.block_size
            lay.bitmap_size = v.bitmap_size
            lay.blocks = [(b, v.block_offset(b)) for b in v.iter_allocated()]  # type: ignore[misc]
            lay.locators = [(i, loc.data_offset, loc.data_length)
                            for i, loc in enumerate(h.locators) if loc.used]
    return lay


# ------------------------------------------------------------------ applying
def fix_checksums(buf: bytearray) -> None:
    """Recompute the checksums of the footer at EOF, the copy at offset 0 and
    the dynamic header (found through the footer), where their cookies are."""
    n = len(buf)
    spots = []
    if n >= FOOTER_SIZE and buf[n - FOOTER_SIZE : n - FOOTER_SIZE + 8] == b"conectix":
        spots.append(n - FOOTER_SIZE)
    if n >= FOOTER_SIZE and buf[:8] == b"conectix":
        spots.append(0)
    for at in spots:
        struct.pack_into(">I", buf, at + 64, checksum(bytes(buf[at : at + FOOTER_SIZE]), 64))
    for at in spots:
        hoff = struct.unpack_from(">Q", buf, at + 16)[0]
        if hoff + HEADER_SIZE <= n and buf[hoff : hoff + 8] == b"cxsparse":
            struct.pack_into(">I", buf, hoff + 36,
                             checksum(bytes(buf[hoff : hoff + HEADER_SIZE]), 36))


def apply_mutations(data: bytes, mutations: Sequence[Mutation]) -> bytes:
    """The file ``data`` with ``mutations`` applied in order."""
    buf = bytearray(data)
    for m in mutations:
        kind = m[0]
        if kind == "xor":
            _, off, pattern = m
            for i, x in enumerate(pattern):
                if off + i < len(buf):
                    buf[off + i] ^= x
        elif kind == "put":
            _, off, width, value = m
            raw = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
            if off + width <= len(buf):
                buf[off : off + width] = raw
        elif kind == "fill":
            _, a, b, byte = m
            b = min(b, len(buf))
            if a < b:
                buf[a:b] = bytes([byte]) * (b - a)
        elif kind == "truncate":
            del buf[m[1] :]
        elif kind == "extend":
            buf += bytes([m[2]]) * m[1]
        elif kind == "fix":
            fix_checksums(buf)
        else:  # pragma: no cover - a bug in a test
            raise ValueError(f"unknown mutation {m!r}")
    return bytes(buf)


# ------------------------------------------------------------------ drawing
class Draw:
    """A source of choices: hypothesis ``st.data()`` or ``random.Random``."""

    def __init__(self, source: object) -> None:
        self.source = source

    def int(self, lo: int, hi: int) -> int:
        src = self.source
        if hasattr(src, "draw"):
            from hypothesis import strategies as st

            return src.draw(st.integers(lo, hi))  # type: ignore[attr-defined]
        return src.randint(lo, hi)  # type: ignore[attr-defined]

    def choice(self, seq: Sequence):
        return seq[self.int(0, len(seq) - 1)]

    def bool(self, p_true_in_8: int = 4) -> bool:
        return self.int(0, 7) < p_true_in_8


def special_values(width: int, lay: Layout, original: int) -> list[int]:
    """Extreme and boundary values for an integer field of ``width`` bytes."""
    top = (1 << (8 * width)) - 1
    vals = {0, 1, 2, 3, 7, 8, 255, 256, 511, 512, 513, 1024, 1536, 4096, top, top - 1,
            top >> 1, (top >> 1) + 1, lay.size, lay.size - FOOTER_SIZE, lay.size + SECTOR,
            lay.size // SECTOR, lay.size // SECTOR - 1, lay.size * 4, original - 1, original + 1,
            original * 2, original // 2, original + SECTOR, 1 << 31, (1 << 32) - 1, 1 << 32,
            2 * 1024**4, 64 * 1024**4, 64 * 1024**4 + SECTOR, 2 * 1024**2, 256 * 1024**2}
    vals.update(1 << k for k in range(8 * width))
    return sorted(v for v in vals if 0 <= v <= top)


def _read_int(data: bytes, off: int, width: int) -> int:
    if off + width > len(data):
        return 0
    return int.from_bytes(data[off : off + width], "big")


def _draw_value(d: Draw, width: int, lay: Layout, original: int) -> int:
    if d.bool(6):
        return d.choice(special_values(width, lay, original))
    return d.int(0, (1 << (8 * width)) - 1)


def draw_mutations(d: Draw, data: bytes, lay: Layout, max_count: int = 3) -> list[Mutation]:
    """1..``max_count`` mutations of a file with layout ``lay``, mostly aimed at
    its structures; checksums are usually made valid again so that the
    parser's deeper checks are reached."""
    out: list[Mutation] = []
    regions = lay.regions()
    kinds = ["flip", "field", "truncate", "extend"]
    if lay.dynamic:
        kinds += ["header_field", "locator_field", "bat", "bitmap", "bat", "header_field"]
    for _ in range(d.int(1, max_count)):
        kind = d.choice(kinds)
        fix = d.bool(6)
        if kind == "flip":
            name = d.choice(sorted(regions))
            a, b = d.choice(regions[name])
            off = d.int(a, max(a, b - 1))
            n = d.int(1, 4)
            out.append(("xor", off, bytes(d.int(1, 255) for _ in range(n))))
        elif kind == "field":
            fname = d.choice(sorted(FOOTER_FIELDS))
            fo, width = FOOTER_FIELDS[fname]
            orig = _read_int(data, lay.size - FOOTER_SIZE + fo, width)
            value = _draw_value(d, width, lay, orig)
            where = d.choice(["primary", "copy", "both"] if lay.dynamic else ["primary"])
            if where in ("primary", "both"):
                out.append(("put", lay.size - FOOTER_SIZE + fo, width, value))
            if where in ("copy", "both"):
                out.append(("put", fo, width, value))
        elif kind == "header_field":
            assert lay.header_at is not None
            fname = d.choice(sorted(HEADER_FIELDS))
            fo, width = HEADER_FIELDS[fname]
            orig = _read_int(data, lay.header_at + fo, width)
            out.append(("put", lay.header_at + fo, width, _draw_value(d, width, lay, orig)))
        elif kind == "locator_field":
            assert lay.header_at is not None
            slot = d.choice([s for s, _, _ in lay.locators] or [0]) if d.bool(6) else d.int(0, 7)
            fname = d.choice(sorted(LOCATOR_FIELDS))
            fo, width = LOCATOR_FIELDS[fname]
            at = lay.header_at + 576 + 24 * slot + fo
            if fname == "code":
                value = int.from_bytes(d.choice([b"W2ru", b"W2ku", b"MacX", b"\0\0\0\0",
                                                 b"Wi2r", b"Wi2k", b"\xff\xff\xff\xff"]), "big")
            else:
                value = _draw_value(d, width, lay, _read_int(data, at, width))
            out.append(("put", at, width, value))
        elif kind == "bat":
            assert lay.bat_at is not None
            entry = d.int(0, max(0, lay.nblocks - 1))
            choices = [BAT_UNUSED, 0, 1, BAT_UNUSED - 1, lay.size // SECTOR,
                       lay.size // SECTOR - 1, (lay.header_at or 0) // SECTOR,
                       lay.bat_at // SECTOR, (lay.size - FOOTER_SIZE) // SECTOR]
            choices += [o // SECTOR for _, o in lay.blocks]  # overlap another block
            choices += [o // SECTOR + 1 for _, o in lay.blocks[:2]]
            value = d.choice(choices) if d.bool(6) else d.int(0, BAT_UNUSED)
            out.append(("put", lay.bat_at + 4 * entry, 4, value))
            fix = False
        elif kind == "bitmap":
            if not lay.blocks:
                continue
            _, off = d.choice(lay.blocks)
            nbytes = d.choice([1, 8, lay.bitmap_size])
            start = off + d.int(0, lay.bitmap_size - nbytes)
            out.append(("fill", start, start + nbytes, d.choice([0x00, 0xFF, 0x80, 0x01, 0x55])))
            fix = False
        elif kind == "truncate":
            bounds = lay.boundaries()
            out.append(("truncate", d.choice(bounds)))
            fix = d.bool(2)
        elif kind == "extend":
            out.append(("extend", d.choice([1, 511, 512, 513, 4096]), d.choice([0, 0xEE])))
            fix = False
        if fix:
            out.append(("fix",))
    return out


# ------------------------------------------------------------------ sample inputs
@dataclass
class Sample:
    """A chain to mutate: its files on disk, base .. leaf (names in one
    directory)."""

    name: str
    dir: Path
    files: list[str]  # base .. leaf

    @property
    def leaf(self) -> str:
        return self.files[-1]

    def data(self, fname: str) -> bytes:
        return (self.dir / fname).read_bytes()

    def write(self, d: Path, replaced: dict[str, bytes] | None = None,
              copy: Sequence[str] = ()) -> Path:
        """Lay the chain out in ``d``: ``replaced`` files with new contents,
        ``copy`` files copied, the others hard-linked (read-only use)."""
        d.mkdir(parents=True, exist_ok=True)
        replaced = replaced or {}
        for fname in self.files:
            if fname in replaced:
                (d / fname).write_bytes(replaced[fname])
            elif fname in copy:
                shutil.copyfile(self.dir / fname, d / fname)
            else:
                try:
                    os.link(self.dir / fname, d / fname)
                except OSError:
                    shutil.copyfile(self.dir / fname, d / fname)
        return d / self.leaf


def built_samples_in(root: Path) -> list[Sample]:
    """Small chains vhdcore writes (every file well under 64 KiB)."""
    from _builders import build_chain

    from vhdcore.disk import create_differencing, create_dynamic

    KiB = 1024
    out = []
    d = root / "dyn3"
    d.mkdir()
    build_chain(d, size=32 * KiB, depth=3, block_size=4 * KiB, writes_per_layer=5,
                max_len=6 * KiB, seed=3)
    out.append(Sample("dyn3", d, ["d0.vhd", "d1.vhd", "d2.vhd"]))
    d = root / "fixed2"
    d.mkdir()
    mc = build_chain(d, size=24 * KiB, depth=1, base="fixed", writes_per_layer=4,
                     max_len=4 * KiB, seed=5)
    create_differencing(d / "d1.vhd", mc.paths[0], block_size=4 * KiB).close()
    with Chain.open(d / "d1.vhd", writable=True) as c:
        c.write(1000, b"\x5a" * 3000)
        c.write(20 * KiB, b"\x00" * 1024)
    out.append(Sample("fixed2", d, ["d0.vhd", "d1.vhd"]))
    # a short last block, a virtual size that is not a block multiple
    d = root / "short"
    d.mkdir()
    create_dynamic(d / "d0.vhd", 20 * KiB + 1536, block_size=8 * KiB).close()
    with Chain.open(d / "d0.vhd", writable=True) as c:
        c.write(20 * KiB, b"\x11" * 1536)
        c.write(100, b"\x22" * 300)
    create_differencing(d / "d1.vhd", d / "d0.vhd").close()
    with Chain.open(d / "d1.vhd", writable=True) as c:
        c.write(16 * KiB + 7, b"\x33" * 5000)
    out.append(Sample("short", d, ["d0.vhd", "d1.vhd"]))
    # a relinked leaf: locators moved behind its blocks
    d = root / "relinked"
    d.mkdir()
    mc = build_chain(d, size=16 * KiB, depth=3, block_size=4 * KiB, writes_per_layer=4,
                     max_len=3 * KiB, seed=8)
    coalesce(mc.paths[1], relink_children=[mc.paths[2]])
    os.unlink(mc.paths[1])
    out.append(Sample("relinked", d, ["d0.vhd", "d2.vhd"]))
    return out


# ------------------------------------------------------------------ kernels
@contextlib.contextmanager
def kernel_impl(which: str) -> Iterator[None]:
    """Patch ``vhdcore.kernels`` with one implementation for the duration."""
    impl = importlib.import_module("vhdcore._merge" if which == "cython" else "vhdcore._merge_py")
    saved = {n: getattr(kernels, n) for n in impl.KERNEL_NAMES}
    try:
        for n in impl.KERNEL_NAMES:
            setattr(kernels, n, getattr(impl, n))
        yield
    finally:
        for n, f in saved.items():
            setattr(kernels, n, f)


# ------------------------------------------------------------------ bounds
class Hang(BaseException):
    """An entry point ran longer than the per-input time bound."""


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread after ``seconds``."""
    if seconds <= 0 or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None,
                                                                  signal.SIG_IGN):
        yield
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def memory_bound(limit: int) -> Iterator[None]:
    """Fail when the Python-visible allocations (tracemalloc, which includes
    numpy arrays) peak above ``limit`` bytes."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()
    if peak > limit:
        raise AssertionError(f"allocations peaked at {peak} bytes, over the bound of {limit}")


def limit_address_space(extra: int) -> int:
    """Cap this process's address space at its current size plus ``extra``
    bytes (for subprocesses); returns the cap."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = vm + extra
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return cap


# ------------------------------------------------------------------ the harness
#: how much of a virtual disk the harness reads from the start (more of it is
#: sampled block by block)
READ_PREFIX = 4 * 1024 * 1024
#: the most allocated blocks whose content the harness samples
SAMPLE_BLOCKS = 64
TARGETS = ("info", "check", "cat", "flatten", "coalesce")


class ContractViolation(AssertionError):
    """An entry point broke the outcome contract."""


def _view_digest(chain: Chain, spans: Sequence[tuple[int, int]]) -> str:
    h = hashlib.sha256()
    buf = bytearray()
    for off, n in spans:
        if off + n > chain.virtual_size:
            raise ContractViolation(f"{chain.leaf.path}: {off}+{n} is past the virtual size "
                                    f"{chain.virtual_size}")
        if len(buf) < n:
            buf = bytearray(n)
        got = chain.read_into(off, memoryview(buf)[:n])
        if got != n:
            raise ContractViolation(f"read_into({off}, {n}) returned {got}")
        h.update(memoryview(buf)[:n])
    return h.hexdigest()


def sample_spans(chain: Chain) -> list[tuple[int, int]]:
    """The parts of a virtual disk the harness compares: a prefix, every
    (sampled) allocated block, the last bytes and an unaligned read."""
    vs = chain.virtual_size
    spans = [(0, min(vs, READ_PREFIX))]
    for blk in chain.allocated_blocks()[:SAMPLE_BLOCKS]:
        spans.append((int(blk) * chain.block_size, chain.block_size))
    if vs > 0:
        spans.append((max(0, vs - 1000), 1000))
        spans.append((vs // 3 | 1, 777))
    return [(o, min(n, vs - o)) for o, n in spans if o < vs]


def chain_view(leaf: Path, spans: Sequence[tuple[int, int]] | None = None
               ) -> tuple[str, list[tuple[int, int]]] | None:
    """(digest, spans) of a chain's view, or None when it does not open."""
    try:
        with Chain.open(leaf) as c:
            spans = list(spans) if spans is not None else sample_spans(c)
            return _view_digest(c, spans), spans
    except VhdError:
        return None


@dataclass
class Outcome:
    results: dict[str, str] = field(default_factory=dict)  # target -> "ok" or error class

    def record(self, target: str, result: str) -> None:
        self.results[target] = result


def _expect(target: str, fn: Callable[[], object], outcome: Outcome) -> object | None:
    try:
        value = fn()
    except VhdError as exc:
        outcome.record(target, type(exc).__name__)
        return None
    except (ContractViolation, Hang):
        raise
    except BaseException as exc:
        raise ContractViolation(f"{target}: unexpected {type(exc).__name__}: {exc}") from exc
    outcome.record(target, "ok")
    return value


def run_targets(workdir: Path, leaf_name: str, targets: Sequence[str] = TARGETS,
                other_backend: str | None = None) -> Outcome:
    """Run the entry points on the chain whose leaf is ``workdir/leaf_name``
    and check the contract.  ``coalesce`` (last) modifies the leaf's parent.
    With ``other_backend``, ``cat`` also compares with that kernel."""
    leaf = workdir / leaf_name
    out = Outcome()
    # no entry point may write to any file of the chain but the coalesced parent
    stamps = {p: _stamp(p) for p in workdir.glob("*.vhd")}
    parent = _parent_path(leaf)

    def info() -> None:
        for p in sorted(workdir.glob("*.vhd")):
            try:
                with VhdFile.open(p) as v:
                    json.dumps(v.describe())
            except VhdError:
                if p == leaf:
                    raise

    if "info" in targets:
        _expect("info", info, out)

    def check() -> None:
        for probs in (check_file(leaf), check_chain(leaf)):
            if not isinstance(probs, list) or not all(isinstance(p, Problem) for p in probs):
                raise ContractViolation(f"check returned {probs!r}")
            for p in probs:
                str(p)
                json.dumps(p.to_json())

    if "check" in targets:
        # check reports problems; it does not raise, not even a VhdError
        try:
            check()
            out.record("check", "ok")
        except (ContractViolation, Hang):
            raise
        except BaseException as exc:
            raise ContractViolation(f"check: unexpected {type(exc).__name__}: {exc}") from exc

    before = _expect("open", lambda: chain_view(leaf), out)
    out.results.pop("open", None)
    if "cat" in targets:
        def cat() -> str | None:
            if before is None:
                with Chain.open(leaf):
                    pass
                raise ContractViolation("chain_view said the chain does not open, but it does")
            digest, spans = before  # type: ignore[misc]
            again = chain_view(leaf, spans)
            if again is None or again[0] != digest:
                raise ContractViolation("two reads of the same chain differ")
            if other_backend:
                with kernel_impl(other_backend):
                    other = chain_view(leaf, spans)
                if other is None or other[0] != digest:
                    raise ContractViolation(f"the {other_backend} kernel reads differently")
            return digest
        _expect("cat", cat, out)

    if "flatten" in targets:
        def flat() -> None:
            dst = workdir / "flat.out"
            flatten(leaf, dst, "vhd")
            if before is None:
                raise ContractViolation("flatten succeeded on a chain that does not open")
            _, spans = before  # type: ignore[misc]
            got = chain_view(dst, spans)
            if got is None or got[0] != before[0]:  # type: ignore[index]
                raise ContractViolation("the flattened image reads differently from the chain")
            errs = [p for p in check_file(dst) if p.severity == "error"]
            if errs:
                raise ContractViolation(f"the flattened image has problems: {errs}")
            os.unlink(dst)
        _expect("flatten", flat, out)

    if "coalesce" in targets:
        def coal() -> None:
            try:
                coalesce(leaf)
            finally:
                if before is not None:  # whatever happened, the child reads the same
                    after = chain_view(leaf, before[1])  # type: ignore[index]
                    if after is None or after[0] != before[0]:  # type: ignore[index]
                        raise ContractViolation("coalesce changed what the child reads")
            if before is None or parent is None:
                raise ContractViolation("coalesce succeeded on a chain that does not open")
            got = chain_view(parent, before[1])  # type: ignore[index]
            if got is None or got[0] != before[0]:  # type: ignore[index]
                raise ContractViolation("after coalesce the parent reads differently from "
                                        "the child before")
        _expect("coalesce", coal, out)
    may_change = {parent} if "coalesce" in targets else set()
    changed = [p.name for p, st in stamps.items() if p not in may_change and _stamp(p) != st]
    if changed:
        raise ContractViolation(f"inputs were written to: {changed}")
    return out


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def _parent_path(leaf: Path) -> Path | None:
    try:
        with Chain.open(leaf) as c:
            return Path(c.layers[1].path) if len(c.layers) > 1 else None
    except VhdError:
        return None


def save_failure(dest: Path, sample: Sample, replaced: dict[str, bytes],
                 mutations: dict[str, list[Mutation]], error: BaseException) -> Path:
    """Keep a failing input (all files of the chain and a note) for the corpus."""
    n = 0
    while (dest / f"fail-{n:03d}").exists():
        n += 1
    d = dest / f"fail-{n:03d}"
    sample.write(d, replaced, copy=sample.files)
    (d / "NOTE.json").write_text(json.dumps({
        "sample": sample.name, "leaf": sample.leaf,
        "mutations": {k: [list(m) if not isinstance(m[-1], bytes) else [*m[:-1], m[-1].hex()]
                          for m in v] for k, v in mutations.items()},
        "error": f"{type(error).__name__}: {error}",
    }, indent=1))
    return d


# ------------------------------------------------------------------ crafting links
def rewrite_parent(child: str | os.PathLike[str], *, locators: Sequence[tuple[bytes, str]] | None
                   = None, raw_locators: Sequence[tuple[bytes, bytes]] | None = None,
                   name: str | None = None, parent_uuid: bytes | _uuid.UUID | None = None) -> None:
    """Rewrite a differencing disk's parent link: locators (code, path) whose
    paths are stored as given (absolute, ``..``, anything), or raw locator
    data; the UTF-16BE parent name; the parent UUID.  New locator data goes
    after the last block and the footer moves behind it."""
    child = os.fspath(child)
    with VhdFile.open(child, writable=True) as v:
        assert v.header is not None, "not a dynamic or differencing disk"
        h = v.header
        changes: dict[str, object] = {}
        if parent_uuid is not None:
            changes["parent_uuid"] = (parent_uuid.bytes if isinstance(parent_uuid, _uuid.UUID)
                                      else parent_uuid)
        if name is not None:
            changes["parent_name"] = name
        blobs: list[tuple[bytes, bytes]] = []
        if locators is not None:
            blobs = [(code, _encode_any(code, path)) for code, path in locators]
        if raw_locators is not None:
            blobs += list(raw_locators)
        if locators is not None or raw_locators is not None:
            locs = []
            for code, blob in blobs:
                space = max(SECTOR, -(-len(blob) // SECTOR) * SECTOR)
                off = v.reserve(space)
                v._pwrite(blob.ljust(space, b"\0"), off)
                locs.append(ParentLocator(code=code, data_space=space, data_length=len(blob),
                                          data_offset=off))
            while len(locs) < 8:
                locs.append(ParentLocator(b"\0\0\0\0", 0, 0, 0))
            changes["locators"] = tuple(locs)
        if changes:
            v.write_header(h.with_(**changes))


def _encode_any(code: bytes, path: str) -> bytes:
    """Locator data for ``path`` stored verbatim (no ``./`` prefix added to
    absolute paths)."""
    if code in (b"W2ru", b"W2ku"):
        return path.encode("utf-16-le")
    if code == b"MacX":
        from urllib.parse import quote

        return ("file://" + quote(path)).encode("utf-8")
    return encode_locator_path(code, path)


def uuid_of(path: str | os.PathLike[str]) -> bytes:
    with VhdFile.open(path) as v:
        return v.footer.unique_id




# ------------------------------------------------------------------ crafting files
def craft_vhd(*, size: int, disk_type: int = 3, block_size: int = 2 * 1024 * 1024,
              max_table_entries: int | None = None, table_offset: int = FOOTER_SIZE + HEADER_SIZE,
              bat: Sequence[int] = (), bat_bytes: int = SECTOR, data_offset: int = FOOTER_SIZE,
              locators: Sequence[ParentLocator] = (), locator_data: Sequence[tuple[int, bytes]] = (),
              parent_uuid: bytes = b"\0" * 16, parent_name: str = "", body: int = 0) -> bytes:
    """A VHD file built field by field, with no validation: whatever a
    hostile or broken writer might produce.  ``bat`` gives the first BAT
    entries (the rest of ``bat_bytes`` is unused), ``locator_data`` is
    (offset, bytes) placed in the file, ``body`` extra bytes before the
    footer.  A fixed disk (``disk_type=2``) is ``body`` bytes of zeros and a
    footer."""
    from vhdcore.format import Footer

    footer = Footer.new(2 if disk_type == 2 else 3, 512 if size <= 0 else min(size, 1 << 40))
    footer = footer.with_(disk_type=disk_type, current_size=size, original_size=size,
                          data_offset=0xFFFFFFFFFFFFFFFF if disk_type == 2 else data_offset)
    if disk_type == 2:
        return bytes(body) + footer.pack()
    mte = max_table_entries if max_table_entries is not None else max(1, -(-size // block_size))
    header = DynamicHeader(table_offset=table_offset, max_table_entries=mte & 0xFFFFFFFF,
                           block_size=block_size, parent_uuid=parent_uuid,
                           parent_name=parent_name,
                           locators=tuple(locators) + tuple(
                               ParentLocator(b"\0\0\0\0", 0, 0, 0)
                               for _ in range(8 - len(locators))))
    end = FOOTER_SIZE + HEADER_SIZE + bat_bytes + body
    for off, blob in locator_data:
        end = max(end, off + len(blob))
    end = -(-end // SECTOR) * SECTOR
    buf = bytearray(end + FOOTER_SIZE)
    buf[0:FOOTER_SIZE] = footer.pack()
    buf[data_offset : data_offset + HEADER_SIZE] = header.pack() if data_offset < end else b""
    if table_offset < end:
        n = min(bat_bytes, end - table_offset) // 4
        entries = list(bat)[:n] + [BAT_UNUSED] * (n - min(n, len(bat)))
        buf[table_offset : table_offset + 4 * n] = struct.pack(f">{n}I", *entries)
    for off, blob in locator_data:
        buf[off : off + len(blob)] = blob
    buf[end:] = footer.pack()
    return bytes(buf)
