"""Consistency checks of VHD files and chains (``vhdcore check``).

Each problem names the file, the byte offset and the block where it is, so
that a person can find it with a hex editor.  Checking only reads.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from .chain import Chain
from .vhd.file import PathLike, VhdFile
from .errors import VhdError
from .vhd.format import BAT_UNUSED, FOOTER_SIZE, SECTOR, Footer

__all__ = ["Problem", "check_file", "check_chain"]


@dataclass(frozen=True)
class Problem:
    """One finding of a check.  ``severity`` is "error" or "warning"."""

    file: str
    message: str
    offset: int | None = None
    block: int | None = None
    severity: str = "error"

    def __str__(self) -> str:
        where = [self.file]
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        if self.block is not None:
            where.append(f"block {self.block}")
        return f"{self.severity}: {', '.join(where)}: {self.message}"

    def to_json(self) -> dict[str, object]:
        """The problem as a JSON-ready dict (``vhdcore check --json``)."""
        return asdict(self)


def _check_open(vhd: VhdFile) -> list[Problem]:
    p: list[Problem] = []
    path = vhd.path
    if not vhd.primary_footer_ok:
        p.append(Problem(path, "primary footer at end of file is missing or damaged; the copy "
                               "at offset 0 is valid ('vhdcore repair' restores it)",
                         offset=max(0, vhd.file_size - FOOTER_SIZE)))
    if vhd.footer.stale_hidden_checksum:
        p.append(Problem(path, "footer checksum ignores the hidden flag (old blktap file)",
                         offset=vhd.footer_offset, severity="warning"))
    if vhd.footer.short:
        p.append(Problem(path, "511-byte footer (very old file)", offset=vhd.footer_offset,
                         severity="warning"))
    if vhd.is_fixed:
        if vhd.footer_offset != vhd.footer.current_size:
            p.append(Problem(path, f"fixed disk data is {vhd.footer_offset} bytes but the footer "
                                   f"says {vhd.footer.current_size}", offset=vhd.footer_offset,
                             severity="warning"))
        return p
    # the copy of the footer at offset 0
    if vhd.primary_footer_ok:
        try:
            copy = Footer.parse(vhd.mv[:FOOTER_SIZE], source=path, offset=0)
            if copy.pack() != vhd.footer.pack():
                # the state between the two writes of a footer update: the
                # primary is in force ('vhdcore repair' rewrites the copy)
                p.append(Problem(path, "footer copy at offset 0 differs from the primary footer "
                                       "(an interrupted update; 'vhdcore repair' rewrites it)",
                                 offset=0, severity="warning"))
        except VhdError as exc:
            p.append(Problem(path, f"footer copy at offset 0 is damaged: {exc}", offset=0))
    h = vhd.header
    assert h is not None and vhd.bat is not None
    # metadata regions that blocks must not overlap
    regions = vhd.metadata_regions()
    try:
        vhd.parent_locators()
    except VhdError as exc:
        p.append(Problem(path, str(exc)))
    for blk, off, message in vhd.layout_conflicts():
        p.append(Problem(path, message, offset=off, block=blk))
    alloc = np.nonzero(vhd.bat != BAT_UNUSED)[0]
    if alloc.size:
        starts = vhd.bat[alloc].astype(np.int64) * SECTOR
        size = vhd.bitmap_size + vhd.block_size
        end = vhd.footer_offset
        past = np.nonzero(starts + size > end)[0]
        for k in past[:100]:
            blk = int(alloc[k])
            p.append(Problem(path, f"block {blk} runs past the footer at {end}",
                             offset=int(starts[k]), block=blk, severity="warning"))
    for r0, r1, what in regions[1:]:
        if r1 > vhd.footer_offset:
            p.append(Problem(path, f"the {what} ({r0}..{r1}) runs past the footer", offset=r0))
    return p


def check_file(path: PathLike) -> list[Problem]:
    """Problems of one VHD file on its own (parents not followed)."""
    path = os.fspath(path)
    try:
        vhd = VhdFile.open(path)
    except VhdError as exc:
        return [Problem(path, str(exc))]
    with vhd:
        return _check_open(vhd)


def check_chain(leaf: PathLike, **open_options: object) -> list[Problem]:
    """Problems of a leaf and every disk of its chain, and of the links
    between them (missing parent, UUID mismatch, cycle, depth, confinement)."""
    leaf = os.fspath(leaf)
    problems = check_file(leaf)
    if any(pr.severity == "error" and pr.offset is None for pr in problems):
        return problems
    try:
        chain = Chain.open(leaf, **open_options)  # type: ignore[arg-type]
    except VhdError as exc:
        # report the files that did open, then the link that broke
        return problems + [Problem(leaf, str(exc))]
    with chain:
        for ly in chain.layers[1:]:
            problems += _check_open(ly)
        for child, parent in zip(chain.layers, chain.layers[1:]):
            h = child.header
            assert h is not None
            if parent.virtual_size > child.virtual_size:
                problems.append(Problem(child.path, f"virtual size {child.virtual_size} is "
                                                    f"smaller than its parent's "
                                                    f"{parent.virtual_size}", severity="warning"))
    return problems
