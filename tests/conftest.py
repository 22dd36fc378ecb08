"""Shared fixtures: the third-party fixture chains, tool detection, a kernel
backend switch."""
from __future__ import annotations

import gzip
import shutil

import pytest

from _helpers import FIXTURE_META, SHARED_FIXTURES, fixture_params, have_tool  # noqa: F401


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
