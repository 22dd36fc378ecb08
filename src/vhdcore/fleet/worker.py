"""``vhdcore worker``: a Celery worker serving one host's queue."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from ._base import FleetSettings, broker_url, check_reachable, queue_name, redis_client
from .budget import set_upload_budget

__all__ = ["run_worker"]

log = logging.getLogger("vhdcore.fleet")


def _heartbeat(settings: FleetSettings, host: str, node: str, concurrency: int,
               stop: threading.Event) -> None:
    """Say every ``heartbeat`` seconds that ``host`` has a worker (the key
    expires three beats after the last one)."""
    r = redis_client(settings.broker)
    key = settings.keys.host(host)
    ttl = max(1, int(3 * settings.heartbeat))
    while True:
        try:
            r.set(key, json.dumps({"worker": node, "concurrency": concurrency,
                                   "pid": os.getpid(), "seen": time.time()}), ex=ttl)
        except Exception as exc:  # the broker is away; the worker keeps going
            log.debug("heartbeat failed: %s", exc)
        if stop.wait(settings.heartbeat):
            return


def run_worker(broker: str | None = None, queue: str | None = None, concurrency: int = 1, *,
               max_upload_rate: int | None = None, redelivery: float | None = None,
               lease: float | None = None, max_attempts: int | None = None,
               state_dir: str | None = None, loglevel: str = "INFO") -> int:
    """Serve the queue of host ``queue`` (default: this machine's host name)
    with ``concurrency`` jobs at once, until stopped (SIGTERM: finish the
    running jobs; SIGQUIT or SIGKILL: they are redelivered).

    ``max_upload_rate`` (bytes per second) sets the fleet-wide upload budget
    (0: no limit; None: leave it as it is).  ``redelivery``, ``lease`` and
    ``max_attempts`` override :class:`FleetSettings`.
    """
    if concurrency < 1:
        from ._base import FleetError

        raise FleetError(f"--concurrency must be at least 1, got {concurrency}")
    settings = FleetSettings(broker_url(broker))
    if redelivery is not None:
        settings.redelivery = float(redelivery)
    if lease is not None:
        settings.lease = float(lease)
    if max_attempts is not None:
        settings.max_attempts = int(max_attempts)
    host = queue or socket.gethostname()
    r = redis_client(settings.broker)
    check_reachable(r, settings.broker)
    if max_upload_rate is not None:
        set_upload_budget(r, settings.keys, max_upload_rate)
    from .tasks import make_app

    app = make_app(settings, state_dir=state_dir)
    node = f"vhdcore.{os.getpid()}@{host}"
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(settings, host, node, concurrency, stop),
                            name="vhdcore-heartbeat", daemon=True)
    beat.start()
    argv = ["worker", "--queues", queue_name(host), "--concurrency", str(concurrency),
            "--hostname", node, "--pool", "prefork", "--loglevel", loglevel,
            "--task-events", "--without-gossip", "--without-mingle"]
    try:
        app.worker_main(argv)
    finally:
        stop.set()
    return 0
