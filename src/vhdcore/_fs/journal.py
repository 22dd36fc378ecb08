"""jbd2 (ext3/ext4 journal) recovery, done virtually.

:func:`replay` walks the log like the kernel's recovery (scan, revoke,
replay) but writes nothing: it returns an :class:`Overlay` that maps each
filesystem block a committed transaction would rewrite to the journal block
holding its newest copy.  Anything odd (a checksum that does not match, an
unknown feature, a tag pointing past the filesystem, a log that would loop)
raises ``FsUnsafe`` so the caller keeps the filesystem whole.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .common import FsUnsafe
from .crc import crc32c_raw, crc32c_rows

__all__ = ["JBD2_MAGIC", "Overlay", "replay"]

JBD2_MAGIC = 0xC03B3998
DESCRIPTOR, COMMIT, SB_V1, SB_V2, REVOKE = 1, 2, 3, 4, 5

INCOMPAT_REVOKE = 0x1
INCOMPAT_64BIT = 0x2
INCOMPAT_ASYNC_COMMIT = 0x4
INCOMPAT_CSUM_V2 = 0x8
INCOMPAT_CSUM_V3 = 0x10
INCOMPAT_FAST_COMMIT = 0x20
INCOMPAT_KNOWN = 0x3F

FLAG_ESCAPE = 1
FLAG_SAME_UUID = 2
FLAG_LAST_TAG = 8

DEFAULT_FC_BLOCKS = 256
_MAGIC_BYTES = struct.pack(">I", JBD2_MAGIC)


@dataclass
class Overlay:
    """Filesystem block -> (journal block, escaped) of its newest committed copy."""

    read_jblock: Callable[[int], bytes] | None = None
    entries: dict[int, tuple[int, bool]] = field(default_factory=dict)
    transactions: int = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, block: int) -> bytes | None:
        hit = self.entries.get(block)
        if hit is None or self.read_jblock is None:
            return None
        data = self.read_jblock(hit[0])
        if hit[1]:
            data = _MAGIC_BYTES + data[4:]
        return data

    def blocks_in(self, start: int, count: int) -> list[int]:
        if not self.entries:
            return []
        if count < len(self.entries):
            return [b for b in range(start, start + count) if b in self.entries]
        return sorted(b for b in self.entries if start <= b < start + count)


def _be32(b: bytes, off: int) -> int:
    v: int = struct.unpack_from(">I", b, off)[0]
    return v


_Tag = tuple[int, int, bool, int]  # (journal block, filesystem block, escaped, checksum)
_Txn = tuple[int, list[_Tag], list[int]]  # (sequence, tags, revoked blocks)


@dataclass
class _Log:
    """What the journal superblock says about the log, validated."""

    block_size: int
    sequence: int
    start: int
    first: int
    last: int  # end of the log (before the fast-commit area)
    maxlen: int
    csum_v2: bool
    csum_v3: bool
    is64: bool
    jseed: int

    @property
    def has_csum(self) -> bool:
        return self.csum_v2 or self.csum_v3

    @property
    def tag_bytes(self) -> int:
        return 16 if self.csum_v3 else (12 if self.is64 else 8) + (2 if self.csum_v2 else 0)

    @property
    def tail(self) -> int:
        return 4 if self.has_csum else 0


def _read_log(sb: bytes, mapped_blocks: int, block_size: int) -> _Log:
    """The journal superblock: magic, geometry, features and its checksum."""
    magic, btype, _ = struct.unpack_from(">III", sb, 0)
    if magic != JBD2_MAGIC or btype not in (SB_V1, SB_V2):
        raise FsUnsafe("journal superblock has no jbd2 magic")
    jbs, maxlen, first, sequence, start = struct.unpack_from(">IIIII", sb, 12)
    if jbs != block_size:
        raise FsUnsafe(f"journal block size {jbs} differs from the filesystem's {block_size}")
    if maxlen > mapped_blocks or first < 1 or first >= maxlen:
        raise FsUnsafe(
            f"journal geometry (first {first}, length {maxlen}) does not fit the "
            f"{mapped_blocks} blocks of the journal inode"
        )
    incompat = 0
    if btype == SB_V2:
        _compat, incompat, _ro = struct.unpack_from(">III", sb, 0x24)
    if incompat & ~INCOMPAT_KNOWN:
        raise FsUnsafe(f"journal has unknown incompatible features 0x{incompat & ~INCOMPAT_KNOWN:x}")
    log = _Log(block_size, sequence, start, first, maxlen, maxlen,
               bool(incompat & INCOMPAT_CSUM_V2), bool(incompat & INCOMPAT_CSUM_V3),
               bool(incompat & INCOMPAT_64BIT), 0)
    if log.has_csum:
        if sb[0x50] != 4:
            raise FsUnsafe(f"journal checksum type {sb[0x50]} is not crc32c")
        want = _be32(sb, 0xFC)
        got = crc32c_raw(0xFFFFFFFF, sb[:0xFC] + b"\0\0\0\0" + sb[0x100:1024])
        if want != got:
            raise FsUnsafe("journal superblock checksum mismatch")
        log.jseed = crc32c_raw(0xFFFFFFFF, sb[0x30:0x40])
    if incompat & INCOMPAT_FAST_COMMIT:
        nfc = _be32(sb, 0x54) or DEFAULT_FC_BLOCKS
        log.last = maxlen - nfc
        if log.last <= first:
            raise FsUnsafe("journal fast-commit area leaves no room for the log")
    return log


class _Scan:
    """Pass 1 of recovery: walk the log from its start, collecting the
    committed transactions (their tags and revoked blocks)."""

    def __init__(self, read_jblock: Callable[[int], bytes], log: _Log, fs_blocks: int) -> None:
        self.read_jblock = read_jblock
        self.log = log
        self.fs_blocks = fs_blocks
        self.txns: list[_Txn] = []
        self.tags: list[_Tag] = []
        self.revokes: list[int] = []
        self.pos, self.expect, self.steps = log.start, log.sequence, 0

    def _next(self) -> None:
        self.pos += 1
        if self.pos >= self.log.last:
            self.pos = self.log.first

    def _step(self) -> None:
        self.steps += 1
        if self.steps > self.log.last - self.log.first:
            raise FsUnsafe("journal walk does not end (the log loops)")

    def _tail_ok(self, blk: bytes) -> bool:
        bs = self.log.block_size
        return crc32c_raw(self.log.jseed, blk[: bs - 4] + b"\0\0\0\0") == _be32(blk, bs - 4)

    def run(self) -> list[_Txn]:
        while True:
            if self.steps > self.log.last - self.log.first:
                raise FsUnsafe("journal walk does not end (the log loops)")
            blk = self.read_jblock(self.pos)
            magic, btype, bseq = struct.unpack_from(">III", blk, 0)
            if magic != JBD2_MAGIC or bseq != self.expect:
                return self.txns
            self.steps += 1
            if btype == DESCRIPTOR:
                self._descriptor(blk)
            elif btype == COMMIT:
                self._commit(blk)
            elif btype == REVOKE:
                self._revoke(blk)
            else:
                raise FsUnsafe(f"journal block {self.pos} has unexpected type {btype}")

    def _descriptor(self, blk: bytes) -> None:
        log = self.log
        if log.has_csum and not self._tail_ok(blk):
            raise FsUnsafe(f"journal descriptor block {self.pos} checksum mismatch")
        off = 12
        limit = log.block_size - log.tail
        while off + log.tag_bytes <= limit:
            if log.csum_v3:
                lo, flags, hi, tcsum = struct.unpack_from(">IIII", blk, off)
            else:
                lo, tcsum, flags = struct.unpack_from(">IHH", blk, off)
                hi = _be32(blk, off + 8) if log.is64 else 0
            fsblock = lo | ((hi << 32) if log.is64 else 0)
            off += log.tag_bytes
            if not flags & FLAG_SAME_UUID:
                off += 16
            self._next()
            self._step()
            if fsblock >= self.fs_blocks:
                raise FsUnsafe(
                    f"journal tag names block {fsblock} past the filesystem ({self.fs_blocks} blocks)"
                )
            self.tags.append((self.pos, fsblock, bool(flags & FLAG_ESCAPE), tcsum))
            if flags & FLAG_LAST_TAG:
                break
        self._next()

    def _commit(self, blk: bytes) -> None:
        if self.log.has_csum:
            want = _be32(blk, 16)
            got = crc32c_raw(self.log.jseed, blk[:16] + b"\0\0\0\0" + blk[20:self.log.block_size])
            if want != got:
                raise FsUnsafe(
                    f"journal commit block {self.pos} (transaction {self.expect}) checksum mismatch")
        self.txns.append((self.expect, self.tags, self.revokes))
        self.tags, self.revokes = [], []
        self.expect = (self.expect + 1) & 0xFFFFFFFF
        self._next()

    def _revoke(self, blk: bytes) -> None:
        log = self.log
        if log.has_csum and not self._tail_ok(blk):
            raise FsUnsafe(f"journal revoke block {self.pos} checksum mismatch")
        rcount = _be32(blk, 12)
        rsize = 8 if log.is64 else 4
        if rcount < 16 or rcount > log.block_size - log.tail:
            raise FsUnsafe(f"journal revoke block {self.pos} has an invalid size {rcount}")
        n = (rcount - 16) // rsize
        fmt = f">{n}{'Q' if log.is64 else 'I'}"
        self.revokes.extend(struct.unpack_from(fmt, blk, 16))
        self._next()


def _apply(overlay: Overlay, txns: list[_Txn]) -> None:
    """Passes 2 and 3: revoke, then replay (the newest copy wins)."""
    revoked: dict[int, int] = {}
    for i, (_seq, _tags, revs) in enumerate(txns):
        for b in revs:
            revoked[b] = i
    entries = overlay.entries
    for i, (_seq, tags, _revs) in enumerate(txns):
        for jpos, fsblock, escape, _c in tags:
            if revoked.get(fsblock, -1) >= i:
                continue
            entries[fsblock] = (jpos, escape)
    overlay.transactions = len(txns)


def replay(
    read_jblock: Callable[[int], bytes],
    mapped_blocks: int,
    block_size: int,
    fs_blocks: int,
) -> tuple[Overlay, list[str]]:
    """Build the overlay of the committed, not yet replayed transactions.

    ``read_jblock(n)`` returns journal block ``n`` (logical, 0 = journal
    superblock); ``mapped_blocks`` is how many logical blocks the journal
    inode maps; ``fs_blocks`` bounds the block numbers that tags may name.
    """
    notes: list[str] = []
    log = _read_log(read_jblock(0), mapped_blocks, block_size)
    overlay = Overlay(read_jblock)
    if log.start == 0:
        notes.append("journal is empty (nothing to replay)")
        return overlay, notes
    if not log.first <= log.start < log.last:
        raise FsUnsafe(f"journal start block {log.start} lies outside the log "
                       f"({log.first}..{log.last - 1})")
    if log.last < log.maxlen and any(read_jblock(log.last)):
        raise FsUnsafe("journal fast-commit area is not empty (fast commits are not replayed here)")
    scan = _Scan(read_jblock, log, fs_blocks)
    txns = scan.run()
    if scan.tags or scan.revokes:
        notes.append(f"journal: uncommitted transaction {scan.expect} ignored, as recovery does")
    if log.has_csum:  # data block checksums of the committed transactions
        _check_data_csums(read_jblock, txns, log.jseed, log.csum_v3, block_size)
    _apply(overlay, txns)
    notes.append(
        f"journal: {len(txns)} committed transaction(s), {len(overlay.entries)} block(s) applied virtually"
    )
    return overlay, notes


def _check_data_csums(
    read_jblock: Callable[[int], bytes],
    txns: list[_Txn],
    jseed: int,
    v3: bool,
    bs: int,
) -> None:
    batch: list[tuple[int, int, int]] = []  # (jpos, seed, want)

    def flush() -> None:
        if not batch:
            return
        rows = np.frombuffer(b"".join(read_jblock(p) for p, _, _ in batch), dtype=np.uint8)
        rows = rows.reshape(len(batch), bs)
        got = crc32c_rows(np.array([s for _, s, _ in batch], dtype=np.uint32), rows)
        for (p, _s, want), g in zip(batch, got.tolist()):
            if (g if v3 else g & 0xFFFF) != want:
                raise FsUnsafe(f"journal data block {p} checksum mismatch")
        batch.clear()

    for seq, tags, _revs in txns:
        seed = crc32c_raw(jseed, struct.pack(">I", seq))
        for jpos, _b, _e, want in tags:
            batch.append((jpos, seed, want))
            if len(batch) >= 256:
                flush()
    flush()
