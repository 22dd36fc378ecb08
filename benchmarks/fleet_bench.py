#!/usr/bin/env python3
"""Benchmark of the fleet (vhdcore[fleet]): jobs per minute and aggregate
upload throughput with 1, 2 and 4 workers against one directory store, and
the overhead per job (queue + job state in Redis) against running the same
imaging directly.

    D=$(mktemp -d); python3 scripts/redis_server.py start --dir $D
    python3 benchmarks/fleet_bench.py --broker "$(python3 scripts/redis_server.py env --dir $D \\
        | sed -n 's/.*REDIS_URL=//p')" [--jobs 8] [--size 64M] [--json]

Each worker serves its own fake host (the workers of a real fleet are on
different machines; here they share this machine's cores and disk, so the
aggregate figures show the scheduling, not a fleet's hardware).  Not a test:
it prints figures, it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from vhdcore._util import human_size, parse_size  # noqa: E402


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def start_worker(broker: str, host: str, log: Path) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-m", "vhdcore", "worker", "--broker", broker,
                          "--queue", host, "--loglevel", "WARNING"],
                         stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=_env(),
                         start_new_session=True)
    return p


def wait_online(client, hosts: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(client.r.exists(client.keys.host(h)) for h in hosts):
            time.sleep(1.0)  # the consumer starts just after the heartbeat
            return
        time.sleep(0.1)
    raise SystemExit(f"workers for {hosts} did not come up")


def wait_done(client, jids: list[str], timeout: float = 600) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = [client.get(j) for j in jids]
        bad = [i for i in infos if i.state in ("failed", "cancelled", "stopped")]
        if bad:
            raise SystemExit(f"job {bad[0].id} {bad[0].state}: {bad[0].error}")
        if all(i.state == "done" for i in infos):
            return infos
        time.sleep(0.05)
    raise SystemExit("jobs did not finish")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", default=os.environ.get("VHDCORE_TEST_REDIS_URL")
                    or os.environ.get("VHDCORE_BROKER"))
    ap.add_argument("--jobs", type=int, default=8, help="jobs per worker count (default 8)")
    ap.add_argument("--size", default="64M", help="virtual size of each chain (default 64M)")
    ap.add_argument("--overhead-reps", type=int, default=7)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args()
    if not ns.broker:
        raise SystemExit("give --broker redis://HOST:PORT/DB (or set VHDCORE_TEST_REDIS_URL)")
    from vhdcore._workloads import make_chain
    from vhdcore.fleet import JobSpec
    from vhdcore.fleet.jobs import FleetClient
    from vhdcore.imaging import create_image

    client = FleetClient(ns.broker)
    client.r.delete(client.keys.budget)
    size = parse_size(ns.size)
    report: dict = {"size": size, "jobs": ns.jobs, "cpus": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="vhdcore-fleet-bench-") as tmp:
        work = Path(tmp)
        leaves = [Path(make_chain(work / f"c{i}", "realistic", size=size, layers=2,
                                  seed=i).leaf) for i in range(ns.jobs)]
        run_id = f"{int(time.time())}"
        # ---- overhead: the same small job directly and through the fleet
        small = Path(make_chain(work / "small", "realistic", size=8 << 20, layers=2, seed=99).leaf)
        direct = []
        for k in range(ns.overhead_reps):
            t = time.perf_counter()
            create_image(small, f"file://{work}/direct{k}", fs_aware=True)
            direct.append(time.perf_counter() - t)
        cli_times = []
        for k in range(3):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "vhdcore", "image", str(small), "--to",
                            f"file://{work}/cli{k}", "-q"], env=_env(), check=True,
                           stdout=subprocess.DEVNULL)
            cli_times.append(time.perf_counter() - t)
        host = f"bench-{run_id}-ovh"
        procs = [start_worker(ns.broker, host, work / "ovh.log")]
        try:
            wait_online(client, [host])
            fleet = []
            inner = []
            for k in range(ns.overhead_reps):
                t = time.perf_counter()
                jid = client.submit(JobSpec(str(small), host, to=f"file://{work}/fleet{k}"))[0]
                info = wait_done(client, [jid])[0]
                fleet.append(time.perf_counter() - t)
                inner.append(float(info.result["seconds"]))
        finally:
            stop(procs)
        report["overhead"] = {
            "direct_create_image_s": statistics.median(direct),
            "vhdcore_image_process_s": statistics.median(cli_times),
            "fleet_submit_to_done_s": statistics.median(fleet),
            "fleet_imaging_inside_worker_s": statistics.median(inner),
            "per_job_overhead_s": statistics.median(fleet) - statistics.median(direct),
        }
        # ---- throughput with 1, 2, 4 workers
        for n in [int(x) for x in ns.workers.split(",")]:
            hosts = [f"bench-{run_id}-{n}-{i}" for i in range(n)]
            procs = [start_worker(ns.broker, h, work / f"w{n}-{i}.log")
                     for i, h in enumerate(hosts)]
            try:
                wait_online(client, hosts)
                t = time.perf_counter()
                jids = [client.submit(JobSpec(str(leaf), hosts[i % n],
                                              to=f"file://{work}/out{n}-{i}"))[0]
                        for i, leaf in enumerate(leaves)]
                infos = wait_done(client, jids)
                wall = time.perf_counter() - t
            finally:
                stop(procs)
            comp = sum(int(i.result["compressed_size"]) for i in infos)
            stream = sum(int(i.result["stream_size"]) for i in infos)
            report["runs"].append({"workers": n, "jobs": len(jids), "seconds": wall,
                                   "jobs_per_minute": 60 * len(jids) / wall,
                                   "upload_bytes_per_s": comp / wall,
                                   "stream_bytes_per_s": stream / wall})
            for i in range(ns.jobs):
                for p in work.glob(f"out{n}-{i}*"):
                    if p.is_dir():
                        for q in p.iterdir():
                            q.unlink()
                        p.rmdir()
                    else:
                        p.unlink()
    if ns.json:
        print(json.dumps(report, indent=2))
        return 0
    o = report["overhead"]
    print(f"fleet benchmark: {ns.jobs} jobs of {human_size(size)} virtual per row, "
          f"{report['cpus']} CPUs, directory store")
    print(f"{'workers':>7} {'jobs/min':>9} {'upload (compressed)':>20} {'image stream':>14}")
    for r in report["runs"]:
        print(f"{r['workers']:>7} {r['jobs_per_minute']:>9.1f} "
              f"{human_size(r['upload_bytes_per_s']) + '/s':>20} "
              f"{human_size(r['stream_bytes_per_s']) + '/s':>14}")
    print(f"per-job overhead (8 MiB chain, median of {ns.overhead_reps}): create_image "
          f"{o['direct_create_image_s'] * 1000:.0f} ms, `vhdcore image` process "
          f"{o['vhdcore_image_process_s'] * 1000:.0f} ms, fleet submit->done "
          f"{o['fleet_submit_to_done_s'] * 1000:.0f} ms (imaging inside the worker "
          f"{o['fleet_imaging_inside_worker_s'] * 1000:.0f} ms): overhead "
          f"{o['per_job_overhead_s'] * 1000:.0f} ms per job")
    return 0


if __name__ == "__main__":
    sys.exit(main())
