"""The interface every repository backend implements: named objects with write-once
create, overwrite, read, list with modification times, delete."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TypeVar


T = TypeVar("T")
Buffer = bytes | bytearray | memoryview
#: what a write takes: one buffer, or several written one after the other
Data = Buffer | tuple[Buffer, ...]


def _joined(data: Data) -> bytes:
    return b"".join(data) if isinstance(data, tuple) else bytes(data)


class Backend(ABC):
    """Named objects of one repository."""

    url: str = ""

    @abstractmethod
    def put_once(self, key: str, data: Data) -> bool:
        """Create ``key`` with ``data`` unless it exists; True if this call wrote it.
        An existing object is never rewritten (its modification time is refreshed,
        so that a concurrent ``gc`` sees it as fresh)."""

    @abstractmethod
    def put(self, key: str, data: Data) -> None:
        """Create or replace ``key`` at once (readers see the old or the new bytes)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The bytes of ``key``; :class:`StoreNotFoundError` when absent."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        """``(key, modification time)`` of every key under ``prefix`` (any order)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (no error when absent)."""

    def mtime(self, key: str) -> float | None:
        """Modification time of ``key`` (None when absent)."""
        for k, t in self.list(key):
            if k == key:
                return t
        return None

    def close(self) -> None:
        """Release connections."""

    def describe(self) -> str:
        return self.url
