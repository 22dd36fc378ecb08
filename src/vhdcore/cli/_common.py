"""What every command module shares: the exit codes, the one mapping from an
exception to an exit code and a message, usage errors, JSON printing and the
small registry through which each module lists its subcommands.

The ``repo`` and ``fleet`` verbs use the same mapping (:func:`exit_code`,
:func:`fail`) as the core commands, so one error gives one exit code whichever
command met it.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

from ..errors import (JobStateError, OutputExistsError, StoreAuthError, StoreError,
                      StoreNotFoundError, VhdError, VhdTimeoutError)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_TIMEOUT = 4

Handler = Callable[[argparse.Namespace], int]
AddParser = Callable[[Any], None]


class Commands:
    """The subcommands of one module: the functions that add their parsers (in
    the order of ``--help``) and the handler of each name."""

    def __init__(self) -> None:
        self.parsers: list[AddParser] = []
        self.handlers: dict[str, Handler] = {}

    def parser(self, fn: AddParser) -> AddParser:
        """Register a function that adds one subcommand (or several) to the parser."""
        self.parsers.append(fn)
        return fn

    def handler(self, name: str) -> Callable[[Handler], Handler]:
        """Register the function that runs subcommand ``name``."""
        def deco(fn: Handler) -> Handler:
            self.handlers[name] = fn
            return fn
        return deco


class UsageError(Exception):
    """A combination of options the parser cannot express (exit 2)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line naming the option."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


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


def report(exc: BaseException, ns: argparse.Namespace | None, prefix: str = "error: ") -> None:
    if _debug_wanted(ns):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"vhdcore: {prefix}{error_message(exc)}", file=sys.stderr)


def exit_code(exc: BaseException) -> int:
    """The exit code of a job that failed with ``exc``: 4 stopped (timeout),
    1 bad input (credentials, a missing image, an existing output, a job state
    that does not fit), 3 the target or the host failed, 1 anything else."""
    if isinstance(exc, VhdTimeoutError):
        return EXIT_TIMEOUT
    if isinstance(exc, (StoreAuthError, StoreNotFoundError, OutputExistsError, JobStateError)):
        return EXIT_ERROR
    if isinstance(exc, (StoreError, OSError)):
        return EXIT_FAILED
    return EXIT_ERROR


def fail(exc: BaseException, ns: argparse.Namespace | None, as_json: bool = False,
         code: int | None = None) -> int:
    """Report ``exc`` (with ``as_json``, also as one JSON error event on
    standard output) and return its exit code (``code`` if given, else
    :func:`exit_code`)."""
    code = exit_code(exc) if code is None else code
    if as_json:
        print(json.dumps({"event": "error", "exit_code": code, "error": type(exc).__name__,
                          "message": error_message(exc)}))
    report(exc, ns, prefix="" if code == EXIT_TIMEOUT else "error: ")
    return code
