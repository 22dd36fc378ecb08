"""What an incremental ``image --repo`` takes from the previous image of the
same name: the identity of each layer, the filesystems' free-sector masks, which
chunks keep their ID without being read (:func:`reusable_chunks`), and the plan
of the first stage (:func:`plan_image`) that :mod:`vhdcore.repo.writer` carries out.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from ..chain import Chain
from ..fsmap import fs_free_map
from ..ops.stream import FreeMap
from ..vhd.file import VhdFile
from ..errors import StoreNotFoundError
from .core import ImageRef, Repository
from .format import ID_SIZE, RepoFormatError

__all__ = ["layer_identity", "reusable_chunks", "fs_mask_digests", "Plan", "plan_image",
           "blocks_to_read"]


def layer_identity(vhd: VhdFile) -> dict[str, Any]:
    """What proves a layer unchanged: UUID, size, times, inode and a digest of
    its footer, header and BAT."""
    st = os.fstat(vhd._fd)
    h = xxhash.xxh3_128(vhd.footer.pack())
    if not vhd.is_fixed:
        assert vhd.header is not None
        h.update(vhd.header.pack())
        if vhd.bat is not None:
            h.update(np.ascontiguousarray(vhd.bat).tobytes())
    return {"path": os.path.realpath(vhd.path), "uuid": str(vhd.uuid), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "dev": st.st_dev, "meta": h.hexdigest()}


_IDENTITY_FIELDS = ("uuid", "size", "mtime_ns", "ctime_ns", "ino", "dev", "meta")


def _same_layer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in _IDENTITY_FIELDS)


def fs_mask_digests(free_map: FreeMap | None, nblocks: int, block_size: int) -> np.ndarray:
    """Per VHD block: 0 when nothing is free, 1 when all is, else a digest of
    the block's free-sector mask."""
    out = np.zeros(nblocks, dtype=np.uint64)
    if free_map is None:
        return out
    dmap = getattr(free_map, "disk_map", None)
    if dmap is None:
        for b in range(nblocks):
            m = free_map(b, block_size // 512)
            if m is not None:
                out[b] = xxhash.xxh3_64_intdigest(m) | 2
        return out
    states = dmap.block_states(block_size, nblocks)
    out[states == 2] = 1
    for b in np.nonzero(states == 1)[0].tolist():
        m = dmap.free_bitmap_for_block(b, block_size)
        out[b] = (xxhash.xxh3_64_intdigest(m) | 2) if m is not None else 0
    return out


def reusable_chunks(chain: Chain, identity: list[dict[str, Any]], prev: dict[str, Any],
                    chunk_size: int, masks: np.ndarray, prev_masks: np.ndarray | None
                    ) -> tuple[np.ndarray, str]:
    """Which chunks keep the previous image's ID without being read, and why
    (or why none do).  All three must hold for a chunk: every layer owning a
    sector of it is unchanged since ``prev`` (the previous chain is a suffix of
    this one, layer for layer); its filesystem free-sector mask is unchanged;
    ``prev`` did not verify damaged."""
    nchunks = -(-chain.virtual_size // chunk_size)
    none = np.zeros(nchunks, dtype=bool)
    if prev["verify"].get("state") == "damaged":
        return none, "previous image is damaged"
    if prev["virtual_size"] != chain.virtual_size or prev["block_size"] != chain.block_size:
        return none, "the disk's size or block size changed"
    pchain = prev["chain"]
    k = len(identity) - len(pchain)
    if k < 0 or not all(isinstance(p, dict) and _same_layer(p, n)
                        for p, n in zip(pchain, identity[k:])):
        return none, "the layers of the previous image are not all unchanged (coalesced?)"
    if prev_masks is None or len(prev_masks) != len(masks):
        return none, "no filesystem mask of the previous image"
    bs = chain.block_size
    changed = np.zeros(chain.nblocks, dtype=bool)
    for ly in chain.layers[:k]:
        if ly.is_fixed:
            changed[:] = True
        else:
            a = ly.allocated_blocks()
            changed[a[a < chain.nblocks]] = True
    changed |= masks != prev_masks
    # map blocks to chunks
    if chunk_size <= bs:
        per = bs // chunk_size
        ok = np.repeat(~changed, per)[:nchunks]
    else:
        per = chunk_size // bs
        pad = np.zeros(nchunks * per, dtype=bool)
        pad[:chain.nblocks] = changed
        ok = np.asarray(~pad.reshape(nchunks, per).any(axis=1), dtype=bool)
    return ok, f"{k} new layer(s) since the previous image"



def chain_tag(identity: list[dict[str, Any]], fs_aware: bool) -> str:
    """Names the checkpoint of an interrupted run over this very chain."""
    blob = json.dumps([[ly[k] for k in _IDENTITY_FIELDS] for ly in identity] + [fs_aware])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def previous_image(repo: Repository, name: str) -> tuple[ImageRef, dict[str, Any]] | None:
    """The newest image of ``name`` not marked damaged (the base)."""
    for ref in reversed(repo.images(name)):
        try:
            man = repo.manifest(ref)
        except (RepoFormatError, StoreNotFoundError):
            continue
        if man["verify"].get("state") != "damaged":
            return ref, man
    return None


@dataclass
class Plan:
    """What the first stage decides: each chunk's ID where the previous image
    gives it (``reuse``), and why (``why``); the free-space map and masks."""

    chunk_size: int
    nchunks: int
    identity: list[dict[str, Any]]
    free_map: FreeMap | None
    fs_info: dict[str, Any] | None
    masks: np.ndarray
    ids: np.ndarray
    reuse: np.ndarray
    why: str = "no previous image"
    parent: str | None = None
    base: ImageRef | None = None
    prev_ids: np.ndarray | None = None


def _previous_masks(repo: Repository, ref: ImageRef, man: dict[str, Any],
                    nblocks: int) -> np.ndarray | None:
    """The free-sector mask digests stored with a previous image (all zero for
    an image made without ``fs_aware``; None when they are missing)."""
    try:
        raw = repo.backend.get(f"images/{ref.name}/{ref.id}.fsmask")
        if len(raw) % 8 == 0:
            return np.frombuffer(raw, dtype="<u8").astype(np.uint64)
        return None
    except StoreNotFoundError:
        return None if man.get("fs_aware") else np.zeros(nblocks, dtype=np.uint64)


def plan_image(repo: Repository, chain: Chain, name: str, fs_aware: bool,
               rehash: bool) -> Plan:
    """Examine the layers, the filesystems and the previous image of ``name``."""
    cs = repo.chunk_size
    nchunks = -(-chain.virtual_size // cs)
    identity = [layer_identity(ly) for ly in chain.layers]
    free_map: FreeMap | None = None
    fs_info: dict[str, Any] | None = None
    if fs_aware:
        free_map, fs_info = fs_free_map(chain)
    masks = fs_mask_digests(free_map, chain.nblocks, chain.block_size)
    plan = Plan(cs, nchunks, identity, free_map, fs_info, masks,
                np.zeros((nchunks, ID_SIZE), dtype=np.uint8), np.zeros(nchunks, dtype=bool))
    base = previous_image(repo, name)
    if base is None:
        return plan
    bref, bman = base
    plan.parent, plan.base = bref.id, bref
    try:
        plan.prev_ids = prev_ids = repo.index(bref, bman)
        pm = _previous_masks(repo, bref, bman, chain.nblocks)
        if rehash:
            plan.why = "--rehash: every chunk read and hashed"
        elif bool(bman.get("fs_aware")) != bool(fs_aware):
            plan.why = "the previous image was made with another --fs-aware setting"
        else:
            plan.reuse, plan.why = reusable_chunks(chain, identity, bman, cs, masks, pm)
            plan.ids[plan.reuse] = prev_ids[plan.reuse]
    except RepoFormatError as exc:
        plan.why = f"previous image unusable ({exc})"
        plan.prev_ids = None
    return plan


def blocks_to_read(chain: Chain, plan: Plan) -> np.ndarray:
    """The blocks overlapping a chunk not reused that some layer holds, ascending."""
    cs, bs, nchunks = plan.chunk_size, chain.block_size, plan.nchunks
    need = ~plan.reuse
    need_blocks: np.ndarray
    if cs <= bs:
        per = bs // cs
        pad = np.zeros(chain.nblocks * per, dtype=bool)
        pad[:nchunks] = need
        need_blocks = np.asarray(pad.reshape(chain.nblocks, per).any(axis=1))
    else:
        per = cs // bs
        need_blocks = np.repeat(need, per)[:chain.nblocks]
    alloc = chain.allocated_blocks()
    result: np.ndarray = alloc[need_blocks[alloc]]
    return result
