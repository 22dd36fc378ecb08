"""Repository objects as files under a directory (``file:///dir`` or a plain path).

A write-once create writes a temporary file, fsyncs it (unless ``durable`` is
False), and links it to its name (any directory it creates on the way is made
durable in its parent first, and the name in its directory after the link) (``link`` fails when the name exists, so an
existing object is never rewritten), then removes the temporary name."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

from ... import _io
from ...errors import StoreError, StoreNotFoundError, UploadError
from .base import Backend, Data, _joined


class DirectoryBackend(Backend):
    """Objects as files under a directory."""

    def __init__(self, root: str, *, durable: bool = True, url: str | None = None) -> None:
        self.root = os.path.abspath(root)
        self.durable = durable
        self.url = url or f"file://{self.root}"

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts) or "\\" in key or "\0" in key:
            raise StoreError(f"{self.url}: invalid object name {key!r}")
        return os.path.join(self.root, *parts)

    def _tmp(self, path: str) -> str:
        d = os.path.dirname(path)
        # a new fan-out directory must be durable in its parent before the
        # chunk in it counts as stored (else a power cut loses the chunk)
        _io.make_dirs(d, durable=self.durable)
        return os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}."
                               f"{threading.get_ident()}.{time.monotonic_ns()}.tmp")

    def _write_tmp(self, tmp: str, data: Data) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            pos = 0
            for part in (data if isinstance(data, tuple) else (data,)):
                _io.pwrite_all(fd, part, pos)
                pos += memoryview(part).nbytes
            if self.durable:
                _io.fsync(fd)
        finally:
            os.close(fd)

    def put_once(self, key: str, data: Data) -> bool:
        path = self._path(key)
        if os.path.exists(path):
            _touch(path)
            return False
        try:
            tmp = self._tmp(path)
            try:
                self._write_tmp(tmp, data)
                try:
                    os.link(tmp, path)  # exclusive: fails if the name exists
                except FileExistsError:
                    _touch(path)
                    return False
            finally:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            if self.durable:
                _io.fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise UploadError(f"{self.url}: writing {key} failed: {exc}") from exc
        return True

    def put(self, key: str, data: Data) -> None:
        path = self._path(key)
        try:
            _io.make_dirs(os.path.dirname(path), durable=self.durable)
            _io.atomic_write(path, _joined(data) if isinstance(data, tuple) else data,
                             durable=self.durable)
        except OSError as exc:
            raise UploadError(f"{self.url}: writing {key} failed: {exc}") from exc

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StoreNotFoundError(f"{self.url}: {key} does not exist") from None
        except OSError as exc:
            raise StoreError(f"{self.url}: reading {key} failed: {exc}") from exc

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def mtime(self, key: str) -> float | None:
        try:
            return os.stat(self._path(key)).st_mtime
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        base = self.root
        start = prefix.rstrip("/")
        top = os.path.join(base, *start.split("/")) if start else base
        if os.path.isfile(top):
            yield start, os.stat(top).st_mtime
            return
        if not os.path.isdir(top):
            return
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            rel = os.path.relpath(dirpath, base)
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                try:
                    t = os.stat(os.path.join(dirpath, fn)).st_mtime
                except FileNotFoundError:
                    continue
                yield (fn if rel == "." else f"{rel.replace(os.sep, '/')}/{fn}"), t

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"{self.url}: deleting {key} failed: {exc}") from exc


def _touch(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
