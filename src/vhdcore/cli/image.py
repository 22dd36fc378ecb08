"""Subcommands over stored images: ``image``, ``restore``, ``ls``, ``rm``,
``verify`` and ``estimate`` (what ``image`` will cost).  With ``--repo`` the
first four hand over to :mod:`vhdcore.cli.repo`."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any

from .._args import new_subcommand as _new
from .._args import seconds as _seconds
from .._util import human_size
from ..errors import VhdError
from ._common import (EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, Commands, UsageError,
                      error_message, exit_code, print_json, report)
from ._options import (POSITIVE, SIZE, add_chain_options, add_force, add_fs_aware,
                       chain_options, check_url, refuse_existing, store_url)
from .progress import display_for, job_progress
from .repo import (add_image_options, add_repo_option, repo_mode, run_image, run_ls,
                   run_restore, run_verify)

COMMANDS = Commands()


@COMMANDS.parser
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
    add_image_options(s)
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
                   help="where the job state lives, and the scratch files of segments "
                        "above 32 MiB (default: beside a file:// output, else "
                        "$XDG_STATE_HOME/vhdcore/jobs)")
    s.add_argument("--threads", type=POSITIVE, default=2, metavar="N",
                   help="merge and compression threads (default 2)")
    s.add_argument("--concurrency", type=POSITIVE, default=4, metavar="N",
                   help="parallel segment uploads (default 4)")
    s.add_argument("--segment-size", type=SIZE, metavar="SIZE",
                   help="segment size, e.g. 64M (default: from the image size and the "
                        "target's limits); segments above 32 MiB are packed on disk, "
                        "not in memory")
    add_fs_aware(s, "leave out")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="one JSON event per line on standard output (schema version 1)")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")
    add_chain_options(s)


@COMMANDS.handler("image")
def _image(ns: argparse.Namespace) -> int:
    from ..imaging import EVENT_VERSION, create_image, job_state_path

    if repo_mode(ns):
        return run_image(ns, job_progress(ns, display_for(ns)))
    if not ns.to:
        raise UsageError("image needs --to URL (or --repo URL --name NAME)")
    check_url(ns.to)
    display = display_for(ns)
    try:
        res = create_image(
            ns.leaf, ns.to, threads=ns.threads, concurrency=ns.concurrency,
            segment_size=ns.segment_size, timeout=ns.timeout,
            coalesce_timeout=ns.coalesce_timeout, resume=ns.resume, restart=ns.restart,
            state_dir=ns.state_dir, progress=job_progress(ns, display),
            fs_aware=ns.fs_aware, chain_options=chain_options(ns), replace=ns.replace)
    except (VhdError, OSError) as exc:
        display.finish(complete=False)
        code = exit_code(exc)
        spath = job_state_path(ns.to, ns.state_dir)
        resumable = code in (EXIT_FAILED, EXIT_TIMEOUT) and os.path.exists(spath)
        if ns.json:
            print(json.dumps({"event": "error", "version": EVENT_VERSION, "exit_code": code,
                              "error": type(exc).__name__, "message": error_message(exc),
                              "resumable": resumable}))
        report(exc, ns, prefix="" if code == EXIT_TIMEOUT else "error: ")
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


@COMMANDS.parser
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
    add_repo_option(s)
    s.add_argument("--format", choices=("vhd", "raw"), default="vhd")
    s.add_argument("--concurrency", type=POSITIVE, default=4, metavar="N",
                   help="parallel segment downloads (default 4)")
    add_force(s)
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the result as JSON")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")


@COMMANDS.handler("restore")
def _restore(ns: argparse.Namespace) -> int:
    from ..store import restore

    if repo_mode(ns):
        return run_restore(ns)
    check_url(ns.url)
    refuse_existing(ns.out, ns.force)
    display = display_for(ns)
    try:
        man = restore(ns.url, ns.out, format=ns.format, concurrency=ns.concurrency,
                      overwrite=ns.force, progress=display.pair("restore"))
    except (VhdError, OSError) as exc:
        display.finish(complete=False)
        code = exit_code(exc)
        report(exc, ns)
        return code
    display.finish()
    if ns.json:
        print(json.dumps({"event": "result", "out": ns.out, "format": ns.format,
                          "segments": len(man.segments), "metadata": dict(man.metadata)}))
    else:
        print(f"restored {ns.url} -> {ns.out} ({ns.format}), sha256 verified")
    return EXIT_OK


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@COMMANDS.parser
def _p_ls(sub: Any) -> None:
    s = _new(sub, "ls", "list the images under a directory, container or bucket",
             "List the images stored under a URL (a directory, Swift container or S3 "
             "bucket, optionally with a name prefix): size stored, virtual size, date "
             "(UTC) and whether each is complete or an interrupted upload.",
             ["ls swift://images", "ls swift://images/web --json", "ls file:///srv/images/"])
    s.add_argument("url", nargs="?", metavar="URL",
                   help="file:///dir/, swift://container[/prefix] or s3://bucket[/prefix]; "
                        "with --repo: only the images of this NAME")
    add_repo_option(s)
    s.add_argument("--json", action="store_true", help="print JSON (sizes in exact bytes)")


@COMMANDS.handler("ls")
def _ls(ns: argparse.Namespace) -> int:
    from ..store import list_images

    if repo_mode(ns):
        return run_ls(ns)
    entries = list_images(check_url(ns.url, prefix=True))
    if ns.json:
        print_json([{"name": e.name, "url": e.url, "size": e.size,
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


@COMMANDS.parser
def _p_rm(sub: Any) -> None:
    s = _new(sub, "rm", "remove a stored image and all its segments",
             "Remove a stored image: its manifest and every segment. An incomplete image "
             "(an interrupted or running upload) is refused unless --force.",
             ["rm swift://images/web01", "rm file:///srv/images/web01 --force"])
    s.add_argument("url", type=store_url, metavar="URL", help="the stored image")
    s.add_argument("-f", "--force", action="store_true",
                   help="also remove an incomplete image (default: refuse)")


@COMMANDS.handler("rm")
def _rm(ns: argparse.Namespace) -> int:
    from ..errors import StoreNotFoundError
    from ..store import open_store

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


@COMMANDS.parser
def _p_verify(sub: Any) -> None:
    s = _new(sub, "verify", "read every segment of a stored image and check its digests",
             "Download every segment of a stored image and check it as restore does (each "
             "segment's MD5, the lz4 frames, the stream's size and SHA-256) without writing "
             "a file. Exit 1 when anything does not match.",
             ["verify swift://images/web01", "verify s3://bucket/web01.vhd --json"])
    s.add_argument("url", nargs="?", metavar="URL",
                   help="the stored image; with --repo: NAME[@ID] (default: every image)")
    add_repo_option(s)
    s.add_argument("--read-data", action="store_true",
                   help="with --repo: read and re-hash every chunk (or --subset of them)")
    s.add_argument("--subset", metavar="N/T", help="with --repo --read-data: check the N-th "
                   "of T slices of the chunks (by ID)")
    s.add_argument("--concurrency", type=POSITIVE, default=4, metavar="N",
                   help="parallel segment downloads (default 4)")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the result as JSON")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")


@COMMANDS.handler("verify")
def _verify(ns: argparse.Namespace) -> int:
    from ..store import verify

    if repo_mode(ns):
        return run_verify(ns)
    check_url(ns.url)
    display = display_for(ns)
    try:
        man = verify(ns.url, concurrency=ns.concurrency, progress=display.pair("verify"))
    except (VhdError, OSError) as exc:
        display.finish(complete=False)
        code = exit_code(exc)
        if ns.json:
            print(json.dumps({"ok": False, "url": ns.url, "error": type(exc).__name__,
                              "message": error_message(exc)}))
        report(exc, ns)
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


@COMMANDS.parser
def _p_estimate(sub: Any) -> None:
    s = _new(sub, "estimate", "what imaging this chain will cost, before running it",
             "Scan the chain once and predict what image stores with the same options "
             "(filesystem-aware by default, like image): the bytes after coalescing and "
             "zero elision (exact), the compressed size (sampled) and the time.",
             ["estimate leaf.vhd", "estimate leaf.vhd --upload-rate 100M --json",
              "estimate leaf.vhd --no-fs-aware"])
    s.add_argument("leaf", help="the newest disk of the chain")
    s.add_argument("--threads", type=POSITIVE, default=2, metavar="N",
                   help="merge threads (default 2)")
    s.add_argument("--upload-rate", type=SIZE, metavar="SIZE",
                   help="bytes per second the target accepts (e.g. 100M); default: unlimited")
    add_fs_aware(s, "like image, leave out")
    s.add_argument("--json", action="store_true", help="print JSON")
    add_chain_options(s)


@COMMANDS.handler("estimate")
def _estimate(ns: argparse.Namespace) -> int:
    from ..estimate import estimate

    est = estimate(ns.leaf, threads=ns.threads, fs_aware=ns.fs_aware,
                   upload_rate=ns.upload_rate, chain_options=chain_options(ns))
    if ns.json:
        print_json(est)
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


