"""Progress on the terminal: :class:`ProgressDisplay` (a tqdm bar per stage on
a terminal, plain lines otherwise) and the ``--json`` event stream."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from .._util import human_size


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


def job_progress(ns: argparse.Namespace,
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


def display_for(ns: argparse.Namespace, unit: str = "B") -> ProgressDisplay:
    return ProgressDisplay(not getattr(ns, "quiet", False) and not getattr(ns, "json", False),
                           unit=unit)


@contextlib.contextmanager
def shown(display: ProgressDisplay) -> Iterator[ProgressDisplay]:
    """Run one operation under ``display``: when it returns, its stage is
    filled to 100% and closed; when it raises, closed as it stands."""
    try:
        yield display
    except BaseException:
        display.finish(complete=False)
        raise
    display.finish()
