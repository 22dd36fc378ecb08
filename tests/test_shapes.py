"""Hypothesis: every disk shape a real chain can have, against the
independent model (a plain bytearray receiving the same writes).

A shape is drawn: block size, a virtual size that is a block multiple, odd,
or within a few sectors of a block boundary; a fixed or dynamic base; depth
1-5 with children that may be larger than their parents; last blocks stored
short (as FreeBSD ``mkimg`` writes them); sector-granular writes into every
layer.  For each shape ``cat``, ``flatten``, ``compact`` and ``coalesce``
(of any differencing layer, its own children relinked) must read exactly
like the model.

The normal run draws a bounded number of examples; set
``VHDCORE_HYPOTHESIS_PROFILE=long`` for a longer search (docs/fuzzing.md).
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _builders import read_all, store_last_block_short
from vhdcore.chain import Chain
from vhdcore.check import check_chain, check_file
from vhdcore.coalesce import coalesce, compact, flatten
from vhdcore.disk import create_differencing, create_dynamic, create_fixed

SECTOR = 512
KiB = 1024
PROFILE = os.environ.get("VHDCORE_HYPOTHESIS_PROFILE", "ci")
EXAMPLES = {"ci": 30, "long": 600}.get(PROFILE, 30)


@st.composite
def shapes(draw):
    bs = draw(st.sampled_from([4 * KiB, 64 * KiB, 512 * KiB, 2048 * KiB]))
    spb = bs // SECTOR
    full = draw(st.integers(1, 3 if bs < 2048 * KiB else 2))
    kind = draw(st.sampled_from(["multiple", "odd", "near"]))
    if kind == "multiple":
        nsec = full * spb
    elif kind == "odd":
        nsec = full * spb + draw(st.integers(1, spb - 1))
    else:
        nsec = full * spb + draw(st.sampled_from([-3, -2, -1, 1, 2, 3]))
    depth = draw(st.integers(1, 5))
    base = draw(st.sampled_from(["fixed", "dynamic"]))
    sizes = [nsec]
    for _ in range(depth - 1):
        grow = draw(st.sampled_from([0, 0, 0, 1, 3, spb + 5]))
        sizes.append(sizes[-1] + grow)
    short = [draw(st.booleans()) for _ in range(depth)]
    writes = draw(st.lists(st.tuples(st.integers(0, depth - 1), st.integers(0, 10**6),
                                     st.integers(1, 2 * spb + 3),
                                     st.sampled_from([0, 1, 2, 0x55, 0xFF])),
                           max_size=12))
    target = draw(st.integers(1, max(1, depth - 1)))
    return bs, sizes, base, short, writes, target


def _build(tmp, bs, sizes, base, short, writes):
    depth = len(sizes)
    model = bytearray(sizes[-1] * SECTOR)
    paths = [tmp / "d0.vhd"]
    if base == "fixed":
        create_fixed(paths[0], sizes[0] * SECTOR).close()
    else:
        create_dynamic(paths[0], sizes[0] * SECTOR, block_size=bs).close()
    by_layer = sorted(writes, key=lambda w: w[0])
    for layer in range(depth):
        if layer:
            p = tmp / f"d{layer}.vhd"
            create_differencing(p, paths[-1], size=sizes[layer] * SECTOR,
                                block_size=bs if base == "fixed" else None).close()
            paths.append(p)
        with Chain.open(paths[layer], writable=True) as c:
            for wl, sector, count, tag in by_layer:
                if wl != layer:
                    continue
                s = sector % sizes[layer]
                n = min(count, sizes[layer] - s)
                data = bytes([tag]) * (n * SECTOR)
                c.write(s * SECTOR, data)
                model[s * SECTOR : (s + n) * SECTOR] = data
        if short[layer] and not (layer == 0 and base == "fixed"):
            store_last_block_short(paths[layer], stale_bits=layer % 2 == 1)
    return paths, bytes(model)


def _errors(problems):
    return [p for p in problems if p.severity == "error"]


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(shape=shapes())
def test_every_shape_reads_like_the_model(tmp_path_factory, shape):
    bs, sizes, base, short, writes, target = shape
    tmp = tmp_path_factory.mktemp("shape")
    paths, model = _build(tmp, bs, sizes, base, short, writes)
    leaf = paths[-1]
    # cat
    assert read_all(leaf) == model
    with Chain.open(leaf) as c:
        c.copy_to_raw(tmp / "cat.raw")
    assert (tmp / "cat.raw").read_bytes() == model
    # flatten
    res = flatten(leaf, tmp / "flat.vhd")
    assert read_all(tmp / "flat.vhd") == model
    assert res.bytes_written == os.path.getsize(tmp / "flat.vhd")
    assert _errors(check_file(tmp / "flat.vhd")) == []
    # compact, into another directory
    out = tmp / "compacted"
    out.mkdir()
    compact(leaf, out / "leaf.vhd")
    with Chain.open(out / "leaf.vhd", allowed_dirs=[out, tmp]) as c:
        assert c.read(0, c.virtual_size) == model
    os.unlink(out / "leaf.vhd")  # a second child of the leaf's parent: gone before coalescing
    if len(paths) < 2:
        return
    # coalesce one differencing layer into its parent; its child (if any) is
    # found and relinked, and the merged layer can then be removed
    k = target
    before = read_all(paths[k])
    res = coalesce(paths[k])
    assert read_all(paths[k - 1]) == before
    expect_relinked = [str(paths[k + 1])] if k + 1 < len(paths) else []
    assert [str(p) for p in res.relinked] == expect_relinked
    os.unlink(paths[k])
    rest = paths[:k] + paths[k + 1 :]
    assert read_all(rest[-1]) == model
    assert _errors(check_chain(rest[-1])) == []
