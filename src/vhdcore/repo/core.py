"""Opening a repository: its config and key, images, indexes, leases."""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import StoreNotFoundError, VhdError
from .backend import Backend, DirectoryBackend, S3Backend, SwiftBackend, open_backend
from .format import (
    CODECS,
    CONFIG_FORMAT,
    CONFIG_VERSION,
    ID_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    ZERO_ID,
    RepoFormatError,
    check_name,
    decode_index,
    ids_as_keys,
    parse_manifest,
    sorted_unique,
)

__all__ = ["Repository", "ImageRef", "init_repo", "open_repo", "Lease", "repo_url_from_env"]

#: a lease not refreshed for this long counts as dead (env VHDCORE_REPO_LEASE_TTL)
DEFAULT_LEASE_TTL = 300.0


def repo_url_from_env(url: str | None) -> str:
    """``url``, else ``$VHDCORE_REPO``; a :class:`VhdError` when neither is set."""
    u = url or os.environ.get("VHDCORE_REPO")
    if not u:
        raise VhdError("no repository given: use --repo URL or set VHDCORE_REPO")
    return u


@dataclass(frozen=True)
class ImageRef:
    """One committed image: ``str()`` is ``NAME@ID``."""

    name: str
    id: str

    def __str__(self) -> str:
        return f"{self.name}@{self.id}"


def new_image_id(now: float | None = None, after: str | None = None) -> str:
    """A new image ID, ``YYYYMMDDTHHMMSS.mmmZ-<8 hex>`` (UTC): IDs sort by time;
    ``after`` (the previous image's ID) is exceeded even if the clock is not."""
    now = time.time() if now is None else now
    while True:
        ms = int(now * 1000)
        image_id = (time.strftime("%Y%m%dT%H%M%S", time.gmtime(ms // 1000))
                    + f".{ms % 1000:03d}Z-" + secrets.token_hex(4))
        if after is None or image_id[:19] > after[:19]:
            return image_id
        now += 0.001


class Repository:
    """An open repository (see :mod:`vhdcore.repo.format` for the layout)."""

    def __init__(self, backend: Backend, config: dict[str, Any]) -> None:
        self.backend = backend
        self.config = config
        self.url = backend.url
        self.chunk_size = int(config["chunk_size"])
        self.key = bytes.fromhex(config["key"])
        self.codec = str(config.get("codec", "lz4"))
        self.lease_ttl = float(os.environ.get("VHDCORE_REPO_LEASE_TTL", DEFAULT_LEASE_TTL))

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ hashing
    def chunk_id(self, raw: bytes | memoryview) -> bytes:
        """Keyed BLAKE3 of a chunk's bytes."""
        import blake3

        return blake3.blake3(raw, key=self.key).digest()

    def index_digest(self, ids: bytes | memoryview) -> bytes:
        import blake3

        return blake3.blake3(ids, key=self.key).digest()

    # ------------------------------------------------------------ images
    def images(self, name: str | None = None, *, where: str = "images") -> list[ImageRef]:
        """Committed images (those with a manifest), oldest first."""
        prefix = f"{where}/{check_name(name)}/" if name else f"{where}/"
        out = []
        for key, _ in self.backend.list(prefix):
            parts = key.split("/")
            if len(parts) == 3 and parts[2].endswith(".json"):
                out.append(ImageRef(parts[1], parts[2][:-5]))
        out.sort(key=lambda r: (r.name, r.id))
        return out

    def resolve(self, name: str, image_id: str | None) -> ImageRef:
        """``NAME@ID``, or the newest image of NAME when ``image_id`` is None."""
        if image_id is not None:
            ref = ImageRef(check_name(name), image_id)
            if not self.backend.exists(self.manifest_key(ref)):
                raise StoreNotFoundError(f"{self.url}: no image {ref}")
            return ref
        imgs = self.images(name)
        if not imgs:
            raise StoreNotFoundError(f"{self.url}: no image named {name!r}")
        return imgs[-1]

    @staticmethod
    def manifest_key(ref: ImageRef, where: str = "images") -> str:
        return f"{where}/{ref.name}/{ref.id}.json"

    @staticmethod
    def index_key(ref: ImageRef, where: str = "images") -> str:
        return f"{where}/{ref.name}/{ref.id}.index"

    def manifest(self, ref: ImageRef, where: str = "images") -> dict[str, Any]:
        key = self.manifest_key(ref, where)
        doc = parse_manifest(self.backend.get(key), f"{self.url}: {key}")
        if doc["name"] != ref.name or doc["id"] != ref.id:
            raise RepoFormatError(f"{self.url}: {key} names another image")
        if doc["chunk_size"] != self.chunk_size:
            raise RepoFormatError(f"{self.url}: {key}: chunk size differs from the repository's")
        return doc

    def index(self, ref: ImageRef, manifest: dict[str, Any] | None = None,
              where: str = "images") -> np.ndarray:
        """The image's ID array (``(n, 32)`` uint8), checked against its digest
        and its manifest."""
        key = self.index_key(ref, where)
        try:
            data = self.backend.get(key)
        except StoreNotFoundError:
            raise RepoFormatError(f"{self.url}: {key} is missing") from None
        ids, digest = decode_index(data, self.key, f"{self.url}: {key}",
                                   chunk_size=self.chunk_size,
                                   virtual_size=None if manifest is None
                                   else manifest["virtual_size"])
        if manifest is not None and digest.hex() != manifest["digest"]:
            raise RepoFormatError(f"{self.url}: {key}: digest differs from the manifest's")
        return ids

    def set_verify_state(self, ref: ImageRef, state: dict[str, Any]) -> None:
        """Record a verify result in the image's manifest (replaced at once)."""
        doc = self.manifest(ref)
        doc["verify"] = state
        self.backend.put(self.manifest_key(ref), json.dumps(doc, indent=1).encode())

    # ------------------------------------------------------------ known chunks
    def known_ids(self, first: list[np.ndarray], refs: list[ImageRef], *,
                  limit: int = 1 << 21, max_indexes: int = 256) -> np.ndarray:
        """Sorted unique IDs (void32) of ``first`` arrays then of the indexes of
        ``refs`` that are not marked damaged: the newest image of each name
        first (clones of one template share most chunks), then the others
        newest first; at most ``limit`` IDs (32 bytes each) from at most
        ``max_indexes`` indexes."""
        parts: list[np.ndarray] = [ids_as_keys(a) for a in first]
        total = sum(len(p) for p in parts)
        newest: dict[str, ImageRef] = {}
        for ref in refs:  # oldest first: the last one of a name wins
            newest[ref.name] = ref
        lead = sorted(newest.values(), key=lambda r: r.id, reverse=True)
        lead_set = set(lead)
        order = lead + sorted((r for r in refs if r not in lead_set), key=lambda r: r.id,
                              reverse=True)
        for ref in order[:max_indexes]:
            if total >= limit:
                break
            try:
                man = self.manifest(ref)
                if man["verify"].get("state") == "damaged":
                    continue
                ids = ids_as_keys(self.index(ref, man))
            except (RepoFormatError, StoreNotFoundError):
                continue
            parts.append(ids)
            total += len(ids)
        if not parts:
            return np.empty(0, dtype=np.dtype((np.void, ID_SIZE)))
        allids = sorted_unique(np.concatenate(parts))
        out: np.ndarray = allids[allids != np.void(ZERO_ID)]
        return out

    # ------------------------------------------------------------ leases
    def leases(self) -> list[dict[str, Any]]:
        """Live leases (those refreshed within their time to live)."""
        now = time.time()
        out = []
        for key, mtime in self.backend.list("leases/"):
            try:
                doc = json.loads(self.backend.get(key))
                if not isinstance(doc, dict):
                    continue
                expires = float(doc.get("expires", 0))
                doc["start"] = float(doc.get("start", now))
            except (StoreNotFoundError, ValueError, TypeError):
                continue
            if expires > now:
                doc["key"] = key
                out.append(doc)
        return out

    def lease(self, kind: str, **info: Any) -> Lease:
        return Lease(self, kind, info)


class Lease:
    """A writer's or reader's lease: a small object refreshed by a thread;
    ``gc`` treats chunks newer than the oldest live lease's start as live and
    keeps forgotten images a lease may still read."""

    def __init__(self, repo: Repository, kind: str, info: dict[str, Any]) -> None:
        self.repo = repo
        self.id = uuid.uuid4().hex
        self.key = f"leases/{self.id}.json"
        self.ttl = repo.lease_ttl
        self.doc: dict[str, Any] = {"kind": kind, "id": self.id, "host": socket.gethostname(),
                                    "pid": os.getpid(), "start": time.time(),
                                    "tool": f"vhdcore {__version__}", **info}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.doc["expires"] = time.time() + self.ttl
        self.repo.backend.put(self.key, json.dumps(self.doc).encode())

    def __enter__(self) -> Lease:
        self._write()
        self._thread = threading.Thread(target=self._run, name="vhdcore-lease", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(max(0.05, self.ttl / 3)):
            try:
                self._write()
            except VhdError:
                pass

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.repo.backend.delete(self.key)
        except VhdError:
            pass


# ------------------------------------------------------------------ init/open
def init_repo(url: str, *, chunk_size: int = 2 << 20, codec: str = "lz4",
              backend_options: dict[str, Any] | None = None) -> Repository:
    """Create a repository at ``url`` (an error if one exists there)."""
    if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise VhdError(f"chunk size {chunk_size} must be a power of two from 64 KiB to 64 MiB")
    if codec not in CODECS:
        raise VhdError(f"unknown codec {codec!r} (use lz4, zstd or none)")
    if codec == "zstd":
        from .format import _zstd

        _zstd()
    backend = open_backend(url, **(backend_options or {}))
    if isinstance(backend, DirectoryBackend):
        os.makedirs(backend.root, exist_ok=True)
    elif isinstance(backend, SwiftBackend):
        backend.ensure_containers()
    elif isinstance(backend, S3Backend):
        backend.ensure_bucket()
    config = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "id": uuid.uuid4().hex,
              "created": time.time(), "chunk_size": chunk_size, "codec": codec,
              "hash": "blake3-keyed", "key": secrets.token_bytes(32).hex(),
              "tool": f"vhdcore {__version__}"}
    if not backend.put_once("config", json.dumps(config, indent=1).encode()):
        backend.close()
        raise VhdError(f"{url}: a repository already exists there")
    return Repository(backend, config)


def open_repo(url: str | None = None, **backend_options: Any) -> Repository:
    """Open the repository at ``url`` (default ``$VHDCORE_REPO``)."""
    url = repo_url_from_env(url)
    backend = open_backend(url, **backend_options)
    try:
        raw = backend.get("config")
    except StoreNotFoundError:
        backend.close()
        raise VhdError(f"{url}: no vhdcore repository there (run `vhdcore repo init {url}`)"
                       ) from None
    try:
        config = json.loads(raw)
        if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
            raise ValueError("not a vhdcore repository config")
        if config.get("version") != CONFIG_VERSION:
            raise ValueError(f"version {config.get('version')} is not supported")
        cs = config["chunk_size"]
        if not isinstance(cs, int) or cs & (cs - 1) or not MIN_CHUNK_SIZE <= cs <= MAX_CHUNK_SIZE:
            raise ValueError("bad chunk size")
        if config.get("hash") != "blake3-keyed" or len(bytes.fromhex(config["key"])) != 32:
            raise ValueError("bad hash or key")
        if config.get("codec", "lz4") not in CODECS:
            raise ValueError("bad codec")
    except (ValueError, KeyError, TypeError) as exc:
        backend.close()
        raise RepoFormatError(f"{url}: config: {exc}") from None
    return Repository(backend, config)
