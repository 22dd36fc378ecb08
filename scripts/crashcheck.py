#!/usr/bin/env python3
"""Run every writing command under the power-cut simulator and print, per
command, the operations recorded, the crash points and the dropped-page
subsets tried, and the violations found.

    PYTHONPATH=src python3 scripts/crashcheck.py              # every crash point, 8 random subsets
    PYTHONPATH=src python3 scripts/crashcheck.py --subsets 2  # about what the suite runs
    PYTHONPATH=src python3 scripts/crashcheck.py --unit 512   # each 512-byte sector on its own
    PYTHONPATH=src python3 scripts/crashcheck.py --only coalesce --json

Besides the random subsets, every crash point also tries "all kept", "none
kept" and "newest only" (the last operation not yet durable alone).

The crash model is described in tests/_crashsim.py and docs/guarantees.md.
Exit code 1 when any violation was found.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from _powercut import SCENARIOS, run_scenario  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=None,
                    help="crash points sampled per command (default: every one)")
    ap.add_argument("--subsets", type=int, default=8,
                    help="random dropped-page subsets per crash point, besides all kept and none kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unit", type=int, default=4096,
                    help="bytes kept or lost together: 4096 (a page, default) or 512 (a sector)")
    ap.add_argument("--only", action="append", help="run only commands whose name contains this")
    ap.add_argument("--json", action="store_true", help="one JSON line per command")
    ap.add_argument("--all-violations", action="store_true",
                    help="keep going after a command's first violation")
    ns = ap.parse_args()
    bad = 0
    total_points = total_variants = 0
    t0 = time.monotonic()
    for name in SCENARIOS:
        if ns.only and not any(o in name for o in ns.only):
            continue
        with tempfile.TemporaryDirectory(prefix="crashcheck-") as d:
            st = run_scenario(name, Path(d) / "w", points=ns.points, subsets=ns.subsets,
                              seed=ns.seed, stop_at_first=not ns.all_violations, unit=ns.unit)
        total_points += st.points
        total_variants += st.variants
        bad += len(st.violations)
        if ns.json:
            print(json.dumps({"command": name, "operations": st.operations, "points": st.points,
                              "subsets": st.variants, "violations": len(st.violations),
                              "first": st.violations[:1]}), flush=True)
        else:
            print(st.line(), flush=True)
            for v in st.violations[:3]:
                print("    " + v, flush=True)
    if not ns.json:
        print(f"total: {total_points} crash points, {total_variants} states checked, "
              f"{bad} violations ({time.monotonic() - t0:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
