# cython: language_level=3, autotestdict=False
"""The native merge kernel: per-sector merging of VHD blocks on buffers.

Same names, signatures, results and exceptions as the pure-Python twin
``vhdcore._merge_py`` (the test oracle).  Import kernels through
``vhdcore.kernels``, never from here.

Conventions (see the twin's docstring for the full list):

* A *sector bitmap* is the VHD one: bit ``s`` is bit ``7 - s % 8`` of byte
  ``s // 8`` (most significant bit first); only the first ``nsectors`` bits
  are read or written, any bits after them are left as they are.
* Sector data buffers hold at least ``nsectors * 512`` bytes.
* Inputs are any contiguous buffers (``bytes``, read-only mmap views);
  outputs are writable buffers owned by the caller.  A read-only output or a
  buffer that is too small is a ``ValueError``.

Every ``def`` checks all sizes with the GIL held and then runs a
``noexcept nogil`` worker inside ``with nogil:``, so the pipeline's other
threads run while it works.  The workers use raw pointers whose bounds the
wrapper has proven; they cannot fail and allocate nothing.  Bitmaps are read
a 64-bit word at a time in big-endian order (so that bit 0, the MSB of byte
0, is the word's top bit); empty and full words take a fast path and runs of
set bits are found with count-leading-zeros.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memmove, memset

from xxhash import xxh3_64_intdigest as _xxh3_64_intdigest

cdef extern from *:
    """
    /* Portable helpers for the merge kernel: big-endian word access, count
       leading zeros and population count, with builtins where the compiler
       has them and plain C elsewhere.  PY_BIG_ENDIAN comes from pyport.h and
       describes the host CPython was built for. */
    #include <stdint.h>
    #include <string.h>

    #define VHDCORE_ALL_ONES 0xFFFFFFFFFFFFFFFFULL
    #define VHDCORE_TOP_BIT 0x8000000000000000ULL

    static inline uint64_t vhdcore_bswap64(uint64_t x) {
    #if defined(__GNUC__) || defined(__clang__)
        return __builtin_bswap64(x);
    #else
        x = ((x & 0x00FF00FF00FF00FFULL) << 8) | ((x >> 8) & 0x00FF00FF00FF00FFULL);
        x = ((x & 0x0000FFFF0000FFFFULL) << 16) | ((x >> 16) & 0x0000FFFF0000FFFFULL);
        return (x << 32) | (x >> 32);
    #endif
    }

    /* The 8 bytes at p as a big-endian number: byte 0 in bits 63..56. */
    static inline uint64_t vhdcore_load_be64(const uint8_t *p) {
        uint64_t x;
        memcpy(&x, p, 8);
    #if defined(PY_BIG_ENDIAN) && PY_BIG_ENDIAN
        return x;
    #else
        return vhdcore_bswap64(x);
    #endif
    }

    static inline void vhdcore_store_be64(uint8_t *p, uint64_t x) {
    #if !(defined(PY_BIG_ENDIAN) && PY_BIG_ENDIAN)
        x = vhdcore_bswap64(x);
    #endif
        memcpy(p, &x, 8);
    }

    /* An 8-byte load in host order, for tests that do not care about order. */
    static inline uint64_t vhdcore_load64(const uint8_t *p) {
        uint64_t x;
        memcpy(&x, p, 8);
        return x;
    }

    static inline void vhdcore_store64(uint8_t *p, uint64_t x) {
        memcpy(p, &x, 8);
    }

    /* Leading zero bits of x; x must not be 0. */
    static inline int vhdcore_clz64(uint64_t x) {
    #if defined(__GNUC__) || defined(__clang__)
        return __builtin_clzll((unsigned long long)x);
    #else
        int n = 0;
        if (!(x & 0xFFFFFFFF00000000ULL)) { n += 32; x <<= 32; }
        if (!(x & 0xFFFF000000000000ULL)) { n += 16; x <<= 16; }
        if (!(x & 0xFF00000000000000ULL)) { n += 8; x <<= 8; }
        if (!(x & 0xF000000000000000ULL)) { n += 4; x <<= 4; }
        if (!(x & 0xC000000000000000ULL)) { n += 2; x <<= 2; }
        if (!(x & 0x8000000000000000ULL)) { n += 1; }
        return n;
    #endif
    }

    static inline int vhdcore_popcount64(uint64_t x) {
    #if defined(__GNUC__) || defined(__clang__)
        return __builtin_popcountll((unsigned long long)x);
    #else
        x = x - ((x >> 1) & 0x5555555555555555ULL);
        x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
        x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
        return (int)((x * 0x0101010101010101ULL) >> 56);
    #endif
    }

    /* 1 when the n bytes at p are all zero.  Exits at the first 256-byte
       chunk holding a non-zero byte; the fixed-size inner loop is one the
       compiler turns into wide vector ORs. */
    static inline int vhdcore_is_zero(const uint8_t *p, size_t n) {
        uint64_t acc;
        size_t i;
        while (n >= 256) {
            acc = 0;
            for (i = 0; i < 256; i += 8) acc |= vhdcore_load64(p + i);
            if (acc) return 0;
            p += 256;
            n -= 256;
        }
        acc = 0;
        while (n >= 8) { acc |= vhdcore_load64(p); p += 8; n -= 8; }
        while (n) { acc |= *p++; n--; }
        return acc == 0;
    }

    /* 1 when the 512-byte sector at p is all zero. */
    static inline int vhdcore_sector_is_zero(const uint8_t *p) {
        uint64_t acc = 0;
        size_t i;
        for (i = 0; i < 256; i += 8) acc |= vhdcore_load64(p + i);
        if (acc) return 0;
        for (i = 256; i < 512; i += 8) acc |= vhdcore_load64(p + i);
        return acc == 0;
    }
    """
    uint64_t load_be64 "vhdcore_load_be64" (const uint8_t *p) noexcept nogil
    void store_be64 "vhdcore_store_be64" (uint8_t *p, uint64_t x) noexcept nogil
    uint64_t load64 "vhdcore_load64" (const uint8_t *p) noexcept nogil
    void store64 "vhdcore_store64" (uint8_t *p, uint64_t x) noexcept nogil
    int clz64 "vhdcore_clz64" (uint64_t x) noexcept nogil
    int popcount64 "vhdcore_popcount64" (uint64_t x) noexcept nogil
    bint mem_is_zero "vhdcore_is_zero" (const uint8_t *p, size_t n) noexcept nogil
    bint sector_is_zero "vhdcore_sector_is_zero" (const uint8_t *p) noexcept nogil
    const Py_ssize_t PY_SSIZE_T_MAX
    const uint64_t ALL_ONES "VHDCORE_ALL_ONES"
    const uint64_t TOP_BIT "VHDCORE_TOP_BIT"


cdef enum:
    SECTOR_SIZE = 512
    SECTOR_SHIFT = 9

cdef enum RunAction:
    RUN_COPY = 0       # copy the run's sectors from src to dst
    RUN_ZERO = 1       # zero the run's sectors in dst
    RUN_RECORD = 2     # append (start, length) to runs


KERNEL_NAMES = (
    "overlay",
    "overlay_full",
    "fill_unset",
    "bitmap_or",
    "bitmap_count",
    "find_runs",
    "is_zero",
    "clear_zero_sectors",
    "drop_equal_sectors",
    "fingerprint",
)


# ---------------------------------------------------------------------------
# nogil workers: raw pointers, bounds proven by the caller, cannot fail


cdef inline uint64_t _load_bits(const uint8_t *p, Py_ssize_t nbytes) noexcept nogil:
    """The ``nbytes`` (1..8) bytes at ``p`` in the top of a big-endian word."""
    cdef uint64_t w = 0
    cdef Py_ssize_t j
    if nbytes == 8:
        return load_be64(p)
    for j in range(nbytes):
        w |= (<uint64_t>p[j]) << (56 - 8 * j)
    return w


cdef inline void _store_bits(uint8_t *p, Py_ssize_t nbytes, uint64_t w) noexcept nogil:
    """Write the top ``nbytes`` (1..8) bytes of ``w`` to ``p``."""
    cdef Py_ssize_t j
    if nbytes == 8:
        store_be64(p, w)
        return
    for j in range(nbytes):
        p[j] = <uint8_t>(w >> (56 - 8 * j))


cdef inline Py_ssize_t _word_extent(Py_ssize_t nsectors, Py_ssize_t base,
                                    uint64_t *valid) noexcept nogil:
    """Bytes of bitmap in the word at sector ``base``, and its mask of valid bits."""
    cdef Py_ssize_t rem = nsectors - base
    if rem >= 64:
        valid[0] = ALL_ONES
        return 8
    valid[0] = ALL_ONES << (64 - rem)
    return (rem + 7) >> 3


cdef inline void _emit(int action, Py_ssize_t start, Py_ssize_t end, const uint8_t *src,
                       uint8_t *dst, uint32_t *runs, Py_ssize_t nruns) noexcept nogil:
    if action == RUN_COPY:
        # memmove: a caller passing the same buffer as source and output is harmless
        memmove(dst + (start << SECTOR_SHIFT), src + (start << SECTOR_SHIFT),
                <size_t>(end - start) << SECTOR_SHIFT)
    elif action == RUN_ZERO:
        memset(dst + (start << SECTOR_SHIFT), 0, <size_t>(end - start) << SECTOR_SHIFT)
    else:
        runs[2 * nruns] = <uint32_t>start
        runs[2 * nruns + 1] = <uint32_t>(end - start)


cdef Py_ssize_t _scan_runs(const uint8_t *want, const uint8_t *have, uint8_t *mark,
                           Py_ssize_t nsectors, int action, const uint8_t *src,
                           uint8_t *dst, uint32_t *runs, Py_ssize_t *nruns_out) noexcept nogil:
    """Act on every run of sectors whose bit is set in ``want`` (all sectors if
    NULL) and clear in ``have`` (ignored if NULL); runs span word boundaries,
    so a full block is one action.  When ``mark`` is not NULL (it is then
    ``have``), the taken bits are set in it.  Returns the number of sectors
    taken and stores the number of runs in ``nruns_out``."""
    cdef Py_ssize_t nwords = (nsectors >> 6) + ((nsectors & 63) != 0)
    cdef Py_ssize_t w, base, nbytes, b, nruns = 0, total = 0
    cdef Py_ssize_t start = -1    # start of the pending run, or -1
    cdef uint64_t valid, t, h = 0, x
    cdef int z, ones
    for w in range(nwords):
        base = w << 6
        nbytes = _word_extent(nsectors, base, &valid)
        t = valid
        if want != NULL:
            t &= _load_bits(want + 8 * w, nbytes)
        if have != NULL:
            h = _load_bits(have + 8 * w, nbytes)
            t &= ~h
        if t == 0:
            if start >= 0:
                _emit(action, start, base, src, dst, runs, nruns)
                total += base - start
                nruns += 1
                start = -1
            continue
        if mark != NULL:
            _store_bits(mark + 8 * w, nbytes, h | t)
        if t == ALL_ONES:
            if start < 0:
                start = base
            continue
        # A mixed word: walk its runs from the top bit down.  x holds the
        # bits from position b on, shifted up so that bit b is the top bit.
        x = t
        b = 0
        while True:
            if x == 0:
                if start >= 0:
                    _emit(action, start, base + b, src, dst, runs, nruns)
                    total += base + b - start
                    nruns += 1
                    start = -1
                break
            z = clz64(x)
            if z:
                if start >= 0:
                    _emit(action, start, base + b, src, dst, runs, nruns)
                    total += base + b - start
                    nruns += 1
                    start = -1
                b += z
                x <<= z
            # the top bit of x is set: count the ones that follow it
            if ~x == 0:
                ones = <int>(64 - b)
            else:
                ones = clz64(~x)
            if start < 0:
                start = base + b
            b += ones
            if b >= 64:
                break        # the run may go on in the next word
            x <<= ones
    if start >= 0:
        _emit(action, start, nsectors, src, dst, runs, nruns)
        total += nsectors - start
        nruns += 1
    nruns_out[0] = nruns
    return total


cdef Py_ssize_t _bitmap_count(const uint8_t *bitmap, Py_ssize_t nsectors) noexcept nogil:
    cdef Py_ssize_t nwords = (nsectors >> 6) + ((nsectors & 63) != 0)
    cdef Py_ssize_t w, nbytes, n = 0
    cdef uint64_t valid, t
    for w in range(nwords):
        nbytes = _word_extent(nsectors, w << 6, &valid)
        t = _load_bits(bitmap + 8 * w, nbytes) & valid
        if t == ALL_ONES:
            n += 64
        elif t:
            n += popcount64(t)
    return n


cdef void _bitmap_or(const uint8_t *src, uint8_t *dst, Py_ssize_t nbytes) noexcept nogil:
    cdef Py_ssize_t i = 0
    while i + 8 <= nbytes:
        store64(dst + i, load64(dst + i) | load64(src + i))
        i += 8
    while i < nbytes:
        dst[i] |= src[i]
        i += 1


cdef Py_ssize_t _clear_zero_sectors(uint8_t *bitmap, const uint8_t *data,
                                    Py_ssize_t nsectors) noexcept nogil:
    """Clear the bits of all-zero sectors; return the bits left set."""
    cdef Py_ssize_t nwords = (nsectors >> 6) + ((nsectors & 63) != 0)
    cdef Py_ssize_t w, base, nbytes, left = 0
    cdef uint64_t valid, h, t, x, bit, cleared
    cdef int z
    cdef const uint8_t *p
    for w in range(nwords):
        base = w << 6
        nbytes = _word_extent(nsectors, base, &valid)
        h = _load_bits(bitmap + 8 * w, nbytes)
        t = h & valid
        if t == 0:
            continue
        p = data + (base << SECTOR_SHIFT)
        cleared = 0
        x = t
        while x:
            z = clz64(x)
            bit = TOP_BIT >> z
            x &= ~bit
            if sector_is_zero(p + (<Py_ssize_t>z << SECTOR_SHIFT)):
                cleared |= bit
        if cleared:
            _store_bits(bitmap + 8 * w, nbytes, h & ~cleared)
        left += popcount64(t & ~cleared)
    return left


cdef Py_ssize_t _drop_equal_sectors(uint8_t *bitmap, const uint8_t *data,
                                    const uint8_t *ref_bitmap, const uint8_t *ref_data,
                                    Py_ssize_t nsectors) noexcept nogil:
    """Clear the bits of sectors set in both bitmaps with equal data; return how many."""
    cdef Py_ssize_t nwords = (nsectors >> 6) + ((nsectors & 63) != 0)
    cdef Py_ssize_t w, base, nbytes, off, dropped = 0
    cdef uint64_t valid, h, t, x, bit, cleared
    cdef int z
    for w in range(nwords):
        base = w << 6
        nbytes = _word_extent(nsectors, base, &valid)
        h = _load_bits(bitmap + 8 * w, nbytes)
        t = h & valid
        if t == 0:
            continue
        t &= _load_bits(ref_bitmap + 8 * w, nbytes)
        if t == 0:
            continue
        cleared = 0
        x = t
        while x:
            z = clz64(x)
            bit = TOP_BIT >> z
            x &= ~bit
            off = (base + z) << SECTOR_SHIFT
            if memcmp(data + off, ref_data + off, SECTOR_SIZE) == 0:
                cleared |= bit
        if cleared:
            _store_bits(bitmap + 8 * w, nbytes, h & ~cleared)
            dropped += popcount64(cleared)
    return dropped


# ---------------------------------------------------------------------------
# Buffer conversion and checks (GIL held)


cdef const uint8_t[::1] _input(object buf):
    """A read-only byte view of any contiguous buffer (like ``np.frombuffer``)."""
    cdef const uint8_t[::1] view
    if buf is None:
        raise TypeError("a bytes-like object is required, not 'NoneType'")
    try:
        view = buf
    except (ValueError, TypeError, BufferError):
        # not a byte format (e.g. a uint32 array): read its bytes as the twin does
        view = memoryview(buf).cast("B")
    return view


cdef uint8_t[::1] _output(object buf):
    """A writable byte view of a caller-owned output buffer; read-only is a ValueError."""
    cdef uint8_t[::1] view
    if buf is None:
        raise TypeError("a bytes-like object is required, not 'NoneType'")
    try:
        view = buf
    except (ValueError, TypeError, BufferError):
        mv = memoryview(buf)
        if mv.readonly:
            raise ValueError("output buffer is read-only") from None
        view = mv.cast("B")
    return view


cdef uint32_t[::1] _output_u32(object buf):
    """A writable uint32 view of the runs buffer; read-only is a ValueError."""
    cdef uint32_t[::1] view
    if buf is None:
        raise TypeError("a bytes-like object is required, not 'NoneType'")
    try:
        view = buf
    except (ValueError, TypeError, BufferError):
        mv = memoryview(buf)
        if mv.readonly:
            raise ValueError("output buffer is read-only") from None
        mv = mv.cast("B")
        if mv.nbytes % 4:
            raise ValueError("runs buffer size must be a multiple of 4 bytes") from None
        view = mv.cast("I")
    return view


cdef inline const uint8_t *_ptr(const uint8_t[::1] view) noexcept:
    return &view[0] if view.shape[0] else NULL


cdef inline uint8_t *_wptr(uint8_t[::1] view) noexcept:
    return &view[0] if view.shape[0] else NULL


cdef int _check_sectors(Py_ssize_t nsectors) except -1:
    if nsectors < 0:
        raise ValueError(f"nsectors must be >= 0, got {nsectors}")
    return 0


cdef int _check_bitmap(Py_ssize_t size, Py_ssize_t nsectors) except -1:
    if size < (nsectors >> 3) + ((nsectors & 7) != 0):
        raise ValueError(f"bitmap of {size} bytes is too small for {nsectors} sectors")
    return 0


cdef int _check_data(Py_ssize_t size, Py_ssize_t nsectors) except -1:
    if nsectors > PY_SSIZE_T_MAX // SECTOR_SIZE or size < nsectors * SECTOR_SIZE:
        raise ValueError(f"data buffer of {size} bytes is too small for {nsectors} sectors")
    return 0


# ---------------------------------------------------------------------------
# The kernel


def overlay(src_bitmap, src_data, out_bitmap, out_data, Py_ssize_t nsectors):
    """Copy each sector set in ``src_bitmap`` and clear in ``out_bitmap`` from
    ``src_data`` to ``out_data`` and set its bit in ``out_bitmap`` (a younger
    layer already in ``out`` wins).  Returns the number of sectors copied.

    Runs of sectors are copied with one memmove each; a full layer onto an
    empty output is a single copy."""
    cdef const uint8_t[::1] sb = _input(src_bitmap)
    cdef const uint8_t[::1] sd = _input(src_data)
    cdef uint8_t[::1] ob = _output(out_bitmap)
    cdef uint8_t[::1] od = _output(out_data)
    cdef Py_ssize_t n, nruns
    _check_sectors(nsectors)
    _check_bitmap(sb.shape[0], nsectors)
    _check_bitmap(ob.shape[0], nsectors)
    _check_data(sd.shape[0], nsectors)
    _check_data(od.shape[0], nsectors)
    cdef const uint8_t *psb = _ptr(sb)
    cdef const uint8_t *psd = _ptr(sd)
    cdef uint8_t *pob = _wptr(ob)
    cdef uint8_t *pod = _wptr(od)
    with nogil:
        n = _scan_runs(psb, pob, pob, nsectors, RUN_COPY, psd, pod, NULL, &nruns)
    return n


def overlay_full(src_data, out_bitmap, out_data, Py_ssize_t nsectors):
    """``overlay`` for a layer where every sector is present (a fixed disk):
    copies the sectors clear in ``out_bitmap``, sets all ``nsectors`` bits and
    returns the number of sectors copied."""
    cdef const uint8_t[::1] sd = _input(src_data)
    cdef uint8_t[::1] ob = _output(out_bitmap)
    cdef uint8_t[::1] od = _output(out_data)
    cdef Py_ssize_t n, nruns
    _check_sectors(nsectors)
    _check_bitmap(ob.shape[0], nsectors)
    _check_data(sd.shape[0], nsectors)
    _check_data(od.shape[0], nsectors)
    cdef const uint8_t *psd = _ptr(sd)
    cdef uint8_t *pob = _wptr(ob)
    cdef uint8_t *pod = _wptr(od)
    with nogil:
        n = _scan_runs(NULL, pob, pob, nsectors, RUN_COPY, psd, pod, NULL, &nruns)
    return n


def fill_unset(bitmap, data, Py_ssize_t nsectors):
    """Zero every sector of ``data`` whose bit is clear.  Returns how many."""
    cdef const uint8_t[::1] b = _input(bitmap)
    cdef uint8_t[::1] d = _output(data)
    cdef Py_ssize_t n, nruns
    _check_sectors(nsectors)
    _check_bitmap(b.shape[0], nsectors)
    _check_data(d.shape[0], nsectors)
    cdef const uint8_t *pb = _ptr(b)
    cdef uint8_t *pd = _wptr(d)
    with nogil:
        n = _scan_runs(NULL, pb, NULL, nsectors, RUN_ZERO, NULL, pd, NULL, &nruns)
    return n


def bitmap_or(src, dst, Py_ssize_t nbytes):
    """``dst[:nbytes] |= src[:nbytes]``."""
    cdef const uint8_t[::1] s = _input(src)
    cdef uint8_t[::1] d = _output(dst)
    if nbytes < 0 or s.shape[0] < nbytes or d.shape[0] < nbytes:
        raise ValueError(
            f"bitmap_or: {nbytes} bytes do not fit buffers of {s.shape[0]} and {d.shape[0]}"
        )
    cdef const uint8_t *ps = _ptr(s)
    cdef uint8_t *pd = _wptr(d)
    with nogil:
        _bitmap_or(ps, pd, nbytes)
    return None


def bitmap_count(bitmap, Py_ssize_t nsectors):
    """Number of set bits among the first ``nsectors``."""
    cdef const uint8_t[::1] b = _input(bitmap)
    cdef Py_ssize_t n
    _check_sectors(nsectors)
    _check_bitmap(b.shape[0], nsectors)
    cdef const uint8_t *pb = _ptr(b)
    with nogil:
        n = _bitmap_count(pb, nsectors)
    return n


def find_runs(bitmap, Py_ssize_t nsectors, runs):
    """Write the runs of set bits as ``(start, length)`` pairs into the uint32
    buffer ``runs`` and return how many runs there are.  ``runs`` must hold
    ``2 * (nsectors // 2 + 1)`` entries (the most runs a bitmap can have)."""
    cdef const uint8_t[::1] b = _input(bitmap)
    cdef Py_ssize_t nruns = 0
    _check_sectors(nsectors)
    _check_bitmap(b.shape[0], nsectors)
    cdef uint32_t[::1] r = _output_u32(runs)
    if nsectors > 0xFFFFFFFF:
        raise ValueError(f"find_runs: {nsectors} sectors do not fit uint32 run entries")
    cdef Py_ssize_t need = 2 * (nsectors // 2 + 1)
    if r.shape[0] < need:
        raise ValueError(f"runs buffer of {r.shape[0]} entries is too small, need {need}")
    cdef const uint8_t *pb = _ptr(b)
    cdef uint32_t *pr = &r[0]
    with nogil:
        _scan_runs(pb, NULL, NULL, nsectors, RUN_RECORD, NULL, NULL, pr, &nruns)
    return nruns


def is_zero(data, Py_ssize_t offset=0, Py_ssize_t length=-1):
    """True when ``data[offset:offset+length]`` (to the end if length < 0) is all zeros.

    Stops at the first 256-byte chunk that holds a non-zero byte."""
    cdef const uint8_t[::1] d = _input(data)
    cdef Py_ssize_t size = d.shape[0]
    cdef bint zero
    if offset < 0 or offset > size or (length >= 0 and length > size - offset):
        raise ValueError(f"range {offset}+{length} is outside a buffer of {size} bytes")
    if length < 0:
        length = size - offset
    if length == 0:
        return True
    cdef const uint8_t *p = &d[offset]
    with nogil:
        zero = mem_is_zero(p, <size_t>length)
    return zero


def clear_zero_sectors(bitmap, data, Py_ssize_t nsectors):
    """Clear the bit of every set sector whose data is all zeros.  Returns the
    number of bits still set."""
    cdef uint8_t[::1] b = _output(bitmap)
    cdef const uint8_t[::1] d = _input(data)
    cdef Py_ssize_t n
    _check_sectors(nsectors)
    _check_bitmap(b.shape[0], nsectors)
    _check_data(d.shape[0], nsectors)
    cdef uint8_t *pb = _wptr(b)
    cdef const uint8_t *pd = _ptr(d)
    with nogil:
        n = _clear_zero_sectors(pb, pd, nsectors)
    return n


def drop_equal_sectors(bitmap, data, ref_bitmap, ref_data, Py_ssize_t nsectors):
    """Clear the bit of every sector set in both bitmaps whose data equals the
    reference's.  Returns the number of bits cleared."""
    cdef uint8_t[::1] b = _output(bitmap)
    cdef const uint8_t[::1] d = _input(data)
    cdef const uint8_t[::1] rb = _input(ref_bitmap)
    cdef const uint8_t[::1] rd = _input(ref_data)
    cdef Py_ssize_t n
    _check_sectors(nsectors)
    _check_bitmap(b.shape[0], nsectors)
    _check_bitmap(rb.shape[0], nsectors)
    _check_data(d.shape[0], nsectors)
    _check_data(rd.shape[0], nsectors)
    cdef uint8_t *pb = _wptr(b)
    cdef const uint8_t *pd = _ptr(d)
    cdef const uint8_t *prb = _ptr(rb)
    cdef const uint8_t *prd = _ptr(rd)
    with nogil:
        n = _drop_equal_sectors(pb, pd, prb, prd, nsectors)
    return n


def fingerprint(data):
    """xxh3-64 of the buffer, as an unsigned int.

    This one verb is not native code of ours: no xxHash C headers are
    available to build against and vhdcore does not vendor third-party code,
    so it calls the ``xxhash`` package's ``xxh3_64_intdigest``, which
    releases the GIL while it hashes large inputs.  Same function as the
    twin, so the same results and exceptions."""
    return _xxh3_64_intdigest(data)
