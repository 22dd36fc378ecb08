"""Finding a differencing disk's parent, confined to the allowed directories.

Parent paths come from the child's parent locators (``W2ru``, ``W2ku``,
``MacX``) and its header's parent name, resolved relative to the child's
directory.  A parent is accepted only when its real path (all symlinks
followed) lies inside one of the allowed directories, it is a regular file,
and it is not reached through an absolute locator path, unless the caller
explicitly allows those.  Its footer UUID must equal the child's parent UUID
and dynamic block sizes must agree (:func:`check_parent`).  :class:`Chain
<vhdcore.chain.Chain>` walks a chain with these.
"""
from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence

from .errors import ConfinementError, ParentMismatchError, ParentNotFoundError, VhdError
from .vhd.file import VhdFile

__all__ = ["check_parent", "find_parent", "open_confined"]

_WIN_ABS = re.compile(r"^[A-Za-z]:[\\/]|^[\\/]{2}")
_LOCATOR_ORDER = {"W2ru": 0, "W2ku": 1, "MacX": 2}


def _within(real: str, roots: Sequence[str]) -> bool:
    for root in roots:
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def open_confined(full: str, roots: Sequence[str], allow_special: bool) -> tuple[int | None, str]:
    """Open ``full`` read-only if it lies inside one of ``roots``: every path
    component from the root down is opened with ``O_NOFOLLOW`` relative to the
    directory descriptor before it (``openat``), so a symlink swapped in after
    the check cannot lead elsewhere; the opened file itself is then checked
    (a regular file unless ``allow_special``).  Returns (fd, "") or (None, why)."""
    real = os.path.realpath(full)
    root = next((r for r in roots if _within(real, [r])), None)
    if root is None:
        return None, f"leads to {real}, outside the allowed directories ({', '.join(roots)})"
    rel = os.path.relpath(real, root)
    parts = [] if rel == os.curdir else rel.split(os.sep)
    if not parts or any(pp in ("", os.curdir, os.pardir) for pp in parts):
        return None, f"leads to {real}, which is not a file inside {root}"
    cloexec = getattr(os, "O_CLOEXEC", 0)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    odir = getattr(os, "O_DIRECTORY", 0)
    try:
        dfd = os.open(root, os.O_RDONLY | odir | cloexec)
    except OSError as exc:
        return None, f"cannot open the allowed directory {root}: {exc.strerror}"
    try:
        for comp in parts[:-1]:
            nd = os.open(comp, os.O_RDONLY | odir | nofollow | cloexec, dir_fd=dfd)
            os.close(dfd)
            dfd = nd
        fd = os.open(parts[-1], os.O_RDONLY | nofollow | os.O_NONBLOCK | cloexec, dir_fd=dfd)
    except OSError as exc:
        return None, (f"leads to {real}, which changed while it was opened "
                      f"({exc.strerror}; a symlink swapped in?)")
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) and not allow_special:
        os.close(fd)
        return None, f"leads to {real}, which is not a regular file"
    try:
        os.set_blocking(fd, True)
    except OSError:  # pragma: no cover - some special files
        pass
    return fd, ""


def _win_basename(raw: str) -> str:
    return re.split(r"[\\/]", raw.rstrip("\\/"))[-1]


class _Search:
    """What one parent search has tried, refused and seen so far."""

    def __init__(self, child: VhdFile, allowed_dirs: Sequence[str], allow_absolute: bool,
                 allow_special: bool) -> None:
        self.child = child
        self.child_dir = os.path.dirname(os.path.abspath(child.path))
        self.allowed_dirs = allowed_dirs
        self.allow_absolute = allow_absolute
        self.allow_special = allow_special
        self.tried: list[str] = []
        self.refused: list[str] = []
        self.seen: set[str] = set()
        self.win_names: list[str] = []


def _locator_candidates(child: VhdFile, search: _Search) -> list[tuple[str, str]]:
    """The paths to try, in the order W2ru, W2ku, MacX, then the parent name
    (damaged locators are noted as tried)."""
    assert child.header is not None
    damaged: list[str] = []
    candidates = sorted(child.parent_locators(strict=False, damaged=damaged),
                        key=lambda cp: _LOCATOR_ORDER.get(cp[0], 9))
    if child.header.parent_name:
        candidates.append(("parent name", child.header.parent_name))
    search.tried.extend(f"a damaged locator ({d})" for d in damaged)
    return candidates


def _try_locator(code: str, raw: str, search: _Search) -> tuple[str, int] | None:
    """Open the parent one locator path names, if it exists and is allowed.
    A Windows absolute path is never followed: its base name is kept for
    :func:`_by_windows_basename`."""
    p = raw.replace("\\", "/")
    if "\0" in p or not p.strip():
        return None
    if _WIN_ABS.match(raw) or _WIN_ABS.match(p):
        search.tried.append(f"{code} {raw!r} (a Windows absolute path)")
        base = _win_basename(raw)
        if base and base not in search.win_names and base not in (".", ".."):
            search.win_names.append(base)
        return None
    absolute = os.path.isabs(p)
    full = os.path.normpath(p if absolute else os.path.join(search.child_dir, p))
    if full in search.seen:
        return None
    search.seen.add(full)
    try:
        st = os.stat(full)
    except (FileNotFoundError, NotADirectoryError):
        search.tried.append(f"{code} {raw!r} -> {full} (missing)")
        return None
    except OSError as exc:
        search.tried.append(f"{code} {raw!r} -> {full} ({exc.strerror})")
        return None
    if absolute and not search.allow_absolute:
        search.refused.append(f"{code} {raw!r} is an absolute path")
        return None
    if not stat.S_ISREG(st.st_mode) and not search.allow_special:
        # refuse before opening: opening a device can have side effects
        search.refused.append(f"{code} {raw!r} leads to {os.path.realpath(full)}, which is not a "
                              "regular file")
        return None
    fd, why = open_confined(full, search.allowed_dirs, search.allow_special)
    if fd is None:
        search.refused.append(f"{code} {raw!r} {why}")
        return None
    return full, fd


def _has_parent_uuid(full: str, fd: int, child: VhdFile) -> tuple[bool, str]:
    """Whether the open file ``fd`` is a VHD whose UUID is ``child``'s parent
    UUID; the second item describes what it is instead."""
    assert child.header is not None
    try:
        with VhdFile(full, _fd=os.dup(fd)) as cand:
            return cand.footer.unique_id == child.header.parent_uuid, str(cand.uuid)
    except VhdError as exc:
        return False, f"not a usable VHD: {exc}"


def _by_windows_basename(search: _Search) -> tuple[str, int] | None:
    """The base name of a Windows path looked for in the child's directory,
    then the other allowed directories, accepted by UUID only."""
    child = search.child
    assert child.header is not None
    dirs = [search.child_dir] + [d for d in search.allowed_dirs if d != search.child_dir]
    for base in search.win_names:
        for d in dirs:
            full = os.path.join(d, base)
            if full in search.seen or not os.path.isfile(full):
                continue
            search.seen.add(full)
            fd, why = open_confined(full, search.allowed_dirs, search.allow_special)
            if fd is None:
                search.refused.append(f"{base!r} in {d} {why}")
                continue
            ok, got = _has_parent_uuid(full, fd, child)
            if ok:
                return full, fd
            os.close(fd)
            search.tried.append(f"{full} (by the base name of a Windows path; its UUID is {got}, "
                                f"not the parent UUID {child.header.parent_uuid_obj})")
    return None


def find_parent(child: VhdFile, *, allowed_dirs: Sequence[str], allow_absolute: bool = False,
                allow_special: bool = False) -> tuple[str, int]:
    """Find and open the parent of a differencing disk, confined to
    ``allowed_dirs`` (real paths).  Returns (path as found, open read-only fd).

    Locators are tried in the order W2ru, W2ku, MacX, then the parent name.
    A Windows absolute path (``C:\\...``, ``\\\\server\\...``) is never followed;
    when nothing else leads to the parent, its base name is looked for in each
    allowed directory and accepted only if that file's UUID is the child's
    parent UUID."""
    search = _Search(child, allowed_dirs, allow_absolute, allow_special)
    for code, raw in _locator_candidates(child, search):
        found = _try_locator(code, raw, search)
        if found is not None:
            return found
    if not search.refused:
        found = _by_windows_basename(search)
        if found is not None:
            return found
    if search.refused:
        raise ConfinementError(f"{child.path}: parent refused: " + "; ".join(search.refused))
    raise ParentNotFoundError(
        f"{child.path}: parent not found; tried "
        + ("; ".join(search.tried) if search.tried else "no locator")
    )


def check_parent(child: VhdFile, parent: VhdFile) -> None:
    """Refuse a parent whose UUID is not the child's parent UUID, or whose
    dynamic block size differs from the child's."""
    assert child.header is not None
    if parent.footer.unique_id != child.header.parent_uuid:
        raise ParentMismatchError(
            f"{child.path}: parent UUID in its header is {child.header.parent_uuid_obj}, but "
            f"{parent.path} has UUID {parent.uuid}"
        )
    if not parent.is_fixed and parent.block_size != child.block_size:
        raise ParentMismatchError(
            f"{child.path}: block size {child.block_size} differs from its parent "
            f"{parent.path}'s {parent.block_size}"
        )
