"""Option types and option groups that several subcommands share (the chain
options, --fs-aware, --force, store URLs) and what they turn into."""
from __future__ import annotations

import argparse
import os
from typing import Any

from .._args import int_at_least as _int_at_least
from .._args import size_at_least as _size_at_least
from ..errors import OutputExistsError, VhdError
from ._common import UsageError


def power_of_two_size(text: str) -> int:
    value = _size_at_least(512)(text)
    if value & (value - 1) or value % 512:
        raise argparse.ArgumentTypeError(
            f"must be a power of two of at least 512 bytes (512K, 2M...), got {text!r}")
    return value


def store_url(text: str) -> str:
    from ..store import parse_url

    try:
        parse_url(text)
    except VhdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def store_prefix(text: str) -> str:
    from ..store import parse_url

    try:
        parse_url(text, prefix=True)
    except VhdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


POSITIVE = _int_at_least(1)
SIZE = _size_at_least(1)
OFFSET = _size_at_least(0)


def chain_options(ns: argparse.Namespace) -> dict[str, Any]:
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


def add_chain_options(p: argparse.ArgumentParser, parent: bool = True) -> None:
    p.add_argument("--allow-dir", action="append", metavar="DIR",
                   help="a directory parents may live in besides the leaf's own (repeatable)")
    p.add_argument("--max-depth", type=POSITIVE, metavar="N",
                   help="the most disks a chain may have (default 256)")
    p.add_argument("--allow-absolute", action="store_true",
                   help="follow parent locators that hold absolute paths (still confined)")
    if parent:
        p.add_argument("--parent", dest="chain_parent", metavar="PATH",
                       help="the leaf's parent, named explicitly instead of found through its "
                            "locators (its UUID must be the leaf's parent UUID)")


def add_fs_aware(p: argparse.ArgumentParser, what: str) -> None:
    fs = p.add_mutually_exclusive_group()
    fs.add_argument("--fs-aware", dest="fs_aware", action="store_true", default=True,
                    help=f"{what} what the guest's filesystems mark free (default)")
    fs.add_argument("--no-fs-aware", dest="fs_aware", action="store_false",
                    help="keep every non-zero block, whatever the filesystems say")


def add_force(p: argparse.ArgumentParser, what: str = "the output file") -> None:
    p.add_argument("-f", "--force", action="store_true",
                   help=f"overwrite {what} if it exists (default: refuse)")


def refuse_existing(path: str, force: bool) -> None:
    if not force and os.path.lexists(path):
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it")


def check_url(url: str | None, prefix: bool = False) -> str:
    """A single-object store URL (or, with ``prefix``, a listing prefix),
    else a usage error that lists the supported forms."""
    if url is None:
        raise UsageError("give a URL, or --repo URL for a repository")
    try:
        return (store_prefix if prefix else store_url)(url)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(str(exc)) from None


