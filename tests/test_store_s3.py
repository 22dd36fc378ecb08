"""The S3 target against Swift's s3api on 127.0.0.1 (scripts/swift_server.py); skipped without it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from _helpers import spill_segment
from _swift import (
    CountingStore,
    ImageStream,
    lz4_tool,
    require_s3,
    resume_after_failure,
    round_trip,
    s3_client,
    unique,
)
from vhdcore.errors import StoreAuthError, StoreError, StoreNotFoundError, UploadError
from vhdcore.store import open_store, restore, upload_frames
from vhdcore.store.base import MiB
from vhdcore.store.s3 import S3Store

pytestmark = pytest.mark.swift

#: parts must be >= 5 MiB except the last; frames are <= 160 KiB
SEG = 5 * MiB + 256 * 1024


@pytest.fixture(scope="module")
def stream() -> ImageStream:
    # mostly incompressible so that a few 5 MiB parts come out of ~25 MiB
    return ImageStream(seed=31, chunks=160, chunk_size=160 * 1024, incompressible=0.9)


@pytest.fixture
def bucket() -> str:
    require_s3()
    name = unique("vhdcore-test")
    client = s3_client()
    client.create_bucket(Bucket=name)
    yield name
    try:
        for up in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
        for obj in client.list_objects_v2(Bucket=name).get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
        client.delete_bucket(Bucket=name)
    except Exception:
        pass


def store(bucket: str, key: str = "images/disk.vhd", **kw) -> S3Store:
    s = open_store(f"s3://{bucket}/{key}", **kw)
    assert isinstance(s, S3Store)
    return s


def test_round_trip(bucket: str, stream: ImageStream, tmp_path: Path) -> None:
    s = store(bucket)
    manifest = round_trip(s, stream, SEG, tmp_path / "out.vhd")
    assert len(manifest.segments) >= 4
    head = s3_client().head_object(Bucket=bucket, Key="images/disk.vhd")
    assert head["ContentLength"] == len(stream.compressed)
    assert head["ETag"].strip('"').endswith(f"-{len(manifest.segments)}")
    assert head["Metadata"]["codec"] == "lz4-frames"
    s.delete()
    with pytest.raises(StoreNotFoundError):
        s.get_manifest()


@lz4_tool
def test_whole_object_decompresses_with_lz4_tool(bucket: str, stream: ImageStream) -> None:
    upload_frames(store(bucket), stream.frames, segment_size=SEG, metadata=stream.metadata)
    body = s3_client().get_object(Bucket=bucket, Key="images/disk.vhd")["Body"].read()
    assert body == stream.compressed
    out = subprocess.run(["lz4", "-d", "-c"], input=body, check=True, capture_output=True).stdout
    assert out == stream.raw


def test_segment_as_frames_reaches_s3_whole(bucket: str, stream: ImageStream) -> None:
    """A part handed over as its frames (as the imaging job does) is read by
    botocore from a FrameReader, signed and sent without a join, and stored
    byte for byte; the server checks the MD5."""
    import hashlib

    from vhdcore.store import FrameList
    from vhdcore.store.retry import RetryPolicy

    frames = [stream.frames[i] for i in range(40)]
    joined = b"".join(frames)
    assert len(joined) > 5 * MiB  # a part the server takes as a middle one
    md5 = hashlib.md5(joined).hexdigest()
    s = store(bucket, retry=RetryPolicy(attempts=1, deadline=10.0))
    s.prepare_write()
    assert s.put_segment(0, FrameList(frames), md5) == md5
    assert s.put_segment(1, FrameList(frames[:3]), hashlib.md5(b"".join(frames[:3])).hexdigest())
    assert s.list_segments()[0].size == len(joined)
    with pytest.raises(UploadError):
        s.put_segment(2, FrameList(frames[:3]), hashlib.md5(b"other").hexdigest())


def test_spilled_segment_reaches_s3_whole(bucket: str, stream: ImageStream,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A part packed into a scratch file is read back by botocore a chunk at
    a time (signed, rewound, sent) and stored byte for byte; the server
    checks the MD5."""
    import hashlib

    from vhdcore.store import SpillSegment
    from vhdcore.store.retry import RetryPolicy

    monkeypatch.setattr(SpillSegment, "CHUNK", 256 * 1024)
    frames = [stream.frames[i] for i in range(40)]
    joined = b"".join(frames)
    assert len(joined) > 5 * MiB

    s = store(bucket, retry=RetryPolicy(attempts=1, deadline=10.0))
    s.prepare_write()
    md5 = hashlib.md5(joined).hexdigest()
    assert s.put_segment(0, spill_segment(frames), md5) == md5
    assert s.list_segments()[0].size == len(joined)
    with pytest.raises(UploadError):
        s.put_segment(1, spill_segment(frames[:3]), hashlib.md5(b"other").hexdigest())


def test_limits_from_the_server(bucket: str) -> None:
    limits = store(bucket).segment_limits()
    assert limits.min_segment_size == 5 * MiB
    assert limits.max_segments == 1000  # Swift's s3api max_upload_part_num, from /info
    assert store(bucket, max_parts=10).segment_limits().max_segments == 10


def test_resume_after_injected_failure(bucket: str, stream: ImageStream, tmp_path: Path) -> None:
    total, again = resume_after_failure(
        lambda: store(bucket), stream, SEG, tmp_path / "out.vhd", fail_after=2
    )
    assert again == total - 2


def test_small_parts_are_refused_before_completing(bucket: str, stream: ImageStream) -> None:
    with pytest.raises(UploadError, match="below the target's minimum"):
        upload_frames(store(bucket), stream.frames, segment_size=1 * MiB, metadata=stream.metadata)


def test_wrong_credentials_fail_fast(bucket: str, stream: ImageStream) -> None:
    s = store(bucket, access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key="wrong")
    t0 = time.monotonic()
    with pytest.raises(StoreAuthError, match="credentials rejected"):
        upload_frames(s, stream.frames, segment_size=SEG, metadata=stream.metadata)
    assert time.monotonic() - t0 < 5


def test_missing_bucket(stream: ImageStream, tmp_path: Path) -> None:
    require_s3()
    missing = unique("vhdcore-missing")
    with pytest.raises(StoreNotFoundError, match="bucket .* does not exist"):
        upload_frames(store(missing), stream.frames, segment_size=SEG, metadata=stream.metadata)
    with pytest.raises(StoreNotFoundError):
        restore(f"s3://{missing}/x", tmp_path / "out.vhd")


def test_not_a_vhdcore_object(bucket: str, tmp_path: Path) -> None:
    s3_client().put_object(Bucket=bucket, Key="plain.txt", Body=b"hello")
    with pytest.raises(StoreError, match="not a vhdcore image") as info:
        restore(f"s3://{bucket}/plain.txt", tmp_path / "out.vhd")
    assert not isinstance(info.value, StoreNotFoundError)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_object_is_an_integrity_error(bucket: str, stream: ImageStream, tmp_path: Path) -> None:
    from vhdcore.errors import IntegrityError

    upload_frames(store(bucket), stream.frames, segment_size=SEG, metadata=stream.metadata)
    # overwrite the object itself with damaged bytes of the same length
    damaged = bytearray(stream.compressed)
    damaged[SEG + 1000] ^= 0x01
    client = s3_client()
    record = client.get_object(Bucket=bucket, Key="images/disk.vhd.vhdcore.json")["Body"].read()
    client.put_object(Bucket=bucket, Key="images/disk.vhd", Body=bytes(damaged))
    assert client.get_object(Bucket=bucket, Key="images/disk.vhd.vhdcore.json")["Body"].read() == record
    with pytest.raises(IntegrityError, match="segment 1"):
        restore(store(bucket), tmp_path / "out.vhd")
    assert list(tmp_path.iterdir()) == []


def test_counting_wrapper_sees_no_puts_on_rerun(bucket: str, stream: ImageStream) -> None:
    upload_frames(store(bucket), stream.frames, segment_size=SEG, metadata=stream.metadata)
    # a completed upload leaves no multipart upload to resume: the re-run uploads again, correctly
    again = CountingStore(store(bucket))
    upload_frames(again, stream.frames, segment_size=SEG, metadata=stream.metadata)
    assert again.puts  # S3 cannot skip parts of a completed object
    assert store(bucket).get_manifest().sha256 == stream.sha256


def test_nosuchupload_recovery_checks_the_parts(bucket: str, stream: ImageStream, tmp_path: Path) -> None:
    """A completion answered NoSuchUpload (its first try went through) is
    accepted only if the object is made of exactly the listed parts: the
    shape of a multipart ETag ("...-N") proves nothing."""
    import hashlib

    from vhdcore.store.base import SegmentInfo

    def multipart_etag(etags: list[str]) -> str:  # S3's rule, written independently
        return hashlib.md5(b"".join(bytes.fromhex(e) for e in etags)).hexdigest() + f"-{len(etags)}"

    man = upload_frames(store(bucket), stream.frames, segment_size=SEG, metadata=stream.metadata)
    assert len(man.segments) >= 3
    head = s3_client().head_object(Bucket=bucket, Key="images/disk.vhd")
    assert head["ETag"].strip('"') == multipart_etag([s.etag for s in man.segments])
    record = s3_client().get_object(Bucket=bucket, Key="images/disk.vhd.vhdcore.json")["Body"].read()
    wrong_etag = [SegmentInfo(s.index, s.size, "0" * 32 if s.index == 1 else s.etag) for s in man.segments]
    wrong_size = [SegmentInfo(s.index, s.size + (7 if s.index == 0 else 0), s.etag) for s in man.segments]
    for segments in (wrong_etag, wrong_size):
        s = store(bucket)
        s._upload_id = "no-such-upload-" + unique("x")  # the completion answers NoSuchUpload
        with pytest.raises(UploadError, match="NoSuchUpload"):
            s.put_manifest(segments, stream.metadata)
        # nothing claims the wrong parts: the record is the old one
        assert s3_client().get_object(Bucket=bucket, Key="images/disk.vhd.vhdcore.json")["Body"].read() == record
    # the very parts: the earlier completion is recognised
    s = store(bucket)
    s._upload_id = "no-such-upload-" + unique("x")
    s.put_manifest(man.segments, stream.metadata)
    restore(store(bucket), tmp_path / "out.vhd")
    assert (tmp_path / "out.vhd").read_bytes() == stream.raw
