"""The fleet's command line without a broker or without the extra: no Redis needed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.pop("VHDCORE_BROKER", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_core_cli_does_not_import_celery_or_redis() -> None:
    p = _run("import sys, vhdcore, vhdcore.fleet; from vhdcore.cli import build_parser; "
             "build_parser().parse_args(['jobs']); "
             "print(sorted(m for m in ('celery', 'kombu', 'redis') if m in sys.modules))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_missing_extra_names_it() -> None:
    for argv in (["jobs", "--broker", "redis://127.0.0.1:1/0"],
                 ["worker", "--broker", "redis://127.0.0.1:1/0", "--queue", "h"]):
        p = _run("import sys; sys.modules['celery'] = None; sys.modules['redis'] = None\n"
                 f"from vhdcore.cli import main; sys.exit(main({argv!r}))")
        assert p.returncode == 1, p.stderr
        assert "pip install 'vhdcore[fleet]'" in p.stderr


def test_no_broker_is_a_clear_error() -> None:
    p = _run("import sys\nfrom vhdcore.cli import main; sys.exit(main(['jobs']))")
    assert p.returncode == 1
    assert "VHDCORE_BROKER" in p.stderr and "Traceback" not in p.stderr


def test_submit_needs_a_target_and_an_absolute_leaf() -> None:
    from vhdcore.fleet import FleetError, JobSpec, job_id

    import pytest

    with pytest.raises(FleetError, match="exactly one"):
        JobSpec("/a.vhd", "h")
    with pytest.raises(FleetError, match="exactly one"):
        JobSpec("/a.vhd", "h", to="file:///x/y", repo="file:///r", name="n")
    with pytest.raises(FleetError, match="--name"):
        JobSpec("/a.vhd", "h", repo="file:///r")
    with pytest.raises(FleetError, match="absolute"):
        JobSpec("a.vhd", "h", to="file:///x/y")
    # the ID depends on host, leaf and target only, and the leaf's spelling is normalised
    a = job_id(JobSpec("/sr/x/../leaf.vhd", "h1", to="file:///x/y", timeout=5))
    assert a == job_id(JobSpec("/sr/leaf.vhd", "h1", to="file:///x/y"))
    assert a != job_id(JobSpec("/sr/leaf.vhd", "h2", to="file:///x/y"))
    assert a != job_id(JobSpec("/sr/leaf.vhd", "h1", to="file:///x/z"))
