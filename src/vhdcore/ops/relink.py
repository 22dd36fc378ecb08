"""``relink``: re-point a differencing disk at another parent (after a
coalesce, or on request after checking that the new parent reads the same),
crash-safely; and finding a disk's children and siblings in the directories
a coalesce may search."""
from __future__ import annotations

import datetime as _dt
import os
import uuid as _uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .._util import aligned_buffer
from ..chain import Chain
from ..vhd.create import parent_locator_blobs
from ..vhd.file import PathLike, VhdFile
from ..errors import CoalesceError, ParentMismatchError, VhdError
from ..vhd.format import HEADER_SIZE, SECTOR, DynamicHeader, ParentLocator, vhd_timestamp

__all__ = ["relink", "RelinkResult"]


@dataclass
class RelinkResult:
    """What :func:`relink` did: ``disk`` now names ``parent`` (UUID, time
    stamp, name, locators).  ``reason`` says why ``parent`` was accepted:
    ``"uuid"`` (it is the disk the child was made against, moved or renamed)
    or ``"content"`` (another disk, e.g. the result of a coalesce, whose
    virtual disk reads byte for byte like the child's current parent).
    ``written`` is False when the disk already said all this."""

    disk: str
    parent: str
    reason: str
    written: bool


def _same_virtual_disk(a: Chain, b: Chain, length: int, chunk: int = 4 * 1024 * 1024) -> bool:
    """True when ``a`` and ``b`` read the same over ``length`` bytes, each
    reading as zero past its own virtual size."""
    ba = aligned_buffer(chunk)
    bb = aligned_buffer(chunk)
    pos = 0
    while pos < length:
        n = min(chunk, length - pos)
        for ch, buf in ((a, ba), (b, bb)):
            got = ch.read_into(pos, buf[:n]) if pos < ch.virtual_size else 0
            if got < n:
                buf[got:n] = bytes(n - got)
        if ba[:n] != bb[:n]:
            return False
        pos += n
    return True


def relink(disk: PathLike, new_parent: PathLike, *,
           allowed_dirs: Iterable[PathLike] | None = None, allow_absolute: bool = False,
           ) -> RelinkResult:
    """Re-point the differencing disk ``disk`` at ``new_parent`` (what
    ``vhd-util modify -p`` does): parent UUID, parent time stamp, UTF-16BE
    parent name and locators.

    Only after checking that ``new_parent``'s virtual disk is the one
    ``disk`` was made against, which means either:

    * ``new_parent``'s UUID is ``disk``'s parent UUID (the same disk, moved,
      renamed or copied), or
    * ``disk``'s current parent can still be found (through its locators,
      confined to ``allowed_dirs``, default ``disk``'s directory, and with the
      UUID check) and ``new_parent``'s whole virtual disk, read through its
      own chain, equals the current parent's byte for byte (each read as zero
      past its size): for instance the parent a coalesce of the current
      parent went into.

    Anything else is refused (``ParentMismatchError``) and nothing is
    written.  The block sizes must agree, and ``new_parent`` must not be
    larger than ``disk``.  The switch itself is crash-safe: see
    :func:`_relink_unchecked`."""
    disk = os.fspath(disk)
    new_parent = os.fspath(new_parent)
    with VhdFile.open(disk) as d:
        if not d.is_differencing or d.header is None:
            raise CoalesceError(f"{disk}: not a differencing disk; nothing to relink")
        want = d.header.parent_uuid
        dsize = d.virtual_size
        dblock = d.block_size
    with VhdFile.open(new_parent) as p:
        puuid = p.footer.unique_id
        if not p.is_fixed and p.block_size != dblock:
            raise ParentMismatchError(f"{new_parent}: block size {p.block_size} differs from "
                                      f"{disk}'s {dblock}")
        if p.virtual_size > dsize:
            raise ParentMismatchError(f"{new_parent}: virtual size {p.virtual_size} is larger "
                                      f"than {disk}'s {dsize}")
        pkey = os.fstat(p._fd)
    opts: dict[str, Any] = {"allow_absolute": allow_absolute}
    if allowed_dirs is not None:
        opts["allowed_dirs"] = list(allowed_dirs)
    if puuid == want:
        reason = "uuid"
    else:
        _check_reads_like_parent(disk, new_parent, want, puuid, opts)
        reason = "content"
    written = _relink_unchecked(disk, new_parent, expected_old_parent=want,
                                expected_new_parent=puuid, expected_key=pkey)
    return RelinkResult(disk, new_parent, reason, written)


def _uuid_str(b: bytes) -> str:
    return str(_uuid.UUID(bytes=b))


def _check_reads_like_parent(disk: str, new_parent: str, want: bytes, puuid: bytes,
                             opts: dict[str, Any]) -> None:
    """Refuse (``ParentMismatchError``) unless ``disk``'s current parent can
    be opened and ``new_parent``'s virtual disk reads like it, byte for byte."""
    try:
        cur = Chain.open(disk, **opts)
    except VhdError as exc:
        raise ParentMismatchError(
            f"{new_parent} has UUID {_uuid_str(puuid)}, not {disk}'s parent UUID "
            f"{_uuid_str(want)}, and the current parent cannot be opened to compare their "
            f"contents ({exc}); refusing to relink") from None
    try:
        with Chain.open(new_parent, **opts) as newc:
            old = Chain.from_layers(cur.layers[1:], owned=False)
            length = max(old.virtual_size, newc.virtual_size)
            if not _same_virtual_disk(old, newc, length):
                raise ParentMismatchError(
                    f"{new_parent} (UUID {_uuid_str(puuid)}) does not read like {disk}'s "
                    f"parent {cur.layers[1].path} (UUID {_uuid_str(want)}); refusing to "
                    "relink: the child would read other data")
    finally:
        cur.close()


def _relink_unchecked(grandchild: PathLike, new_parent: PathLike, *,
                      expected_old_parent: bytes | None = None,
                      expected_new_parent: bytes | None = None,
                      expected_key: os.stat_result | None = None) -> bool:
    """Re-point a differencing disk at ``new_parent`` without checking the
    contents (the caller did).  The disk's parent UUID must be
    ``expected_old_parent`` or already the new one; ``new_parent`` is opened
    again and its UUID must be ``expected_new_parent`` (and the same file as
    ``expected_key``), so a file swapped in meanwhile is refused.

    Nothing the disk's current header refers to is overwritten: new locator
    data and a new header go to fresh space at the end of the file, and one
    footer write switches to them (see :meth:`VhdFile.relocate_header`), so
    a crash at any point leaves the disk pointing at its old parent or at
    the new one, never at a mix.  Running it again is harmless.  Returns
    True when it wrote."""
    grandchild = os.fspath(grandchild)
    new_parent = os.fspath(new_parent)
    puuid, pstamp = _new_parent_identity(new_parent, expected_new_parent, expected_key)
    with VhdFile.open(grandchild, writable=True) as g:
        if not g.is_differencing or g.header is None:
            raise CoalesceError(f"{grandchild}: not a differencing disk; nothing to relink")
        h = g.header
        if expected_old_parent is not None and h.parent_uuid not in (expected_old_parent, puuid):
            raise CoalesceError(
                f"{grandchild}: its parent is {h.parent_uuid_obj}, not "
                f"{_uuid_str(expected_old_parent)}")
        locs, pos, wrote = _write_locators(g, h, parent_locator_blobs(grandchild, new_parent))
        new_header = h.with_(parent_uuid=puuid, parent_timestamp=pstamp,
                             parent_name=os.path.basename(new_parent), locators=tuple(locs))
        if wrote or new_header.pack() != h.pack():
            g.relocate_header(new_header, offset=pos)
            return True
        g.sync_footer_copy()
        return False


def _new_parent_identity(new_parent: str, expected_uuid: bytes | None,
                         expected_key: os.stat_result | None) -> tuple[bytes, int]:
    """The new parent's UUID and time stamp, refusing another file than the
    one the caller checked."""
    with VhdFile.open(new_parent) as p:
        puuid = p.footer.unique_id
        st = os.fstat(p._fd)
        if expected_uuid is not None and puuid != expected_uuid:
            raise ParentMismatchError(
                f"{new_parent}: UUID is {_uuid_str(puuid)}, not {_uuid_str(expected_uuid)} "
                "(the file changed since it was checked)")
        if expected_key is not None and (st.st_dev, st.st_ino) != (expected_key.st_dev,
                                                                   expected_key.st_ino):
            raise ParentMismatchError(f"{new_parent}: another file than the one checked")
        pstamp = vhd_timestamp(_dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc))
    return puuid, pstamp


def _write_locators(g: VhdFile, h: DynamicHeader, blobs: list[tuple[bytes, bytes]]
                    ) -> tuple[list[ParentLocator], int | None, bool]:
    """Write the locator data that the disk does not hold already into fresh
    space (one reserve for it and the new header: one fsync of the new end,
    see :meth:`VhdFile.reserve`).  Returns the eight locators, where the new
    header goes, and whether anything was written."""
    old = {loc.code: loc for loc in h.locators if loc.used}
    fresh = []
    for code, blob in blobs:
        slot = old.get(code)
        if not (slot is not None and slot.data_length == len(blob)
                and slot.data_offset + len(blob) <= g.file_size
                and bytes(g.mv[slot.data_offset : slot.data_offset + len(blob)]) == blob):
            fresh.append(code)
    spaces = {code: max(SECTOR, -(-len(blob) // SECTOR) * SECTOR) for code, blob in blobs}
    pos = g.reserve(sum(spaces[c] for c in fresh) + HEADER_SIZE) if fresh else None
    locs: list[ParentLocator] = []
    wrote = False
    for code, blob in blobs:
        if code not in fresh:
            locs.append(old[code])  # already says this (a repeated relink)
            continue
        assert pos is not None
        space = spaces[code]
        g._pwrite(blob.ljust(space, b"\0"), pos)
        wrote = True
        locs.append(ParentLocator(code=code, data_space=space, data_length=len(blob),
                                  data_offset=pos))
        pos += space
    while len(locs) < 8:
        locs.append(ParentLocator(code=b"\0\0\0\0", data_space=0, data_length=0,
                                  data_offset=0))
    return locs, pos, wrote


# --------------------------------------------------------------------------
# a disk's children and siblings
def _vhd_files_in(dirs: Iterable[str]) -> list[str]:
    out: set[str] = set()
    for d in dirs:
        try:
            for e in os.scandir(d):
                if e.is_file(follow_symlinks=False) and e.name.lower().endswith((".vhd", ".avhd")):
                    out.add(e.path)
        except OSError:
            continue
    return sorted(out)


def _find_children(of: VhdFile, dirs: Iterable[str], extra: Sequence[PathLike],
                   exclude: Iterable[str]) -> list[str]:
    """Differencing disks whose parent UUID is ``of``'s UUID: among the
    ``.vhd``/``.avhd`` files of ``dirs`` and the files ``extra``."""
    uid = of.footer.unique_id
    skip = {os.path.realpath(x) for x in exclude}
    out = []
    seen: set[str] = set()
    for c in [os.fspath(e) for e in extra] + _vhd_files_in(dirs):
        real = os.path.realpath(c)
        if real in skip or real in seen:
            continue
        seen.add(real)
        try:
            if not os.path.isfile(c):
                continue
            with VhdFile.open(c) as v:
                if v.is_differencing and v.header is not None and v.header.parent_uuid == uid:
                    out.append(c)
        except (VhdError, OSError):
            continue
    return out


def _search_dirs(child_path: str, chain_options: dict[str, Any]) -> list[str]:
    """The directories a coalesce may search for other disks of the chain:
    the child's and every ``allowed_dirs`` one."""
    dirs = [os.path.dirname(os.path.abspath(child_path))]
    for d in chain_options.get("allowed_dirs") or ():
        d = os.path.abspath(os.fspath(d))
        if d not in dirs:
            dirs.append(d)
    return dirs


def _find_siblings(parent: VhdFile, child_path: str, extra: Sequence[PathLike],
                   dirs: Sequence[str] = ()) -> list[str]:
    """Other differencing disks whose parent UUID is the parent's (in the
    parent's and the child's directory, in ``dirs``, and among ``extra``)."""
    search = [os.path.dirname(os.path.abspath(parent.path)),
              os.path.dirname(os.path.abspath(child_path)), *dirs]
    return _find_children(parent, search, extra, [child_path, parent.path])
