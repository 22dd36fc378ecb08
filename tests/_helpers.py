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
