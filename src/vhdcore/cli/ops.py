"""Subcommands that rewrite disks: ``flatten``, ``coalesce``, ``compact``,
``relink`` and ``repair``."""
from __future__ import annotations

import argparse
import os
from typing import Any

from .._args import new_subcommand as _new
from .._args import seconds as _seconds
from .._util import human_size
from ._common import EXIT_OK, Commands
from ._options import POSITIVE, add_chain_options, add_force, add_fs_aware, chain_options
from .progress import display_for, shown

COMMANDS = Commands()


# ------------------------------------------------------------------ flatten / coalesce / compact / repair
@COMMANDS.parser
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
    s.add_argument("--threads", type=POSITIVE, default=2, metavar="N",
                   help="merge threads (default 2)")
    add_fs_aware(s, "leave out")
    add_force(s)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")
    add_chain_options(s)


@COMMANDS.handler("flatten")
def _flatten(ns: argparse.Namespace) -> int:
    from ..ops.flatten import flatten

    with shown(display_for(ns)) as display:
        res = flatten(ns.leaf, ns.out, ns.format, threads=ns.threads,
                      progress=display.pair("flatten"), chain_options=chain_options(ns),
                      fs_aware=ns.fs_aware, overwrite=ns.force)
    print(f"flattened {ns.leaf} -> {res.path} ({res.format}): {res.blocks_stored} blocks, "
          f"{human_size(res.sectors_stored * 512)} of data, {human_size(res.bytes_written)} written")
    return EXIT_OK


@COMMANDS.parser
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
    add_chain_options(s)


@COMMANDS.handler("coalesce")
def _coalesce(ns: argparse.Namespace) -> int:
    from ..ops.coalesce import coalesce

    with shown(display_for(ns, unit="blocks")) as display:
        res = coalesce(ns.child, relink_children=ns.relink or (), siblings=ns.sibling or (),
                       timeout=ns.timeout, checkpoint_dir=ns.checkpoint_dir,
                       progress=display.pair("coalesce"), chain_options=chain_options(ns))
    print(f"coalesced {res.child} into {res.parent}: {res.blocks_merged} blocks, "
          f"{human_size(res.sectors_written * 512)} written, "
          f"{human_size(res.sectors_skipped_equal * 512)} already equal"
          + (", parent grown" if res.grown else "") + (", resumed" if res.resumed else "")
          + (f"; relinked its children {', '.join(res.relinked)} to the parent"
             if res.relinked else "")
          + f" in {res.seconds:.2f} s. {res.child} can now be removed.")
    return EXIT_OK


@COMMANDS.parser
def _p_compact(sub: Any) -> None:
    s = _new(sub, "compact", "rewrite one VHD without its empty blocks",
             "Rewrite one VHD without the blocks that hold nothing (a differencing disk "
             "stays differencing over the same parent). Lossless: no filesystem awareness. "
             "An existing OUT is refused unless --force.",
             ["compact old.vhd new.vhd"])
    s.add_argument("input", help="the VHD to rewrite (only read)")
    s.add_argument("out", help="the output file")
    add_force(s)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")
    add_chain_options(s)


@COMMANDS.handler("compact")
def _compact(ns: argparse.Namespace) -> int:
    from ..ops.compact import compact

    with shown(display_for(ns, unit="blocks")) as display:
        res = compact(ns.input, ns.out, progress=display.pair("compact"), overwrite=ns.force,
                      chain_options=chain_options(ns))
    print(f"compacted {ns.input} -> {res.path}: {res.blocks_stored} blocks kept, "
          f"{human_size(os.path.getsize(res.path))}")
    return EXIT_OK


@COMMANDS.parser
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
    add_chain_options(s, parent=False)


@COMMANDS.handler("relink")
def _relink(ns: argparse.Namespace) -> int:
    from ..ops.relink import relink

    opts = chain_options(ns)
    res = relink(ns.disk, ns.parent, allowed_dirs=opts.get("allowed_dirs"),
                 allow_absolute=bool(opts.get("allow_absolute")))
    why = ("same UUID" if res.reason == "uuid"
           else "same content as its current parent, compared byte for byte")
    if res.written:
        print(f"relinked {res.disk} -> {res.parent} ({why})")
    else:
        print(f"{res.disk} already names {res.parent} ({why}); nothing written")
    return EXIT_OK


@COMMANDS.parser
def _p_repair(sub: Any) -> None:
    s = _new(sub, "repair", "restore a damaged primary footer from the copy at offset 0",
             "Restore a damaged primary footer (at the end of the file) from the copy at "
             "offset 0 of a dynamic or differencing disk; writes nothing when it is fine.",
             ["repair torn.vhd"])
    s.add_argument("file", help="the VHD file")


@COMMANDS.handler("repair")
def _repair(ns: argparse.Namespace) -> int:
    from ..ops.repair import repair

    if repair(ns.file):
        print(f"{ns.file}: primary footer restored from the copy at offset 0")
    else:
        print(f"{ns.file}: primary footer is fine; nothing written")
    return EXIT_OK


