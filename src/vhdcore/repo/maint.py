"""Listing, forgetting, garbage collection and verification."""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import StoreNotFoundError, VhdError
from .core import ImageRef, Repository, open_repo
from .format import (
    ID_SIZE,
    ZERO_ID,
    RepoFormatError,
    check_name,
    chunk_id_from_key,
    chunk_key,
    decode_chunk,
    ids_as_keys,
    parse_ref,
    sorted_unique,
)

__all__ = ["list_images", "forget", "gc", "verify", "parse_duration", "GcResult",
           "VerifyResult"]

#: seconds by which lease and forget clocks may disagree
LEASE_CLOCK_MARGIN = 60.0
#: checkpoints of interrupted images stay roots this long
CHECKPOINT_KEEP = 7 * 86400.0


def parse_duration(text: str | float) -> float:
    """``"24h"``, ``"30m"``, ``"7d"``, ``"90s"`` or seconds -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise VhdError(f"cannot read {text!r} as a duration (examples: 90s, 30m, 24h, 7d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400,
                                "w": 604800}[m.group(2)]


def list_images(repo_url: str | None, name: str | None = None) -> list[dict[str, Any]]:
    """One summary per committed image (oldest first): name, id, time, virtual
    size, new/reused/zero bytes, verify state, parent."""
    with open_repo(repo_url) as repo:
        out: list[dict[str, Any]] = []
        for ref in repo.images(name):
            try:
                m = repo.manifest(ref)
            except (RepoFormatError, StoreNotFoundError) as exc:
                out.append({"name": ref.name, "id": ref.id, "error": str(exc)})
                continue
            b = m["bytes"]

            def num(k: str) -> int:
                v = b.get(k, 0)
                return v if isinstance(v, int) and not isinstance(v, bool) else 0

            state = m["verify"].get("state", "unverified")
            parent = m.get("parent")
            out.append({"name": ref.name, "id": ref.id, "ref": str(ref),
                        "created": m["created"], "virtual_size": m["virtual_size"],
                        "new_bytes": num("new"), "stored_bytes": num("new_stored"),
                        "reused_bytes": num("reused"), "zero_bytes": num("zero"),
                        "verify": state if isinstance(state, str) else "unknown",
                        "parent": parent if isinstance(parent, str) else None})
        return out


# ------------------------------------------------------------------ forget
def _select_forget(refs: list[ImageRef], repo: Repository, keep_last: int | None,
                   keep_daily: int | None, keep_weekly: int | None,
                   keep_monthly: int | None) -> list[ImageRef]:
    by_name: dict[str, list[tuple[ImageRef, float]]] = {}
    for r in refs:
        try:
            t = float(repo.manifest(r)["created"])
        except (RepoFormatError, StoreNotFoundError):
            t = 0.0
        by_name.setdefault(r.name, []).append((r, t))
    drop: list[ImageRef] = []
    for imgs in by_name.values():
        imgs.sort(key=lambda x: (x[1], x[0].id), reverse=True)  # newest first
        keep: set[ImageRef] = set()
        if keep_last:
            keep.update(r for r, _ in imgs[:keep_last])
        for n, fmt in ((keep_daily, "%Y-%m-%d"), (keep_weekly, "%G-%V"),
                       (keep_monthly, "%Y-%m")):
            if not n:
                continue
            seen: list[str] = []
            for r, t in imgs:
                period = time.strftime(fmt, time.gmtime(t))
                if period not in seen:
                    if len(seen) >= n:
                        break
                    seen.append(period)
                    keep.add(r)
        drop.extend(r for r, _ in imgs if r not in keep)
    return drop


def forget(repo_url: str | None, ref: str | None = None, *, name: str | None = None,
           keep_last: int | None = None, keep_daily: int | None = None,
           keep_weekly: int | None = None, keep_monthly: int | None = None,
           dry_run: bool = False) -> list[str]:
    """Remove images (their manifest and index; chunks are ``gc``'s job):
    ``ref`` (``NAME@ID``), or every image of ``name`` (default: of every
    name) beyond the ``keep_*`` policy.  An image a running reader may be
    reading is kept in ``forgotten/`` until ``gc`` finds no lease live
    that started before the forget (then it goes).  Returns what was forgotten."""
    policy = (keep_last, keep_daily, keep_weekly, keep_monthly)
    with open_repo(repo_url) as repo:
        if ref is not None:
            if any(p is not None for p in policy):
                raise VhdError("give either NAME@ID or a --keep-* policy, not both")
            n, image_id = parse_ref(ref)
            if image_id is None:
                raise VhdError(f"forget needs NAME@ID (got {ref!r}); use --keep-last to "
                               "thin out a name")
            targets = [repo.resolve(n, image_id)]
        else:
            if all(p is None for p in policy):
                raise VhdError("forget needs NAME@ID or at least one --keep-* option")
            if any(p is not None and p < 0 for p in policy):
                raise VhdError("--keep-* values must not be negative")
            targets = _select_forget(repo.images(name), repo, *policy)
        if dry_run:
            return [str(t) for t in targets]
        for t in targets:
            _forget_one(repo, t, time.time())
        return [str(t) for t in targets]


def _forget_one(repo: Repository, ref: ImageRef, now: float) -> None:
    """Move the image's index to ``forgotten/`` (a reader that started before
    may still need its chunks: ``gc`` keeps them until no such lease is live),
    then delete manifest and index."""
    b = repo.backend
    mkey = repo.manifest_key(ref)
    for suffix in (".index", ".fsmask"):
        try:
            data = b.get(f"images/{ref.name}/{ref.id}{suffix}")
        except StoreNotFoundError:
            continue
        b.put(f"forgotten/{ref.name}/{ref.id}{suffix}", data)
    b.put(f"forgotten/{ref.name}/{ref.id}.json",
          json.dumps({"forgotten_at": now, "name": ref.name, "id": ref.id}).encode())
    b.delete(mkey)  # the image is gone for readers from here on
    b.delete(f"images/{ref.name}/{ref.id}.index")
    b.delete(f"images/{ref.name}/{ref.id}.fsmask")


# ------------------------------------------------------------------ gc
@dataclass
class GcResult:
    """What ``gc`` did."""

    images: int = 0
    referenced: int = 0
    chunks: int = 0
    deleted: int = 0
    kept_young: int = 0
    cutoff: float = 0.0
    forgotten_purged: int = 0
    errors: list[str] = field(default_factory=list)


def _mark_committed(repo: Repository, parts: list[np.ndarray], res: GcResult) -> None:
    """The chunks of every committed image (an unreadable index stops ``gc``)."""
    for ref in repo.images():
        try:
            man = repo.manifest(ref)
            parts.append(ids_as_keys(repo.index(ref, man)))
        except (RepoFormatError, StoreNotFoundError):
            if not repo.backend.exists(repo.manifest_key(ref)):
                continue  # forgotten meanwhile: its copy in forgotten/ counts
            raise  # an unreadable index stops gc: it must not guess
        res.images += 1


def _mark_forgotten(repo: Repository, starts: list[float], parts: list[np.ndarray],
                    res: GcResult, dry_run: bool) -> None:
    """The chunks of forgotten images a lease older than the forget may read;
    the others are purged."""
    from .format import decode_index

    for ref in repo.images(where="forgotten"):
        try:
            info = json.loads(repo.backend.get(f"forgotten/{ref.name}/{ref.id}.json"))
            at = float(info["forgotten_at"])
        except (StoreNotFoundError, ValueError, KeyError, TypeError):
            at = 0.0
        # a lease that started before the forget (with a margin for
        # clocks) may have read the image
        if any(s <= at + LEASE_CLOCK_MARGIN for s in starts):
            idx = repo.backend.get(f"forgotten/{ref.name}/{ref.id}.index")
            ids, _ = decode_index(idx, repo.key, f"forgotten/{ref}")
            parts.append(ids_as_keys(ids))
        elif not dry_run:
            for sfx in (".index", ".fsmask", ".json"):
                repo.backend.delete(f"forgotten/{ref.name}/{ref.id}{sfx}")
            res.forgotten_purged += 1


def _mark_checkpoints(repo: Repository, start: float, parts: list[np.ndarray],
                      dry_run: bool) -> None:
    """The chunks of interrupted images (their checkpoints expire after a week)."""
    for key, mtime in repo.backend.list("checkpoints/"):
        if mtime < start - CHECKPOINT_KEEP:
            if not dry_run:
                repo.backend.delete(key)
            continue
        data = repo.backend.get(key)
        data = data[:len(data) - len(data) % ID_SIZE]
        parts.append(ids_as_keys(np.frombuffer(data, dtype=np.uint8).reshape(-1, ID_SIZE)))


def _sweep(repo: Repository, live: np.ndarray, cutoff: float, res: GcResult,
           dry_run: bool) -> None:
    """Delete the chunks not in ``live`` older than ``cutoff``."""
    for key, mtime in repo.backend.list("chunks/"):
        cid = chunk_id_from_key(key)
        if cid is None:
            continue
        res.chunks += 1
        i = int(np.searchsorted(live, np.void(cid))) if len(live) else 0
        if i < len(live) and bytes(live[i]) == cid:
            continue
        if mtime >= cutoff:
            res.kept_young += 1
            continue
        if dry_run:
            res.deleted += 1
            continue
        # re-check the time right before deleting: a writer that found
        # this chunk present refreshed it
        t = repo.backend.mtime(key)
        if t is not None and t >= cutoff:
            res.kept_young += 1
            continue
        repo.backend.delete(key)
        res.deleted += 1


def gc(repo_url: str | None, *, grace: float | str = "24h", dry_run: bool = False) -> GcResult:
    """Delete chunks no committed index references and that are older than
    ``min(gc start - grace, oldest live lease's start)``.  Forgotten images
    count as referenced until no lease older than the forget is live.  Checkpoints of interrupted images count as referenced
    for a week.  An unreadable index stops ``gc`` before it deletes anything."""
    grace_s = parse_duration(grace)
    res = GcResult()
    with open_repo(repo_url) as repo:
        start = time.time()
        with repo.lease("gc"):
            leases = [x for x in repo.leases() if x.get("kind") != "gc"]
            starts = [float(x.get("start", start)) for x in leases]
            cutoff = min([start - grace_s] + starts)
            res.cutoff = cutoff
            parts: list[np.ndarray] = []
            _mark_committed(repo, parts, res)
            _mark_forgotten(repo, starts, parts, res, dry_run)
            _mark_checkpoints(repo, start, parts, dry_run)
            live = sorted_unique(np.concatenate(parts)) if parts else \
                np.empty(0, dtype=np.dtype((np.void, ID_SIZE)))
            res.referenced = int(len(live)) - int(bool(len(live)) and
                                                  bool((live == np.void(ZERO_ID)).any()))
            _sweep(repo, live, cutoff, res, dry_run)
    return res


# ------------------------------------------------------------------ verify
@dataclass
class VerifyResult:
    """What ``verify`` found: per image its state; damaged chunks and who uses them."""

    images: dict[str, str] = field(default_factory=dict)
    chunks_checked: int = 0
    missing: dict[str, list[str]] = field(default_factory=dict)
    damaged: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.damaged or self.errors)


def _parse_subset(subset: str | None) -> tuple[int, int]:
    if subset is None:
        return 1, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", subset)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise VhdError(f"--subset {subset!r}: expected n/t with 1 <= n <= t (e.g. 1/10)")
    return int(m.group(1)), int(m.group(2))


def _select(repo: Repository, ref: str | None) -> list[ImageRef]:
    if ref is None:
        return repo.images()
    n, image_id = parse_ref(ref)
    refs = [repo.resolve(n, image_id)] if image_id else repo.images(check_name(n))
    if not refs:
        raise StoreNotFoundError(f"{repo.url}: no image named {n!r}")
    return refs


def _present_chunks(repo: Repository) -> np.ndarray:
    """Every chunk present, as one sorted array (32 bytes per chunk, no Python
    object per chunk)."""
    buf = bytearray()
    for k, _ in repo.backend.list("chunks/"):
        cid = chunk_id_from_key(k)
        if cid is not None:
            buf += cid
    return sorted_unique(ids_as_keys(np.frombuffer(bytes(buf), dtype=np.uint8)
                                     .reshape(-1, ID_SIZE)))


def _check_indexes(repo: Repository, refs: list[ImageRef], present: np.ndarray,
                   res: VerifyResult) -> dict[ImageRef, np.ndarray]:
    """Each image's manifest and index, and its chunks present; the sorted
    chunk IDs of each readable image."""
    per_image: dict[ImageRef, np.ndarray] = {}
    for r in refs:
        try:
            man = repo.manifest(r)
            ids = ids_as_keys(repo.index(r, man))
        except (RepoFormatError, StoreNotFoundError) as exc:
            res.errors[str(r)] = str(exc)
            res.images[str(r)] = "damaged"
            continue
        ids = ids[ids != np.void(ZERO_ID)]
        u = sorted_unique(ids)
        per_image[r] = u
        if len(present):
            pos = np.minimum(np.searchsorted(present, u), len(present) - 1)
            miss = u[present[pos] != u]
        else:
            miss = u
        for m in miss[:1000].tolist():
            res.missing.setdefault(bytes(m).hex(), []).append(str(r))
        res.images[str(r)] = "damaged" if len(miss) else "ok"
    return per_image


def _read_chunks(repo: Repository, per_image: dict[ImageRef, np.ndarray], res: VerifyResult,
                 part: int, total: int) -> set[bytes]:
    """Read and re-hash the chunks (of the subset ``part/total``); the damaged
    ones, named with the images that use them."""
    allids: Any = sorted_unique(np.concatenate(list(per_image.values()))) if per_image else []
    bad: set[bytes] = set()
    for v in allids:
        cid = bytes(v)
        if total > 1 and int.from_bytes(cid[:4], "big") % total != part - 1:
            continue
        if cid.hex() in res.missing:
            continue
        res.chunks_checked += 1
        key = chunk_key(cid)
        try:
            raw = decode_chunk(repo.backend.get(key), f"chunk {cid.hex()}")
            if repo.chunk_id(raw) != cid:
                raise RepoFormatError(f"chunk {cid.hex()} does not hash to its ID")
        except (RepoFormatError, StoreNotFoundError):
            bad.add(cid)
    for r, u in per_image.items():
        for cid in bad:
            i = int(np.searchsorted(u, np.void(cid)))
            if i < len(u) and bytes(u[i]) == cid:
                res.damaged.setdefault(cid.hex(), []).append(str(r))
                res.images[str(r)] = "damaged"
    return bad


def _quarantine(repo: Repository, bad: set[bytes]) -> None:
    """Move damaged chunks to ``bad/`` so that a later image stores a good copy."""
    for cid in bad:
        try:
            data = repo.backend.get(chunk_key(cid))
            repo.backend.put(f"bad/{cid.hex()}", data)
            repo.backend.delete(chunk_key(cid))
        except StoreNotFoundError:
            pass


def _mark_states(repo: Repository, refs: list[ImageRef], res: VerifyResult, read_data: bool,
                 subset: str | None) -> None:
    """Each image's verify state into its manifest."""
    now = time.time()
    for r in refs:
        state = res.images.get(str(r), "damaged")
        if state == "ok" and not read_data:
            state_doc: dict[str, Any] = {"state": "ok", "time": now, "read_data": False}
        else:
            state_doc = {"state": state, "time": now, "read_data": read_data,
                         "subset": subset}
        if state == "damaged":
            state_doc["chunks"] = sorted(
                [h for h, imgs in {**res.missing, **res.damaged}.items()
                 if str(r) in imgs])[:100]
        try:
            repo.set_verify_state(r, state_doc)
        except (RepoFormatError, StoreNotFoundError):
            pass


def verify(repo_url: str | None, ref: str | None = None, *, read_data: bool = False,
           subset: str | None = None, mark: bool = True) -> VerifyResult:
    """Check images (``ref``: ``NAME`` or ``NAME@ID``; default every image):
    manifest and index readable and consistent, every referenced chunk
    present.  ``read_data`` also reads every chunk (or the ``subset`` ``n/t``
    of them, by ID), checks its header and re-hashes it.  A damaged chunk is
    named with the images that use it; it is moved to ``bad/`` so a later
    image can store a good copy.  With ``mark``, each image's verify state
    goes into its manifest (a damaged image is never used as a base)."""
    part, total = _parse_subset(subset)
    if subset is not None and not read_data:
        raise VhdError("--subset needs --read-data")
    res = VerifyResult()
    with open_repo(repo_url) as repo:
        refs = _select(repo, ref)
        per_image = _check_indexes(repo, refs, _present_chunks(repo), res)
        if read_data:
            bad = _read_chunks(repo, per_image, res, part, total)
            if mark:
                _quarantine(repo, bad)
        if mark:
            _mark_states(repo, refs, res, read_data, subset)
    return res
