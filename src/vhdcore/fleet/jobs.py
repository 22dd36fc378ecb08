"""Jobs of the fleet: their records in Redis, submit, list, cancel (what a job
is and its ID: :mod:`vhdcore.fleet.spec`).

A job is "image this chain, on this host, to this target".  Its ID is
derived from those three (:func:`job_id`), so submitting the same job again
finds the record already there and returns it.  The record is a Redis hash
that the worker running the job keeps up to date with the job's state and
its latest progress event (the schema of ``vhdcore image --json``); every
event is also published on a Redis channel and kept in a short list.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from ._base import (
    BrokerUnreachableError,
    FleetError,
    FleetSettings,
    broker_url,
    check_reachable,
    queue_name,
    redis_client,
    require_extra,
)

from .spec import QUEUED, RUNNING, STATES, STOPPED, TERMINAL_STATES, JobSpec, job_id

__all__ = ["JobSpec", "JobInfo", "job_id", "submit", "get_job", "list_jobs", "cancel",
           "STATES", "TERMINAL_STATES"]


@dataclass
class JobInfo:
    """One job as ``vhdcore jobs`` shows it."""

    id: str
    host: str
    leaf: str
    target: str
    state: str
    stage: str = "queued"
    percent: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    rate: float = 0.0
    eta: float | None = None
    error: str = ""
    attempts: int = 0
    max_attempts: int = 0
    worker: str = ""
    created: float = 0.0
    updated: float = 0.0
    requeued: bool = False
    host_online: bool = False
    #: False when the job is recorded as running but its lock's lease ran
    #: out: its worker died and the job waits for redelivery
    lease_alive: bool = True
    result: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """The state in words: "waiting for host" for a queued job whose host
        has no worker, "stopped (resumable)" for a job stopped at its timeout."""
        if self.state == QUEUED and not self.host_online:
            return "waiting for host"
        if self.state == RUNNING and not self.lease_alive:
            return "worker lost, redelivering"
        if self.state == STOPPED:
            return "stopped (resumable)" + (", re-queued" if self.requeued else "")
        return self.state

    def to_json(self) -> dict[str, Any]:
        return {"job": self.id, "host": self.host, "leaf": self.leaf, "target": self.target,
                "state": self.state, "status": self.status, "stage": self.stage,
                "percent": self.percent, "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total, "rate": self.rate, "eta": self.eta,
                "error": self.error or None, "attempts": self.attempts,
                "max_attempts": self.max_attempts, "worker": self.worker or None,
                "host_online": self.host_online, "lease_alive": self.lease_alive,
                "created": self.created,
                "updated": self.updated, "result": self.result, "progress": self.progress}

    @classmethod
    def from_record(cls, rec: dict[str, str], host_online: bool,
                    lease_alive: bool = True) -> JobInfo:
        prog = _loads(rec.get("progress"))
        eta = rec.get("eta")
        return cls(
            id=rec.get("id", ""), host=rec.get("host", ""), leaf=rec.get("leaf", ""),
            target=rec.get("target", ""), state=rec.get("state", QUEUED),
            stage=rec.get("stage", "queued"), percent=int(rec.get("percent") or 0),
            bytes_done=int(rec.get("bytes_done") or 0), bytes_total=int(rec.get("bytes_total") or 0),
            rate=float(rec.get("rate") or 0.0), eta=float(eta) if eta not in (None, "") else None,
            error=rec.get("error", ""), attempts=int(rec.get("attempts") or 0),
            max_attempts=int(rec.get("max_attempts") or 0), worker=rec.get("worker", ""),
            created=float(rec.get("created") or 0), updated=float(rec.get("updated") or 0),
            requeued=rec.get("requeued") == "1", host_online=host_online,
            lease_alive=lease_alive,
            result=_loads(rec.get("result")), progress=prog)


def _loads(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


# A record is created only if there is none, or the one there has finished
# (failed, stopped for good, cancelled: submitting again runs it again).
_CREATE = """
local st = redis.call('HGET', KEYS[1], 'state')
if st then
  local requeued = redis.call('HGET', KEYS[1], 'requeued')
  if not (st == 'failed' or st == 'cancelled' or (st == 'stopped' and requeued ~= '1')) then
    return {0, st, redis.call('HGET', KEYS[1], 'published') or ''}
  end
end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return {1, 'queued', ''}
"""


class FleetClient:
    """The submitting side of the fleet: a Redis connection and a Celery app
    made on first use.  The functions below create one per call."""

    def __init__(self, broker: str | None = None, settings: FleetSettings | None = None) -> None:
        self.settings = settings or FleetSettings(broker_url(broker))
        self.url = self.settings.broker
        self.keys = self.settings.keys
        self.r = redis_client(self.url)
        check_reachable(self.r, self.url)
        self._app: Any = None

    def app(self) -> Any:
        if self._app is None:
            from .tasks import make_app

            self._app = make_app(self.settings, client=True)
        return self._app

    # ---------------------------------------------------------------- submit
    def submit(self, spec: JobSpec, *, max_attempts: int | None = None) -> tuple[str, bool]:
        """Queue ``spec`` on its host's queue; returns (job ID, created).  An
        existing job (queued, running, done, or stopped and re-queued) is
        returned as it is (created False)."""
        jid = job_id(spec)
        now = time.time()
        fields = {"id": jid, "host": spec.host, "leaf": spec.leaf, "target": spec.target,
                  "to": spec.to or "", "repo": spec.repo or "", "name": spec.name or "",
                  "timeout": "" if spec.timeout is None else repr(spec.timeout),
                  "fs_aware": "1" if spec.fs_aware else "0",
                  "segment_size": "" if spec.segment_size is None else str(spec.segment_size),
                  "state": QUEUED, "stage": "queued",
                  "percent": "0", "attempts": "0",
                  "max_attempts": str(max_attempts or self.settings.max_attempts),
                  "created": repr(now), "updated": repr(now), "error": ""}
        argv: list[str] = [repr(now), jid]
        for k, v in fields.items():
            argv += [k, v]
        created, _state, published = self._redis(lambda: self.r.eval(
            _CREATE, 3, self.keys.job(jid), self.keys.index, self.keys.events(jid), *argv))
        if created or not published:
            # a new job, or one whose message never went out (the submitter died)
            self._publish(jid, spec.host)
        return jid, bool(created)

    def _publish(self, jid: str, host: str) -> None:
        kombu = require_extra("kombu")
        try:
            self.app().send_task("vhdcore.fleet.image", args=[jid], queue=queue_name(host),
                                 task_id=jid, retry=True,
                                 retry_policy={"max_retries": 2, "interval_start": 0.2,
                                               "interval_step": 0.5})
        except (kombu.exceptions.OperationalError, OSError) as exc:
            raise BrokerUnreachableError(f"could not queue job {jid}: {exc}") from None
        self.r.hset(self.keys.job(jid), "published", repr(time.time()))

    # ---------------------------------------------------------------- read
    def get(self, jid: str) -> JobInfo:
        """The job ``jid`` (a unique prefix of an ID is enough)."""
        full = self.resolve(jid)
        rec = self._redis(lambda: self.r.hgetall(self.keys.job(full)))
        if not rec:
            raise FleetError(f"no job {jid}")
        return JobInfo.from_record(rec, self._host_online(rec.get("host", "")),
                                   bool(self.r.exists(self.keys.lock(full))))

    def resolve(self, jid: str) -> str:
        if self.r.exists(self.keys.job(jid)):
            return jid
        matches = [j for j in self.r.zrange(self.keys.index, 0, -1) if j.startswith(jid)]
        if len(matches) == 1:
            return str(matches[0])
        if not matches:
            raise FleetError(f"no job {jid}")
        raise FleetError(f"{jid!r} is the start of {len(matches)} job IDs; give more of it")

    def all(self) -> list[JobInfo]:
        """Every job, oldest first."""
        ids = self._redis(lambda: self.r.zrange(self.keys.index, 0, -1))
        pipe = self.r.pipeline()
        for j in ids:
            pipe.hgetall(self.keys.job(j))
        recs = [r for r in pipe.execute() if r]
        hosts = sorted({r.get("host", "") for r in recs})
        online = dict(zip(hosts, (bool(x) for x in self._exists_many(
            [self.keys.host(h) for h in hosts]))))
        locks = self._exists_many([self.keys.lock(r.get("id", "")) for r in recs])
        return [JobInfo.from_record(r, online.get(r.get("host", ""), False), bool(lk))
                for r, lk in zip(recs, locks)]

    def events(self, jid: str) -> list[dict[str, Any]]:
        """The job's latest progress events, oldest first."""
        raw = self.r.lrange(self.keys.events(self.resolve(jid)), 0, -1)
        out = []
        for line in raw:
            ev = _loads(line)
            if isinstance(ev, dict):
                out.append(ev)
        return out

    def _exists_many(self, keys: list[str]) -> list[int]:
        pipe = self.r.pipeline()
        for k in keys:
            pipe.exists(k)
        return list(pipe.execute())

    def _host_online(self, host: str) -> bool:
        return bool(self.r.exists(self.keys.host(host)))

    # ---------------------------------------------------------------- cancel
    def cancel(self, jid: str) -> JobInfo:
        """Ask job ``jid`` to stop: a queued job is cancelled at once, a
        running one at its next safe point (its imaging state is kept, so
        submitting it again resumes)."""
        full = self.resolve(jid)
        key = self.keys.job(full)
        self.r.eval("""
local st = redis.call('HGET', KEYS[1], 'state')
if not st or st == 'done' or st == 'failed' or st == 'cancelled' then return st end
redis.call('HSET', KEYS[1], 'cancel', '1')
if st ~= 'running' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'requeued', '0', 'updated', ARGV[1])
end
return st
""", 1, key, repr(time.time()))
        return self.get(full)

    def _redis(self, fn: Any) -> Any:
        redis = require_extra("redis")
        try:
            return fn()
        except redis.ConnectionError as exc:
            raise BrokerUnreachableError(f"the broker {self.url} does not answer: {exc}") from None


def submit(leaf: str, host: str, *, to: str | None = None, repo: str | None = None,
           name: str | None = None, timeout: float | None = None, fs_aware: bool = True,
           segment_size: int | None = None, max_attempts: int | None = None,
           broker: str | None = None) -> str:
    """Queue the imaging of ``leaf`` on ``host`` and return the job's ID.

    Give ``to`` (a store URL) or ``repo`` and ``name``.  The same (host,
    leaf, target) gives the same ID, and submitting it again while it is
    queued, running or done returns it without queuing it twice.
    ``segment_size`` is as for ``vhdcore image --segment-size``; ``max_attempts``
    bounds the runs of a job that keeps stopping at its timeout.  ``broker``
    defaults to ``$VHDCORE_BROKER``.
    """
    spec = JobSpec(leaf=leaf, host=host, to=to, repo=repo, name=name, timeout=timeout,
                   fs_aware=fs_aware, segment_size=segment_size)
    return FleetClient(broker).submit(spec, max_attempts=max_attempts)[0]


def get_job(job: str, *, broker: str | None = None) -> JobInfo:
    """The job ``job`` (an ID or a unique prefix of one)."""
    return FleetClient(broker).get(job)


def list_jobs(*, broker: str | None = None) -> list[JobInfo]:
    """Every job the fleet knows, oldest first."""
    return FleetClient(broker).all()


def cancel(job: str, *, broker: str | None = None) -> JobInfo:
    """Cancel ``job``; returns its record after the request."""
    return FleetClient(broker).cancel(job)
