"""The repository's on-store formats: config, chunk objects, indexes, manifests.

Layout (keys of the backend)::

    config                              JSON: format, version, chunk size, hash, key, id
    chunks/<4 hex>/<64 hex>             one chunk object, named by its keyed ID
    images/<name>/<image id>.index      the image's index (header + one 32-byte ID per chunk)
    images/<name>/<image id>.json       the image's manifest (written last)
    forgotten/<name>/<image id>.*       forgotten while a lease was live (gc removes later)
    leases/<lease id>.json              a live writer or reader (refreshed)
    checkpoints/<name>/<lease id>       IDs an interrupted ``image`` already stored
    bad/<64 hex>                        a chunk ``verify`` found damaged, moved aside

**Chunk IDs** are keyed BLAKE3 (32 bytes) of the chunk's raw bytes with the
repository's random key.  The all-zero chunk has the reserved ID of 32 zero
bytes and is never stored.

**Chunk object**: a 32-byte header, then the payload::

    magic "VHDCCHK1" (8) | codec u8 | 3 reserved | raw length u32 |
    payload length u32 | xxh3-64 of the payload u64 | crc32 of bytes 0..27 u32

**Index**: a 64-byte header, then ``nchunks`` IDs of 32 bytes::

    magic "VHDCIDX1" (8) | version u32 | chunk size u32 | virtual size u64 |
    nchunks u64 | digest (32): keyed BLAKE3 of the ID array

The digest of the ID array is the image digest (chunk IDs are content
hashes, so it covers every byte of the disk).
"""
from __future__ import annotations

import json
import re
import struct
import zlib
from typing import Any

import numpy as np
import xxhash

from ..errors import IntegrityError

__all__ = [
    "CONFIG_FORMAT", "ZERO_ID", "ID_SIZE", "CHUNK_MAGIC", "INDEX_MAGIC", "CODECS",
    "encode_chunk", "decode_chunk", "chunk_header", "chunk_key", "encode_index_header",
    "decode_index", "parse_manifest", "nonzero_rows", "sorted_unique", "check_name", "parse_ref", "RepoFormatError",
]

CONFIG_FORMAT = "vhdcore-repository"
CONFIG_VERSION = 1
MANIFEST_FORMAT = "vhdcore-repo-image"
MANIFEST_VERSION = 1
ID_SIZE = 32
ZERO_ID = bytes(ID_SIZE)
CHUNK_MAGIC = b"VHDCCHK1"
INDEX_MAGIC = b"VHDCIDX1"
INDEX_VERSION = 1
_CHDR = struct.Struct("<8sB3xIIQ")  # 28 bytes, then crc32
CHUNK_HEADER_SIZE = _CHDR.size + 4
_IHDR = struct.Struct("<8sIIQQ32s")
INDEX_HEADER_SIZE = _IHDR.size
CODECS = {"none": 0, "lz4": 1, "zstd": 2}
_CODEC_NAMES = {v: k for k, v in CODECS.items()}
MAX_CHUNK_SIZE = 64 << 20
MIN_CHUNK_SIZE = 64 << 10
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ID_RE = re.compile(r"^\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{8}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class RepoFormatError(IntegrityError):
    """Repository content that is not what it claims (damaged, truncated or hostile)."""


def check_name(name: str) -> str:
    """An image name: letters, digits, ``.``, ``_``, ``-`` (at most 128)."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".json"):
        from ..errors import VhdError

        raise VhdError(f"invalid image name {name!r}: use letters, digits, '.', '_' and '-' "
                       "(starting with a letter or digit)")
    return name


def check_image_id(image_id: str) -> str:
    if not _ID_RE.match(image_id):
        from ..errors import VhdError

        raise VhdError(f"invalid image id {image_id!r} (expected YYYYMMDDTHHMMSS.mmmZ-xxxxxxxx)")
    return image_id


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME@ID`` -> (name, id or None)."""
    name, sep, image_id = ref.partition("@")
    check_name(name)
    if sep:
        check_image_id(image_id)
        return name, image_id
    return name, None


def chunk_key(cid: bytes) -> str:
    h = cid.hex()
    return f"chunks/{h[:4]}/{h}"


def chunk_id_from_key(key: str) -> bytes | None:
    h = key.rsplit("/", 1)[-1]
    if not _HEX64.match(h) or key != chunk_key(bytes.fromhex(h)):
        return None
    return bytes.fromhex(h)


# ------------------------------------------------------------------ chunks
def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as exc:
        raise RepoFormatError("the zstd codec needs the zstandard package: "
                              "pip install 'vhdcore[zstd]'") from exc
    return zstandard


def chunk_header(codec: int, raw_len: int, payload: bytes | memoryview) -> bytes:
    head = _CHDR.pack(CHUNK_MAGIC, codec, raw_len, len(payload), xxhash.xxh3_64_intdigest(payload))
    return head + struct.pack("<I", zlib.crc32(head))


def encode_chunk(raw: bytes | memoryview, codec: str = "lz4", level: int = 3) -> bytes:
    """The stored object of a chunk: header + payload (compressed unless that grows it)."""
    c = CODECS[codec]
    if c == 1:
        import lz4.block

        payload: bytes | memoryview = lz4.block.compress(raw, store_size=False)
    elif c == 2:
        payload = _zstd().ZstdCompressor(level=level).compress(raw)
    else:
        payload = raw
    if len(payload) >= len(raw):
        c, payload = 0, raw
    return chunk_header(c, len(raw), payload) + bytes(payload)


def decode_chunk(obj: bytes, where: str = "chunk") -> bytes:
    """The raw bytes of a stored chunk object, after checking its header and payload
    checksum; :class:`RepoFormatError` naming ``where`` on any damage."""
    if len(obj) < CHUNK_HEADER_SIZE:
        raise RepoFormatError(f"{where}: {len(obj)} bytes, shorter than a chunk header")
    magic, codec, raw_len, plen, xx = _CHDR.unpack_from(obj, 0)
    (crc,) = struct.unpack_from("<I", obj, _CHDR.size)
    if magic != CHUNK_MAGIC:
        raise RepoFormatError(f"{where}: not a vhdcore chunk (magic {magic!r})")
    if crc != zlib.crc32(obj[:_CHDR.size]):
        raise RepoFormatError(f"{where}: chunk header checksum mismatch")
    if codec not in _CODEC_NAMES:
        raise RepoFormatError(f"{where}: unknown codec {codec}")
    if raw_len > MAX_CHUNK_SIZE or raw_len == 0:
        raise RepoFormatError(f"{where}: raw length {raw_len} out of range")
    if plen != len(obj) - CHUNK_HEADER_SIZE:
        raise RepoFormatError(f"{where}: payload is {len(obj) - CHUNK_HEADER_SIZE} bytes, "
                              f"header says {plen} (truncated or padded)")
    payload = memoryview(obj)[CHUNK_HEADER_SIZE:]
    if xxhash.xxh3_64_intdigest(payload) != xx:
        raise RepoFormatError(f"{where}: payload checksum mismatch")
    try:
        if codec == 0:
            raw = bytes(payload)
        elif codec == 1:
            import lz4.block

            raw = lz4.block.decompress(payload, uncompressed_size=raw_len)
        else:
            raw = _zstd().ZstdDecompressor().decompress(payload, max_output_size=raw_len)
    except Exception as exc:
        raise RepoFormatError(f"{where}: payload does not decompress ({exc})") from None
    if len(raw) != raw_len:
        raise RepoFormatError(f"{where}: decompressed to {len(raw)} bytes, header says {raw_len}")
    return raw


# ------------------------------------------------------------------ index
def encode_index_header(chunk_size: int, virtual_size: int, nchunks: int, digest: bytes) -> bytes:
    return _IHDR.pack(INDEX_MAGIC, INDEX_VERSION, chunk_size, virtual_size, nchunks, digest)


def decode_index(data: bytes, key: bytes, where: str = "index", *,
                 chunk_size: int | None = None, virtual_size: int | None = None
                 ) -> tuple[np.ndarray, bytes]:
    """The ID array (numpy ``S32``-free view: an ``(n, 32)`` uint8 array) and digest
    of an index, after checking its header, length and digest."""
    import blake3

    if len(data) < INDEX_HEADER_SIZE:
        raise RepoFormatError(f"{where}: {len(data)} bytes, shorter than an index header")
    magic, version, csize, vsize, n, digest = _IHDR.unpack_from(data, 0)
    if magic != INDEX_MAGIC:
        raise RepoFormatError(f"{where}: not a vhdcore index (magic {magic!r})")
    if version != INDEX_VERSION:
        raise RepoFormatError(f"{where}: index version {version} is not supported")
    if not MIN_CHUNK_SIZE <= csize <= MAX_CHUNK_SIZE:
        raise RepoFormatError(f"{where}: chunk size {csize} out of range")
    if n != -(-vsize // csize):
        raise RepoFormatError(f"{where}: {n} chunks do not cover a {vsize}-byte disk")
    if chunk_size is not None and csize != chunk_size:
        raise RepoFormatError(f"{where}: chunk size {csize}, the repository uses {chunk_size}")
    if virtual_size is not None and vsize != virtual_size:
        raise RepoFormatError(f"{where}: virtual size {vsize}, the manifest says {virtual_size}")
    if len(data) != INDEX_HEADER_SIZE + n * ID_SIZE:
        raise RepoFormatError(f"{where}: {len(data) - INDEX_HEADER_SIZE} bytes of IDs, "
                              f"expected {n * ID_SIZE} (truncated?)")
    body = memoryview(data)[INDEX_HEADER_SIZE:]
    if blake3.blake3(body, key=key).digest() != digest:
        raise RepoFormatError(f"{where}: index digest mismatch (damaged)")
    ids = np.frombuffer(data, dtype=np.uint8, offset=INDEX_HEADER_SIZE).reshape(n, ID_SIZE)
    return ids, digest


def ids_as_keys(ids: np.ndarray) -> np.ndarray:
    """An ``(n, 32)`` uint8 ID array as a 1-D array of 32-byte void scalars
    (sortable, searchable, comparable without per-ID Python objects)."""
    a = np.ascontiguousarray(ids)
    return a.view(np.dtype((np.void, ID_SIZE))).reshape(-1)


def sorted_unique(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a 1-D key array (``np.unique`` without its
    first-call import of ``numpy.ma``, ~80 ms)."""
    a = np.sort(keys)
    if len(a) < 2:
        return a
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    keep[1:] = a[1:] != a[:-1]
    out: np.ndarray = a[keep]
    return out


def nonzero_rows(ids: np.ndarray) -> np.ndarray:
    """Per row of an ``(n, 32)`` ID array: True unless it is the zero ID
    (without an ``n x 32`` temporary)."""
    v = np.ascontiguousarray(ids).view("<u8")
    out: np.ndarray = (v[:, 0] | v[:, 1] | v[:, 2] | v[:, 3]) != 0
    return out


# ------------------------------------------------------------------ manifest
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str, "version": int, "name": str, "id": str, "created": (int, float),
    "virtual_size": int, "chunk_size": int, "nchunks": int, "digest": str, "block_size": int,
    "counts": dict, "bytes": dict, "chain": list, "verify": dict,
}


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """A manifest's JSON after checking its shape; :class:`RepoFormatError` otherwise."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RepoFormatError(f"{where}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise RepoFormatError(f"{where}: not a vhdcore repository manifest")
    for k, t in _REQUIRED.items():
        v = doc.get(k)
        if not isinstance(v, t) or isinstance(v, bool):
            raise RepoFormatError(f"{where}: field {k!r} missing or of the wrong type")
    if doc["version"] != MANIFEST_VERSION:
        raise RepoFormatError(f"{where}: manifest version {doc['version']} is not supported")
    if not _HEX64.match(doc["digest"]):
        raise RepoFormatError(f"{where}: digest is not 64 hex digits")
    if not (MIN_CHUNK_SIZE <= doc["chunk_size"] <= MAX_CHUNK_SIZE) or doc["virtual_size"] < 0 \
            or doc["nchunks"] != -(-doc["virtual_size"] // doc["chunk_size"]) \
            or not (512 <= doc["block_size"] <= (256 << 20)):
        raise RepoFormatError(f"{where}: sizes are inconsistent")
    if not _ID_RE.match(doc["id"]) or not _NAME_RE.match(doc["name"]):
        raise RepoFormatError(f"{where}: bad name or id")
    return doc
