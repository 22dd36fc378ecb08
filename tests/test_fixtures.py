"""The third-party fixture chains (blktap vhd-util, qemu-img): reading the
leaf through the chain gives exactly the SHA-256 computed without any VHD code."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from _helpers import fixture_params
from vhdcore.chain import Chain


@pytest.mark.parametrize("fixture_chain", fixture_params(), indirect=True)
def test_cat_matches_digest(fixture_chain, kernel_backend):
    leaf, meta = fixture_chain
    with Chain.open(leaf) as chain:
        assert len(chain) == len(meta["chain_base_to_leaf"])
        assert chain.virtual_size == meta["virtual_size"]
        h = hashlib.sha256()
        for view in chain.iter_raw():
            h.update(view)
    assert h.hexdigest() == meta["flat_sha256"]


@pytest.mark.parametrize("fixture_chain", fixture_params(), indirect=True)
def test_cli_cat_matches_digest(fixture_chain, tmp_path):
    leaf, meta = fixture_chain
    out = subprocess.run([sys.executable, "-m", "vhdcore", "cat", str(leaf)], capture_output=True,
                         check=True)
    assert hashlib.sha256(out.stdout).hexdigest() == meta["flat_sha256"]
    raw = tmp_path / "out.raw"
    subprocess.run([sys.executable, "-m", "vhdcore", "cat", str(leaf), "-o", str(raw)], check=True)
    assert hashlib.sha256(raw.read_bytes()).hexdigest() == meta["flat_sha256"]


@pytest.mark.parametrize("fixture_chain", fixture_params(), indirect=True)
def test_check_passes_on_fixtures(fixture_chain):
    from vhdcore.check import check_chain

    leaf, _ = fixture_chain
    problems = [p for p in check_chain(leaf) if p.severity == "error"]
    assert problems == []


@pytest.mark.parametrize("fixture_chain", fixture_params(), indirect=True)
def test_reading_modifies_nothing(fixture_chain):
    leaf, meta = fixture_chain
    files = sorted(leaf.parent.iterdir())
    before = {f: (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest()) for f in files}
    with Chain.open(leaf) as chain:
        chain.read(0, chain.virtual_size)
    after = {f: (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest()) for f in files}
    assert before == after
