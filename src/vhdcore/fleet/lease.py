"""A job's lock in Redis with a lease: held by one run, refreshed while it runs.

The lock is a key holding the run's random token with an expiry (the lease).
Only the holder can refresh or release it (checked in Lua).  A run that
cannot refresh its lease before it expires stops: after that moment another
worker may take the job, and the same job must never run twice at once.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Lease"]

_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """The lock ``key`` with a lease of ``seconds``."""

    def __init__(self, client: Any, key: str, seconds: float) -> None:
        self.r = client
        self.key = key
        self.seconds = seconds
        self.token = secrets.token_hex(16)
        self.expires = 0.0  # monotonic time the lease runs out, as far as we know
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def acquire(self) -> bool:
        """Take the lock if nobody holds it; True on success."""
        t = time.monotonic()
        ok = self.r.set(self.key, self.token, nx=True, px=int(self.seconds * 1000))
        if ok:
            self.expires = t + self.seconds
        return bool(ok)

    def refresh(self) -> bool:
        """Extend the lease; False if the lock is no longer ours."""
        t = time.monotonic()
        ok = self.r.eval(_REFRESH, 1, self.key, self.token, int(self.seconds * 1000))
        if ok:
            self.expires = t + self.seconds
        return bool(ok)

    def release(self) -> None:
        try:
            self.r.eval(_RELEASE, 1, self.key, self.token)
        except Exception:  # the lease runs out by itself
            pass

    def keep(self, on_lost: Callable[[str], None], every: float | None = None,
             also: Callable[[], None] | None = None) -> None:
        """Refresh the lease every ``seconds / 3`` on a thread until
        :meth:`stop`; call ``on_lost(reason)`` once if it is lost or cannot be
        confirmed before it would expire.  ``also()`` runs on each tick."""
        period = every or self.seconds / 3

        def run() -> None:
            while not self._stop.wait(period):
                try:
                    if not self.refresh():
                        self._lose(on_lost, "the job's lock was taken over")
                        return
                except Exception as exc:
                    # the broker is away (restarting?): keep trying until the
                    # lease would have run out
                    if time.monotonic() + period >= self.expires:
                        self._lose(on_lost, f"could not refresh the job's lease: {exc}")
                        return
                if also is not None:
                    try:
                        also()
                    except Exception:
                        pass

        self._thread = threading.Thread(target=run, name="vhdcore-lease", daemon=True)
        self._thread.start()

    def _lose(self, on_lost: Callable[[str], None], reason: str) -> None:
        self.lost = reason
        on_lost(reason)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
