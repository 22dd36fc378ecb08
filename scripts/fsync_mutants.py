#!/usr/bin/env python3
"""Replace each fsync / directory fsync call site of the engine with a no-op,
one at a time, and check that the test suite notices (at least one test
fails).  The checkout is never modified: each mutant is a copy of ``src``
in a temporary directory, put first on PYTHONPATH.

    python3 scripts/fsync_mutants.py                      # tests/test_powercut.py per mutant
    python3 scripts/fsync_mutants.py --tests tests/test_powercut.py tests/test_faults.py
    python3 scripts/fsync_mutants.py --list               # only list the sites

Sites are the statements that call ``_io.fsync``, ``_io.fsync_dir``,
``_fsync_dir``, ``VhdFile._sync`` (``._sync()``) or ``fsync(fd)`` inside
``_io.atomic_write`` / ``_io.fsync_dir``, in src/vhdcore except the
benchmarks (the bench package, which write scratch data on purpose without fsync) and
the primitive ``os.fsync`` inside ``_io.fsync`` itself (the simulator records
through it, so it cannot see that one removed).  Exit code 1 when a mutant
survives.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
CALL = re.compile(r"^(\s*)((?:_io\.fsync|_io\.fsync_dir|_fsync_dir|[A-Za-z_]+\._sync|fsync|fsync_dir)\(.*\))\s*(#.*)?$")
SKIP_DIRS = {"bench"}  # the benchmarks write scratch data without fsync on purpose


def sites() -> list[tuple[Path, int, str]]:
    out = []
    for path in sorted((SRC / "vhdcore").rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(SRC / "vhdcore").parts[:-1]):
            continue
        text = path.read_text()
        lines = text.splitlines()
        spans = []  # (first, last line, name) of module functions and methods
        for node in ast.parse(text).body:
            body = node.body if isinstance(node, ast.ClassDef) else [node]
            for f in body:
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    spans.append((f.lineno, f.end_lineno or f.lineno, f.name))
        for i, line in enumerate(lines):
            func = next((n for a, b, n in spans if a <= i + 1 <= b), "")
            m = CALL.match(line)
            if not m:
                continue
            if path.name == "_io.py" and func == "fsync":
                continue  # the primitive itself
            out.append((path, i, func))
    return out


def run_mutant(path: Path, lineno: int, tests: list[str], timeout: float) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="fsync-mutant-") as tmp:
        dst = Path(tmp) / "src"
        shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns("__pycache__"))
        target = dst / path.relative_to(SRC)
        lines = target.read_text().splitlines(keepends=True)
        m = CALL.match(lines[lineno])
        assert m
        lines[lineno] = f"{m.group(1)}pass  # mutant: {m.group(2)} removed\n"
        target.write_text("".join(lines))
        env = dict(os.environ, PYTHONPATH=str(dst), PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "--benchmark-disable", *tests]
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return True, "timed out (counted as caught)"
        tail = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED") or "passed" in ln
                or "failed" in ln]
        return r.returncode != 0, (tail[0] if tail else r.stdout[-200:]).strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", nargs="+", default=["tests/test_powercut.py"])
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--only", help="only sites whose FILE:LINE contains this (e.g. vhd/write.py, ops/grow.py:129)")
    ap.add_argument("--timeout", type=float, default=900)
    ns = ap.parse_args()
    todo = [s for s in sites() if not ns.only or ns.only in f"{s[0]}:{s[1] + 1}"]
    caught = 0
    t0 = time.monotonic()
    for path, i, func in todo:
        rel = path.relative_to(ROOT)
        code = path.read_text().splitlines()[i].strip()
        where = f"{rel}:{i + 1} in {func}(): {code}"
        if ns.list:
            print(where)
            continue
        ok, detail = run_mutant(path, i, ns.tests, ns.timeout)
        caught += ok
        print(f"{'caught  ' if ok else 'SURVIVED'} {where}\n         {detail}", flush=True)
    if ns.list:
        print(f"{len(todo)} sites")
        return 0
    print(f"{caught}/{len(todo)} fsync sites: removing it makes a test fail "
          f"({time.monotonic() - t0:.0f} s)")
    return 0 if caught == len(todo) else 1


if __name__ == "__main__":
    sys.exit(main())
