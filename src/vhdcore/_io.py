"""The one place where vhdcore writes to files.

Every write, fsync, truncate and rename of the engine goes through these
functions, so that tests can inject faults (EIO, ENOSPC, short writes, a
stop at the Nth operation) with :func:`inject` and prove that no input is
damaged and no output claims to be complete.
"""
from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Union, cast

__all__ = ["pwrite_all", "fsync", "ftruncate", "replace", "unlink", "fsync_dir", "atomic_write",
           "create_temp", "make_dirs", "start_writeback", "will_need", "FILE_MODE", "PRIVATE_MODE", "FaultPlan", "inject", "SimulatedCrash"]

Buffer = Union[bytes, bytearray, memoryview]
#: what the write functions take: a buffer, or a list or tuple of buffers
#: written one after another
Data = Union[Buffer, Sequence[Buffer]]

#: mode of every new file vhdcore writes: the process umask decides (like cp
#: or qemu-img); only job state and checkpoints use PRIVATE_MODE
FILE_MODE = 0o666
PRIVATE_MODE = 0o600


class SimulatedCrash(BaseException):
    """Raised by an injected stop: like a crash, nothing after it runs
    normally (a BaseException, so ordinary error handling does not catch it)."""


@dataclass
class FaultPlan:
    """Fail the ``at``-th operation (1-based, counting writes, fsyncs,
    truncates and renames) with ``kind``: ``"eio"``, ``"enospc"``,
    ``"short"`` (a write that stores the whole sectors of its first half,
    then fails: storage tears writes at sector boundaries, so a write of one
    sector stores nothing) or
    ``"stop"`` (:class:`SimulatedCrash`).  ``count`` records how many
    operations were seen (run once with ``at=0`` to count them)."""

    at: int = 0
    kind: str = "eio"
    count: int = 0
    fired: bool = False
    ops: list[str] = field(default_factory=list)


_plan: FaultPlan | None = None
#: test hook: called as ``_observer(op, *args)`` after each operation that
#: succeeded (``"pwrite", fd, offset, data``; ``"fsync", fd``;
#: ``"ftruncate", fd, size``; ``"replace", src, dst``; ``"unlink", path``).
#: The crash simulator of the test suite records through it.
_observer: Callable[..., None] | None = None
_SECTOR = 512
_lock = threading.Lock()


def _tick(op: str) -> FaultPlan | None:
    plan = _plan
    if plan is None:
        return None
    with _lock:
        plan.count += 1
        plan.ops.append(op)
        if plan.at and plan.count == plan.at and not plan.fired:
            plan.fired = True
            return plan
    return None


def _fail(plan: FaultPlan, op: str) -> None:
    if plan.kind == "stop":
        raise SimulatedCrash(f"injected stop at operation {plan.count} ({op})")
    code = errno.ENOSPC if plan.kind == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (injected at operation {plan.count}, {op})")


def pwrite_all(fd: int, data: Data, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (looping over short writes).
    ``data`` is a buffer, or a list or tuple of buffers written one after
    another (``pwritev``: one operation, no join)."""
    if isinstance(data, (list, tuple)):
        if _plan is None and _observer is None:
            _pwritev_all(fd, data, offset)
            return
        one: Buffer = b"".join(data)  # under test: one operation like any other write
    else:
        one = cast(Buffer, data)
    view = memoryview(one).cast("B")
    plan = _tick("pwrite")
    if plan is not None:
        if plan.kind == "short" and len(view) > 1:
            # storage writes whole sectors or nothing: a torn write keeps the
            # complete sectors of its first half (none of a one-sector write)
            keep = (offset + len(view) // 2) // _SECTOR * _SECTOR - offset
            if keep > 0:
                os.pwrite(fd, view[:keep], offset)
            raise OSError(errno.EIO, f"short write (injected at operation {plan.count})")
        _fail(plan, "pwrite")
    start, whole = offset, view
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"write of {len(view)} bytes at {offset} wrote nothing")
        view = view[n:]
        offset += n
    if _observer is not None:
        _observer("pwrite", fd, start, whole)


#: buffers per pwritev call (Linux's IOV_MAX is 1024)
_IOV_MAX = 1024


def _pwritev_all(fd: int, parts: Sequence[Buffer], offset: int) -> None:
    views = deque(memoryview(p).cast("B") for p in parts if len(p))
    while views:
        batch = [views[i] for i in range(min(len(views), _IOV_MAX))]
        n = os.pwritev(fd, batch, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"write at {offset} wrote nothing")
        offset += n
        while n:
            head = views[0]
            if n >= len(head):
                n -= len(head)
                views.popleft()
            else:
                views[0] = head[n:]
                n = 0


def scratch_write(fd: int, data: Buffer, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of a scratch file: not user data,
    so neither fault injection nor the crash observer sees it (they would
    count writes no power cut can leave behind)."""
    _pwritev_all(fd, (data,), offset)


def fsync(fd: int) -> None:
    plan = _tick("fsync")
    if plan is not None:
        _fail(plan, "fsync")
    os.fsync(fd)
    if _observer is not None:
        _observer("fsync", fd)


def ftruncate(fd: int, size: int) -> None:
    plan = _tick("ftruncate")
    if plan is not None:
        _fail(plan, "ftruncate")
    os.ftruncate(fd, size)
    if _observer is not None:
        _observer("ftruncate", fd, size)


def replace(src: str, dst: str) -> None:
    plan = _tick("replace")
    if plan is not None:
        _fail(plan, "replace")
    os.replace(src, dst)
    if _observer is not None:
        _observer("replace", src, dst)


def unlink(path: str) -> None:
    os.unlink(path)
    if _observer is not None:
        _observer("unlink", path)


def make_dirs(path: str, *, durable: bool = True) -> None:
    """Create directory ``path`` and its missing parents (like ``mkdir -p``),
    each made durable in its parent (when ``durable``): a file is only as
    durable as every directory entry on its path."""
    missing: list[str] = []
    d = os.path.abspath(path)
    while not os.path.isdir(d):
        missing.append(d)
        d = os.path.dirname(d)
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            continue
        if durable:
            fsync_dir(os.path.dirname(d))


def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable.  A failed fsync (EIO, ...)
    fails the operation; only a file system that cannot fsync a directory at
    all (EINVAL, ENOTSUP) is tolerated."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str, data: Data | Iterator[Buffer], *, durable: bool = True,
                 private: bool = False) -> None:
    """Replace ``path`` with ``data`` (a buffer, a list of buffers, or an
    iterator of them) all at once: a temporary file beside it,
    fsynced (when ``durable``), renamed over ``path``, the directory fsynced.
    A failure removes the temporary file and leaves ``path`` as it was.
    The file gets mode 0666 less the umask, like any file a program creates,
    or 0600 when ``private``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = create_temp(directory, f".{os.path.basename(path)}.", ".tmp", private=private)
    try:
        try:
            if isinstance(data, Iterator):
                # written a piece at a time (a segment read back from scratch)
                pos = 0
                for piece in data:
                    pwrite_all(fd, piece, pos)
                    pos += memoryview(piece).nbytes
            else:
                pwrite_all(fd, data, 0)
            if durable:
                fsync(fd)
        finally:
            os.close(fd)
        replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(directory)


def create_temp(directory: str, prefix: str, suffix: str, *,
                private: bool = False) -> tuple[int, str]:
    """Create a new empty file with a unique name in ``directory`` (mode 0666
    less the umask, or 0600 when ``private``; ``tempfile.mkstemp`` always
    makes 0600); return its write descriptor and path."""
    import secrets

    mode = PRIVATE_MODE if private else FILE_MODE
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, flags, mode), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


# --------------------------------------------------------------------------
# advice to the kernel: never a write, never a durability promise, never fails
_SYNC_FILE_RANGE_WRITE = 2
_sfr: Callable[..., int] | None = None
_sfr_tried = False


def _sync_file_range() -> Callable[..., int] | None:
    global _sfr, _sfr_tried
    if not _sfr_tried:
        _sfr_tried = True
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            fn.restype = ctypes.c_int
            _sfr = fn
        except (OSError, AttributeError):  # not Linux/glibc: fall back to fadvise
            _sfr = None
    return _sfr


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from
    ``offset`` back to storage now, without waiting (``sync_file_range`` with
    ``SYNC_FILE_RANGE_WRITE``; ``POSIX_FADV_DONTNEED`` where that is missing,
    which starts writeback too).  Advice only: nothing becomes durable
    through it (only :func:`fsync` promises that), so the crash model is
    unchanged; it lets the device write while the engine still reads, and
    leaves the final fsync little to do.  Errors are ignored."""
    if length <= 0:
        return
    fn = _sync_file_range()
    try:
        if fn is not None:
            fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
        elif hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def will_need(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start reading ``length`` bytes of ``fd`` from
    ``offset`` into the page cache (``POSIX_FADV_WILLNEED``), without
    waiting.  Advice only; errors are ignored."""
    if length <= 0 or not hasattr(os, "posix_fadvise"):
        return
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass


@contextlib.contextmanager
def inject(plan: FaultPlan) -> Iterator[FaultPlan]:
    """Apply a fault plan to every write operation in this process."""
    global _plan
    old = _plan
    _plan = plan
    try:
        yield plan
    finally:
        _plan = old
