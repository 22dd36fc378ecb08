"""Sector- and byte-granular writes through chains of depth 1 to 30, compared
with an independent model: a plain bytearray that receives the same writes."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _builders import build_chain, read_all
from vhdcore.chain import Chain

MiB = 1024 * 1024


@pytest.mark.parametrize("depth", [1, 2, 3, 5, 12, 30])
@pytest.mark.parametrize("granularity", [512, 1])
def test_chain_matches_model(tmp_path, kernel_backend, depth, granularity):
    mc = build_chain(tmp_path, size=5 * MiB + 512 * 5, depth=depth, block_size=512 * 1024,
                     writes_per_layer=8, granularity=granularity, max_len=200_000,
                     seed=depth * 31 + granularity)
    assert read_all(mc.leaf) == bytes(mc.model)


@pytest.mark.parametrize("base", ["fixed", "dynamic"])
def test_partial_reads_match_model(tmp_path, base):
    import random

    mc = build_chain(tmp_path, size=3 * MiB, depth=4, base=base, block_size=1 * MiB, seed=5,
                     writes_per_layer=15, granularity=512)
    rnd = random.Random(9)
    with Chain.open(mc.leaf) as c:
        for _ in range(200):
            off = rnd.randrange(c.virtual_size)
            n = rnd.randrange(0, 3 * MiB)
            assert c.read(off, n) == bytes(mc.model[off : off + n])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    depth=st.integers(1, 5),
    block_kib=st.sampled_from([4, 64, 512]),
    writes=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 255), st.integers(1, 40),
                              st.integers(0, 255)), max_size=40),
)
def test_random_sector_writes(tmp_path_factory, depth, block_kib, writes):
    """Hypothesis: one tag byte per sector, expanded; newest layer wins per sector."""
    from vhdcore.disk import create_differencing, create_dynamic

    tmp = tmp_path_factory.mktemp("h")
    nsec = 256
    size = nsec * 512
    model = bytearray(size)
    paths = [tmp / "d0.vhd"]
    create_dynamic(paths[0], size, block_size=block_kib * 1024).close()
    for i in range(1, depth):
        paths.append(tmp / f"d{i}.vhd")
        create_differencing(paths[i], paths[i - 1]).close()
    for layer, sector, count, tag in sorted(writes, key=lambda w: w[0] % depth):
        layer %= depth
        count = min(count, nsec - sector)
        # a child writes only after its parent's writes: replay in layer order
        data = bytes([tag]) * (count * 512)
        with Chain.open(paths[layer], writable=True) as c:
            c.write(sector * 512, data)
        model[sector * 512 : (sector + count) * 512] = data
    assert read_all(paths[-1]) == bytes(model)
