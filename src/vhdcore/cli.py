"""The command line: ``python -m vhdcore ...`` (also installed as ``vhdcore``).

This module parses arguments, calls the library and prints; it holds as little
logic of its own as it can.  Each subcommand is registered by a small
function decorated with :func:`_subparser` (its options, description and
examples) and run by one decorated with :func:`_command`.

Exit codes (a contract other tools script against):

* 0 — success (``check``: no problems found)
* 1 — bad input or an error (a ``VhdError``); ``check``: problems found
* 2 — wrong usage (argparse; every option value is validated here)
* 3 — the job failed (a target or the host failed; ``image`` can be resumed
  when it says so)
* 4 — the job stopped at its timeout or was interrupted; it can be resumed

``--debug`` (or ``VHDCORE_DEBUG=1``) prints the traceback of an error.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import json
import math
import os
import re
import stat
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from ._args import int_at_least as _int_at_least
from ._args import new_subcommand as _new
from ._args import seconds as _seconds
from ._args import size_at_least as _size_at_least
from . import __version__
from ._util import human_size, parse_size
from .errors import OutputExistsError, VhdError, VhdTimeoutError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_TIMEOUT = 4

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Handler] = {}
#: functions that each add one subcommand's parser, in the order of ``--help``
_SUBPARSERS: list[Callable[[Any], None]] = []


def _command(name: str) -> Callable[[Handler], Handler]:
    """Register the function that runs subcommand ``name``."""
    def deco(fn: Handler) -> Handler:
        _COMMANDS[name] = fn
        return fn
    return deco


def _subparser(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    """Register a function that adds one subcommand to the parser."""
    _SUBPARSERS.append(fn)
    return fn


class UsageError(Exception):
    """A combination of options the parser cannot express (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line naming the option."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _power_of_two_size(text: str) -> int:
    value = _size_at_least(512)(text)
    if value & (value - 1) or value % 512:
        raise argparse.ArgumentTypeError(
            f"must be a power of two of at least 512 bytes (512K, 2M...), got {text!r}")
    return value


def _store_url(text: str) -> str:
    from .store import parse_url

    try:
        parse_url(text)
    except VhdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _store_prefix(text: str) -> str:
    from .store import parse_url

    try:
        parse_url(text, prefix=True)
    except VhdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


_POSITIVE = _int_at_least(1)
_SIZE = _size_at_least(1)
_OFFSET = _size_at_least(0)


# ------------------------------------------------------------------ helpers
def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _chain_options(ns: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if getattr(ns, "allow_dir", None):
        leaf = next(getattr(ns, a) for a in ("leaf", "file", "child", "input", "disk")
                    if getattr(ns, a, None))
        leaf_dir = os.path.dirname(os.path.abspath(leaf))
        opts["allowed_dirs"] = [leaf_dir, *ns.allow_dir]
    if getattr(ns, "chain_parent", None):
        opts["parent"] = ns.chain_parent
    if getattr(ns, "max_depth", None):
        opts["max_depth"] = ns.max_depth
    if getattr(ns, "allow_absolute", False):
        opts["allow_absolute"] = True
    return opts


def _add_chain_options(p: argparse.ArgumentParser, parent: bool = True) -> None:
    p.add_argument("--allow-dir", action="append", metavar="DIR",
                   help="a directory parents may live in besides the leaf's own (repeatable)")
    p.add_argument("--max-depth", type=_POSITIVE, metavar="N",
                   help="the most disks a chain may have (default 256)")
    p.add_argument("--allow-absolute", action="store_true",
                   help="follow parent locators that hold absolute paths (still confined)")
    if parent:
        p.add_argument("--parent", dest="chain_parent", metavar="PATH",
                       help="the leaf's parent, named explicitly instead of found through its "
                            "locators (its UUID must be the leaf's parent UUID)")


def _add_fs_aware(p: argparse.ArgumentParser, what: str) -> None:
    fs = p.add_mutually_exclusive_group()
    fs.add_argument("--fs-aware", dest="fs_aware", action="store_true", default=True,
                    help=f"{what} what the guest's filesystems mark free (default)")
    fs.add_argument("--no-fs-aware", dest="fs_aware", action="store_false",
                    help="keep every non-zero block, whatever the filesystems say")


def _add_force(p: argparse.ArgumentParser, what: str = "the output file") -> None:
    p.add_argument("-f", "--force", action="store_true",
                   help=f"overwrite {what} if it exists (default: refuse)")


def _refuse_existing(path: str, force: bool) -> None:
    if not force and os.path.lexists(path):
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it")


# ------------------------------------------------------------------ errors
_ERRNO_TEXT = {
    errno.ENOENT: "does not exist",
    errno.EEXIST: "already exists",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on the device",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EROFS: "the file system is read-only",
    errno.EBUSY: "is busy (a mount point or a device in use?)",
    errno.EIO: "input/output error (the disk may be failing)",
}
_ERRNO_RE = re.compile(r"\[Errno (\d+)\] ([^:\]]+?)(?:: '([^']*)')?(?=$|[;,)])")


def _errno_phrase(code: int | None, strerror: str | None) -> str:
    if code in _ERRNO_TEXT:
        return _ERRNO_TEXT[code]
    return (strerror or "failed").lower()


def error_message(exc: BaseException) -> str:
    """One sentence for ``exc``: the file named once, no raw errno tuple."""
    if isinstance(exc, OSError) and not isinstance(exc, VhdError):
        what = _errno_phrase(exc.errno, exc.strerror)
        if exc.filename is not None and exc.filename2 is not None:
            return f"{exc.filename} -> {exc.filename2}: {what}"
        if exc.filename is not None:
            name = str(exc.filename)
            for suffix in (".part", ".tmp"):
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
            parent = os.path.dirname(os.path.abspath(name))
            if exc.errno == errno.ENOENT and not os.path.isdir(parent):
                return f"cannot write {name}: the directory {parent} does not exist"
            return f"{name}: {what}"
        return str(exc.strerror or exc)
    text = str(exc) or type(exc).__name__

    def plain(m: re.Match[str]) -> str:
        phrase = _errno_phrase(int(m.group(1)), m.group(2))
        return f"{m.group(3)}: {phrase}" if m.group(3) else phrase
    text = _ERRNO_RE.sub(plain, text)
    # "x.vhd: x.vhd: ..." -> "x.vhd: ..."
    text = re.sub(r"^(\S+): \1: ", r"\1: ", text)
    text = re.sub(r"(\S+): (?:vhdcore: )?\1: ", r"\1: ", text)
    return text


def _debug_wanted(ns: argparse.Namespace | None) -> bool:
    return bool(getattr(ns, "debug", False)) or os.environ.get("VHDCORE_DEBUG", "") not in ("", "0")


def _report(exc: BaseException, ns: argparse.Namespace | None, prefix: str = "error: ") -> None:
    if _debug_wanted(ns):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"vhdcore: {prefix}{error_message(exc)}", file=sys.stderr)


# ------------------------------------------------------------------ progress
def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressDisplay:
    """Progress on stderr: a tqdm bar per stage on a terminal, plain lines
    (at most one per ``interval`` seconds, and one at each stage's start and
    end) otherwise; nothing when disabled.  A finished stage's bar is filled
    to 100% before it closes."""

    def __init__(self, enabled: bool = True, *, unit: str = "B", interval: float = 10.0,
                 stream: Any = None, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty() if tty is None else tty
        self.unit = unit
        self.interval = interval
        self.bar: Any = None
        self.label = ""
        self.total = 0
        self.done = 0
        self.t0 = 0.0
        self.last_line = 0.0
        self.shown = -1

    def _amount(self, n: float) -> str:
        return human_size(n) if self.unit == "B" else f"{int(n)} {self.unit}"

    def _line(self, rate: float | None, eta: float | None) -> None:
        if self.done == self.shown:
            return
        self.shown = self.done
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"vhdcore: {self.label}: {pct:5.1f}%",
                 f"{self._amount(self.done)} of {self._amount(self.total)}"]
        if rate:
            parts.append(f"{self._amount(rate)}/s" if self.unit == "B" else f"{rate:.0f} {self.unit}/s")
        if eta is not None:
            parts.append(f"ETA {_fmt_eta(eta)}")
        print(", ".join(parts), file=self.stream, flush=True)
        self.last_line = time.monotonic()

    def update(self, label: str, done: int, total: int, *, rate: float | None = None,
               eta: float | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if label != self.label:
            self.finish()
            self.label, self.total, self.done, self.t0 = label, max(0, total), 0, now
            self.shown = -1
            if self.tty:
                from tqdm import tqdm

                try:
                    width = os.get_terminal_size(self.stream.fileno()).columns
                except (OSError, ValueError, AttributeError):
                    width = 0
                # a terminal that reports no width (a bare pty) still gets a bar
                sizing: dict[str, Any] = {"dynamic_ncols": True} if width else {"ncols": 100,
                                                                                 "nrows": 24}
                self.bar = tqdm(total=max(1, self.total), desc=label, unit=self.unit,
                                unit_scale=self.unit == "B", unit_divisor=1024,
                                file=self.stream, leave=True, **sizing)
            else:
                self.done = done
                self._line(None, None)
        self.total = max(self.total, total)
        self.done = max(self.done, min(done, self.total) if self.total else done)
        if self.bar is not None:
            if self.bar.total != max(1, self.total):
                self.bar.total = max(1, self.total)
            self.bar.update(max(0, self.done - self.bar.n))
        elif not self.tty and now - self.last_line >= self.interval:
            if rate is None and now - self.t0 >= 1.0:
                rate = self.done / (now - self.t0)
            self._line(rate, eta)

    def finish(self, complete: bool = True) -> None:
        """End the current stage (filled to its total when ``complete``)."""
        if not self.label:
            return
        if complete:
            self.done = self.total
        if self.bar is not None:
            if complete:
                self.bar.update(max(0, max(1, self.total) - self.bar.n))
            self.bar.close()
            self.bar = None
        elif self.enabled and not self.tty and complete:
            el = time.monotonic() - self.t0
            self._line(self.done / el if el >= 1.0 else None, None)
        self.label = ""

    def pair(self, label: str) -> Callable[[int, int], None] | None:
        """A ``(done, total)`` callback for flatten, coalesce and compact."""
        if not self.enabled:
            return None

        def cb(done: int, total: int) -> None:
            self.update(label, done, total)
        return cb


def _job_progress(ns: argparse.Namespace,
                  display: ProgressDisplay) -> Callable[[Any], None] | None:
    """--json: one JSON event per line on stdout (schema: docs/cli.md); else
    the display (a bar on a terminal, plain lines otherwise)."""
    if getattr(ns, "json", False):
        def emit(ev: Any) -> None:
            sys.stdout.write(json.dumps({"event": "progress", **ev.to_json()}) + "\n")
            sys.stdout.flush()
        return emit
    if not display.enabled:
        return None

    def show(ev: Any) -> None:
        if ev.stage in ("queued",):
            return
        if ev.stage == "done":
            display.finish(complete=True)
            return
        if ev.stage == "failed":
            display.finish(complete=False)
            return
        display.update(f"{ev.stage} ({ev.percent}%)", ev.bytes_done, ev.bytes_total,
                       rate=ev.rate, eta=ev.eta)
    return show


def _display(ns: argparse.Namespace, unit: str = "B") -> ProgressDisplay:
    return ProgressDisplay(not getattr(ns, "quiet", False) and not getattr(ns, "json", False),
                           unit=unit)


# ------------------------------------------------------------------ info
_LOCATOR_PLATFORMS = {
    "W2ru": "Windows, relative path",
    "W2ku": "Windows, absolute path",
    "Wi2r": "Windows, relative (deprecated)",
    "Wi2k": "Windows, absolute (deprecated)",
    "MacX": "Mac OS X, file URL",
    "Mac ": "Mac OS alias",
}
_VHD_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_INFO_SIZES = ("file_size", "virtual_size", "original_size", "block_size", "allocated_bytes")


def vhd_time_iso(seconds: int) -> str:
    """A VHD time stamp (seconds since 2000-01-01 UTC) as ISO 8601 UTC."""
    return (_VHD_EPOCH + datetime.timedelta(seconds=int(seconds))).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_info(d: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``VhdFile.describe()`` as the ``--json`` document (time stamps ISO 8601
    UTC, raw values kept as ``*_vhd``; sizes exact bytes) and as the text
    lines of ``vhdcore info`` (human sizes with the exact bytes, one line per
    parent locator: platform code, meaning, path).  The one place both forms
    are made, so new fields show in both."""
    doc = dict(d)
    for key in ("timestamp", "parent_timestamp"):
        if isinstance(doc.get(key), int):
            doc[key + "_vhd"] = doc[key]
            doc[key] = vhd_time_iso(doc[key])
    lines: list[str] = []
    for k, v in doc.items():
        if k.endswith("_vhd"):
            continue
        label = k.replace("_", " ")
        if k == "parent_locators":
            if not v:
                lines.append(f"{'parent locators':20} none")
            for loc in v:
                if "error" in loc:
                    lines.append(f"{'parent locator':20} damaged: {loc['error']}")
                    continue
                meaning = _LOCATOR_PLATFORMS.get(loc.get("code", ""), "unknown platform")
                lines.append(f"{'parent locator':20} {loc.get('code')!s:4} ({meaning}): "
                             f"{loc.get('path')}")
        elif k in _INFO_SIZES and isinstance(v, int):
            lines.append(f"{label:20} {human_size(v)} ({v} bytes)")
        elif isinstance(v, bool):
            lines.append(f"{label:20} {'yes' if v else 'no'}")
        elif k == "geometry" and isinstance(v, list):
            lines.append(f"{label:20} {'/'.join(str(x) for x in v)} (cylinders/heads/sectors)")
        else:
            lines.append(f"{label:20} {v}")
    return doc, lines


@_subparser
def _p_info(sub: Any) -> None:
    s = _new(sub, "info", "show the footer, header and BAT facts of one VHD file",
             "Print what one VHD file says about itself: type, sizes, UUID, time stamps "
             "(ISO 8601, UTC), block table and, for a differencing disk, its parent and "
             "parent locators. The file is only read; its parents are not opened.",
             ["info disk.vhd", "info child.vhd --json"])
    s.add_argument("file", help="the VHD file")
    s.add_argument("--json", action="store_true",
                   help="print JSON (sizes as exact bytes, time stamps ISO 8601)")


@_command("info")
def _info(ns: argparse.Namespace) -> int:
    from .disk import VhdFile

    try:
        with VhdFile.open(ns.file) as vhd:
            doc, lines = format_info(vhd.describe())
    except VhdError as exc:
        return _info_damaged(ns, exc)
    if ns.json:
        _print_json(doc)
    else:
        print("\n".join(lines))
    return EXIT_OK


def _info_damaged(ns: argparse.Namespace, exc: VhdError) -> int:
    """``info`` on a file that does not open: every field that can be read,
    and which checksum failed (stored vs computed).  Exit code 1."""
    from .disk import inspect_damaged

    try:
        d = inspect_damaged(ns.file)
    except (OSError, VhdError):
        raise exc from None
    d = {"error": str(exc), **d}
    if ns.json:
        _print_json(d)
        raise exc
    print(f"{'error':20} {exc}")
    for k, v in d.items():
        if k in ("error", "checksum_failures"):
            continue
        if isinstance(v, dict):
            print(f"{k.replace('_', ' ')} at offset {v.get('offset')}:")
            for kk, vv in v.items():
                if kk != "offset":
                    print(f"  {kk.replace('_', ' '):20} {vv}")
        else:
            print(f"{k.replace('_', ' '):20} {v}")
    for bad in d["checksum_failures"]:
        print(f"BAD {bad}")
    # and the one-line error on standard error (exit 1), as for every command
    raise exc


# ------------------------------------------------------------------ check / chain
@_subparser
def _p_check(sub: Any) -> None:
    s = _new(sub, "check", "check a VHD file (or its whole chain) for damage",
             "Check the footer, header, block table and bitmaps of a VHD file; with "
             "--chain, also every parent and each link. Exit 1 and one line per problem "
             "(file, offset, block) when something is wrong.",
             ["check disk.vhd", "check leaf.vhd --chain --json"])
    s.add_argument("file", help="the VHD file")
    s.add_argument("--chain", action="store_true", help="also check every parent and each link")
    s.add_argument("--json", action="store_true", help="print JSON")
    _add_chain_options(s)


@_command("check")
def _check(ns: argparse.Namespace) -> int:
    from .check import check_chain, check_file

    if ns.chain:
        problems = check_chain(ns.file, **_chain_options(ns))
    else:
        problems = check_file(ns.file)
    errors = [p for p in problems if p.severity == "error"]
    if ns.json:
        _print_json({"ok": not errors, "problems": [p.to_json() for p in problems]})
    else:
        for p in problems:
            print(p)
        if not errors:
            print(f"{ns.file}: ok" + (" (whole chain)" if ns.chain else ""))
    return EXIT_OK if not errors else EXIT_ERROR


@_subparser
def _p_chain(sub: Any) -> None:
    s = _new(sub, "chain", "list the chain from leaf to base",
             "Resolve the parents of a differencing disk (confined to the leaf's directory "
             "unless --allow-dir) and list every disk from leaf to base with its sizes.",
             ["chain leaf.vhd", "chain leaf.vhd --allow-dir /srv/bases --json"])
    s.add_argument("leaf", help="the newest disk of the chain")
    s.add_argument("--json", action="store_true", help="print JSON")
    _add_chain_options(s)


@_command("chain")
def _chain(ns: argparse.Namespace) -> int:
    from .chain import Chain

    with Chain.open(ns.leaf, **_chain_options(ns)) as chain:
        rows: list[dict[str, Any]] = []
        for ly in chain.layers:
            rows.append({
                "path": ly.path, "type": ly.footer.type_name, "uuid": str(ly.uuid),
                "virtual_size": ly.virtual_size, "file_size": ly.file_size,
                "allocated_bytes": ly.allocated_bytes(),
            })
    if ns.json:
        _print_json({"leaf": ns.leaf, "depth": len(rows), "disks": rows})
        return EXIT_OK
    for i, r in enumerate(rows):
        print(f"{'leaf' if i == 0 else ('base' if i == len(rows) - 1 else 'parent'):6} "
              f"{r['path']}  {r['type']}  virtual {human_size(r['virtual_size'])}  "
              f"file {human_size(r['file_size'])}  allocated {human_size(r['allocated_bytes'])}")
    return EXIT_OK


# ------------------------------------------------------------------ create / snapshot
@_subparser
def _p_create(sub: Any) -> None:
    s = _new(sub, "create", "create an empty fixed or dynamic VHD",
             "Create an empty VHD. An existing file is refused unless --force.",
             ["create base.vhd --size 10G", "create disk.vhd --size 1.5T --block-size 512K",
              "create fixed.vhd --size 512M --type fixed"])
    s.add_argument("out", help="the new VHD file")
    s.add_argument("--size", required=True, type=_SIZE, metavar="SIZE",
                   help="virtual size, e.g. 10G, 512M or 1.5T")
    s.add_argument("--type", choices=("dynamic", "fixed"), default="dynamic")
    s.add_argument("--block-size", type=_power_of_two_size, metavar="SIZE",
                   help="block size of a dynamic disk (default 2M)")
    _add_force(s)


@_command("create")
def _create(ns: argparse.Namespace) -> int:
    from .disk import create_dynamic, create_fixed

    if ns.type == "fixed" and ns.block_size:
        raise UsageError("--block-size applies to dynamic disks only, not --type fixed")
    _refuse_existing(ns.out, ns.force)
    if ns.type == "fixed":
        create_fixed(ns.out, ns.size, exclusive=not ns.force).close()
    else:
        create_dynamic(ns.out, ns.size, block_size=ns.block_size or 2 * 1024 * 1024,
                       exclusive=not ns.force).close()
    print(f"created {ns.out}: {ns.type} {human_size(ns.size)}")
    return EXIT_OK


@_subparser
def _p_snapshot(sub: Any) -> None:
    s = _new(sub, "snapshot", "create a differencing disk over a parent",
             "Create a differencing disk whose parent is --parent (recorded with a relative "
             "locator). An existing file is refused unless --force.",
             ["snapshot child.vhd --parent base.vhd"])
    s.add_argument("child", help="the new differencing disk")
    s.add_argument("--parent", required=True, help="the disk it records changes against")
    _add_force(s)


@_command("snapshot")
def _snapshot(ns: argparse.Namespace) -> int:
    from .disk import create_differencing

    _refuse_existing(ns.child, ns.force)
    create_differencing(ns.child, ns.parent, exclusive=not ns.force).close()
    print(f"created {ns.child}: differencing disk over {ns.parent}")
    return EXIT_OK


# ------------------------------------------------------------------ cat / write
@_subparser
def _p_cat(sub: Any) -> None:
    s = _new(sub, "cat", "write the whole virtual disk through the chain as raw bytes",
             "Read the virtual disk through the chain and write it raw: to a sparse file "
             "with -o (refused if it exists, unless --force), or to standard output, which "
             "must not be a terminal.",
             ["cat leaf.vhd -o disk.raw", "cat leaf.vhd --stdout | sha256sum"])
    out = s.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", metavar="FILE", help="output file (sparse)")
    out.add_argument("--stdout", action="store_true",
                     help="write to standard output (the default without -o)")
    s.add_argument("leaf", help="the newest disk of the chain")
    _add_force(s)
    _add_chain_options(s)


@_command("cat")
def _cat(ns: argparse.Namespace) -> int:
    from .chain import Chain

    to_file = ns.output and ns.output != "-"
    if to_file:
        _refuse_existing(ns.output, ns.force)
    elif sys.stdout.isatty():
        raise UsageError("refusing to write a raw disk to a terminal; use -o FILE or "
                         "redirect standard output")
    with Chain.open(ns.leaf, **_chain_options(ns)) as chain:
        if to_file:
            chain.copy_to_raw(ns.output)
            return EXIT_OK
        out = sys.stdout.buffer
        for view in chain.iter_raw(8 * 1024 * 1024):
            out.write(view)
        out.flush()
    return EXIT_OK


@_subparser
def _p_write(sub: Any) -> None:
    s = _new(sub, "write", "write a file's bytes into a VHD at a virtual offset",
             "Write the bytes of a file (or standard input) into a VHD at a virtual byte "
             "offset, allocating blocks as needed. With --sparse, runs of zero sectors "
             "that already read as zero are not written, so unallocated blocks stay "
             "unallocated.",
             ["write child.vhd --offset 1M --from data.bin",
              "write disk.vhd --offset 0 --from disk.raw --sparse"])
    s.add_argument("file", help="the VHD to write into (the leaf of its chain)")
    s.add_argument("--offset", required=True, type=_OFFSET, metavar="OFFSET",
                   help="virtual byte offset (K/M/G suffixes)")
    s.add_argument("--from", dest="source", required=True, metavar="FILE",
                   help="source file, or - for standard input")
    s.add_argument("--sparse", action="store_true",
                   help="skip zero sectors where the disk already reads zero")
    _add_chain_options(s)


def _write_stream(chain: Any, src: Any, offset: int, sparse: bool) -> tuple[int, int]:
    """Copy ``src`` into the chain at ``offset``; with ``sparse``, leave out
    whole zero sectors where the disk already reads zero.  Returns (bytes
    consumed, bytes skipped)."""
    import numpy as np

    pos = offset
    skipped = 0
    chunk = 4 * 1024 * 1024
    try:
        st = os.fstat(src.fileno())
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
    except (OSError, AttributeError, ValueError):
        size = None
    if size is not None and offset + size > chain.virtual_size:
        # a regular file is checked before anything is written
        raise VhdError(f"{chain.leaf.path}: {size} bytes at offset {offset} do not fit in the "
                       f"virtual size of {chain.virtual_size} bytes; nothing was written")
    while True:
        buf = src.read(chunk)
        if not buf:
            break
        if pos + len(buf) > chain.virtual_size:
            raise VhdError(f"{chain.leaf.path}: the input runs past the virtual size of "
                           f"{chain.virtual_size} bytes; {pos - offset} bytes were written")
        if not sparse:
            chain.write(pos, buf)
            pos += len(buf)
            continue
        view = memoryview(buf)

        def put(lo: int, piece: memoryview, zero: bool) -> None:
            nonlocal skipped
            if zero:
                # zeros: write only where the disk does not already read zero
                cur = chain.read(lo, len(piece))
                if cur.count(0) == len(cur):
                    skipped += len(piece)
                    return
            chain.write(lo, piece)

        head = min(len(view), (-pos) % 512)
        if head:
            put(pos, view[:head], not any(view[:head]))
        body_len = (len(view) - head) // 512 * 512
        body = np.frombuffer(view[head:head + body_len], dtype=np.uint8).reshape(-1, 512)
        flags: Any = body.any(axis=1)
        nonzero: list[bool] = [bool(x) for x in flags] if len(body) else []
        i = 0
        base = pos + head
        while i < len(nonzero):
            j = i
            while j < len(nonzero) and nonzero[j] == nonzero[i]:
                j += 1
            put(base + i * 512, view[head + i * 512: head + j * 512], not nonzero[i])
            i = j
        tail = view[head + body_len:]
        if len(tail):
            put(base + body_len, tail, not any(tail))
        pos += len(view)
    return pos - offset, skipped


@_command("write")
def _write(ns: argparse.Namespace) -> int:
    from .chain import Chain

    src = sys.stdin.buffer if ns.source == "-" else open(ns.source, "rb")
    try:
        with Chain.open(ns.file, writable=True, **_chain_options(ns)) as chain:
            n, skipped = _write_stream(chain, src, ns.offset, ns.sparse)
            chain.leaf.flush()
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    extra = f" ({skipped} bytes of zeros skipped)" if ns.sparse else ""
    print(f"wrote {n - skipped} bytes at offset {ns.offset} into {ns.file}{extra}")
    return EXIT_OK


# ------------------------------------------------------------------ flatten / coalesce / compact / repair
@_subparser
def _p_flatten(sub: Any) -> None:
    s = _new(sub, "flatten", "write the chain as one standalone image (read once)",
             "Read the chain once and write its virtual disk as one standalone image: a "
             "sparse dynamic VHD without zero blocks (default), a fixed VHD or a raw file. "
             "Filesystem-aware by default, like image and estimate. The output is written "
             "to OUT.part and renamed when complete; an existing OUT is refused unless "
             "--force.",
             ["flatten leaf.vhd flat.vhd", "flatten leaf.vhd disk.raw --format raw --no-fs-aware"])
    s.add_argument("leaf", help="the newest disk of the chain")
    s.add_argument("out", help="the output file")
    s.add_argument("--format", choices=("vhd", "fixed", "raw"), default="vhd",
                   help="vhd: sparse dynamic VHD without zero blocks (default)")
    s.add_argument("--threads", type=_POSITIVE, default=2, metavar="N",
                   help="merge threads (default 2)")
    _add_fs_aware(s, "leave out")
    _add_force(s)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")
    _add_chain_options(s)


@_command("flatten")
def _flatten(ns: argparse.Namespace) -> int:
    from .coalesce import flatten

    display = _display(ns)
    try:
        res = flatten(ns.leaf, ns.out, ns.format, threads=ns.threads,
                      progress=display.pair("flatten"), chain_options=_chain_options(ns),
                      fs_aware=ns.fs_aware, overwrite=ns.force)
    except BaseException:
        display.finish(complete=False)
        raise
    display.finish()
    print(f"flattened {ns.leaf} -> {res.path} ({res.format}): {res.blocks_stored} blocks, "
          f"{human_size(res.sectors_stored * 512)} of data, {human_size(res.bytes_written)} written")
    return EXIT_OK


@_subparser
def _p_coalesce(sub: Any) -> None:
    s = _new(sub, "coalesce", "merge a differencing disk into its parent, in place",
             "Merge a differencing disk into its parent, in place, with checkpoints: after "
             "a crash, a --timeout or Ctrl-C, the same command continues where it stopped. "
             "Refuses when the parent has other children.",
             ["coalesce child.vhd", "coalesce child.vhd --relink grandchild.vhd --timeout 300"])
    s.add_argument("child", help="the differencing disk to merge into its parent")
    s.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                   help="stop with a checkpoint after this long (exit 4; run again to resume)")
    s.add_argument("--relink", nargs="+", metavar="GRANDCHILD",
                   help="the child's own children, re-pointed to the parent afterwards")
    s.add_argument("--sibling", action="append", metavar="VHD",
                   help="another disk to treat as a child of the parent (refuses if it is)")
    s.add_argument("--checkpoint-dir", metavar="DIR",
                   help="where the checkpoint lives (default: beside the child)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")
    _add_chain_options(s)


@_command("coalesce")
def _coalesce(ns: argparse.Namespace) -> int:
    from .coalesce import coalesce

    display = _display(ns, unit="blocks")
    try:
        res = coalesce(ns.child, relink_children=ns.relink or (), siblings=ns.sibling or (),
                       timeout=ns.timeout, checkpoint_dir=ns.checkpoint_dir,
                       progress=display.pair("coalesce"), chain_options=_chain_options(ns))
    except BaseException:
        display.finish(complete=False)
        raise
    display.finish()
    print(f"coalesced {res.child} into {res.parent}: {res.blocks_merged} blocks, "
          f"{human_size(res.sectors_written * 512)} written, "
          f"{human_size(res.sectors_skipped_equal * 512)} already equal"
          + (", parent grown" if res.grown else "") + (", resumed" if res.resumed else "")
          + (f"; relinked its children {', '.join(res.relinked)} to the parent"
             if res.relinked else "")
          + f" in {res.seconds:.2f} s. {res.child} can now be removed.")
    return EXIT_OK


@_subparser
def _p_compact(sub: Any) -> None:
    s = _new(sub, "compact", "rewrite one VHD without its empty blocks",
             "Rewrite one VHD without the blocks that hold nothing (a differencing disk "
             "stays differencing over the same parent). Lossless: no filesystem awareness. "
             "An existing OUT is refused unless --force.",
             ["compact old.vhd new.vhd"])
    s.add_argument("input", help="the VHD to rewrite (only read)")
    s.add_argument("out", help="the output file")
    _add_force(s)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")
    _add_chain_options(s)


@_command("compact")
def _compact(ns: argparse.Namespace) -> int:
    from .coalesce import compact

    display = _display(ns, unit="blocks")
    try:
        res = compact(ns.input, ns.out, progress=display.pair("compact"), overwrite=ns.force,
                      chain_options=_chain_options(ns))
    except BaseException:
        display.finish(complete=False)
        raise
    display.finish()
    print(f"compacted {ns.input} -> {res.path}: {res.blocks_stored} blocks kept, "
          f"{human_size(os.path.getsize(res.path))}")
    return EXIT_OK


@_subparser
def _p_relink(sub: Any) -> None:
    s = _new(sub, "relink", "re-point a differencing disk at a new parent, checked first",
             "Rewrite DISK's parent locators, parent UUID, time stamp and name to name NEW, "
             "only if NEW is the disk DISK was made against: NEW's UUID is DISK's parent UUID, "
             "or NEW's virtual disk reads byte for byte like DISK's current parent (which must "
             "still be found, e.g. after a coalesce). Nothing is written otherwise (exit 1).",
             ["relink child.vhd --parent moved/base.vhd",
              "relink grandchild.vhd --parent base.vhd --allow-dir /srv/disks"])
    s.add_argument("disk", help="the differencing disk to re-point")
    s.add_argument("--parent", required=True, metavar="NEW", help="the new parent")
    _add_chain_options(s, parent=False)


@_command("relink")
def _relink(ns: argparse.Namespace) -> int:
    from .coalesce import relink

    opts = _chain_options(ns)
    res = relink(ns.disk, ns.parent, allowed_dirs=opts.get("allowed_dirs"),
                 allow_absolute=bool(opts.get("allow_absolute")))
    why = ("same UUID" if res.reason == "uuid"
           else "same content as its current parent, compared byte for byte")
    if res.written:
        print(f"relinked {res.disk} -> {res.parent} ({why})")
    else:
        print(f"{res.disk} already names {res.parent} ({why}); nothing written")
    return EXIT_OK
@_subparser
def _p_repair(sub: Any) -> None:
    s = _new(sub, "repair", "restore a damaged primary footer from the copy at offset 0",
             "Restore a damaged primary footer (at the end of the file) from the copy at "
             "offset 0 of a dynamic or differencing disk; writes nothing when it is fine.",
             ["repair torn.vhd"])
    s.add_argument("file", help="the VHD file")


@_command("repair")
def _repair(ns: argparse.Namespace) -> int:
    from .coalesce import repair

    if repair(ns.file):
        print(f"{ns.file}: primary footer restored from the copy at offset 0")
    else:
        print(f"{ns.file}: primary footer is fine; nothing written")
    return EXIT_OK


# ------------------------------------------------------------------ image / restore
def _image_exit(exc: BaseException) -> int:
    from .errors import JobStateError, StoreAuthError, StoreError, StoreNotFoundError

    if isinstance(exc, VhdTimeoutError):
        return EXIT_TIMEOUT
    if isinstance(exc, (StoreAuthError, StoreNotFoundError, OutputExistsError, JobStateError)):
        return EXIT_ERROR
    if isinstance(exc, (StoreError, OSError)):
        return EXIT_FAILED
    return EXIT_ERROR


@_subparser
def _p_image(sub: Any) -> None:
    s = _new(sub, "image", "image a chain to a target: coalesce, compress, upload",
             "Image a VHD chain to a directory, Swift or S3: coalesce it (25%), compress and "
             "upload it in segments (50%), write the manifest (100%). The target is checked "
             "first (a missing file:// directory is created with its parents, like mkdir -p; "
             "a missing Swift container and its segment container are created); a job that "
             "cannot start leaves no state. An image already stored at the URL is refused "
             "unless --replace. A job stopped by --timeout, Ctrl-C or a failing target keeps "
             "its state: run the same command with --resume.",
             ["image leaf.vhd --to swift://images/web01",
              "image leaf.vhd --to file:///srv/images/web01 --json",
              "image leaf.vhd --to s3://bucket/web01.vhd --timeout 600",
              "image leaf.vhd --to swift://images/web01 --resume"])
    s.add_argument("leaf", help="the newest disk of the chain")
    s.add_argument("--to", metavar="URL",
                   help="file:///dir/name, swift://container/name or s3://bucket/key")
    _repo_image_options(s)
    s.add_argument("--timeout", type=_seconds, metavar="S",
                   help="stop after S seconds with a resumable state (exit 4)")
    s.add_argument("--coalesce-timeout", type=_seconds, metavar="S",
                   help="stop if the coalescing stage takes longer than S seconds (exit 4)")
    job = s.add_mutually_exclusive_group()
    job.add_argument("--resume", action="store_true", help="continue an interrupted job")
    job.add_argument("--restart", action="store_true", help="discard an interrupted job's state")
    s.add_argument("--replace", action="store_true",
                   help="replace an image already stored at the URL (default: refuse)")
    s.add_argument("--state-dir", metavar="DIR",
                   help="where the job state lives (default: beside a file:// output, else "
                        "$XDG_STATE_HOME/vhdcore/jobs)")
    s.add_argument("--threads", type=_POSITIVE, default=2, metavar="N",
                   help="merge and compression threads (default 2)")
    s.add_argument("--concurrency", type=_POSITIVE, default=4, metavar="N",
                   help="parallel segment uploads (default 4)")
    s.add_argument("--segment-size", type=_SIZE, metavar="SIZE",
                   help="segment size, e.g. 64M (default: from the image size and the "
                        "target's limits)")
    _add_fs_aware(s, "leave out")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="one JSON event per line on standard output (schema version 1)")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")
    _add_chain_options(s)


@_command("image")
def _image(ns: argparse.Namespace) -> int:
    from .imaging import EVENT_VERSION, create_image, job_state_path

    if _repo_mode(ns):
        from .repo.cli import run_image

        ns._chain_options = _chain_options(ns)
        return run_image(ns, _job_progress(ns, _display(ns)))
    if not ns.to:
        raise UsageError("image needs --to URL (or --repo URL --name NAME)")
    _check_url(ns.to)
    display = _display(ns)
    try:
        res = create_image(
            ns.leaf, ns.to, threads=ns.threads, concurrency=ns.concurrency,
            segment_size=ns.segment_size, timeout=ns.timeout,
            coalesce_timeout=ns.coalesce_timeout, resume=ns.resume, restart=ns.restart,
            state_dir=ns.state_dir, progress=_job_progress(ns, display),
            fs_aware=ns.fs_aware, chain_options=_chain_options(ns), replace=ns.replace)
    except (VhdError, OSError) as exc:
        display.finish(complete=False)
        code = _image_exit(exc)
        spath = job_state_path(ns.to, ns.state_dir)
        resumable = code in (EXIT_FAILED, EXIT_TIMEOUT) and os.path.exists(spath)
        if ns.json:
            print(json.dumps({"event": "error", "version": EVENT_VERSION, "exit_code": code,
                              "error": type(exc).__name__, "message": error_message(exc),
                              "resumable": resumable}))
        _report(exc, ns, prefix="" if code == EXIT_TIMEOUT else "error: ")
        if code == EXIT_FAILED and resumable:
            print(f"vhdcore: the job state was kept in {spath}; run the same command with "
                  "--resume to continue once the target works again", file=sys.stderr)
        elif code == EXIT_FAILED:
            print("vhdcore: nothing was stored and no job state was kept; fix the problem and "
                  "run the same command again", file=sys.stderr)
        return code
    display.finish()
    if ns.json:
        from dataclasses import asdict

        print(json.dumps({"event": "result", "version": EVENT_VERSION, **asdict(res)}))
    else:
        print(f"image stored at {res.url}: {human_size(res.virtual_size)} virtual, "
              f"{res.blocks_stored} blocks, {human_size(res.stream_size)} stream -> "
              f"{human_size(res.compressed_size)} in {res.segments} segments "
              f"({res.segments_skipped} already there) in {res.seconds:.1f} s")
    return EXIT_OK


@_subparser
def _p_restore(sub: Any) -> None:
    s = _new(sub, "restore", "download an image, verify it, write a VHD or raw file",
             "Download a stored image, check every segment's MD5 and the stream's SHA-256, "
             "and write it as a VHD (default) or a raw file. The output appears only when "
             "everything matched; an existing OUT is refused unless --force.",
             ["restore swift://images/web01 web01.vhd",
              "restore file:///srv/images/web01 disk.raw --format raw"])
    s.add_argument("url", metavar="URL",
                   help="the stored image; with --repo: NAME[@ID] (newest without @ID)")
    s.add_argument("out", help="the output file")
    _repo_option(s)
    s.add_argument("--format", choices=("vhd", "raw"), default="vhd")
    s.add_argument("--concurrency", type=_POSITIVE, default=4, metavar="N",
                   help="parallel segment downloads (default 4)")
    _add_force(s)
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the result as JSON")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")


@_command("restore")
def _restore(ns: argparse.Namespace) -> int:
    from .store import restore

    if _repo_mode(ns):
        from .repo.cli import run_restore

        return run_restore(ns)
    _check_url(ns.url)
    _refuse_existing(ns.out, ns.force)
    display = _display(ns)
    try:
        man = restore(ns.url, ns.out, format=ns.format, concurrency=ns.concurrency,
                      overwrite=ns.force, progress=display.pair("restore"))
    except (VhdError, OSError) as exc:
        display.finish(complete=False)
        code = _image_exit(exc)
        _report(exc, ns)
        return code
    display.finish()
    if ns.json:
        print(json.dumps({"event": "result", "out": ns.out, "format": ns.format,
                          "segments": len(man.segments), "metadata": dict(man.metadata)}))
    else:
        print(f"restored {ns.url} -> {ns.out} ({ns.format}), sha256 verified")
    return EXIT_OK


# ------------------------------------------------------------------ ls / rm / verify
def _check_url(url: str | None, prefix: bool = False) -> str:
    """A single-object store URL (or, with ``prefix``, a listing prefix),
    else a usage error that lists the supported forms."""
    if url is None:
        raise UsageError("give a URL, or --repo URL for a repository")
    try:
        return (_store_prefix if prefix else _store_url)(url)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(str(exc)) from None


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@_subparser
def _p_ls(sub: Any) -> None:
    s = _new(sub, "ls", "list the images under a directory, container or bucket",
             "List the images stored under a URL (a directory, Swift container or S3 "
             "bucket, optionally with a name prefix): size stored, virtual size, date "
             "(UTC) and whether each is complete or an interrupted upload.",
             ["ls swift://images", "ls swift://images/web --json", "ls file:///srv/images/"])
    s.add_argument("url", nargs="?", metavar="URL",
                   help="file:///dir/, swift://container[/prefix] or s3://bucket[/prefix]; "
                        "with --repo: only the images of this NAME")
    _repo_option(s)
    s.add_argument("--json", action="store_true", help="print JSON (sizes in exact bytes)")


@_command("ls")
def _ls(ns: argparse.Namespace) -> int:
    from .store import list_images

    if _repo_mode(ns):
        from .repo.cli import run_ls

        return run_ls(ns)
    entries = list_images(_check_url(ns.url, prefix=True))
    if ns.json:
        _print_json([{"name": e.name, "url": e.url, "size": e.size,
                      "virtual_size": e.virtual_size, "segments": e.segments,
                      "modified": _iso(e.modified), "complete": e.complete} for e in entries])
        return EXIT_OK
    if not entries:
        print(f"no images under {ns.url}", file=sys.stderr)
        return EXIT_OK
    width = max(len(e.name) for e in entries)
    print(f"{'NAME':{width}}  {'STORED':>10}  {'VIRTUAL':>10}  {'MODIFIED (UTC)':20}  STATE")
    for e in entries:
        print(f"{e.name:{width}}  {human_size(e.size):>10}  "
              f"{human_size(e.virtual_size) if e.virtual_size is not None else '-':>10}  "
              f"{_iso(e.modified) or '-':20}  {'complete' if e.complete else 'incomplete'}")
    return EXIT_OK


@_subparser
def _p_rm(sub: Any) -> None:
    s = _new(sub, "rm", "remove a stored image and all its segments",
             "Remove a stored image: its manifest and every segment. An incomplete image "
             "(an interrupted or running upload) is refused unless --force.",
             ["rm swift://images/web01", "rm file:///srv/images/web01 --force"])
    s.add_argument("url", type=_store_url, metavar="URL", help="the stored image")
    s.add_argument("-f", "--force", action="store_true",
                   help="also remove an incomplete image (default: refuse)")


@_command("rm")
def _rm(ns: argparse.Namespace) -> int:
    from .errors import StoreNotFoundError
    from .store import open_store

    with open_store(ns.url) as store:
        try:
            man = store.get_manifest()
            count, complete = len(man.segments), True
        except StoreNotFoundError:
            segs = store.list_segments()
            if not segs:
                raise StoreNotFoundError(f"{ns.url}: no image there (nothing to remove)") from None
            if not ns.force:
                raise VhdError(f"{ns.url} is an incomplete image ({len(segs)} segments, no "
                               "manifest): an interrupted upload that --resume can finish, or "
                               "one still running; pass --force to remove it anyway")
            count, complete = len(segs), False
        store.delete()
    print(f"removed {ns.url}: {'image' if complete else 'incomplete image'}, {count} segments")
    return EXIT_OK


@_subparser
def _p_verify(sub: Any) -> None:
    s = _new(sub, "verify", "read every segment of a stored image and check its digests",
             "Download every segment of a stored image and check it as restore does (each "
             "segment's MD5, the lz4 frames, the stream's size and SHA-256) without writing "
             "a file. Exit 1 when anything does not match.",
             ["verify swift://images/web01", "verify s3://bucket/web01.vhd --json"])
    s.add_argument("url", nargs="?", metavar="URL",
                   help="the stored image; with --repo: NAME[@ID] (default: every image)")
    _repo_option(s)
    s.add_argument("--read-data", action="store_true",
                   help="with --repo: read and re-hash every chunk (or --subset of them)")
    s.add_argument("--subset", metavar="N/T", help="with --repo --read-data: check the N-th "
                   "of T slices of the chunks (by ID)")
    s.add_argument("--concurrency", type=_POSITIVE, default=4, metavar="N",
                   help="parallel segment downloads (default 4)")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the result as JSON")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")


@_command("verify")
def _verify(ns: argparse.Namespace) -> int:
    from .store import verify

    if _repo_mode(ns):
        from .repo.cli import run_verify

        return run_verify(ns)
    _check_url(ns.url)
    display = _display(ns)
    try:
        man = verify(ns.url, concurrency=ns.concurrency, progress=display.pair("verify"))
    except (VhdError, OSError) as exc:
        display.finish(complete=False)
        code = _image_exit(exc)
        if ns.json:
            print(json.dumps({"ok": False, "url": ns.url, "error": type(exc).__name__,
                              "message": error_message(exc)}))
        _report(exc, ns)
        return code
    display.finish()
    if ns.json:
        print(json.dumps({"ok": True, "url": ns.url, "segments": len(man.segments),
                          "stored_bytes": man.compressed_size, "stream_bytes": man.stream_size,
                          "sha256": man.sha256}))
    else:
        print(f"{ns.url}: ok, {len(man.segments)} segments, {human_size(man.compressed_size)} "
              f"stored, {human_size(man.stream_size or 0)} stream, sha256 verified")
    return EXIT_OK


# ------------------------------------------------------------------ estimate / demo / fsmap / bench
@_subparser
def _p_estimate(sub: Any) -> None:
    s = _new(sub, "estimate", "what imaging this chain will cost, before running it",
             "Scan the chain once and predict what image stores with the same options "
             "(filesystem-aware by default, like image): the bytes after coalescing and "
             "zero elision (exact), the compressed size (sampled) and the time.",
             ["estimate leaf.vhd", "estimate leaf.vhd --upload-rate 100M --json",
              "estimate leaf.vhd --no-fs-aware"])
    s.add_argument("leaf", help="the newest disk of the chain")
    s.add_argument("--threads", type=_POSITIVE, default=2, metavar="N",
                   help="merge threads (default 2)")
    s.add_argument("--upload-rate", type=_SIZE, metavar="SIZE",
                   help="bytes per second the target accepts (e.g. 100M); default: unlimited")
    _add_fs_aware(s, "like image, leave out")
    s.add_argument("--json", action="store_true", help="print JSON")
    _add_chain_options(s)


@_command("estimate")
def _estimate(ns: argparse.Namespace) -> int:
    from .estimate import estimate

    est = estimate(ns.leaf, threads=ns.threads, fs_aware=ns.fs_aware,
                   upload_rate=ns.upload_rate, chain_options=_chain_options(ns))
    if ns.json:
        _print_json(est)
        return EXIT_OK
    for ly in est["layers"]:
        print(f"  {ly['type']:13} {ly['path']}: file {human_size(ly['file_size'])}, "
              f"allocated {human_size(ly['allocated_bytes'])}")
    print(f"virtual size            {human_size(est['virtual_size'])}")
    print(f"VHD files               {human_size(est['vhd_bytes'])} in {est['depth']} disks")
    print(f"after coalescing        {human_size(est['data_bytes'])} of data in "
          f"{est['blocks_stored']} blocks ({human_size(est['stream_bytes'])} image stream)")
    print(f"expected compressed     {human_size(est['expected_compressed_bytes'])} "
          f"(ratio {est['compression_ratio']}, from {est['sample_blocks']} sampled blocks)")
    for p in est.get("filesystems", {}).get("partitions", []):
        print(f"  partition {p.get('index')}: {p.get('fs') or 'unknown'} {p.get('state')}, "
              f"used {human_size(p.get('used_bytes') or 0)}, free "
              f"{human_size(p.get('free_bytes') or 0)}")
    wo = est.get("without_fs_aware")
    if wo:
        print(f"without --fs-aware      {human_size(wo['data_bytes'])} of data in "
              f"{wo['blocks_stored']} blocks, expected compressed "
              f"{human_size(wo['expected_compressed_bytes'])}")
    print(f"time, 2 minutes per GB  {est['rule_of_thumb_seconds']:.0f} s")
    print(f"time, vhdcore predicted {est['predicted_seconds']:.1f} s (measured on this machine)")
    return EXIT_OK


@_subparser
def _p_demo(sub: Any) -> None:
    s = _new(sub, "demo", "image, restore and check a built-in demo chain (no server)",
             "Build a synthetic chain of three VHDs, image it to a local directory, restore "
             "it and check that the restored disk reads exactly like the chain.",
             ["demo", "demo --size 1G --workdir demo-files --json"])
    s.add_argument("--size", default=384 * 1024 * 1024, type=_size_at_least(1024 * 1024),
                   metavar="SIZE", help="virtual size of the demo disk (default 384M)")
    s.add_argument("--workdir", help="keep the files here instead of a temporary directory")
    s.add_argument("--keep", action="store_true", help="do not delete the temporary directory")
    s.add_argument("--json", action="store_true", help="JSON events on standard output")


@_command("demo")
def _demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo

    from .imaging import EVENT_VERSION

    say = (lambda msg: print(json.dumps({"event": "info", "version": EVENT_VERSION,
                                         "message": msg}))) if ns.json else print
    display = _display(ns)
    figures = run_demo(ns.workdir, size=ns.size, progress=_job_progress(ns, display),
                       say=say, keep=ns.keep)
    display.finish()
    if ns.json:
        print(json.dumps({"event": "result", "version": EVENT_VERSION, **figures}))
    return EXIT_OK


@_subparser
def _p_fsmap(sub: Any) -> None:
    s = _new(sub, "fsmap", "show the disk's partitions, filesystems and their free space",
             "Read the partition table and filesystems of the virtual disk through the chain "
             "and show each one's state and free space: what a filesystem-aware image, "
             "flatten or estimate leaves out.",
             ["fsmap leaf.vhd", "fsmap leaf.vhd --json --ranges"])
    s.add_argument("leaf", help="the newest disk of the chain")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--ranges", action="store_true", help="with --json: list the free ranges")
    _add_chain_options(s)


@_command("fsmap")
def _fsmap(ns: argparse.Namespace) -> int:
    from .chain import Chain
    from .fsmap import map_disk

    if ns.ranges and not ns.json:
        raise UsageError("--ranges needs --json")
    with Chain.open(ns.leaf, **_chain_options(ns)) as chain:
        dmap = map_disk(chain.read, chain.virtual_size)
        vsize = chain.virtual_size
    if ns.json:
        _print_json(dmap.to_json(include_ranges=ns.ranges))
        return EXIT_OK
    print(f"{ns.leaf}: {human_size(vsize)}, partition table: {dmap.table}")
    for p in dmap.partitions:
        print(f"  {p.index:2} {p.table:4} {human_size(p.start):>10} +{human_size(p.length):>10}  "
              f"{p.fs or p.type_hint or 'unknown':8} {p.state:16} used {human_size(p.used_bytes)}"
              f", free {human_size(p.free_bytes)}" + (f"  ({p.reason})" if p.reason else ""))
        for w in p.warnings:
            print(f"       warning: {w}")
    for w in dmap.warnings:
        print(f"  warning: {w}")
    print(f"skippable: {human_size(dmap.free_bytes)} of {human_size(vsize)}")
    return EXIT_OK


@_subparser
def _p_bench(sub: Any) -> None:
    s = _new(sub, "bench", "measure throughput against this machine's limits (PASS/MISS)",
             "Generate chains in a temporary directory and measure the kernel, flatten, "
             "coalesce, lz4, upload and imaging against the memory copy bandwidth, qemu-img, "
             "the pure-Python twin and the slowest pipeline stage. Exit code 0 even when a "
             "target is missed (it is a report) unless --strict.",
             ["bench --quick", "bench --json --strict"])
    s.add_argument("--quick", action="store_true",
                   help="smaller workload (96M) and 5 repetitions: under two minutes")
    s.add_argument("--size", type=_size_at_least(1024 * 1024), metavar="SIZE",
                   help="virtual size of the workloads (default 256M, quick 96M)")
    s.add_argument("--reps", type=_POSITIVE, metavar="N",
                   help="repetitions per figure, median reported (default 7, quick 5)")
    s.add_argument("--memory-size", type=_size_at_least(1024 * 1024), metavar="SIZE",
                   help="virtual size of the sparse chain of the memory check (default 8G)")
    s.add_argument("--no-memory", action="store_true", help="skip the memory check")
    s.add_argument("--workdir", help="make the temporary directory here")
    s.add_argument("--json", action="store_true", help="print every figure as JSON")
    s.add_argument("--strict", action="store_true", help="exit 1 when any target is missed")


@_command("bench")
def _bench(ns: argparse.Namespace) -> int:
    from . import bench

    report = bench.run_bench(size=ns.size, quick=ns.quick, reps=ns.reps,
                             memory_size=ns.memory_size, memory=not ns.no_memory,
                             workdir=ns.workdir, say=lambda msg: print(msg, file=sys.stderr))
    if ns.json:
        _print_json(report)
    else:
        print(bench.format_report(report))
    return EXIT_ERROR if ns.strict and report["summary"]["miss"] else EXIT_OK


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The ``vhdcore`` argument parser with every subcommand (the CLI reference
    in the documentation is generated from it)."""
    p = _Parser(
        prog="vhdcore",
        description="Read, check, coalesce, flatten and image Microsoft VHD chains.",
        epilog="Sizes accept K/M/G/T suffixes (binary: 10G, 512K, 1.5T). Every command that "
               "writes a file refuses an existing one unless --force; image refuses an "
               "existing stored image unless --replace. New files honour the umask (job "
               "state and checkpoints stay private). Exit codes: 0 ok, 1 bad input or "
               "problems found, 2 usage, 3 job failed (resumable when it says so), 4 timed "
               "out or interrupted (resumable). --debug or VHDCORE_DEBUG=1 prints the "
               "traceback of an error.",
    )
    p.add_argument("--version", action="version", version=f"vhdcore {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an error (also VHDCORE_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _SUBPARSERS:
        add(sub)
    for extra in _EXTRA_PARSERS:
        extra(sub)
    return p


#: functions that add subcommands defined in other modules (kept for
#: compatibility; new subcommands in this file use @_subparser)
_EXTRA_PARSERS: list[Callable[[Any], None]] = []


# ------------------------------------------------------------------ repository (vhdcore.repo)
def _repo_mode(ns: argparse.Namespace) -> bool:
    """``--repo`` given, or ``$VHDCORE_REPO`` set and no single-object target
    (``image`` without ``--to``; ``restore`` of a NAME rather than a URL)."""
    if getattr(ns, "repo", None):
        return True
    if not os.environ.get("VHDCORE_REPO"):
        return False
    if ns.command == "image":
        return not ns.to
    if ns.command == "restore":
        return "://" not in ns.url
    if ns.command in ("ls", "verify"):
        return ns.url is None or "://" not in ns.url
    return False


def _repo_option(s: argparse.ArgumentParser) -> None:
    from .repo.cli import add_repo_option

    add_repo_option(s)


def _repo_image_options(s: argparse.ArgumentParser) -> None:
    from .repo.cli import add_image_options

    add_image_options(s)


def _register_repo(sub: Any) -> None:
    from .repo import cli as rc

    rc.add_repo_parser(sub)
    for add in (rc.add_export_parser, rc.add_forget_parser, rc.add_gc_parser):
        add(sub)


_EXTRA_PARSERS.append(_register_repo)


@_command("repo")
def _repo(ns: argparse.Namespace) -> int:
    from .repo.cli import run_repo

    return run_repo(ns)


@_command("export")
def _export(ns: argparse.Namespace) -> int:
    from .repo.cli import run_export

    return run_export(ns)


@_command("forget")
def _forget(ns: argparse.Namespace) -> int:
    from .repo.cli import run_forget

    return run_forget(ns)


@_command("gc")
def _gc(ns: argparse.Namespace) -> int:
    from .repo.cli import run_gc

    return run_gc(ns)
def _add_fleet_parsers(sub: Any) -> None:
    """``worker``, ``submit``, ``jobs``, ``cancel``: the fleet (vhdcore[fleet]);
    the handlers import Celery and redis-py only when they run."""
    from .fleet.cli import add_parsers

    add_parsers(sub, _COMMANDS)


_EXTRA_PARSERS.append(_add_fleet_parsers)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and
    return the exit code (see this module's docstring)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return _COMMANDS[ns.command](ns)
    except UsageError as exc:
        print(f"vhdcore {ns.command}: error: {exc} (see 'vhdcore {ns.command} --help')",
              file=sys.stderr)
        return EXIT_USAGE
    except VhdTimeoutError as exc:
        _report(exc, ns, prefix="")
        return EXIT_TIMEOUT
    except VhdError as exc:
        _report(exc, ns)
        return EXIT_ERROR
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except KeyboardInterrupt:
        print("vhdcore: interrupted", file=sys.stderr)
        return EXIT_TIMEOUT
    except OSError as exc:
        _report(exc, ns)
        return EXIT_ERROR
