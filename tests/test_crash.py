"""Crash safety of coalesce: kill the process (SIGKILL) at random points.
After each kill the child still reads the same, the parent passes check, and
a re-run finishes with the right content."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from _builders import build_chain, read_all
from vhdcore.check import check_file
from vhdcore.coalesce import checkpoint_path

MiB = 1024 * 1024

# the progress hook paces the run (2 ms a block) so that kills land all
# through it on a fast machine; the writes themselves are not slowed
SCRIPT = """
import sys, time
from vhdcore.coalesce import coalesce
coalesce(sys.argv[1], batch_blocks=int(sys.argv[2]), relink_children=sys.argv[3:],
         progress=lambda done, total: time.sleep(0.004))
"""


def _run(child, batch, relink=(), capture=False):
    pipe = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(child), str(batch),
                             *map(str, relink)], stdout=pipe, stderr=pipe)


@pytest.mark.slow
def test_sigkill_at_random_points(tmp_path):
    rnd = random.Random(1234)
    # a chain that takes a noticeable time to coalesce: many small blocks,
    # scattered sector-granular writes, with a grandchild to relink
    mc = build_chain(tmp_path, size=48 * MiB, depth=3, block_size=512 * 1024,
                     writes_per_layer=400, max_len=64 * 1024, seed=77, base_writes=50)
    base, child, grandchild = mc.paths
    child_view = read_all(child)
    leaf_view = read_all(grandchild)
    ck = checkpoint_path(child)
    kills = 0
    for _ in range(30):
        before = os.stat(ck).st_mtime_ns if os.path.exists(ck) else 0
        proc = _run(child, 4, [grandchild])
        # wait until this run has started merging (it rewrites the
        # checkpoint), then kill it at a random point of its work
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 30:
            if os.path.exists(ck) and os.stat(ck).st_mtime_ns != before:
                break
            time.sleep(0.002)
        time.sleep(rnd.uniform(0.0, 0.15))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        # the child is never modified; the parent stays a valid VHD
        assert read_all(child) == child_view
        assert [p for p in check_file(base) if p.severity == "error"] == []
        if not os.path.exists(ck):
            break  # finished before the kill
        if kills >= 6:
            break
    assert kills >= 3, f"only {kills} kills landed"
    # finish: a re-run completes with the right content everywhere
    if os.path.exists(ck):
        proc = _run(child, 4, [grandchild], capture=True)
        out, err = proc.communicate()
        assert proc.returncode == 0, err.decode()
    assert not os.path.exists(ck)
    assert read_all(base) == child_view
    assert read_all(grandchild) == leaf_view
    os.unlink(child)
    assert read_all(grandchild) == leaf_view
