"""kombu's Redis transport, hardened: a malformed payload in a queue is
logged and dropped instead of stopping the worker.

Stock kombu decodes each item popped from a queue list as JSON inside its
event loop; an item that is not JSON (or not a kombu envelope) raises there,
and Celery treats that as an unrecoverable error and exits.  Celery already
copes with well-formed envelopes whose task body is bad (it rejects them).
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

_redis: Any = importlib.import_module("kombu.transport.redis")

__all__ = ["Transport", "TRANSPORT"]

#: the ``broker_transport`` setting that selects this transport
TRANSPORT = "vhdcore.fleet._transport:Transport"
log = logging.getLogger("vhdcore.fleet")
_MALFORMED = (ValueError, KeyError, TypeError, AttributeError, IndexError)


class Channel(_redis.Channel):  # type: ignore[misc]
    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except _MALFORMED as exc:
            log.error("dropped a malformed message from the broker (%s: %s)",
                      type(exc).__name__, exc)
            return True

    def _get(self, queue: str) -> Any:
        try:
            return super()._get(queue)
        except _MALFORMED as exc:
            log.error("dropped a malformed message from %s (%s: %s)", queue,
                      type(exc).__name__, exc)
            raise _redis.Empty() from None


class Transport(_redis.Transport):  # type: ignore[misc]
    Channel = Channel
