"""``server_missing``: a test that needs an absent server skips when run
alone and fails when ``VHDCORE_REQUIRE_SERVERS=1`` (scripts/test.sh, CI), and
every Swift/S3 skip path of the tests and benchmarks goes through it."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import server_missing

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("value", [None, "", "0", "yes"])
def test_skips_unless_required(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("VHDCORE_REQUIRE_SERVERS", raising=False)
    else:
        monkeypatch.setenv("VHDCORE_REQUIRE_SERVERS", value)
    with pytest.raises(pytest.skip.Exception, match="no server here"):
        server_missing("no server here")


def test_fails_when_required(monkeypatch):
    monkeypatch.setenv("VHDCORE_REQUIRE_SERVERS", "1")
    with pytest.raises(pytest.fail.Exception, match="VHDCORE_REQUIRE_SERVERS=1 but no server here"):
        server_missing("no server here")


def _run_store_tests(env_extra: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("ST_AUTH", "ST_USER", "ST_KEY", "AWS_ENDPOINT_URL", "VHDCORE_TEST_SWIFT",
                        "VHDCORE_TEST_SWIFT_DIR", "VHDCORE_REQUIRE_SERVERS")}
    env.update(env_extra)
    files = [HERE / "test_store_swift.py", HERE / "test_store_s3.py",
             HERE.parent / "benchmarks" / "test_bench_store.py"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         "-k", "round_trip or upload_swift_vhdcore",
         # the benchmarks are not copied beside the tests of an installed build
         *(str(f) for f in files if f.is_file())],
        capture_output=True, text=True, env=env, cwd=tmp_path)


def test_a_run_without_servers_skips_alone_and_fails_in_ci(tmp_path):
    """The real store tests and benchmarks, with no server configured."""
    alone = _run_store_tests({}, tmp_path)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert re.search(r"\d+ skipped", alone.stdout) and "failed" not in alone.stdout
    ci = _run_store_tests({"VHDCORE_REQUIRE_SERVERS": "1"}, tmp_path)
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "VHDCORE_REQUIRE_SERVERS=1 but" in ci.stdout
    assert not re.search(r"\d+ skipped", ci.stdout), ci.stdout


def test_every_server_skip_goes_through_server_missing():
    """No Swift/S3 test or benchmark calls pytest.skip itself."""
    offenders = []
    for path in list(HERE.glob("*.py")) + list((HERE.parent / "benchmarks").glob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"pytest\.skip\(\s*(f?\"[^\"]*\"|f?'[^']*')", text):
            msg = m.group(1).lower()
            if re.search(r"swift|s3|server|endpoint|st_auth|aws", msg) and "in memory" not in msg:
                offenders.append(f"{path.name}: {m.group(0)}")
    assert not offenders, offenders
