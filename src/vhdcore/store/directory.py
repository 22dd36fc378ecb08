"""A plain directory as an object store: ``file:///path/to/dir/name``.

Layout beside each other in the directory::

    name.segments/00000000.lz4        segment bytes (the primary generation)
    name.segments/00000000.lz4.md5    "<md5 hex> <size>" (written after the segment)
    name.segments/g<hex>/00000000.lz4 segments of another generation (a re-image)
    name.manifest.json                the manifest: generation, segments, metadata

Every file is written to a temporary name, flushed to disk and renamed, so a
crash leaves either the old state or the new one; a segment counts as
uploaded only once its ``.md5`` record exists and matches its size.  Files
get the usual mode (0666 less the umask).  After a new manifest is written,
:meth:`DirectoryStore.prune` removes every file the manifest does not use.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import _io
from ..errors import StoreError, StoreNotFoundError, UploadError
from .base import (
    SegmentData,
    segment_parts,
    _GENERATION_RE,
    ImageEntry,
    Manifest,
    SegmentInfo,
    SegmentLimits,
    Store,
    check_metadata,
)
from .retry import RetryPolicy

__all__ = ["DirectoryStore"]

_SEGMENT_RE = re.compile(r"^(\d{8})\.lz4$")
_MANIFEST_FORMAT = "vhdcore-manifest"
_MANIFEST_VERSION = 1

#: no practical limit on a file system; 1 TiB per segment and 10^7 segments
DIRECTORY_LIMITS = SegmentLimits(1, 1 << 40, 10_000_000)


def _atomic_write(path: Path, data: SegmentData, durable: bool) -> None:
    # through vhdcore._io, so that tests can inject faults here too; a
    # FrameList goes down as its frames (one vectored write, no join), a
    # SpillSegment a chunk at a time
    _io.atomic_write(str(path), segment_parts(data), durable=durable)


class DirectoryStore(Store):
    """An image kept as files in a local directory.  The directory must
    exist, except that :meth:`prepare_write` (which the imaging job calls)
    creates it with its parents, like ``mkdir -p``.

    ``durable=False`` skips flushing to stable storage (faster, not crash-safe; for tests
    and benchmarks).
    """

    scheme = "file"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        name: str,
        *,
        durable: bool = True,
        retry: RetryPolicy | None = None,
        url: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        if not name or "/" in name or name in (".", ".."):
            raise StoreError(f"invalid image name {name!r} in directory {self.directory}")
        self.name = name
        self.durable = durable
        self.segments_dir = self.directory / f"{name}.segments"
        self.manifest_path = self.directory / f"{name}.manifest.json"
        self._mkdir_lock = threading.Lock()
        self._read_generation: str | None = None
        super().__init__(url or f"file://{self.directory / name}", retry)

    def _check_directory(self) -> None:
        if not self.directory.is_dir():
            raise StoreNotFoundError(f"{self.describe()}: directory {self.directory} does not exist")

    def prepare_write(self, *, create: bool = True) -> None:
        if create:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"{self.describe()}: cannot create the directory {self.directory}: "
                    f"{exc.strerror or exc}"
                ) from exc
        self._check_directory()
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise StoreError(f"{self.describe()}: the directory {self.directory} is not writable")

    def list_images(self, prefix: str) -> list[ImageEntry]:
        self._check_directory()
        base = "file://" + str(self.directory.resolve()).rstrip("/") + "/"
        found: dict[str, ImageEntry] = {}
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as exc:
            raise StoreError(f"listing {self.directory} failed: {exc.strerror or exc}") from exc
        for entry in names:
            if entry.endswith(".manifest.json") and entry.startswith(prefix):
                name = entry[: -len(".manifest.json")]
                img = DirectoryStore(self.directory, name, url=base + name)
                try:
                    man = img.get_manifest()
                    mtime: float | None = img.manifest_path.stat().st_mtime
                except (StoreError, OSError):
                    continue
                vs = man.metadata.get("virtual-size")
                found[name] = ImageEntry(name, base + name, man.compressed_size, len(man.segments),
                                         mtime, True, int(vs) if vs and vs.isdigit() else None)
        for entry in names:
            if entry.endswith(".segments") and entry.startswith(prefix):
                name = entry[: -len(".segments")]
                if name in found or not name:
                    continue
                img = DirectoryStore(self.directory, name, url=base + name)
                segs = img.list_segments()
                try:
                    mtime = img.segments_dir.stat().st_mtime
                except OSError:
                    mtime = None
                found[name] = ImageEntry(name, base + name, sum(s.size for s in segs.values()),
                                         len(segs), mtime, False)
        return [found[k] for k in sorted(found)]

    def _generation_dir(self, generation: str) -> Path:
        return self.segments_dir / generation if generation else self.segments_dir

    def _segment_path(self, index: int, generation: str | None = None) -> Path:
        if index < 0 or index > 99_999_999:
            raise ValueError(f"segment index {index} out of range")
        gen = self.generation if generation is None else generation
        return self._generation_dir(gen) / f"{index:08d}.lz4"

    def segment_limits(self) -> SegmentLimits:
        return DIRECTORY_LIMITS

    def put_segment(self, index: int, data: SegmentData, md5_hex: str) -> str:
        path = self._segment_path(index)
        self._check_directory()
        try:
            with self._mkdir_lock:
                # every directory on a segment's path survives a power cut
                # (a new generation's must, once the manifest names it)
                _io.make_dirs(str(path.parent), durable=self.durable)
            record = path.with_name(path.name + ".md5")
            try:
                record.unlink()
            except FileNotFoundError:
                pass
            _atomic_write(path, data, self.durable)
            _atomic_write(record, f"{md5_hex} {len(data)}\n".encode(), self.durable)
        except OSError as exc:
            raise UploadError(f"{self.describe()}: writing segment {index} to {path} failed: {exc}") from exc
        return md5_hex

    def list_segments(self) -> dict[int, SegmentInfo]:
        self._check_directory()
        found: dict[int, SegmentInfo] = {}
        where = self._generation_dir(self.generation)
        try:
            names = os.listdir(where)
        except FileNotFoundError:
            return found
        except OSError as exc:
            raise StoreError(f"{self.describe()}: listing {where} failed: {exc}") from exc
        for entry in names:
            m = _SEGMENT_RE.match(entry)
            if not m:
                continue
            path = where / entry
            try:
                size = path.stat().st_size
                etag, recorded = (path.with_name(entry + ".md5")).read_text().split()
            except (OSError, ValueError):
                continue  # no complete record: not uploaded
            if int(recorded) == size:
                index = int(m.group(1))
                found[index] = SegmentInfo(index, size, etag)
        return found

    def get_segment(self, index: int) -> bytes:
        # the segments of the image last read (get_manifest), else of the upload
        path = self._segment_path(index, self._read_generation)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            self._check_directory()
            raise StoreNotFoundError(f"{self.describe()}: segment {index} ({path}) does not exist") from None
        except OSError as exc:
            raise StoreError(f"{self.describe()}: reading segment {index} ({path}) failed: {exc}") from exc

    def put_manifest(self, segments: list[SegmentInfo], metadata: Mapping[str, str]) -> None:
        self._check_directory()
        doc: dict[str, Any] = {
            "format": _MANIFEST_FORMAT,
            "version": _MANIFEST_VERSION,
            "generation": self.generation,
            "metadata": check_metadata(metadata),
            "segments": [{"index": s.index, "size": s.size, "etag": s.etag} for s in segments],
        }
        body = json.dumps(doc, indent=1, sort_keys=True).encode()
        try:
            _atomic_write(self.manifest_path, body, True)
        except OSError as exc:
            raise UploadError(
                f"{self.describe()}: writing manifest {self.manifest_path} failed: {exc}"
            ) from exc

    def get_manifest(self) -> Manifest:
        try:
            raw = self.manifest_path.read_bytes()
        except FileNotFoundError:
            self._check_directory()
            raise StoreNotFoundError(
                f"{self.describe()}: no image manifest {self.manifest_path} (not uploaded, or incomplete)"
            ) from None
        except OSError as exc:
            raise StoreError(f"{self.describe()}: reading {self.manifest_path} failed: {exc}") from exc
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != _MANIFEST_FORMAT:
                raise ValueError("not a vhdcore manifest")
            segments = [SegmentInfo(int(s["index"]), int(s["size"]), str(s["etag"])) for s in doc["segments"]]
            metadata = {str(k): str(v) for k, v in doc.get("metadata", {}).items()}
            generation = doc.get("generation", "")
            if not isinstance(generation, str) or not _GENERATION_RE.match(generation):
                raise ValueError(f"bad generation {generation!r}")
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(
                f"{self.describe()}: {self.manifest_path} is not a vhdcore image manifest ({exc})"
            ) from exc
        self._read_generation = generation
        return Manifest(segments, metadata, generation)

    def prune(self) -> int:
        manifest = self.get_manifest()
        keep_dir = self._generation_dir(manifest.generation)
        keep: set[Path] = set()
        for seg in manifest.segments:
            path = self._segment_path(seg.index, manifest.generation)
            keep.update((path, path.with_name(path.name + ".md5")))
        removed = self._remove_tree(self.segments_dir, keep, keep_dir)
        # temporary files of manifest writes that a crash left behind
        prefix = f".{self.manifest_path.name}."
        for entry in os.listdir(self.directory):
            if entry.startswith(prefix) and entry.endswith(".tmp"):
                removed += self._unlink(self.directory / entry)
        if removed and self.durable:
            _io.fsync_dir(str(self.segments_dir))
        return removed

    def _unlink(self, path: Path) -> int:
        try:
            _io.unlink(str(path))
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StoreError(f"{self.describe()}: removing {path} failed: {exc}") from exc
        return 1

    def _remove_tree(self, where: Path, keep: set[Path], keep_dir: Path | None) -> int:
        """Remove what is under ``where`` except ``keep`` (and ``keep_dir``
        itself); directories left empty go too.  Returns the files removed."""
        try:
            entries = os.listdir(where)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StoreError(f"{self.describe()}: listing {where} failed: {exc}") from exc
        removed = 0
        for entry in entries:
            path = where / entry
            if path.is_dir() and not path.is_symlink():
                removed += self._remove_tree(path, keep, keep_dir)
                if path != keep_dir:
                    try:
                        path.rmdir()
                    except OSError:
                        pass
            elif path not in keep:
                removed += self._unlink(path)
        return removed

    def delete(self) -> None:
        try:
            self.manifest_path.unlink()
        except FileNotFoundError:
            pass
        self._read_generation = None
        self._remove_tree(self.segments_dir, set(), None)
        try:
            self.segments_dir.rmdir()
        except OSError:
            pass
