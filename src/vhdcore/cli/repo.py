"""The repository's subcommands (``repo``, ``export``, ``forget``, ``gc``) and
the ``--repo`` forms of ``image``, ``restore``, ``ls`` and ``verify``.

Each handler takes the parsed arguments and returns the exit code; errors map
to exit codes as everywhere else (:func:`vhdcore.cli._common.fail`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from .._args import new_subcommand as _new
from .._util import human_size, parse_size
from ..errors import VhdError
from ._common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, Commands, fail
from ._options import chain_options

__all__ = ["add_repo_parser", "add_export_parser", "add_forget_parser", "add_gc_parser",
           "add_repo_option", "add_image_options", "repo_mode", "run_repo",
           "run_image", "run_restore", "run_ls", "run_verify", "run_export", "run_forget",
           "run_gc", "repo_of"]

COMMANDS = Commands()


def repo_of(ns: argparse.Namespace) -> str | None:
    """``--repo``, else ``$VHDCORE_REPO``, else None."""
    return getattr(ns, "repo", None) or os.environ.get("VHDCORE_REPO") or None


def repo_mode(ns: argparse.Namespace) -> bool:
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


# ------------------------------------------------------------------ parsers
def add_repo_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", metavar="URL",
                   help="a repository (file:///dir, swift://container[/prefix], "
                        "s3://bucket[/prefix]); $VHDCORE_REPO stands for it")


@COMMANDS.parser
def add_repo_parser(sub: Any) -> None:
    s = _new(sub, "repo", "manage a content-addressed image repository",
             "Manage a content-addressed repository of images on a directory, Swift or S3: "
             "each distinct chunk stored once, every later image of a name incremental. "
             "'repo init URL' creates an empty one (see docs/repository.md).",
             ["repo init file:///srv/repo", "repo init swift://images --chunk-size 2M"])
    rs = s.add_subparsers(dest="repo_command", metavar="SUBCOMMAND")
    rs.required = True
    i = rs.add_parser("init", help="create an empty repository")
    i.add_argument("url", help="file:///dir (or a path), swift://container[/prefix] or "
                               "s3://bucket[/prefix]")
    i.add_argument("--chunk-size", default="2M",
                   help="fixed chunk size, a power of two from 64K to 64M (default 2M)")
    i.add_argument("--codec", choices=("lz4", "zstd", "none"), default="lz4",
                   help="chunk compression (default lz4; zstd needs the [zstd] extra)")


@COMMANDS.parser
def add_export_parser(sub: Any) -> None:
    s = _new(sub, "export", "write a repository image as a single-object stream image",
             "Write one image of a repository (the newest of NAME without @ID) to a URL in "
             "the single-object stream format of 'image --to', which restore and lz4 -d read.",
             ["export --repo file:///srv/repo web01 --to file:///srv/images/web01",
              "export --repo swift://images web01@0123abcd --to s3://bucket/web01.vhd"])
    s.add_argument("ref", metavar="NAME[@ID]")
    add_repo_option(s)
    s.add_argument("--to", required=True, metavar="URL",
                   help="file:///dir/name, swift://container/name or s3://bucket/key")
    s.add_argument("--concurrency", type=int, default=4, help="parallel transfers")
    s.add_argument("--json", action="store_true", help="print the result as JSON")


@COMMANDS.parser
def add_forget_parser(sub: Any) -> None:
    s = _new(sub, "forget", "remove images from a repository (gc frees the chunks)",
             "Remove one image (NAME@ID), or apply a retention policy (--keep-last, "
             "--keep-daily, ...) to the images of a repository or of one NAME. Only "
             "manifests and indexes go; 'gc' deletes the chunks no image uses any more.",
             ["forget --repo file:///srv/repo web01@0123abcd",
              "forget --repo swift://images --keep-last 7 --keep-daily 14"])
    s.add_argument("ref", nargs="?", metavar="NAME@ID|NAME",
                   help="the image to forget; with --keep-*: only images of NAME")
    add_repo_option(s)
    for what in ("last", "daily", "weekly", "monthly"):
        s.add_argument(f"--keep-{what}", type=int, metavar="N",
                       help=f"keep the {'N newest images' if what == 'last' else 'newest image of each of the last N ' + {'daily': 'days', 'weekly': 'weeks', 'monthly': 'months'}[what]}")
    s.add_argument("--dry-run", action="store_true", help="only print what would go")
    s.add_argument("--json", action="store_true", help="print JSON")


@COMMANDS.parser
def add_gc_parser(sub: Any) -> None:
    s = _new(sub, "gc", "delete chunks no image references",
             "Mark every chunk a committed image references and delete the others that are "
             "older than the grace period and than every live writer's lease.",
             ["gc --repo file:///srv/repo", "gc --repo swift://images --grace 48h --dry-run"])
    add_repo_option(s)
    s.add_argument("--grace", default="24h",
                   help="keep unreferenced chunks younger than this (default 24h)")
    s.add_argument("--dry-run", action="store_true", help="only count what would go")
    s.add_argument("--json", action="store_true", help="print JSON")


def add_image_options(s: argparse.ArgumentParser) -> None:
    """``--repo``/``--name``/``--rehash`` on ``image``."""
    add_repo_option(s)
    s.add_argument("--name", help="with --repo: the image's name (e.g. the VM)")
    s.add_argument("--rehash", action="store_true",
                   help="with --repo: read and hash every chunk (no reuse from the chain)")


# ------------------------------------------------------------------ handlers
@COMMANDS.handler("repo")
def run_repo(ns: argparse.Namespace) -> int:
    from ..repo.core import init_repo

    try:
        repo = init_repo(ns.url, chunk_size=parse_size(ns.chunk_size), codec=ns.codec)
    except (VhdError, OSError) as exc:
        return fail(exc, ns)
    repo.close()
    print(f"repository created at {ns.url} (chunks of {human_size(repo.chunk_size)}, "
          f"{repo.codec}, keyed BLAKE3 IDs)")
    return EXIT_OK


def run_image(ns: argparse.Namespace, progress: Any) -> int:
    from dataclasses import asdict

    from ..repo.writer import create_image

    if not ns.name:
        print("vhdcore: error: image --repo needs --name NAME", file=sys.stderr)
        return EXIT_USAGE
    if getattr(ns, "to", None):
        print("vhdcore: error: give --to or --repo, not both", file=sys.stderr)
        return EXIT_USAGE
    try:
        res = create_image(ns.leaf, repo_of(ns), ns.name, progress=progress,
                           timeout=ns.timeout, fs_aware=ns.fs_aware, rehash=ns.rehash,
                           threads=ns.threads, concurrency=ns.concurrency,
                           chain_options=chain_options(ns))
    except (VhdError, OSError) as exc:
        return fail(exc, ns, ns.json)
    if ns.json:
        print(json.dumps({"event": "result", "ref": str(res), **asdict(res)}))
    else:
        print(str(res))
        b = res.bytes
        print(f"{human_size(res.virtual_size)} virtual: {human_size(b.get('new', 0))} new "
              f"({human_size(b.get('new_stored', 0))} stored), "
              f"{human_size(b.get('reused', 0))} reused, {human_size(b.get('zero', 0))} zero, "
              f"{res.seconds:.1f} s", file=sys.stderr)
    return EXIT_OK


def run_restore(ns: argparse.Namespace) -> int:
    from ..repo.reader import restore

    try:
        man = restore(repo_of(ns), ns.url, ns.out, format=ns.format, concurrency=ns.concurrency)
    except (VhdError, OSError) as exc:
        return fail(exc, ns)
    ref = f"{man['name']}@{man['id']}"
    if ns.json:
        print(json.dumps({"event": "result", "ref": ref, "out": ns.out, "format": ns.format,
                          "digest": man["digest"]}))
    else:
        print(f"restored {ref} -> {ns.out} ({ns.format}), every chunk verified")
    return EXIT_OK


def run_ls(ns: argparse.Namespace) -> int:
    from ..repo.maint import list_images

    try:
        rows = list_images(repo_of(ns), ns.url)
    except (VhdError, OSError) as exc:
        return fail(exc, ns)
    if ns.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    for r in rows:
        if "error" in r:
            print(f"{r['name']}@{r['id']}  unreadable: {r['error']}")
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created"]))
        print(f"{r['ref']}  {when}Z  {human_size(r['virtual_size'])}  "
              f"new {human_size(r['new_bytes'])}  reused {human_size(r['reused_bytes'])}  "
              f"{r['verify']}")
    return EXIT_OK


def run_verify(ns: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..repo.maint import verify

    try:
        res = verify(repo_of(ns), ns.url, read_data=ns.read_data, subset=ns.subset)
    except (VhdError, OSError) as exc:
        return fail(exc, ns)
    if ns.json:
        print(json.dumps({"ok": res.ok, **asdict(res)}, indent=1))
    else:
        for ref, state in res.images.items():
            print(f"{ref}: {state}")
        for h, imgs in res.missing.items():
            print(f"missing chunk {h}: used by {', '.join(imgs)}")
        for h, imgs in res.damaged.items():
            print(f"damaged chunk {h}: used by {', '.join(imgs)}")
        for ref, err in res.errors.items():
            print(f"{ref}: {err}")
        if ns.read_data:
            print(f"{res.chunks_checked} chunks read and re-hashed")
    return EXIT_OK if res.ok else EXIT_ERROR


@COMMANDS.handler("export")
def run_export(ns: argparse.Namespace) -> int:
    from ..repo.reader import export

    try:
        meta = export(repo_of(ns), ns.ref, ns.to, concurrency=ns.concurrency)
    except (VhdError, OSError) as exc:
        return fail(exc, ns)
    if ns.json:
        print(json.dumps({"event": "result", "to": ns.to, "metadata": meta}))
    else:
        print(f"exported {ns.ref} -> {ns.to} (sha256 {meta.get('sha256')})")
    return EXIT_OK


@COMMANDS.handler("forget")
def run_forget(ns: argparse.Namespace) -> int:
    from ..repo.maint import forget

    policy = {k: getattr(ns, f"keep_{k}") for k in ("last", "daily", "weekly", "monthly")}
    has_policy = any(v is not None for v in policy.values())
    try:
        if has_policy:
            gone = forget(repo_of(ns), None, name=ns.ref, dry_run=ns.dry_run,
                          **{f"keep_{k}": v for k, v in policy.items()})
        else:
            if not ns.ref:
                print("vhdcore: error: forget needs NAME@ID or --keep-* options",
                      file=sys.stderr)
                return EXIT_USAGE
            gone = forget(repo_of(ns), ns.ref, dry_run=ns.dry_run)
    except (VhdError, OSError) as exc:
        return fail(exc, ns)
    if ns.json:
        print(json.dumps({"forgotten": gone, "dry_run": ns.dry_run}))
    else:
        for g in gone:
            print(f"{'would forget' if ns.dry_run else 'forgot'} {g}")
    return EXIT_OK


@COMMANDS.handler("gc")
def run_gc(ns: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..repo.maint import gc

    try:
        res = gc(repo_of(ns), grace=ns.grace, dry_run=ns.dry_run)
    except (VhdError, OSError) as exc:
        return fail(exc, ns)
    if ns.json:
        print(json.dumps(asdict(res)))
    else:
        print(f"{res.images} images reference {res.referenced} chunks; {res.chunks} chunks "
              f"stored; {'would delete' if ns.dry_run else 'deleted'} {res.deleted}; kept "
              f"{res.kept_young} unreferenced but young")
    return EXIT_OK
