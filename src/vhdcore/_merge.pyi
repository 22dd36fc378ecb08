"""Type stub for the compiled merge kernel ``vhdcore._merge``.

Same names and signatures as the pure-Python twin ``vhdcore._merge_py``.
Inputs are any contiguous read-only buffers; outputs are writable buffers
owned by the caller (``find_runs``' ``runs`` holds uint32 entries).
"""

from _typeshed import ReadableBuffer, WriteableBuffer

KERNEL_NAMES: tuple[str, ...]

def overlay(
    src_bitmap: ReadableBuffer,
    src_data: ReadableBuffer,
    out_bitmap: WriteableBuffer,
    out_data: WriteableBuffer,
    nsectors: int,
) -> int: ...
def overlay_full(
    src_data: ReadableBuffer, out_bitmap: WriteableBuffer, out_data: WriteableBuffer, nsectors: int
) -> int: ...
def fill_unset(bitmap: ReadableBuffer, data: WriteableBuffer, nsectors: int) -> int: ...
def bitmap_or(src: ReadableBuffer, dst: WriteableBuffer, nbytes: int) -> None: ...
def bitmap_count(bitmap: ReadableBuffer, nsectors: int) -> int: ...
def find_runs(bitmap: ReadableBuffer, nsectors: int, runs: WriteableBuffer) -> int: ...
def is_zero(data: ReadableBuffer, offset: int = 0, length: int = -1) -> bool: ...
def clear_zero_sectors(bitmap: WriteableBuffer, data: ReadableBuffer, nsectors: int) -> int: ...
def drop_equal_sectors(
    bitmap: WriteableBuffer,
    data: ReadableBuffer,
    ref_bitmap: ReadableBuffer,
    ref_data: ReadableBuffer,
    nsectors: int,
) -> int: ...
def fingerprint(data: ReadableBuffer) -> int: ...
