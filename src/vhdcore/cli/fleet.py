"""The fleet's subcommands: ``worker``, ``submit``, ``jobs``, ``cancel``.

This module imports neither Celery nor redis-py (the handlers do, when run).
"""
from __future__ import annotations

import argparse
import json
import sys

from typing import Any

from .._args import int_at_least, new_subcommand as _new, positive_seconds
from .._util import human_size, parse_size
from ._common import EXIT_FAILED, EXIT_OK, Commands, Handler, fail

__all__ = ["COMMANDS"]

COMMANDS = Commands()


def _guard(fn: Handler) -> Handler:
    """An unreachable broker is exit 3 with a clear message."""
    def run(ns: argparse.Namespace) -> int:
        # imported here: the fleet package (its jobs and worker) is not loaded
        # by the other commands' start-up
        from ..fleet._base import BrokerUnreachableError

        try:
            return fn(ns)
        except BrokerUnreachableError as exc:
            return fail(exc, ns, getattr(ns, "json", False), code=EXIT_FAILED)
    run.__doc__ = fn.__doc__
    return run


def _worker(ns: argparse.Namespace) -> int:
    from ..fleet.worker import run_worker

    rate = None
    if ns.max_upload_rate is not None:
        rate = 0 if ns.max_upload_rate.lower() in ("0", "none", "off") \
            else parse_size(ns.max_upload_rate)
    return run_worker(ns.broker, ns.queue, ns.concurrency, max_upload_rate=rate,
                      redelivery=ns.redelivery_timeout, lease=ns.lease,
                      max_attempts=ns.max_attempts, state_dir=ns.state_dir,
                      loglevel=ns.loglevel)


def _submit(ns: argparse.Namespace) -> int:
    from ..fleet._base import FleetError
    from ..fleet.jobs import FleetClient, JobSpec

    if ns.to is None and ns.repo is None:
        raise FleetError("give --to URL or --repo URL --name NAME")
    spec = JobSpec(leaf=ns.leaf, host=ns.host, to=ns.to, repo=ns.repo, name=ns.name,
                   timeout=ns.timeout, fs_aware=ns.fs_aware,
                   segment_size=parse_size(ns.segment_size) if ns.segment_size else None)
    client = FleetClient(ns.broker)
    jid, created = client.submit(spec, max_attempts=ns.max_attempts)
    if ns.json:
        print(json.dumps({"event": "submitted", "job": jid, "created": created,
                          "state": client.get(jid).status}))
    else:
        print(jid)
        if not created:
            print(f"vhdcore: job {jid} already exists ({client.get(jid).status}); not queued "
                  "again", file=sys.stderr)
    return EXIT_OK


def _fmt_eta(eta: float | None) -> str:
    if eta is None:
        return "-"
    eta = max(0.0, eta)
    if eta < 120:
        return f"{eta:.0f}s"
    if eta < 7200:
        return f"{eta / 60:.0f}m"
    return f"{eta / 3600:.1f}h"


def _jobs(ns: argparse.Namespace) -> int:
    from ..fleet.jobs import FleetClient

    client = FleetClient(ns.broker)
    infos = [client.get(ns.job)] if ns.job else client.all()
    if ns.json:
        if ns.job:
            out: Any = infos[0].to_json()
            out["events"] = client.events(infos[0].id)[-20:]
        else:
            out = [i.to_json() for i in infos]
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    if ns.job:
        info = infos[0]
        for k, v in info.to_json().items():
            if k in ("progress",):
                continue
            if k == "result" and v:
                v = json.dumps(v)
            print(f"{k:14} {v}")
        return EXIT_OK
    print(f"{'JOB':12} {'HOST':16} {'STATE':22} {'STAGE':11} {'PCT':>4} {'BYTES':>21} "
          f"{'RATE':>11} {'ETA':>5}  ERROR")
    for i in infos:
        done = f"{human_size(i.bytes_done)}/{human_size(i.bytes_total)}" if i.bytes_total else "-"
        rate = f"{human_size(i.rate)}/s" if i.rate else "-"
        print(f"{i.id[:12]:12} {i.host[:16]:16} {i.status[:22]:22} {i.stage[:11]:11} "
              f"{i.percent:>3}% {done:>21} {rate:>11} {_fmt_eta(i.eta):>5}  {i.error}")
    return EXIT_OK


def _cancel(ns: argparse.Namespace) -> int:
    from ..fleet.jobs import FleetClient

    info = FleetClient(ns.broker).cancel(ns.job)
    if ns.json:
        print(json.dumps(info.to_json()))
    else:
        what = "cancelled" if info.state == "cancelled" else (
            "cancel requested (stops at its next safe point)" if info.state == "running"
            else f"not cancelled: it is {info.status}")
        print(f"{info.id}: {what}")
    return EXIT_OK


def _broker_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", metavar="URL",
                   help="the Redis broker, redis://HOST:6379/0 (default: $VHDCORE_BROKER)")


_COUNT = int_at_least(1)


@COMMANDS.parser
def _p_worker(sub: Any) -> None:
    s = _new(sub, "worker", "serve one host's imaging queue (fleet)",
             "Run a Celery worker for the imaging jobs of one host (needs vhdcore[fleet]). "
             "SIGTERM finishes the running jobs first; a killed worker's jobs are "
             "redelivered and resume from their job state.",
             ["worker --broker redis://127.0.0.1:6379/0 --queue hv0042",
              "worker --queue hv0042 --concurrency 1 --max-upload-rate 400M"])
    _broker_option(s)
    s.add_argument("--queue", metavar="HOSTNAME",
                   help="the host whose jobs this worker runs (default: this host's name)")
    s.add_argument("--concurrency", type=_COUNT, default=1, metavar="N",
                   help="jobs run at once on this host (default 1)")
    s.add_argument("--max-upload-rate", metavar="SIZE",
                   help="set the fleet-wide upload budget, bytes per second shared by every "
                        "worker (e.g. 400M; 0: no limit; default: leave it as it is)")
    s.add_argument("--redelivery-timeout", type=positive_seconds, metavar="S",
                   help="a killed worker's job is redelivered within S seconds (default 120)")
    s.add_argument("--lease", type=positive_seconds, metavar="S",
                   help="lease of a job's lock, refreshed every S/3 seconds (default 30)")
    s.add_argument("--max-attempts", type=_COUNT, metavar="N",
                   help="runs of a job that stops at its timeout or loses its target before "
                        "it is left stopped (default 3)")
    s.add_argument("--state-dir", metavar="DIR",
                   help="where imaging job states live (default as for `vhdcore image`)")
    s.add_argument("--loglevel", default="INFO", help="Celery's log level (default INFO)")


@COMMANDS.parser
def _p_submit(sub: Any) -> None:
    s = _new(sub, "submit", "queue an imaging job on a host's worker; prints its ID",
             "Queue an imaging job for the worker of HOSTNAME, where the chain lives; prints "
             "the job ID. Submitting the same job again (same host, leaf and target) returns "
             "the existing job.",
             ["submit /srv/sr/leaf.vhd --host hv0042 --to swift://images/vm-17",
              "submit /srv/sr/leaf.vhd --host hv0042 --repo swift://repo --name vm-17"])
    s.add_argument("leaf", help="the leaf VHD, as a path on that host")
    s.add_argument("--host", required=True, metavar="HOSTNAME", help="the host that has the chain")
    s.add_argument("--to", metavar="URL", help="the target, as for `vhdcore image --to`")
    s.add_argument("--repo", metavar="URL", help="image into this repository instead (with --name)")
    s.add_argument("--name", metavar="NAME", help="the image's name in --repo")
    s.add_argument("--timeout", type=positive_seconds, metavar="S",
                   help="each attempt stops after S seconds, resumable, and is re-queued")
    s.add_argument("--max-attempts", type=_COUNT, metavar="N",
                   help="attempts before the job is left stopped (default 3)")
    s.add_argument("--segment-size", metavar="SIZE",
                   help="segment size, as for `vhdcore image` (default: from the image size)")
    s.add_argument("--no-fs-aware", dest="fs_aware", action="store_false",
                   help="store every non-zero block (default: skip free space)")
    s.add_argument("--json", action="store_true", help="print JSON")
    _broker_option(s)


@COMMANDS.parser
def _p_jobs(sub: Any) -> None:
    s = _new(sub, "jobs", "the fleet's jobs: state, stage, percent, host",
             "Show every job (or one) with its state, stage, percent, bytes, rate, ETA, host "
             "and error, from the progress the workers publish to Redis.",
             ["jobs", "jobs 4be0e3a3 --json"])
    s.add_argument("job", nargs="?", metavar="JOB", help="one job (an ID or its start)")
    s.add_argument("--json", action="store_true", help="print JSON")
    _broker_option(s)


@COMMANDS.parser
def _p_cancel(sub: Any) -> None:
    s = _new(sub, "cancel", "cancel a queued or running job (fleet)",
             "Cancel a queued job, or stop a running one at its next segment (its job state "
             "is kept: submitting it again resumes it).",
             ["cancel 4be0e3a3c54f6f0e8d1a56b2a0d3f9e1"])
    s.add_argument("job", metavar="JOB")
    s.add_argument("--json", action="store_true", help="print JSON")
    _broker_option(s)


COMMANDS.handler("worker")(_guard(_worker))
COMMANDS.handler("submit")(_guard(_submit))
COMMANDS.handler("jobs")(_guard(_jobs))
COMMANDS.handler("cancel")(_guard(_cancel))
