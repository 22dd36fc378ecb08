"""Option types and the subcommand constructor shared by every command line
module of :mod:`vhdcore.cli` (the repository's and the fleet's included)."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

from ._util import human_size, parse_size
from .errors import VhdError

__all__ = ["new_subcommand", "int_at_least", "seconds", "positive_seconds", "size_at_least"]


def new_subcommand(sub: Any, name: str, help: str, description: str,
         examples: Sequence[str]) -> argparse.ArgumentParser:
    """A subcommand parser with a one-line ``help`` (the list of commands), a
    ``description`` and examples (its own ``--help`` and docs/cli.md)."""
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description,
        epilog="examples:\n" + "\n".join(f"  $ vhdcore {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    return p


def int_at_least(low: int) -> Callable[[str], int]:
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return whole_number


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds of at least 0, got {text!r}")
    return value


def size_at_least(low: int) -> Callable[[str], int]:
    def size(text: str) -> int:
        try:
            value = parse_size(text)
        except VhdError:
            raise argparse.ArgumentTypeError(
                f"expected a size such as 4096, 512K, 10G or 1.5T, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {human_size(low)}, got {text!r}")
        return value
    return size


def positive_seconds(text: str) -> float:
    """A number of seconds above 0 (a lease, a redelivery timeout)."""
    value = seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value
