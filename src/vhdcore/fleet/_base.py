"""Settings, Redis keys, errors and the Redis client of the fleet (no Celery here)."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import VhdError

__all__ = ["FleetError", "BrokerUnreachableError", "FleetSettings", "broker_url", "redis_client",
           "require_extra", "Keys"]

T = TypeVar("T")

EXTRA_HINT = "pip install 'vhdcore[fleet]'"


class FleetError(VhdError):
    """A fleet operation cannot be done (no such job, bad arguments, missing extra)."""


class BrokerUnreachableError(FleetError):
    """The Redis broker does not answer (the command line exits with 3)."""


def require_extra(module: str) -> Any:
    """Import ``module`` (celery, redis) or raise :class:`FleetError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise FleetError(f"the fleet commands need {module!r} ({exc}); install the extra: "
                         f"{EXTRA_HINT}") from None


def broker_url(url: str | None = None) -> str:
    """``url``, else ``$VHDCORE_BROKER``; a :class:`FleetError` when neither is set."""
    url = url or os.environ.get("VHDCORE_BROKER")
    if not url:
        raise FleetError("no broker: give --broker redis://HOST:6379/0 or set VHDCORE_BROKER")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise FleetError(f"{url!r}: the fleet's broker must be a Redis URL (redis://HOST:PORT/DB)")
    return url


@dataclass
class FleetSettings:
    """How a fleet behaves; the defaults are the documented policy.

    ``redelivery`` is the most seconds before the job of a killed worker is
    handed out again (it sets the Redis transport's ``visibility_timeout``
    and its restore sweep); ``lease`` is the lifetime of a job's lock,
    refreshed every ``lease / 3`` seconds while the job runs;
    ``max_attempts`` bounds how often a job that stopped at its timeout (or
    lost its target or worker) is run; ``heartbeat`` is how often a worker
    says its host is served.
    """

    broker: str
    redelivery: float = 120.0
    lease: float = 30.0
    max_attempts: int = 3
    retry_delay: float = 2.0
    heartbeat: float = 5.0
    prefix: str = "vhdcore:fleet:"

    def restore_interval(self) -> int:
        """Seconds between the transport's sweeps for abandoned messages."""
        return max(1, min(10, int(self.redelivery / 6)))

    def visibility_timeout(self) -> int:
        """The transport's ``visibility_timeout``: a sweep comes at most one
        interval later, so redelivery happens within ``redelivery`` seconds."""
        return max(1, int(self.redelivery) - self.restore_interval())

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)


class Keys:
    """Names of the fleet's Redis keys."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:events"

    def runs(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:runs"

    def lock(self, job_id: str) -> str:
        return f"{self.prefix}lock:{job_id}"

    @property
    def index(self) -> str:
        return f"{self.prefix}jobs"

    def host(self, host: str) -> str:
        return f"{self.prefix}host:{host}"

    @property
    def channel(self) -> str:
        return f"{self.prefix}events"

    @property
    def budget(self) -> str:
        return f"{self.prefix}budget"

    def granted(self, second: int | None = None) -> str:
        return f"{self.prefix}budget:granted:" + ("" if second is None else str(second))


def queue_name(host: str) -> str:
    """The Celery queue of a host: ``image.<host>``."""
    return f"image.{host}"


def redis_client(url: str, *, timeout: float = 5.0) -> Any:
    """A redis-py client for ``url`` with short timeouts (strings decoded)."""
    redis = require_extra("redis")
    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                decode_responses=True)


def check_reachable(client: Any, url: str) -> None:
    """Ping the broker; :class:`BrokerUnreachableError` if it does not answer."""
    redis = require_extra("redis")
    try:
        client.ping()
    except redis.RedisError as exc:
        raise BrokerUnreachableError(f"the broker {_safe(url)} does not answer: {exc}") from None


def _safe(url: str) -> str:
    """``url`` without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def retrying(fn: Callable[[], T], *, seconds: float, what: str = "") -> T:
    """Call ``fn`` until it stops raising a Redis connection error or
    ``seconds`` have passed (workers ride out a broker restart)."""
    redis = require_extra("redis")
    deadline = time.monotonic() + seconds
    delay = 0.1
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(2.0, delay * 2)
