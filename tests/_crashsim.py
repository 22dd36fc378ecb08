"""A power-cut simulator for the test suite (issue 14).

A command runs once for real inside a directory ``root`` while a recorder
logs every write, fsync, truncate, rename, create, link, unlink, mkdir and
directory fsync it makes under ``root``: the writes, fsyncs, truncates,
renames and unlinks of the engine through the ``vhdcore._io`` observer hook,
creates (``os.open`` with ``O_CREAT``, which ``tempfile`` uses too), links,
``mkdir`` and direct unlinks by wrapping those ``os`` functions while it
records.  (The engine never writes through mmap: its maps are read-only.)

Then, for a crash point N (a power cut right after the Nth operation), the
log is replayed and the files are rebuilt the way a power cut may leave them:

* what was made durable is kept: a file's content as of its last fsync, the
  directory entries (creates, renames, links, unlinks, mkdirs) of a directory
  as of its last fsync;
* every 4 KiB page written (or truncated) since its file's last fsync is kept
  or lost on its own; a file's length follows its data: it grows only when
  the page holding its new last byte is kept (as ext4 ``data=ordered``
  commits a size only after the data), and a pending truncate happens or not;
* each directory operation since its directory's last fsync happened or not
  (on its own; one whose source is missing then does nothing).

The variants tried at a point are "all kept" (what a killed process leaves),
"none kept" (only what was made durable), "newest only" (only the last
operation not yet durable reached the disk: what a missing barrier before it
allows), and ``subsets`` seeded random choices.  ``explore`` rebuilds ``root`` for each variant in place (paths and
unchanged files' modification times as they were, so job ids and
fingerprints still match) and calls the scenario's check on it.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vhdcore import _io

PAGE = 4096
#: the unit kept or lost on its own: a 4 KiB page, or (``explore(unit=512)``)
#: a 512-byte sector, the smallest write storage keeps whole
UNIT = [PAGE]
DIR = "<dir>"


class Inode:
    __slots__ = ("vol", "dur", "dirty", "touched")

    def __init__(self, data: bytes = b"") -> None:
        self.vol = bytearray(data)   # what the process sees
        self.dur = bytes(data)       # what survives any power cut
        self.dirty: dict[int, int] = {}  # page changed since the last fsync -> operation
        self.touched = False         # written at all during the run


def _pages(a: int, b: int) -> range:
    """Pages covering bytes [a, b)."""
    u = UNIT[0]
    return range(a // u, -(-b // u)) if b > a else range(0)


# ------------------------------------------------------------------ recording
def fd_path(fd: int) -> str | None:
    """The path an open file descriptor was opened by (Linux: /proc; macOS:
    F_GETPATH), None when unknown."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        import fcntl

        if not hasattr(fcntl, "F_GETPATH"):
            return None
        try:
            raw = fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024))
        except OSError:
            return None
        path = os.fsdecode(raw.split(b"\0", 1)[0])
    return path[: -len(" (deleted)")] if path.endswith(" (deleted)") else path


def supported() -> bool:
    """Whether this platform can tell which file a descriptor is."""
    fd = os.open(os.path.abspath(__file__), os.O_RDONLY)
    try:
        return fd_path(fd) is not None
    finally:
        os.close(fd)


class Recorder:
    """Record what a command does under ``root`` (a context manager)."""

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self.ops: list[tuple[Any, ...]] = []
        self.initial: dict[str, Any] = {}      # path -> bytes or DIR
        self.mtimes: dict[str, tuple[int, int]] = {}
        self.live: dict[tuple[int, int], int] = {}  # (dev, ino) -> model inode id
        self.initial_ids: dict[str, int] = {}
        self._next_id = 0
        self._saved: dict[str, Any] = {}

    # ---- paths and identities
    def _inside(self, path: str) -> str | None:
        p = os.path.normpath(os.path.join(os.getcwd(), os.fspath(path)))
        p = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
        return p if p == self.root or p.startswith(self.root + os.sep) else None

    def _new_id(self, st: os.stat_result) -> int:
        self._next_id += 1
        self.live[(st.st_dev, st.st_ino)] = self._next_id
        return self._next_id

    def _fd_id(self, fd: int) -> tuple[str, int | str] | None:
        st = os.fstat(fd)
        path = fd_path(fd)
        if path is None:
            return None
        inside = self._inside(path)
        if inside is None:
            return None
        if stat.S_ISDIR(st.st_mode):
            return inside, DIR
        key = (st.st_dev, st.st_ino)
        if key not in self.live:  # opened before recording started? it must be an input
            raise AssertionError(f"crashsim: unknown file {path} written")
        return inside, self.live[key]

    # ---- the _io observer
    def observe(self, op: str, *args: Any) -> None:
        if op in ("pwrite", "fsync", "ftruncate"):
            ident = self._fd_id(args[0])
            if ident is None:
                return
            path, iid = ident
            if op == "pwrite":
                self.ops.append(("write", iid, args[1], bytes(args[2])))
            elif op == "ftruncate":
                self.ops.append(("trunc", iid, args[1]))
            elif iid == DIR:
                self.ops.append(("fsyncdir", path))
            else:
                self.ops.append(("fsync", iid))
        elif op == "replace":
            src, dst = self._inside(args[0]), self._inside(args[1])
            if src and dst:
                self.ops.append(("rename", src, dst))
        elif op == "unlink":
            pass  # recorded by the os.unlink wrapper

    # ---- os wrappers for what does not go through _io
    def _wrap(self) -> None:
        real = {n: getattr(os, n) for n in ("open", "mkdir", "unlink", "rmdir", "link", "remove")}
        self._saved = real
        rec = self

        def w_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
            inside = rec._inside(path) if dir_fd is None and flags & os.O_CREAT else None
            existed = inside is not None and os.path.lexists(inside)
            fd = real["open"](path, flags, mode) if dir_fd is None else real["open"](
                path, flags, mode, dir_fd=dir_fd)
            if inside is not None:
                st = os.fstat(fd)
                key = (st.st_dev, st.st_ino)
                if not existed or key not in rec.live:
                    rec.ops.append(("create", inside, rec._new_id(st)))
                elif flags & os.O_TRUNC:
                    rec.ops.append(("trunc", rec.live[key], 0))
            return fd

        def w_mkdir(path: Any, mode: int = 0o777, *, dir_fd: Any = None) -> None:
            real["mkdir"](path, mode) if dir_fd is None else real["mkdir"](path, mode, dir_fd=dir_fd)
            inside = rec._inside(path) if dir_fd is None else None
            if inside:
                rec.ops.append(("mkdir", inside))

        def w_unlink(path: Any, *, dir_fd: Any = None) -> None:
            real["unlink"](path) if dir_fd is None else real["unlink"](path, dir_fd=dir_fd)
            inside = rec._inside(path) if dir_fd is None else None
            if inside:
                rec.ops.append(("unlink", inside))

        def w_rmdir(path: Any, *, dir_fd: Any = None) -> None:
            real["rmdir"](path) if dir_fd is None else real["rmdir"](path, dir_fd=dir_fd)
            inside = rec._inside(path) if dir_fd is None else None
            if inside:
                rec.ops.append(("unlink", inside))

        def w_link(src: Any, dst: Any, **kw: Any) -> None:
            real["link"](src, dst, **kw)
            s, d = rec._inside(src), rec._inside(dst)
            if s and d:
                rec.ops.append(("link", s, d))

        os.open, os.mkdir, os.unlink, os.rmdir, os.link = w_open, w_mkdir, w_unlink, w_rmdir, w_link  # type: ignore[assignment]
        os.remove = w_unlink  # type: ignore[assignment]

    def _unwrap(self) -> None:
        for n, f in self._saved.items():
            setattr(os, n, f)

    def __enter__(self) -> "Recorder":
        for dirpath, dirs, files in os.walk(self.root):
            for d in dirs:
                self.initial[os.path.join(dirpath, d)] = DIR
            for f in files:
                p = os.path.join(dirpath, f)
                st = os.stat(p)
                self.initial[p] = Path(p).read_bytes()
                self.initial_ids[p] = self._new_id(st)
                self.mtimes[p] = (st.st_atime_ns, st.st_mtime_ns)
        assert _io._observer is None, "crashsim: a recorder is already active"
        _io._observer = self.observe
        self._wrap()
        return self

    def __exit__(self, *exc: object) -> None:
        _io._observer = None
        self._unwrap()


# ------------------------------------------------------------------ replaying
@dataclass
class State:
    """The replayed state after some operations."""

    inodes: dict[int, Inode]
    vol_ns: dict[str, int | str]
    dur_ns: dict[str, int | str]
    pending: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)  # (dir, op + (k,))

    def newest(self) -> int:
        """The last operation whose effect is not durable yet."""
        ks = [op[-1] for _, op in self.pending]
        ks += [max(ino.dirty.values()) for ino in self.inodes.values() if ino.dirty]
        return max(ks, default=0)

    def nothing_pending(self) -> bool:
        return not self.pending and not any(
            ino.dirty or len(ino.vol) != len(ino.dur) for ino in self.inodes.values())


def _ns_apply(ns: dict[str, int | str], op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "create":
        ns[op[1]] = op[2]
    elif kind == "mkdir":
        ns[op[1]] = DIR
    elif kind == "rename":
        if op[1] in ns:
            ns[op[2]] = ns.pop(op[1])
    elif kind == "link":
        if op[1] in ns:
            ns[op[2]] = ns[op[1]]
    elif kind == "unlink":
        ns.pop(op[1], None)


_ROOT = [""]


def replay(rec: Recorder) -> Iterator[tuple[int, State]]:
    """Yield (k, state after the first k operations) for k = 0..len(ops)."""
    inodes = {rec.initial_ids[p]: Inode(d) for p, d in rec.initial.items() if d is not DIR}
    ns: dict[str, int | str] = {p: (DIR if d is DIR else rec.initial_ids[p])
                                for p, d in rec.initial.items()}
    st = State(inodes, dict(ns), dict(ns))
    _ROOT[0] = rec.root
    yield 0, st
    for k, op in enumerate(rec.ops, 1):
        kind = op[0]
        if kind == "write":
            ino = st.inodes[op[1]]
            off, data = op[2], op[3]
            if len(ino.vol) < off + len(data):
                ino.vol.extend(bytes(off + len(data) - len(ino.vol)))
            ino.vol[off : off + len(data)] = data
            ino.dirty.update(dict.fromkeys(_pages(off, off + len(data)), k))
            ino.touched = True
        elif kind == "trunc":
            ino = st.inodes[op[1]]
            old, new = len(ino.vol), op[2]
            if new < old:
                del ino.vol[new:]
            else:
                ino.vol.extend(bytes(new - old))
            ino.dirty.update(dict.fromkeys(_pages(min(old, new), max(old, new)), k))
            ino.touched = True
        elif kind == "fsync":
            ino = st.inodes[op[1]]
            ino.dur = bytes(ino.vol)
            ino.dirty.clear()
        elif kind == "fsyncdir":
            d = op[1]
            keep = []
            for dd, pop in st.pending:
                if dd == d:
                    _ns_apply(st.dur_ns, pop)
                else:
                    keep.append((dd, pop))
            st.pending = keep
        else:
            if kind == "create":
                st.inodes[op[2]] = Inode()
                st.inodes[op[2]].touched = True
            _ns_apply(st.vol_ns, op)
            target = op[2] if kind in ("rename", "link") else op[1]
            st.pending.append((os.path.dirname(target), op + (k,)))
        yield k, st


def crash_view(st: State, mode: str, rng: random.Random) -> dict[str, bytes | str]:
    """Path -> content (or DIR) after a power cut in state ``st``:
    ``mode`` is "all" (every pending change kept), "none", "random", or
    "newest" (only the last operation not yet durable reached the disk: the
    typical result of a missing barrier before it)."""
    newest = st.newest() if mode == "newest" else -1

    def coin(k: int = -2) -> bool:
        if mode == "newest":
            return k == newest
        return mode == "all" or (mode == "random" and rng.random() < 0.5)

    ns = dict(st.dur_ns)
    for _, op in st.pending:
        if coin(op[-1]):
            _ns_apply(ns, op[:-1])
    out: dict[str, bytes | str] = {}
    contents: dict[int, bytes] = {}
    for path in sorted(ns):
        iid = ns[path]
        parent = os.path.dirname(path)
        if parent != st_root() and ns.get(parent) != DIR:
            continue  # its directory did not survive
        if iid == DIR:
            out[path] = DIR
            continue
        assert isinstance(iid, int)
        if iid not in contents:
            contents[iid] = _file_after_crash(st.inodes[iid], coin)
        out[path] = contents[iid]
    return out


def st_root() -> str:
    return _ROOT[0]


def _file_after_crash(ino: Inode, coin: Callable[..., bool]) -> bytes:
    vol, dur = ino.vol, ino.dur
    if not ino.dirty and len(vol) == len(dur):
        return dur
    kept = {p for p in sorted(ino.dirty) if coin(ino.dirty[p])}
    if len(vol) > len(dur):
        last = (len(vol) - 1) // UNIT[0]
        length = len(vol) if (last in kept if last in ino.dirty else coin()) else len(dur)
    elif len(vol) < len(dur):
        length = len(vol) if coin() else len(dur)
    else:
        length = len(vol)
    buf = bytearray(dur[:length].ljust(length, b"\0"))
    for p in kept:
        a, b = p * UNIT[0], min((p + 1) * UNIT[0], len(vol), length)
        if b > a:
            buf[a:b] = vol[a:b]
    return bytes(buf)


def materialize(rec: Recorder, view: dict[str, bytes | str]) -> None:
    """Make ``rec.root`` hold exactly ``view``."""
    root = rec.root
    for e in os.listdir(root):
        p = os.path.join(root, e)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    for path in sorted(view):
        if view[path] is DIR or view[path] == DIR:
            os.makedirs(path, exist_ok=True)
    for path, data in view.items():
        if data == DIR:
            continue
        assert isinstance(data, bytes)
        with open(path, "wb") as f:
            f.write(data)
        # a file the command never wrote keeps its time stamps (the coalesce
        # fingerprint and the imaging job id include them)
        if path in rec.mtimes and rec.initial.get(path) == data:
            os.utime(path, ns=rec.mtimes[path])


# ------------------------------------------------------------------ exploring
@contextlib.contextmanager
def no_real_fsync() -> Iterator[None]:
    """The simulator decides what an fsync made durable; the real ones only
    cost time here (the recorder still sees every ``_io.fsync``)."""
    real = os.fsync
    os.fsync = lambda fd: None  # type: ignore[assignment]
    try:
        yield
    finally:
        os.fsync = real  # type: ignore[assignment]


@dataclass
class Stats:
    name: str
    operations: int = 0
    points: int = 0
    variants: int = 0
    violations: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.name:34} {self.operations:6} ops {self.points:6} crash points "
                f"{self.variants:7} states (page/entry subsets)  {len(self.violations)} violations")


def explore(name: str, root: Path, run: Callable[[], object],
            check: Callable[[str, bool], None], *, points: Iterable[int] | int | None = None,
            subsets: int = 2, seed: int = 0, stop_at_first: bool = True,
            unit: int = PAGE) -> Stats:
    """Record ``run()`` in ``root``, then for crash points (all when ``points``
    is None, an int samples that many evenly, or an explicit list) rebuild
    ``root`` as each variant of a power cut leaves it and call
    ``check(where, done)``, which raises (AssertionError, or any error of
    vhdcore on a file it cannot read) on a broken promise.
    ``done`` is True after the last operation: the command has returned, so
    its result must have been made durable (even with nothing else kept).
    ``unit=512`` keeps or loses each sector on its own instead of each page."""
    UNIT[0] = unit
    try:
        with no_real_fsync():
            return _explore(name, root, run, check, points, subsets, seed, stop_at_first)
    finally:
        UNIT[0] = PAGE


def _explore(name: str, root: Path, run: Callable[[], object],
             check: Callable[[str, bool], None], points: Iterable[int] | int | None,
             subsets: int, seed: int, stop_at_first: bool) -> Stats:
    with Recorder(root) as rec:
        run()
    n = len(rec.ops)
    if points is None:
        chosen = set(range(1, n + 1))
    elif isinstance(points, int):
        step = max(1, n / max(1, points))
        chosen = {min(n, max(1, round(i * step))) for i in range(1, points + 1)} | {n}
    else:
        chosen = {p for p in points if 1 <= p <= n}
    stats = Stats(name, operations=n)
    rng = random.Random(seed)
    for k, st in replay(rec):
        if k not in chosen:
            continue
        stats.points += 1
        modes = (["all"] if st.nothing_pending()
                 else ["all", "none", "newest"] + ["random"] * subsets)
        for i, mode in enumerate(modes):
            view = crash_view(st, mode, rng)
            materialize(rec, view)
            stats.variants += 1
            where = f"{name}: power cut after operation {k}/{n} {_describe(rec.ops[k - 1])}, {mode}#{i}"
            try:
                check(where, k == n)
            except Exception as exc:  # a broken promise, or a file vhdcore cannot open
                what = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
                stats.violations.append(f"{where}: {what}")
                if stop_at_first:
                    return stats
    return stats


def _describe(op: tuple[Any, ...]) -> str:
    if op[0] == "write":
        return f"(write {len(op[3])} bytes at {op[2]} of file #{op[1]})"
    return "(" + " ".join(str(x) if not isinstance(x, str) else os.path.basename(x) for x in op) + ")"
