"""The S3 target against Swift's s3api on 127.0.0.1 (scripts/swift_server.py); skipped without it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

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
