"""The imaging job: a VHD chain to a compressed, segmented image in an object
store, with the familiar stages, fine progress, timeouts and resume.

The job runs in the three published stages:

``coalescing`` (25%)
    The *plan*: which blocks the image stores.  A block is stored when a
    sector some layer holds (and, with ``fs_aware``, the guest filesystem
    does not mark free) holds a non-zero byte.  It is decided from the
    layers' sector bitmaps and a short probe of the data that stops at the
    first non-zero byte (:mod:`vhdcore.imaging.plan`): the data itself is not
    merged here.
``uploading`` (50%)
    The image stream -- a sparse dynamic VHD: head (footer copy, dynamic
    header, BAT), one frame per stored block, footer -- is produced in order
    in one pass over the chain's data: merge threads, an lz4 pool and an
    upload pool run concurrently with bounded queues
    (:mod:`vhdcore.imaging.stages`), so the slowest stage sets the pace and
    memory stays bounded.  The SHA-256 of the uncompressed stream is
    computed on the way.
``done`` (100%)
    The manifest (the "image is complete" marker) is written with the
    image's metadata and the job state is removed.

A job state file (:mod:`vhdcore.imaging.state`) records the plan and every
segment uploaded.  A timeout, Ctrl-C, a crash or a lost server leaves it
behind; ``resume=True`` continues: blocks of segments already in the store
are merged again (for the stream digest, and checked against the xxh3 the
state recorded) but never compressed or sent again.

Over a complete image, the new segments go to another *generation* of the
target (recorded in the job state) and the old image stays complete and
restorable until the new manifest replaces it; then what only the old image
used is deleted (see :mod:`vhdcore.store.base`).

Modules: :mod:`~vhdcore.imaging.events` (stages, progress events),
:mod:`~vhdcore.imaging.state` (the job state), :mod:`~vhdcore.imaging.plan`
(the plan), :mod:`~vhdcore.imaging.stages` (the stream's stages),
:mod:`~vhdcore.imaging.target` (the target: store opened and checked,
generation, segment size), :mod:`~vhdcore.imaging.job` (the job that runs
them).
"""
from __future__ import annotations

import time  # the job's clock, looked up here on use (tests replace it)

from ..compress import compress_frame as compress_frame
from ..store import SegmentUploader as SegmentUploader
from ..store import open_store as open_store
from .events import (
    EVENT_FIELDS as EVENT_FIELDS,
    EVENT_VERSION as EVENT_VERSION,
    RATE_MIN_SECONDS as RATE_MIN_SECONDS,
    RATE_WINDOW_SECONDS as RATE_WINDOW_SECONDS,
    STAGE_PERCENT as STAGE_PERCENT,
    STAGES as STAGES,
    ProgressCallback as ProgressCallback,
    ProgressEvent as ProgressEvent,
    _Reporter as _Reporter,
)
from .job import ImageResult as ImageResult
from .job import _fs_metadata as _fs_metadata
from .job import create_image as create_image
from .state import (
    STATE_VERSION as STATE_VERSION,
    STREAM_FORMAT as STREAM_FORMAT,
    _chain_identity as _chain_identity,
    _job_id as _job_id,
    _load_state as _load_state,
    _remove_state as _remove_state,
    _save_state as _save_state,
    job_state_path as job_state_path,
)
from .target import _refuse_existing_image as _refuse_existing_image

__all__ = [
    "ProgressEvent",
    "ImageResult",
    "create_image",
    "job_state_path",
    "STAGES",
    "STAGE_PERCENT",
    "STREAM_FORMAT",
    "EVENT_VERSION",
]
