"""The command line: ``python -m vhdcore ...`` (also installed as ``vhdcore``).

This package parses arguments, calls the library and prints; it holds as
little logic of its own as it can.  One module per group of subcommands, each
listing its own in a :class:`~vhdcore.cli._common.Commands` (a function that
adds the parser, and the handler):

* :mod:`.disk` — ``info``, ``check``, ``chain``, ``create``, ``snapshot``,
  ``cat``, ``write``
* :mod:`.ops` — ``flatten``, ``coalesce``, ``compact``, ``relink``, ``repair``
* :mod:`.image` — ``image``, ``restore``, ``ls``, ``rm``, ``verify``, ``estimate``
* :mod:`.tools` — ``demo``, ``fsmap``, ``bench``
* :mod:`.repo` — ``repo``, ``export``, ``forget``, ``gc`` and the ``--repo`` forms
* :mod:`.fleet` — ``worker``, ``submit``, ``jobs``, ``cancel``

with :mod:`._common` (exit codes, error messages), :mod:`._options` (shared
options) and :mod:`.progress` (the progress display).

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
import os
import sys
from collections.abc import Sequence

# numpy's OpenBLAS starts a thread per CPU at import that spins for a while
# (about 0.1 CPU-seconds, a quarter of what starting ``image`` costs) and
# vhdcore calls no BLAS routine: a command needs none of those threads.  Only
# here, where vhdcore owns the process; the library leaves its host alone.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .._version import __version__
from ..errors import VhdError, VhdTimeoutError
from . import disk, fleet, image, ops, repo, tools
from ._common import (EXIT_ERROR, EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, Commands,
                      Handler, Parser, UsageError, error_message, exit_code, report)
from .disk import format_info, vhd_time_iso
from .progress import ProgressDisplay

__all__ = ["main", "build_parser", "error_message", "exit_code", "format_info", "vhd_time_iso",
           "ProgressDisplay", "UsageError", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE",
           "EXIT_FAILED", "EXIT_TIMEOUT"]

#: the command modules, in the order of ``--help``
_GROUPS: tuple[Commands, ...] = (disk.COMMANDS, ops.COMMANDS, image.COMMANDS, tools.COMMANDS,
                                 repo.COMMANDS, fleet.COMMANDS)
_HANDLERS: dict[str, Handler] = {name: fn for group in _GROUPS
                                 for name, fn in group.handlers.items()}


def build_parser() -> argparse.ArgumentParser:
    """The ``vhdcore`` argument parser with every subcommand (the CLI reference
    in the documentation is generated from it)."""
    p = Parser(
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
    for group in _GROUPS:
        for add in group.parsers:
            add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and
    return the exit code (see this module's docstring)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return _HANDLERS[ns.command](ns)
    except UsageError as exc:
        print(f"vhdcore {ns.command}: error: {exc} (see 'vhdcore {ns.command} --help')",
              file=sys.stderr)
        return EXIT_USAGE
    except VhdTimeoutError as exc:
        report(exc, ns, prefix="")
        return EXIT_TIMEOUT
    except VhdError as exc:
        report(exc, ns)
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
        report(exc, ns)
        return EXIT_ERROR
