"""The public API: ``vhdcore.__all__``, docstrings, the default backend, the
cost of ``import vhdcore``, the version, and (when mypy is installed and the
sources are beside the tests) ``mypy --strict`` and ``mypy.stubtest``.

That the compiled kernel and its pure-Python twin have the same names and
signatures is tested in tests/test_kernels.py (``test_same_names_and_signatures``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vhdcore

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "vhdcore"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VHDCORE_IMPORT_POLICY"}
    env.update(extra)
    return env


def _run(code: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_clean_env(**env), timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_all_names_exist_and_are_documented():
    assert len(set(vhdcore.__all__)) == len(vhdcore.__all__), "duplicates in __all__"
    for name in vhdcore.__all__:
        obj = getattr(vhdcore, name)
        if name in ("__version__", "backend"):
            assert isinstance(obj, str)
            continue
        doc = inspect.getdoc(obj) or ""
        assert doc.strip(), f"vhdcore.{name} has no docstring"
        if dataclasses.is_dataclass(obj):
            # a dataclass without a docstring gets its signature as __doc__
            assert not doc.startswith(f"{obj.__name__}("), f"vhdcore.{name} has no docstring"


def test_public_methods_are_documented():
    for name in vhdcore.__all__:
        obj = getattr(vhdcore, name)
        if not inspect.isclass(obj) or issubclass(obj, BaseException):
            continue
        for attr, value in vars(obj).items():
            if attr.startswith("_"):
                continue
            fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            if callable(fn):
                assert inspect.getdoc(fn), f"vhdcore.{name}.{attr} has no docstring"


def test_every_error_is_exported():
    from vhdcore import errors

    assert set(errors.__all__) <= set(vhdcore.__all__)
    for name in errors.__all__:
        assert issubclass(getattr(vhdcore, name), vhdcore.VhdError) or name == "VhdError"


def test_lazy_names_are_the_module_objects():
    from vhdcore import chain, check, coalesce, disk, fsmap, imaging, store

    assert vhdcore.Chain is chain.Chain
    assert vhdcore.open_chain == chain.Chain.open
    assert vhdcore.check_chain is check.check_chain
    assert vhdcore.flatten is coalesce.flatten
    assert vhdcore.VhdFile is disk.VhdFile
    assert vhdcore.map_disk is fsmap.map_disk
    assert vhdcore.create_image is imaging.create_image
    assert vhdcore.restore is store.restore
    # the two functions named like their modules stay reachable through them
    assert callable(vhdcore.coalesce.coalesce) and callable(vhdcore.estimate.estimate)
    with pytest.raises(AttributeError):
        getattr(vhdcore, "no_such_name")
    assert set(vhdcore.__all__) <= set(dir(vhdcore))


def test_star_import():
    ns: dict[str, object] = {}
    exec("from vhdcore import *", ns)
    assert set(vhdcore.__all__) <= set(ns)


def test_backend_is_cython_by_default():
    """Without VHDCORE_IMPORT_POLICY an installed vhdcore runs the compiled kernel."""
    assert _run("import vhdcore; print(vhdcore.backend)") == "cython"
    assert _run("import vhdcore; print(vhdcore.backend)", VHDCORE_IMPORT_POLICY="python") == "python"


def test_import_is_light():
    """``import vhdcore`` loads neither numpy nor a compressor nor an object-store client."""
    heavy = ("numpy", "lz4", "boto3", "botocore", "swiftclient", "requests", "tqdm")
    loaded = _run("import sys, vhdcore; "
                  f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    assert loaded == ""


def test_commands_run_numpy_with_one_blas_thread():
    """The CLI asks OpenBLAS for one thread (vhdcore calls no BLAS routine and
    its idle threads spin at import), unless the user chose a number."""
    code = "import os, vhdcore.cli; print(os.environ.get('OPENBLAS_NUM_THREADS'))"
    env = {k: v for k, v in _clean_env().items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    assert _run(code, OPENBLAS_NUM_THREADS="3") == "3"


def test_imaging_loads_the_filesystem_readers_only_when_used():
    loaded = _run("import sys, vhdcore.imaging; "
                  "print(','.join(m for m in sys.modules if m.startswith(('vhdcore.fsmap', "
                  "'vhdcore._fs'))))")
    assert loaded == ""


def test_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", vhdcore.__version__)
    out = subprocess.run([sys.executable, "-m", "vhdcore", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    assert out.stdout.strip() == f"vhdcore {vhdcore.__version__}"


def test_installed_metadata_matches():
    from importlib.metadata import PackageNotFoundError, version

    try:
        assert version("vhdcore") == vhdcore.__version__
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        pytest.skip("vhdcore is not installed")


def test_changelog_has_this_version():
    changelog = ROOT / "CHANGELOG.md"
    if not changelog.is_file():
        pytest.skip("CHANGELOG.md is not beside the tests")
    assert f"## [{vhdcore.__version__}]" in changelog.read_text(encoding="utf-8")


def test_typed_package():
    pkg = Path(vhdcore.__file__).parent
    assert (pkg / "py.typed").is_file()
    assert (pkg / "_merge.pyi").is_file()


_HAVE_MYPY = importlib.util.find_spec("mypy") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _HAVE_MYPY, reason="mypy is not installed")
@pytest.mark.skipif(not SRC.is_dir(), reason="the sources are not beside the tests")
def test_mypy_strict():
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
                          str(SRC)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(not _HAVE_MYPY, reason="mypy is not installed")
def test_stub_matches_the_extension(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mypy.stubtest", "--mypy-config-file",
                          os.devnull, "vhdcore._merge"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
