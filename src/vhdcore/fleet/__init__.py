"""Imaging a fleet of hypervisors: jobs on Celery with Redis (the ``[fleet]`` extra).

One ``vhdcore image`` on one host is the unit of work.  Each host runs a
worker on its own queue (``image.<host>``), with a limit on the jobs it runs
at once; jobs are submitted from anywhere with the same Redis as broker and
result store:

* :func:`submit` queues a job and returns its ID, derived from (host, leaf,
  target): submitting the same job again returns the existing one;
* :func:`get_job`, :func:`list_jobs` give each job's state, stage, percent,
  bytes, rate, ETA, host and error (:class:`JobInfo`), :func:`cancel` stops
  one;
* :func:`run_worker` serves a host's queue (``vhdcore worker``).

A job runs under a Redis lock with a refreshed lease, so it never runs twice
at once; its message is acknowledged late, so a killed worker's job is
redelivered (within :attr:`FleetSettings.redelivery` seconds) and resumes
from its imaging job state.  A job that reaches its timeout is stopped
(resumable) and queued again, up to :attr:`FleetSettings.max_attempts`
attempts.  Uploads of the whole fleet share one byte budget, a token bucket
in Redis (:mod:`vhdcore.fleet.budget`).  See docs/fleet.md.

Importing this package needs neither Celery nor redis-py; using it does.
"""
from __future__ import annotations

from ._base import BrokerUnreachableError, FleetError, FleetSettings, queue_name
from .jobs import STATES, JobInfo, JobSpec, cancel, get_job, job_id, list_jobs, submit
from .worker import run_worker

__all__ = [
    "BrokerUnreachableError",
    "FleetError",
    "FleetSettings",
    "JobInfo",
    "JobSpec",
    "STATES",
    "cancel",
    "get_job",
    "job_id",
    "list_jobs",
    "queue_name",
    "run_worker",
    "set_upload_budget",
    "submit",
]


def set_upload_budget(rate: int | None, *, broker: str | None = None) -> None:
    """Set the fleet-wide upload budget to ``rate`` bytes per second (None
    or 0: no limit), as ``vhdcore worker --max-upload-rate`` does."""
    from ._base import broker_url, check_reachable, redis_client
    from .budget import set_upload_budget as _set

    url = broker_url(broker)
    r = redis_client(url)
    check_reachable(r, url)
    _set(r, FleetSettings(url).keys, rate)
