"""Shared fixtures: the third-party fixture chains, tool detection, a kernel
backend switch."""
from __future__ import annotations

import gzip
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


@pytest.fixture
def fixture_chain(request, tmp_path):
    """Decompress one shared fixture chain into tmp_path; returns (leaf path, meta)."""
    name = request.param
    if not FIXTURE_META:
        pytest.skip("shared fixtures are not present beside the checkout")
    meta = FIXTURE_META[name]
    d = tmp_path / name
    d.mkdir()
    for f in meta["chain_base_to_leaf"]:
        with gzip.open(SHARED_FIXTURES / name / (f + ".gz"), "rb") as src, open(d / f, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return d / meta["leaf"], meta


def fixture_params():
    """Parameters for tests over all fixture chains (one skip when absent)."""
    if not FIXTURE_NAMES:
        return [pytest.param("absent", marks=pytest.mark.skip(reason="shared fixtures absent"))]
    return FIXTURE_NAMES


@pytest.fixture(params=["cython", "python"])
def kernel_backend(request, monkeypatch):
    """Run a test with each kernel implementation (patched into vhdcore.kernels)."""
    import importlib

    from vhdcore import kernels

    if request.param == "cython":
        try:
            impl = importlib.import_module("vhdcore._merge")
        except ImportError:
            pytest.skip("compiled kernel not built")
    else:
        impl = importlib.import_module("vhdcore._merge_py")
    for name in impl.KERNEL_NAMES:
        monkeypatch.setattr(kernels, name, getattr(impl, name))
    return request.param
