"""What a fleet job is: :class:`JobSpec` (image this chain, on this host, to
this target), its ID (:func:`job_id`), the states its record goes through and
how a record gives the spec back.  Shared by the submitting side
(:mod:`vhdcore.fleet.jobs`) and the worker's task (:mod:`vhdcore.fleet.tasks`);
needs neither Celery nor redis-py."""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass

from ._base import FleetError

__all__ = ["JobSpec", "job_id", "spec_from_record", "STATES", "TERMINAL_STATES", "EVENTS_KEPT",
           "QUEUED", "RUNNING", "STOPPED", "DONE", "FAILED", "CANCELLED"]

QUEUED, RUNNING, STOPPED, DONE, FAILED, CANCELLED = (
    "queued", "running", "stopped", "done", "failed", "cancelled")
#: the states a job record can hold
STATES = (QUEUED, RUNNING, STOPPED, DONE, FAILED, CANCELLED)
#: states after which nothing more happens unless the job is submitted again
TERMINAL_STATES = (DONE, FAILED, CANCELLED)
#: how many progress events of a job are kept (the newest)
EVENTS_KEPT = 2000


@dataclass(frozen=True)
class JobSpec:
    """What a job does: image ``leaf`` on ``host`` to ``to`` (a store URL),
    or into the repository ``repo`` as image ``name``."""

    leaf: str
    host: str
    to: str | None = None
    repo: str | None = None
    name: str | None = None
    timeout: float | None = None
    fs_aware: bool = True
    segment_size: int | None = None

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() for c in self.host):
            raise FleetError(f"bad host name {self.host!r}")
        if not self.leaf or not posixpath.isabs(self.leaf):
            raise FleetError(f"the leaf must be an absolute path on the host, got {self.leaf!r}")
        if (self.to is None) == (self.repo is None):
            raise FleetError("give exactly one of --to URL or --repo URL --name NAME")
        if self.repo is not None and not self.name:
            raise FleetError("--repo needs --name NAME")
        if self.to is not None and self.name is not None:
            raise FleetError("--name goes with --repo, not with --to")
        if self.timeout is not None and not self.timeout > 0:
            raise FleetError(f"the timeout must be positive, got {self.timeout}")

    @property
    def target(self) -> str:
        """The target as one string (part of the job's identity)."""
        if self.to is not None:
            return self.to
        return f"repo:{self.repo}#{self.name}"


def job_id(spec: JobSpec) -> str:
    """The job's ID: a digest of (host, chain identity, target).

    The chain is only readable on its host, so the submitter names it by the
    leaf's path there (normalised); the worker records the chain's real
    identity (the disks' UUIDs) in the job when it runs.
    """
    ident = {"host": spec.host, "leaf": posixpath.normpath(spec.leaf), "target": spec.target}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def spec_from_record(rec: dict[str, str]) -> JobSpec:
    """The :class:`JobSpec` a record was submitted with (FleetError if damaged)."""
    try:
        timeout = float(rec["timeout"]) if rec.get("timeout") else None
        seg = int(rec["segment_size"]) if rec.get("segment_size") else None
        return JobSpec(leaf=rec["leaf"], host=rec["host"], to=rec.get("to") or None,
                       repo=rec.get("repo") or None, name=rec.get("name") or None,
                       timeout=timeout, fs_aware=rec.get("fs_aware", "1") == "1",
                       segment_size=seg)
    except (KeyError, ValueError) as exc:
        raise FleetError(f"job record {rec.get('id')!r} is damaged ({exc})") from None
