"""The imaging job's target: its store opened, checked before anything is
recorded (reachable, writable, no image there unless it is to be replaced),
the generation the new segments go under, and their size.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..chain import Chain
from ..compress import frame_bound
from ..errors import JobStateError, OutputExistsError, StoreError, StoreNotFoundError
from ..store import choose_segment_size
from ..store.base import Store
from ..vhd.layout import DynamicLayout


def _api() -> ModuleType:
    """The package :mod:`vhdcore.imaging`: ``open_store``,
    ``SegmentUploader``, ``compress_frame`` and ``time`` are looked up there
    on use (tests replace them)."""
    return sys.modules[__package__]


def open_target(chain: Chain, target_url: str, store_options: dict[str, Any] | None) -> Store:
    """Open the store at ``target_url``; ``chain`` is closed when that fails."""
    try:
        store: Store = _api().open_store(target_url, **(store_options or {}))
    except BaseException:
        chain.close()
        raise
    return store


def check_target(store: Store, target_url: str, *, resume: bool, replace: bool) -> None:
    """Make sure the target can take the image (a missing ``file://``
    directory or Swift container is created) and, unless resuming, that no
    image is stored there already (see :func:`_refuse_existing_image`)."""
    store.prepare_write(create=True)
    if not resume:
        _refuse_existing_image(store, target_url, replace)


def _refuse_existing_image(store: Store, target_url: str, replace: bool) -> None:
    """Raise :class:`OutputExistsError` when an image (or any object) is
    already stored at the target and ``replace`` is not set."""
    if replace:
        return
    try:
        store.get_manifest()
    except StoreNotFoundError:
        return
    except StoreError:
        raise OutputExistsError(
            f"{target_url}: something that is not a vhdcore image is stored there; "
            "pass --replace (replace=True) to replace it") from None
    raise OutputExistsError(
        f"{target_url}: an image is already stored there; pass --replace (replace=True) to "
        "replace it, or choose another name")


def choose_generation(store: Store, state: dict[str, Any], job_id: str,
                      save: Callable[[], None]) -> None:
    """The new image's segments go under a generation the image now at
    the target does not use: that one stays complete and restorable until
    the new manifest replaces it (then its segments are deleted).  A new
    generation is recorded in ``state`` and saved (``save``) before use."""
    generation = state.get("generation")
    if generation is None or generation == store.current_generation():
        if generation is not None:
            state["segments"].clear()  # that generation now holds a complete image
        generation = store.new_generation(seed=job_id)
        state["generation"] = generation
        save()
    store.set_generation(generation)


def segment_size_for(store: Store, layout: DynamicLayout, nstored: int, requested: int | None,
                     state: dict[str, Any], where: str) -> int:
    """The job's segment size (fixed for the job, recorded in ``state``):
    ``requested``, else the one recorded, else chosen for the stream and the
    target's limits; at least one frame above the target's minimum part size.
    A resumed job asked for another size: :class:`JobStateError` (``where``
    names its state file)."""
    stream_size = layout.stream_size(nstored)
    segment_size = requested
    limits = store.segment_limits()
    if segment_size is None:
        segment_size = int(state.get("segment_size") or 0) or choose_segment_size(
            frame_bound(stream_size) + 64 * nstored, limits,
            max_frame_size=frame_bound(layout.block_stride))
    floor = limits.min_segment_size + frame_bound(layout.block_stride) + 4096 \
        if limits.min_segment_size > 1 else 1
    if segment_size < floor:
        # segments close before a frame that does not fit: leave room for
        # one frame above the target's minimum part size (S3: 5 MiB)
        segment_size = -(-floor // (1 << 20)) << 20
    if state.get("segment_size") not in (None, segment_size):
        raise JobStateError(f"{where}: the job used segments of "
                            f"{state['segment_size']} bytes, not {segment_size}; "
                            "resume without --segment-size")
    state["segment_size"] = segment_size
    return segment_size
