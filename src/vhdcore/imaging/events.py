"""Progress of an imaging job: the published stages, :class:`ProgressEvent`
(one line of ``vhdcore image --json``) and the reporter that turns the
stages' counters into rate-limited events with a rate and an ETA."""
from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["STAGES", "STAGE_PERCENT", "EVENT_VERSION", "EVENT_FIELDS", "ProgressEvent",
           "ProgressCallback", "monotonic"]


def monotonic() -> float:
    """The job's clock: ``vhdcore.imaging.time.monotonic()`` (looked up on
    every reading, so that a test can replace the package's ``time``)."""
    return float(sys.modules[__package__].time.monotonic())


#: the stages of a job and the percentage the imaging service publishes for each
STAGES = ("queued", "coalescing", "uploading", "done", "failed")
STAGE_PERCENT = {"queued": 0, "coalescing": 25, "uploading": 50, "done": 100}
#: version of the JSON form of a ProgressEvent (``vhdcore image --json``);
#: raised when a field changes meaning or disappears
EVENT_VERSION = 1
#: the rate is measured over this many seconds of progress, and reported
#: only once a stage has run for RATE_MIN_SECONDS
RATE_WINDOW_SECONDS = 5.0
RATE_MIN_SECONDS = 1.0
#: the fields of one ``"event": "progress"`` line of ``vhdcore image --json``
#: (schema version EVENT_VERSION): name, JSON type, meaning.  docs/cli.md is
#: generated from this table and a test checks the emitted lines against it.
EVENT_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("event", "string", '"progress" (other lines: "error" with exit_code, error, message and '
                        'resumable; "result" with the ImageResult fields)'),
    ("version", "integer", f"schema version of the line, {EVENT_VERSION}"),
    ("stage", "string", "queued, coalescing, uploading, done or failed"),
    ("percent", "integer", "the published figure of the stage: 0, 25, 50, 100"),
    ("fraction", "number", "progress inside the stage, 0 to 1 (bytes_done / bytes_total)"),
    ("bytes_done", "integer", "bytes of the stage done (coalescing: virtual disk; uploading: "
                              "image stream)"),
    ("bytes_total", "integer", "bytes of the stage in all"),
    ("blocks_done", "integer", "blocks of the stage done"),
    ("blocks_total", "integer", "blocks of the stage in all"),
    ("rate", "number", f"bytes per second over the last {RATE_WINDOW_SECONDS:g} s; absent "
                       "until the stage has run long enough for it to mean something"),
    ("eta", "number", "seconds until the job is done; absent while unknown"),
    ("elapsed", "number", "seconds since the job started"),
    ("message", "string", "what the job is doing, or why it failed"),
)


@dataclass
class ProgressEvent:
    """One progress report of an imaging job.

    ``percent`` is the published figure of the stage (25, 50, 100);
    ``fraction`` is the fine progress inside the stage (0..1) computed from
    ``bytes_done``/``bytes_total``.  ``rate`` is bytes per second in this
    stage, measured over the last few seconds (None until the stage has run
    long enough for it to mean something); ``eta`` the estimated seconds
    until the job is done (None while unknown).
    """

    stage: str
    percent: int
    bytes_done: int = 0
    bytes_total: int = 0
    blocks_done: int = 0
    blocks_total: int = 0
    rate: float | None = None
    eta: float | None = None
    elapsed: float = 0.0
    message: str = ""

    @property
    def fraction(self) -> float:
        """``bytes_done / bytes_total`` of the current stage (0.0 when the total is 0)."""
        return self.bytes_done / self.bytes_total if self.bytes_total else 0.0

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON-ready dict (one line of ``vhdcore image
        --json``, schema version :data:`EVENT_VERSION`; ``rate`` and ``eta``
        are left out while unknown)."""
        d: dict[str, Any] = {"version": EVENT_VERSION, **asdict(self)}
        d["fraction"] = round(self.fraction, 6)
        if self.rate is None:
            del d["rate"]
        else:
            d["rate"] = round(self.rate, 1)
        if self.eta is None:
            del d["eta"]
        else:
            d["eta"] = round(self.eta, 2)
        d["elapsed"] = round(self.elapsed, 3)
        return d


ProgressCallback = Callable[[ProgressEvent], None]



class _Reporter:
    """Turns counters into rate-limited ProgressEvents with an ETA."""

    def __init__(self, callback: ProgressCallback | None, interval: float = 0.2) -> None:
        self.callback = callback
        self.interval = interval
        self.t0 = monotonic()
        self.stage_t0 = self.t0
        self.last = 0.0
        self.stage = "queued"
        self.coalesce_rate: float | None = None
        self.upload_estimate: float | None = None
        self.last_event: ProgressEvent | None = None
        # (time, bytes_done) samples of the current stage, for the rate
        self.samples: deque[tuple[float, int]] = deque()

    def enter(self, stage: str, message: str = "", **kw: int) -> None:
        if self.stage == "coalescing" and stage != "coalescing" and self.last_event:
            self.coalesce_rate = self.last_event.rate
        self.stage = stage
        self.stage_t0 = monotonic()
        self.samples.clear()
        self.emit(force=True, message=message, **kw)

    def _rate(self, now: float, bytes_done: int) -> float | None:
        """Bytes per second over the last RATE_WINDOW_SECONDS of this stage,
        None until the stage has run RATE_MIN_SECONDS (a rate over a few
        milliseconds -- or over bytes a resumed job skipped -- means nothing)."""
        s = self.samples
        if not s or bytes_done != s[-1][1] or now - s[-1][0] >= 0.1:
            s.append((now, bytes_done))
        while len(s) > 2 and now - s[1][0] >= RATE_WINDOW_SECONDS:
            s.popleft()
        t_first, b_first = s[0]
        span = now - t_first
        if span < RATE_MIN_SECONDS or now - self.stage_t0 < RATE_MIN_SECONDS:
            return None
        return max(0.0, (bytes_done - b_first) / span)

    def fail(self, exc: BaseException) -> None:
        """Report the job failed with ``exc`` (the ``failed`` stage)."""
        self.stage = "failed"
        self.emit(force=True, message=str(exc) or type(exc).__name__)

    def emit(self, *, force: bool = False, message: str = "", bytes_done: int = 0,
             bytes_total: int = 0, blocks_done: int = 0, blocks_total: int = 0,
             upload_total: int | None = None) -> None:
        now = monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        rate = self._rate(now, bytes_done)
        eta: float | None = None
        if rate and bytes_total:
            eta = (bytes_total - bytes_done) / rate
            if self.stage == "coalescing" and upload_total:
                # assume the upload stage runs at about a third of the scan
                eta += upload_total / (rate / 3)
        if self.stage == "done":
            eta = 0.0
        ev = ProgressEvent(self.stage, STAGE_PERCENT.get(self.stage, 0), bytes_done, bytes_total,
                           blocks_done, blocks_total, rate, eta, now - self.t0, message)
        if self.stage == "failed" and self.last_event is not None:
            ev.percent = self.last_event.percent
        self.last_event = ev
        if self.callback is not None:
            self.callback(ev)


