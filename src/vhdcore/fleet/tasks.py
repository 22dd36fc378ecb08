"""The Celery side of the fleet: the app, its configuration and the imaging task.

Importing this module imports Celery; nothing else in ``vhdcore`` does.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from ..errors import StoreError, VhdError, VhdTimeoutError
from ._base import FleetError, FleetSettings, queue_name, redis_client, require_extra, retrying
from .budget import UploadBudget
from .spec import (
    CANCELLED,
    DONE,
    EVENTS_KEPT,
    FAILED,
    RUNNING,
    STOPPED,
    TERMINAL_STATES,
    JobSpec,
    spec_from_record,
)
from .lease import Lease

__all__ = ["make_app", "run_imaging", "TASK_NAME"]

TASK_NAME = "vhdcore.fleet.image"
#: the hardened Redis transport; kombu loads it by name (see _transport.py)
TRANSPORT = "vhdcore.fleet._transport:Transport"
#: the Redis transport's index of unacknowledged messages (kombu's default key)
UNACKED_INDEX = "unacked_index"
log = logging.getLogger("vhdcore.fleet")
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def run_imaging(spec: JobSpec, *, progress: Callable[[Any], None] | None,
                upload_gate: Callable[[int], None] | None,
                state_dir: str | None) -> dict[str, Any]:
    """Run one job's imaging on this host and return its result as JSON.

    ``--to URL``: :func:`vhdcore.imaging.create_image`, resuming from the
    job state an earlier attempt left.  ``--repo URL --name NAME``:
    ``vhdcore.repo.create_image`` when this vhdcore has the repository
    (:class:`FleetError` otherwise).
    """
    if spec.to is not None:
        from ..imaging import create_image, job_state_path

        resume = os.path.exists(job_state_path(spec.to, state_dir))
        res = create_image(spec.leaf, spec.to, timeout=spec.timeout, resume=resume,
                           state_dir=state_dir, progress=progress, fs_aware=spec.fs_aware,
                           segment_size=spec.segment_size, upload_gate=upload_gate)
        return asdict(res)
    try:
        repo = importlib.import_module("vhdcore.repo")
    except ModuleNotFoundError as exc:
        if exc.name not in ("vhdcore.repo",):
            raise
        raise FleetError("--repo jobs need the content-addressed repository (vhdcore.repo), "
                         "which this vhdcore does not have") from None
    res = repo.create_image(spec.leaf, spec.repo, spec.name, progress=progress,
                            timeout=spec.timeout, fs_aware=spec.fs_aware)
    return {"name": str(res.name), "id": str(res.id)}


def make_app(settings: FleetSettings, *, client: bool = False,
             state_dir: str | None = None) -> Any:
    """A Celery app on ``settings.broker`` (broker and result store), with
    late acknowledgement, a prefetch of one and the Redis transport's
    visibility timeout set from ``settings.redelivery``.  ``client=True``
    (submitting only) gives up quickly when the broker is away."""
    celery = require_extra("celery")
    app = celery.Celery("vhdcore.fleet", broker=settings.broker, backend=settings.broker,
                        set_as_current=False)
    transport = {
        "visibility_timeout": settings.visibility_timeout(),
        "unacked_restore_interval": settings.restore_interval(),
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 5,
        "health_check_interval": 10,
    }
    app.conf.update(
        broker_transport=TRANSPORT if settings.broker.startswith(("redis://", "rediss://",
                                                                  "unix://")) else None,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_track_started=True, result_expires=7 * 86400,
        broker_transport_options=transport, result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=3 if client else None,
        broker_connection_timeout=5,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_send_task_events=True, task_send_sent_event=True,
        task_default_queue="image.unrouted",
        redis_backend_health_check_interval=10,
        redis_socket_connect_timeout=5,
        redis_retry_on_timeout=True,
    )
    if client:
        return app

    def image(task: Any, job: Any = None, *args: Any, **kwargs: Any) -> Any:
        return _image_task(task, settings, state_dir, job, args, kwargs)

    app.task(name=TASK_NAME, bind=True, acks_late=True, max_retries=None)(image)
    return app


# ----------------------------------------------------------------------------
_CLIENTS: dict[tuple[int, str], Any] = {}


def _client(settings: FleetSettings) -> Any:
    key = (os.getpid(), settings.broker)
    r = _CLIENTS.get(key)
    if r is None:
        r = _CLIENTS[key] = redis_client(settings.broker, timeout=10)
    return r


def _image_task(task: Any, settings: FleetSettings, state_dir: str | None, job: Any,
                args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """One delivery of a job's message."""
    if not isinstance(job, str) or not _JOB_ID.fullmatch(job) or args or kwargs:
        # not a message vhdcore sent: acknowledge and drop it, keep working
        log.error("ignoring a malformed imaging message (job=%r, %d extra arguments)",
                  job, len(args) + len(kwargs))
        return {"ignored": "malformed message"}
    r = _client(settings)
    keys = settings.keys
    key = keys.job(job)
    patience = max(60.0, settings.lease * 2)
    rec: dict[str, str] = retrying(lambda: r.hgetall(key), seconds=patience)
    if not rec:
        log.error("ignoring job %s: no such job record", job)
        return {"ignored": "unknown job"}
    state = rec.get("state", "")
    if state in TERMINAL_STATES:
        return {"state": state}  # a duplicate delivery of a finished job
    if rec.get("cancel") == "1":
        _update(r, key, state=CANCELLED, requeued="0")
        return {"state": CANCELLED}
    if state == STOPPED and rec.get("requeued") != "1":
        return {"state": state}
    host = rec.get("host", "")
    try:
        spec = spec_from_record(rec)
    except FleetError as exc:
        _update(r, key, state=FAILED, error=str(exc))
        return {"state": FAILED}
    lease = Lease(r, keys.lock(job), settings.lease)
    if not retrying(lease.acquire, seconds=patience):
        # another run holds the job (a message redelivered while it runs):
        # look again later rather than drop it, in case that run dies
        raise task.retry(queue=queue_name(host), countdown=max(1.0, settings.lease / 2),
                         max_retries=None)
    try:
        return _run_locked(task, settings, state_dir, r, job, key, rec, spec, lease)
    finally:
        lease.stop()
        lease.release()


def _update(r: Any, key: str, **fields: Any) -> None:
    fields["updated"] = repr(time.time())
    try:
        retrying(lambda: r.hset(key, mapping={k: "" if v is None else str(v)
                                              for k, v in fields.items()}), seconds=60)
    except Exception as exc:  # the record will be stale; the job itself is not lost
        log.error("could not update %s: %s", key, exc)


class _Stop:
    """Why a running job must stop (cancelled, or its lease lost), raised as
    ``KeyboardInterrupt`` into the job at its next safe point, once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.raised = False
        self.lock = threading.Lock()

    def request(self, reason: str) -> None:
        with self.lock:
            if self.reason is None:
                self.reason = reason

    def check(self) -> None:
        with self.lock:
            if self.reason is not None and not self.raised:
                self.raised = True
                raise KeyboardInterrupt(self.reason)


def _start_run(task: Any, settings: FleetSettings, r: Any, job: str, key: str,
               spec: JobSpec, lease: Lease) -> tuple[int, str]:
    """Count the attempt and record the run; its number and the worker's name."""
    attempt = int(retrying(lambda: r.hincrby(key, "attempts", 1), seconds=60))
    node = str(getattr(task.request, "hostname", "") or "")
    started = time.time()
    _update(r, key, state=RUNNING, requeued="0", worker=node, started=repr(started), error="",
            lock=lease.token)
    try:
        r.rpush(settings.keys.runs(job), json.dumps({"attempt": attempt, "worker": node,
                                                     "pid": os.getpid(), "start": started,
                                                     "token": lease.token}))
        _record_chain(r, key, spec)
    except Exception:
        pass
    return attempt, node


def _stopped(task: Any, settings: FleetSettings, r: Any, job: str, key: str, spec: JobSpec,
             attempt: int, max_attempts: int, reason: str | None, exc: BaseException) -> str:
    """The outcome of a run that stopped (cancelled, lease lost, timed out,
    interrupted or failed in the store or the OS); raises the task's retry
    when the job is to run again."""
    msg = str(exc) or type(exc).__name__
    if reason == "cancelled":
        _update(r, key, state=CANCELLED, requeued="0",
                error="cancelled; submit it again to resume")
        return CANCELLED
    if reason is not None:
        # our lease is gone (the broker was away too long, or another run
        # took the job): look again later, when the job is done, held by
        # that other run, or free to resume
        log.error("job %s: stopped, %s; looking again in %.0f s", job, reason,
                  settings.lease)
        _end_run(r, settings.keys.runs(job), attempt, "lost")
        raise task.retry(queue=queue_name(spec.host), countdown=settings.lease,
                         max_retries=None) from None
    timed_out = isinstance(exc, VhdTimeoutError)
    why = msg if timed_out else f"{type(exc).__name__}: {msg}"
    if attempt < max_attempts:
        _update(r, key, state=STOPPED, requeued="1",
                error=f"attempt {attempt} of {max_attempts}: {why}; re-queued")
        _end_run(r, settings.keys.runs(job), attempt, "requeued")
        raise task.retry(queue=queue_name(spec.host), countdown=settings.retry_delay,
                         max_retries=None) from None
    outcome = STOPPED if timed_out else FAILED
    _update(r, key, state=outcome, requeued="0",
            error=f"{why} (after {attempt} attempts; submit it again to resume)")
    return outcome


def _finished(r: Any, key: str, job: str, lease: Lease, result: dict[str, Any]) -> None:
    if lease.lost:
        log.warning("job %s finished after its lease was lost (%s)", job, lease.lost)
    secs = float(result.get("seconds") or 0)
    size = int(result.get("stream_size") or 0)
    _update(r, key, state=DONE, stage="done", percent=100, error="", eta=0,
            rate=round(size / secs, 1) if secs > 0 and size else "",
            bytes_done=size or "", bytes_total=size or "",
            result=json.dumps(result, default=str), finished=repr(time.time()))


def _run_locked(task: Any, settings: FleetSettings, state_dir: str | None, r: Any, job: str,
                key: str, rec: dict[str, str], spec: JobSpec, lease: Lease) -> Any:
    max_attempts = int(rec.get("max_attempts") or settings.max_attempts)
    attempt, _node = _start_run(task, settings, r, job, key, spec, lease)
    stop = _Stop()
    tag = (getattr(task.request, "properties", None) or {}).get("delivery_tag")

    def on_tick() -> None:
        if r.hget(key, "cancel") == "1":
            stop.request("cancelled")
        if tag:
            # keep our unacknowledged message from being handed out again while
            # we run: the transport redelivers what it has not seen for
            # visibility_timeout seconds, and a job may run for hours
            r.zadd(UNACKED_INDEX, {tag: time.time()}, xx=True)

    def progress(ev: Any) -> None:
        _publish(r, settings, job, spec.host, attempt, ev)
        if ev.stage not in ("failed", "done"):
            stop.check()

    redis_errors = (require_extra("redis").ConnectionError, require_extra("redis").TimeoutError)
    budget = UploadBudget(settings, client=r)
    # tick often enough for both the lease and the transport's visibility timeout
    lease.keep(lambda why: stop.request("lease: " + why), also=on_tick,
               every=min(settings.lease, settings.visibility_timeout()) / 3)
    outcome: str
    try:
        result = run_imaging(spec, progress=progress,
                             upload_gate=lambda n: budget.take(n, check=stop.check),
                             state_dir=state_dir)
    except (VhdTimeoutError, KeyboardInterrupt, StoreError, OSError) as exc:
        outcome = _stopped(task, settings, r, job, key, spec, attempt, max_attempts,
                           stop.reason, exc)
    except redis_errors as exc:
        # the broker went away for longer than we wait: the record cannot be
        # trusted to say what happened, so run the job again later (it resumes)
        log.error("job %s: the broker failed (%s); looking again in %.0f s", job, exc,
                  settings.lease)
        raise task.retry(queue=queue_name(spec.host), countdown=settings.lease,
                         max_retries=None) from None
    except VhdError as exc:
        outcome = FAILED
        _update(r, key, state=FAILED, requeued="0", error=f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        outcome = FAILED
        log.exception("job %s failed", job)
        _update(r, key, state=FAILED, requeued="0", error=f"{type(exc).__name__}: {exc}")
    else:
        outcome = DONE
        _finished(r, key, job, lease, result)
    _end_run(r, settings.keys.runs(job), attempt, outcome)
    return {"state": outcome, "attempt": attempt}


def _end_run(r: Any, runs_key: str, attempt: int, outcome: str) -> None:
    try:
        retrying(lambda: r.rpush(runs_key, json.dumps({"attempt": attempt, "end": time.time(),
                                                       "outcome": outcome})), seconds=30)
    except Exception:
        pass


def _record_chain(r: Any, key: str, spec: JobSpec) -> None:
    """The chain's real identity (its disks' UUIDs), as seen on the host."""
    from ..chain import Chain

    try:
        with Chain.open(spec.leaf) as chain:
            ident = [{"path": ly.path, "uuid": str(ly.uuid)} for ly in chain.layers]
    except Exception:
        return
    r.hset(key, "chain", json.dumps(ident))


def _publish(r: Any, settings: FleetSettings, job: str, host: str, attempt: int,
             ev: Any) -> None:
    """Put a progress event into the job's record, its event list and the
    fleet's channel.  A broker that is away loses the event, not the job."""
    keys = settings.keys
    body = {"event": "progress", **ev.to_json(), "job": job, "host": host, "attempt": attempt,
            "time": round(time.time(), 3)}
    line = json.dumps(body)
    try:
        pipe = r.pipeline(transaction=False)
        pipe.hset(keys.job(job), mapping={
            "stage": ev.stage, "percent": str(ev.percent), "bytes_done": str(ev.bytes_done),
            "bytes_total": str(ev.bytes_total), "rate": "" if ev.rate is None else str(round(ev.rate, 1)),
            "eta": "" if ev.eta is None else str(round(ev.eta, 2)), "progress": line,
            "updated": repr(time.time())})
        pipe.rpush(keys.events(job), line)
        pipe.ltrim(keys.events(job), -EVENTS_KEPT, -1)
        pipe.publish(keys.channel, line)
        pipe.execute()
    except Exception as exc:
        log.warning("job %s: progress not published: %s", job, exc)
