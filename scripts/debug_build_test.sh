#!/usr/bin/env bash
# Build vhdcore's Cython kernel with bounds and wraparound checks on
# (VHDCORE_DEBUG_BUILD=1, see setup.py) and run the test suite against it.
#
# Nothing in the checkout changes: the source tree is copied (without the
# generated _merge.c and any build products, so cythonize runs again with the
# debug directives), installed (not editable) into a throwaway virtualenv
# that sees this Python's packages (numpy, Cython, pytest, ...), and the
# tests run from a directory that does not have the checkout's src/ on the
# path, against the installed package.  The editable install of the checkout
# keeps its optimised kernel.
#
# By default it runs the tests that drive the kernel (its own tests, the
# model, fixtures, third-party readers, fuzzing, shapes, coalesce, flatten and
# imaging): the rest of the suite already ran against the source tree in the
# same CI run and does not reach the kernel any differently.
#
# Usage: scripts/debug_build_test.sh [pytest arguments, instead of the default selection]
#   PYTHON=python3.11  the interpreter to build for (default: python3)
#   KEEP=1             keep the temporary directory (its path is printed)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vhdcore-debug.XXXXXX")
if [ "${KEEP:-}" = "1" ]; then
    echo "debug build: keeping $WORK"
else
    trap 'rm -rf "$WORK"' EXIT
fi
t0=$(date +%s)

echo "debug build: copying the source tree"
"$PY" - "$REPO" "$WORK/tree" <<'EOF'
import shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2], symlinks=True, ignore=shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "*.so", "*.pyd", "_merge.c", "__pycache__",
    ".hypothesis", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".benchmarks", ".venv"))
EOF

echo "debug build: virtualenv and install with VHDCORE_DEBUG_BUILD=1"
# no pip (nor the old setuptools it brings) inside: the build uses this
# Python's setuptools and Cython, and this Python's pip installs into it
"$PY" -m venv --system-site-packages --without-pip "$WORK/venv"
VPY="$WORK/venv/bin/python"
# the build requirements (pip only fetches what this Python lacks, e.g. a newer setuptools)
mapfile -t REQS < <("$VPY" - "$WORK/tree/pyproject.toml" <<'PYEOF'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))
PYEOF
)
"$PY" -m pip --python "$VPY" install --quiet "${REQS[@]}"
VHDCORE_DEBUG_BUILD=1 "$PY" -m pip --python "$VPY" install --quiet --no-build-isolation \
    --no-deps --no-cache-dir "$WORK/tree"

# the C that cythonize generated must carry the bounds checks
if ! grep -q "__Pyx_RaiseBufferIndexError" "$WORK/tree/src/vhdcore/_merge.c"; then
    echo "debug build: the generated _merge.c has no bounds checks" >&2
    exit 1
fi
t1=$(date +%s)

mkdir "$WORK/run"
cp -r "$REPO/tests" "$WORK/run/tests"
cp "$REPO/pyproject.toml" "$WORK/run/"   # pytest settings (markers), no src/ on the path
cd "$WORK/run"
# the package under test must be the debug build in the virtualenv
"$VPY" - "$WORK/venv" <<'EOF'
import os, sys
import vhdcore, vhdcore._merge as m
from vhdcore import kernels
venv = os.path.realpath(sys.argv[1])
for mod in (vhdcore, m):
    if not os.path.realpath(mod.__file__).startswith(venv + os.sep):
        sys.exit(f"debug build: {mod.__name__} comes from {mod.__file__}, not the virtualenv")
assert kernels.backend == "cython", kernels.backend
print(f"debug build: testing {m.__file__}")
EOF

export VHDCORE_SHARED_FIXTURES="${VHDCORE_SHARED_FIXTURES:-$(cd "$REPO/.." && pwd)/shared/fixtures}"
if [ "$#" -eq 0 ]; then
    set -- tests/test_kernels.py tests/test_bounds.py tests/test_model.py tests/test_fixtures.py \
        tests/test_thirdparty.py tests/test_fuzz.py tests/test_shapes.py tests/test_edges.py \
        tests/test_coalesce.py tests/test_relink.py tests/test_image_shapes.py tests/test_imaging.py
fi
status=0
"$VPY" -m pytest -x -q -p no:cacheprovider "$@" || status=$?
t2=$(date +%s)
echo "debug build: build $((t1 - t0)) s, tests $((t2 - t1)) s, total $((t2 - t0)) s"
exit $status
