#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine, start a
# loopback Swift (with its S3 API) for the object-store tests and a loopback
# Redis (persistent: append-only file) for the fleet tests, run the whole
# suite (benchmarks once, as smoke tests; mypy --strict, stubtest and the docs
# examples included), stop the servers, then test what users install: the
# wheel and the sdist outside the source tree (scripts/test_wheel.sh), the
# kernel built with bounds checks (scripts/debug_build_test.sh), and the
# documentation site (mkdocs build --strict).
#
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k swift   # only the main suite, extra arguments to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="qemu-utils libvhdi-utils memcached lz4 e2fsprogs xfsprogs ntfs-3g fdisk gdisk redis-server"
missing=""
for pkg in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing system packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "== missing system packages (tests that need them will skip):$missing" >&2
  fi
fi

PY=${PYTHON:-python3}
echo "== installing vhdcore and its test dependencies"
$PY -m pip install -q --disable-pip-version-check -e ".[test,typecheck,docs,fleet]" swift

SWIFT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/vhdcore-swift.XXXXXX")
REDIS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/vhdcore-redis.XXXXXX")
cleanup() {
  $PY scripts/swift_server.py stop --dir "$SWIFT_DIR" >/dev/null 2>&1 || true
  $PY scripts/redis_server.py stop --dir "$REDIS_DIR" >/dev/null 2>&1 || true
  rm -rf "$SWIFT_DIR" "$REDIS_DIR"
}
trap cleanup EXIT
echo "== starting a loopback Swift in $SWIFT_DIR"
$PY scripts/swift_server.py start --dir "$SWIFT_DIR"
eval "$($PY scripts/swift_server.py env --dir "$SWIFT_DIR")"
export VHDCORE_TEST_SWIFT=1
echo "== starting a loopback Redis in $REDIS_DIR"
$PY scripts/redis_server.py start --dir "$REDIS_DIR"
eval "$($PY scripts/redis_server.py env --dir "$REDIS_DIR")"
# every server the suite uses is started here: a missing one fails its tests
export VHDCORE_REQUIRE_SERVERS=1

echo "== running the tests"
$PY -m pytest -q -p no:cacheprovider --benchmark-disable "$@"
cleanup
trap - EXIT
# the server is gone: the later runs must not look for it
unset ST_AUTH ST_USER ST_KEY AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY \
  AWS_DEFAULT_REGION VHDCORE_TEST_SWIFT VHDCORE_TEST_SWIFT_DIR VHDCORE_REQUIRE_SERVERS \
  VHDCORE_TEST_REDIS_URL VHDCORE_TEST_REDIS_DIR
if [ "$#" -gt 0 ]; then
  exit 0  # a selection was asked for: skip the packaging checks
fi

echo "== the documentation site (mkdocs build --strict)"
SITE=$(mktemp -d "${TMPDIR:-/tmp}/vhdcore-site.XXXXXX")
$PY -m mkdocs build --strict --quiet --site-dir "$SITE"
rm -rf "$SITE"

echo "== the kernel with bounds checks (VHDCORE_DEBUG_BUILD=1)"
bash scripts/debug_build_test.sh

echo "== the wheel and the sdist, installed outside the source tree"
bash scripts/test_wheel.sh
