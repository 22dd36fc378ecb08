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
    sb = read_jblock(0)
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
    csum_v2 = bool(incompat & INCOMPAT_CSUM_V2)
    csum_v3 = bool(incompat & INCOMPAT_CSUM_V3)
    has_csum = csum_v2 or csum_v3
    is64 = bool(incompat & INCOMPAT_64BIT)
    jseed = 0
    if has_csum:
        if sb[0x50] != 4:
            raise FsUnsafe(f"journal checksum type {sb[0x50]} is not crc32c")
        want = _be32(sb, 0xFC)
        got = crc32c_raw(0xFFFFFFFF, sb[:0xFC] + b"\0\0\0\0" + sb[0x100:1024])
        if want != got:
            raise FsUnsafe("journal superblock checksum mismatch")
        jseed = crc32c_raw(0xFFFFFFFF, sb[0x30:0x40])
    last = maxlen
    if incompat & INCOMPAT_FAST_COMMIT:
        nfc = _be32(sb, 0x54) or DEFAULT_FC_BLOCKS
        last = maxlen - nfc
        if last <= first:
            raise FsUnsafe("journal fast-commit area leaves no room for the log")
    overlay = Overlay(read_jblock)
    if start == 0:
        notes.append("journal is empty (nothing to replay)")
        return overlay, notes
    if not first <= start < last:
        raise FsUnsafe(f"journal start block {start} lies outside the log ({first}..{last - 1})")
    if last < maxlen and any(read_jblock(last)):
        raise FsUnsafe("journal fast-commit area is not empty (fast commits are not replayed here)")

    if csum_v3:
        tag_bytes = 16
    else:
        tag_bytes = (12 if is64 else 8) + (2 if csum_v2 else 0)
    tail = 4 if has_csum else 0
    span = last - first

    def nxt(p: int) -> int:
        p += 1
        return first if p >= last else p

    def tail_ok(blk: bytes) -> bool:
        return crc32c_raw(jseed, blk[: block_size - 4] + b"\0\0\0\0") == _be32(blk, block_size - 4)

    # pass 1: scan, collecting committed transactions
    txns: list[tuple[int, list[tuple[int, int, bool, int]], list[int]]] = []
    cur_tags: list[tuple[int, int, bool, int]] = []
    cur_revokes: list[int] = []
    pos, expect, steps = start, sequence, 0
    while True:
        if steps > span:
            raise FsUnsafe("journal walk does not end (the log loops)")
        blk = read_jblock(pos)
        magic, btype, bseq = struct.unpack_from(">III", blk, 0)
        if magic != JBD2_MAGIC or bseq != expect:
            break
        steps += 1
        if btype == DESCRIPTOR:
            if has_csum and not tail_ok(blk):
                raise FsUnsafe(f"journal descriptor block {pos} checksum mismatch")
            off = 12
            limit = block_size - tail
            while off + tag_bytes <= limit:
                if csum_v3:
                    lo, flags, hi, tcsum = struct.unpack_from(">IIII", blk, off)
                else:
                    lo, tcsum, flags = struct.unpack_from(">IHH", blk, off)
                    hi = _be32(blk, off + 8) if is64 else 0
                fsblock = lo | ((hi << 32) if is64 else 0)
                off += tag_bytes
                if not flags & FLAG_SAME_UUID:
                    off += 16
                pos = nxt(pos)
                steps += 1
                if steps > span:
                    raise FsUnsafe("journal walk does not end (the log loops)")
                if fsblock >= fs_blocks:
                    raise FsUnsafe(
                        f"journal tag names block {fsblock} past the filesystem ({fs_blocks} blocks)"
                    )
                cur_tags.append((pos, fsblock, bool(flags & FLAG_ESCAPE), tcsum))
                if flags & FLAG_LAST_TAG:
                    break
            pos = nxt(pos)
        elif btype == COMMIT:
            if has_csum:
                want = _be32(blk, 16)
                got = crc32c_raw(jseed, blk[:16] + b"\0\0\0\0" + blk[20:block_size])
                if want != got:
                    raise FsUnsafe(f"journal commit block {pos} (transaction {expect}) checksum mismatch")
            txns.append((expect, cur_tags, cur_revokes))
            cur_tags, cur_revokes = [], []
            expect = (expect + 1) & 0xFFFFFFFF
            pos = nxt(pos)
        elif btype == REVOKE:
            if has_csum and not tail_ok(blk):
                raise FsUnsafe(f"journal revoke block {pos} checksum mismatch")
            rcount = _be32(blk, 12)
            rsize = 8 if is64 else 4
            if rcount < 16 or rcount > block_size - tail:
                raise FsUnsafe(f"journal revoke block {pos} has an invalid size {rcount}")
            n = (rcount - 16) // rsize
            fmt = f">{n}{'Q' if is64 else 'I'}"
            cur_revokes.extend(struct.unpack_from(fmt, blk, 16))
            pos = nxt(pos)
        else:
            raise FsUnsafe(f"journal block {pos} has unexpected type {btype}")
    if cur_tags or cur_revokes:
        notes.append(f"journal: uncommitted transaction {expect} ignored, as recovery does")

    # data block checksums of the committed transactions
    if has_csum:
        _check_data_csums(read_jblock, txns, jseed, csum_v3, block_size)

    # pass 2 and 3: revoke, then replay (newest copy wins)
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
    notes.append(
        f"journal: {len(txns)} committed transaction(s), {len(entries)} block(s) applied virtually"
    )
    return overlay, notes


def _check_data_csums(
    read_jblock: Callable[[int], bytes],
    txns: list[tuple[int, list[tuple[int, int, bool, int]], list[int]]],
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
