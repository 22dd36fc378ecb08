"""The Swift target against a real Swift on 127.0.0.1 (scripts/swift_server.py); skipped without it."""

from __future__ import annotations

import json
import tempfile
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from _helpers import spill_segment
from _swift import (
    CountingStore,
    ImageStream,
    corrupted_segment_detected,
    lz4_tool,
    require_swift,
    resume_after_failure,
    round_trip,
    server_control,
    swift_connection,
    unique,
)
from vhdcore.errors import StoreAuthError, StoreError, StoreNotFoundError, UploadError
from vhdcore.store import RetryPolicy, UploadStats, open_store, restore, upload_frames
from vhdcore.store.swift import SwiftStore, swift_auth_options

pytestmark = pytest.mark.swift

SEG = 300_000


@pytest.fixture(scope="module")
def stream() -> ImageStream:
    return ImageStream(seed=21, chunks=40, chunk_size=160 * 1024)


@pytest.fixture
def container() -> str:
    require_swift()
    name = unique("vhdcore-test")
    conn = swift_connection()
    conn.put_container(name)
    yield name
    for c in (name, f"{name}_segments"):
        try:
            for obj in conn.get_container(c, full_listing=True)[1]:
                conn.delete_object(c, obj["name"])
            conn.delete_container(c)
        except Exception:
            pass
    conn.close()


def store(container: str, name: str = "images/disk.vhd", **kw) -> SwiftStore:
    s = open_store(f"swift://{container}/{name}", **kw)
    assert isinstance(s, SwiftStore)
    return s


def test_round_trip(container: str, stream: ImageStream, tmp_path: Path) -> None:
    s = store(container)
    manifest = round_trip(s, stream, SEG, tmp_path / "out.vhd", concurrency=4)
    assert len(manifest.segments) >= 5
    conn = swift_connection()
    headers = conn.head_object(container, "images/disk.vhd")
    assert headers["x-static-large-object"] == "True"
    assert headers["x-object-meta-vhdcore-sha256"] == stream.sha256
    assert int(headers["content-length"]) == len(stream.compressed)
    names = [o["name"] for o in conn.get_container(f"{container}_segments")[1]]
    assert names[:2] == ["images/disk.vhd/00000000", "images/disk.vhd/00000001"]
    s.delete()
    assert conn.get_container(f"{container}_segments")[1] == []
    with pytest.raises(StoreNotFoundError):
        s.get_manifest()


@lz4_tool
def test_segment_as_frames_reaches_swift_whole(container: str, stream: ImageStream) -> None:
    """A segment handed over as its frames (as the imaging job does) is sent
    with its length, read from the frames without a join, and stored byte
    for byte; the server checks the MD5."""
    import hashlib

    from vhdcore.store import FrameList

    frames = [stream.frames[i] for i in range(6)]
    joined = b"".join(frames)
    s = store(container, retry=RetryPolicy(attempts=1, deadline=10.0))
    s.prepare_write()
    etag = s.put_segment(0, FrameList(frames), hashlib.md5(joined).hexdigest())
    assert etag == hashlib.md5(joined).hexdigest()
    assert s.get_segment(0) == joined
    with pytest.raises(UploadError):  # the server refuses a body that does not match
        s.put_segment(1, FrameList(frames), hashlib.md5(b"other").hexdigest())


@lz4_tool
def test_spilled_segment_reaches_swift_whole(container: str, stream: ImageStream,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A segment packed into a scratch file (segments above the memory
    budget) is sent with its length, read back a chunk at a time, and stored
    byte for byte; the server checks the MD5."""
    import hashlib

    from vhdcore.store import SpillSegment

    monkeypatch.setattr(SpillSegment, "CHUNK", 10_000)  # many reads per body
    frames = [stream.frames[i] for i in range(6)]
    joined = b"".join(frames)
    assert len(joined) > 3 * 10_000
    s = store(container, retry=RetryPolicy(attempts=1, deadline=10.0))
    s.prepare_write()
    for k, md5 in enumerate((hashlib.md5(joined).hexdigest(), hashlib.md5(b"other").hexdigest())):
        seg = spill_segment(frames)
        if k == 0:
            assert s.put_segment(0, seg, md5) == md5
            assert s.get_segment(0) == joined
        else:
            with pytest.raises(UploadError):  # the server refuses a body that does not match
                s.put_segment(1, seg, md5)
        seg.close()


def test_whole_object_get_decompresses_with_lz4_tool(container: str, stream: ImageStream) -> None:
    upload_frames(store(container), stream.frames, segment_size=SEG, metadata=stream.metadata)
    _, body = swift_connection().get_object(container, "images/disk.vhd")  # the SLO: all segments
    assert body == stream.compressed
    out = subprocess.run(["lz4", "-d", "-c"], input=body, check=True, capture_output=True).stdout
    assert out == stream.raw


def test_limits_come_from_info(container: str) -> None:
    limits = store(container).segment_limits()
    info = swift_connection().get_capabilities()
    assert limits.max_segments <= info["slo"]["max_manifest_segments"]
    assert limits.max_segment_size == info["swift"]["max_file_size"]
    assert limits.min_segment_size == info["slo"].get("min_segment_size", 1)


def test_resume_after_injected_failure(container: str, stream: ImageStream, tmp_path: Path) -> None:
    total, again = resume_after_failure(
        lambda: store(container), stream, SEG, tmp_path / "out.vhd", fail_after=3
    )
    assert again == total - 3


def test_resume_after_servers_stopped_mid_upload(container: str, stream: ImageStream, tmp_path: Path) -> None:
    server = server_control()
    quick = RetryPolicy(attempts=2, initial_delay=0.05, deadline=5.0)
    stopped = threading.Event()
    lock = threading.Lock()

    def stop_after_two(info, uploaded) -> None:
        with lock:
            done.append(info.index)
            if len(done) == 2 and not stopped.is_set():
                server.stop_servers()
                stopped.set()

    done: list[int] = []
    first = CountingStore(store(container, retry=quick, timeout=5))
    try:
        with pytest.raises(UploadError):
            upload_frames(
                first,
                stream.frames,
                segment_size=SEG,
                metadata=stream.metadata,
                concurrency=2,
                progress=stop_after_two,
            )
        assert stopped.is_set()
    finally:
        server.start_servers()
    listed = store(container).list_segments()
    assert 2 <= len(listed) < len(first.puts) + 1
    second = CountingStore(store(container))
    stats = UploadStats()
    upload_frames(second, stream.frames, segment_size=SEG, metadata=stream.metadata, stats=stats)
    assert stats.skipped_segments == len(listed)
    assert sorted(second.puts) == sorted(
        set(range(stats.skipped_segments + stats.uploaded_segments)) - set(listed)
    )
    restore(store(container), tmp_path / "out.vhd")
    assert (tmp_path / "out.vhd").read_bytes() == stream.raw


def test_retries_ride_through_a_short_outage(container: str, stream: ImageStream, tmp_path: Path) -> None:
    server = server_control()
    patient = RetryPolicy(attempts=20, initial_delay=0.2, max_delay=1.0, deadline=60.0)
    restarted = threading.Event()

    def bounce(info, uploaded) -> None:
        if info.index == 1 and not restarted.is_set():
            restarted.set()
            server.stop_servers()
            threading.Timer(1.0, server.start_servers).start()

    try:
        upload_frames(
            store(container, retry=patient, timeout=10),
            stream.frames,
            segment_size=SEG,
            metadata=stream.metadata,
            concurrency=1,
            progress=bounce,
        )
    finally:
        deadline = time.monotonic() + 30
        while not all(server.status().values()) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert restarted.is_set()
    restore(store(container), tmp_path / "out.vhd")
    assert (tmp_path / "out.vhd").read_bytes() == stream.raw


def test_corrupted_segment_is_an_integrity_error(container: str, stream: ImageStream, tmp_path: Path) -> None:
    s = store(container)
    upload_frames(s, stream.frames, segment_size=SEG, metadata=stream.metadata)
    conn = swift_connection()

    def overwrite(index: int) -> None:
        obj = f"images/disk.vhd/{index:08d}"
        _, data = conn.get_object(f"{container}_segments", obj)
        damaged = bytearray(data)
        damaged[200] ^= 0x01
        conn.put_object(f"{container}_segments", obj, bytes(damaged))

    corrupted_segment_detected(store(container), tmp_path / "out.vhd", overwrite)


def test_wrong_credentials_fail_fast(container: str, stream: ImageStream) -> None:
    s = store(
        container,
        auth_url=os.environ["ST_AUTH"],
        user=os.environ["ST_USER"],
        key="wrong-key",
        auth_version="1.0",
    )
    t0 = time.monotonic()
    with pytest.raises(StoreAuthError, match="credentials rejected.*401"):
        upload_frames(s, stream.frames, segment_size=SEG, metadata=stream.metadata)
    with pytest.raises(StoreAuthError):
        restore(s, Path(tempfile.gettempdir()) / unique("never-written"))
    assert time.monotonic() - t0 < 5


def test_bad_token_fails_fast(container: str) -> None:
    conn = swift_connection()
    url, _ = conn.get_auth()
    s = store(container, storage_url=url, auth_token="AUTH_tk-not-a-token", env={})
    with pytest.raises(StoreAuthError):
        s.list_segments()


def test_missing_container(stream: ImageStream, tmp_path: Path) -> None:
    require_swift()
    missing = unique("vhdcore-missing")
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        upload_frames(store(missing), stream.frames, segment_size=SEG, metadata=stream.metadata)
    with pytest.raises(StoreNotFoundError, match="no such image"):
        restore(f"swift://{missing}/x", tmp_path / "out.vhd")
    assert not (tmp_path / "out.vhd").exists()


def test_create_container_option(stream: ImageStream, tmp_path: Path) -> None:
    require_swift()
    name = unique("vhdcore-created")
    s = store(name, create_container=True)
    try:
        round_trip(s, stream, SEG, tmp_path / "out.vhd")
    finally:
        s.delete()
        conn = swift_connection()
        for c in (name, f"{name}_segments"):
            conn.delete_container(c)


def test_not_a_vhdcore_object(container: str, tmp_path: Path) -> None:
    conn = swift_connection()
    conn.put_object(container, "plain.txt", b"just some text")
    with pytest.raises(StoreError, match="not a vhdcore image") as info:
        restore(f"swift://{container}/plain.txt", tmp_path / "out.vhd")
    assert not isinstance(info.value, StoreNotFoundError)
    # an SLO made by another tool is not one either
    conn.put_container(f"{container}_segments")
    conn.put_object(f"{container}_segments", "other/0", b"abc")
    manifest = json.dumps([{"path": f"/{container}_segments/other/0"}])
    conn.put_object(container, "other-slo", manifest, query_string="multipart-manifest=put")
    with pytest.raises(StoreError, match="not a vhdcore image"):
        restore(f"swift://{container}/other-slo", tmp_path / "out.vhd")
    assert list(tmp_path.iterdir()) == []


def test_auth_options_from_environment() -> None:
    v1 = swift_auth_options({}, {"ST_AUTH": "http://h/auth/v1.0", "ST_USER": "a:b", "ST_KEY": "k"})
    assert v1["authurl"] == "http://h/auth/v1.0" and v1["auth_version"] == "1.0" and v1["user"] == "a:b"
    ks = swift_auth_options(
        {},
        {
            "OS_AUTH_URL": "https://id.example/v3",
            "OS_USERNAME": "u",
            "OS_PASSWORD": "p",
            "OS_PROJECT_NAME": "proj",
            "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_DOMAIN_NAME": "Default",
            "OS_REGION_NAME": "DFW",
        },
    )
    assert ks["auth_version"] == "3" and ks["os_options"]["project_name"] == "proj"
    assert ks["os_options"]["region_name"] == "DFW" and ks["os_options"]["user_domain_name"] == "Default"
    ks2 = swift_auth_options(
        {},
        {
            "OS_AUTH_URL": "https://id.example/v2.0",
            "OS_USERNAME": "u",
            "OS_PASSWORD": "p",
            "OS_TENANT_NAME": "t",
        },
    )
    assert ks2["auth_version"] == "2.0" and ks2["os_options"]["tenant_name"] == "t"
    token = swift_auth_options({}, {"OS_STORAGE_URL": "https://s/v1/AUTH_x", "OS_AUTH_TOKEN": "tok"})
    assert token == {"preauthurl": "https://s/v1/AUTH_x", "preauthtoken": "tok"}
    explicit = swift_auth_options(
        {"auth_url": "https://id/v2.0", "user": "u", "key": "k", "tenant_name": "t"},
        {"ST_AUTH": "http://ignored"},
    )
    assert explicit["authurl"] == "https://id/v2.0" and explicit["auth_version"] == "2.0"
    with pytest.raises(StoreAuthError, match="no Swift credentials"):
        swift_auth_options({}, {})
    with pytest.raises(StoreAuthError, match="without a user and key"):
        swift_auth_options({}, {"ST_AUTH": "http://h/auth/v1.0"})
