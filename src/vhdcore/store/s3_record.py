"""The JSON record an S3 image keeps beside its object (``<key>.vhdcore.json``):
the generation whose object holds the stream, the image metadata and the
segment table.  S3 fixes an object's user metadata when its multipart upload
starts, but the image's SHA-256 is only known at the end, so the record holds
it; writing the record is the switch to a new generation."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .base import SegmentInfo, _GENERATION_RE, decode_meta_value, encode_meta_value

RECORD_SUFFIX = ".vhdcore.json"
RECORD_FORMAT = "vhdcore-s3-manifest"


def encode_record(generation: str, metadata: Mapping[str, str],
                  segments: list[SegmentInfo]) -> bytes:
    """The record's bytes (``metadata`` already checked)."""
    record = {
        "format": RECORD_FORMAT,
        "version": 1,
        "generation": generation,
        "metadata": {k: encode_meta_value(v) for k, v in metadata.items()},
        "segments": [[s.index, s.size, s.etag] for s in segments],
    }
    return json.dumps(record).encode()


def decode_record(raw: bytes) -> tuple[list[SegmentInfo], dict[str, str], str]:
    """Segments, metadata and generation of a record; ``ValueError``, ``KeyError``,
    ``TypeError`` or ``AttributeError`` when it is damaged."""
    record: Any = json.loads(raw)
    if record.get("format") != RECORD_FORMAT:
        raise ValueError("unknown format")
    segments = [SegmentInfo(int(i), int(n), str(e)) for i, n, e in record["segments"]]
    metadata = {str(k): decode_meta_value(str(v)) for k, v in record["metadata"].items()}
    generation = record.get("generation", "")
    if not isinstance(generation, str) or not _GENERATION_RE.match(generation):
        raise ValueError(f"bad generation {generation!r}")
    return segments, metadata, generation
