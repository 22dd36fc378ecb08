"""Benchmark workloads, generated once per session.  Size with
VHDCORE_BENCH_MIB (default 64 MiB of virtual disk: small enough for CI smoke
runs; use 1024 or more for real figures)."""
from __future__ import annotations

import os

import pytest

from vhdcore._workloads import make_chain

MiB = 1024 * 1024
BENCH_MIB = int(os.environ.get("VHDCORE_BENCH_MIB", "64"))


@pytest.fixture(scope="session")
def workloads(tmp_path_factory):
    made = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = make_chain(tmp_path_factory.mktemp(kind), kind, size=BENCH_MIB * MiB,
                                    layers=3 if kind != "scattered" else 2, seed=1)
        return made[kind]
    return get
