"""Helpers the tests import (kept out of conftest.py, whose module name
clashes with the benchmarks' conftest)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
#: the shared fixtures live beside the project checkout; the suite still
#: passes without them (those tests skip)
SHARED_FIXTURES = Path(os.environ.get("VHDCORE_SHARED_FIXTURES", HERE.parent.parent / "shared" / "fixtures"))


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None


def _fixture_meta() -> dict:
    f = SHARED_FIXTURES / "fixtures.json"
    if not f.is_file():
        return {}
    return json.loads(f.read_text())


FIXTURE_META = _fixture_meta()
FIXTURE_NAMES = sorted(FIXTURE_META)


def fixture_params():
    """Parameters for tests over all fixture chains (one skip when absent)."""
    if not FIXTURE_NAMES:
        return [pytest.param("absent", marks=pytest.mark.skip(reason="shared fixtures absent"))]
    return FIXTURE_NAMES


def server_missing(why: str) -> None:
    """Skip the calling test because a server it needs is absent, or fail it
    when ``VHDCORE_REQUIRE_SERVERS=1`` (set by scripts/test.sh, which starts
    every server the suite uses): a CI run that silently tested no server
    must not pass."""
    if os.environ.get("VHDCORE_REQUIRE_SERVERS") == "1":
        pytest.fail(f"VHDCORE_REQUIRE_SERVERS=1 but {why}")
    pytest.skip(why)


def spill_segment(parts, directory=None):
    """A SpillSegment (a segment packed into a scratch file) holding ``parts``."""
    from vhdcore.store import SpillSegment

    seg = SpillSegment(None if directory is None else str(directory))
    for p in parts:
        seg.append(p)
    return seg
