"""The fleet-wide upload budget: one token bucket in Redis, in bytes.

Every worker takes tokens before it hands a segment to its uploader, in
grants of at most ``burst`` bytes, through one Lua script, so the check and
the deduction are atomic however many workers ask at once.  The bucket uses
the Redis server's clock (``TIME``), not the workers' clocks.

The bucket holds at most ``burst`` tokens (half a second of the rate, at
least one grant of 1 MiB), so over any window of T seconds the fleet is
granted at most ``burst + rate * T`` bytes: within 5% of the budget over 10
seconds.  Each grant is also added to a per-second counter (kept an hour),
which is what ``granted_per_second`` reads back: the accounting the tests
check.
"""
from __future__ import annotations

import time
from typing import Any

from ._base import FleetSettings, Keys, redis_client, retrying

__all__ = ["UploadBudget", "set_upload_budget"]

MiB = 1 << 20
#: the largest grant a worker takes in one call
MAX_GRANT = 64 * MiB
#: seconds the per-second accounting counters are kept
ACCOUNTING_TTL = 3600

# KEYS[1] bucket hash (rate, burst, tokens, ts); KEYS[2] accounting key prefix
# ARGV[1] bytes wanted.  Returns {granted, wait in microseconds}.
_TAKE = """
local rate = tonumber(redis.call('HGET', KEYS[1], 'rate') or '0')
local want = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if not rate or rate <= 0 then
  return {want, 0}
end
local burst = tonumber(redis.call('HGET', KEYS[1], 'burst') or '0')
if burst < 1 then burst = rate end
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or tostring(burst))
local ts = tonumber(redis.call('HGET', KEYS[1], 'ts') or tostring(now))
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
end
if want > burst then want = burst end
if tokens >= want then
  tokens = tokens - want
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
  local acct = KEYS[2] .. t[1]
  redis.call('INCRBY', acct, want)
  redis.call('EXPIRE', acct, tonumber(ARGV[2]))
  redis.call('INCRBY', KEYS[2] .. 'total', want)
  return {want, 0}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
return {0, math.ceil((want - tokens) / rate * 1000000)}
"""


def _burst(rate: int) -> int:
    return max(MiB, rate // 2)


def set_upload_budget(client: Any, keys: Keys, rate: int | None) -> None:
    """Set the fleet's upload budget to ``rate`` bytes per second (None or 0:
    no limit).  The bucket starts full."""
    if not rate:
        client.delete(keys.budget)
        return
    if rate < 0:
        raise ValueError(f"the upload rate must not be negative, got {rate}")
    burst = _burst(rate)
    client.hset(keys.budget, mapping={"rate": str(rate), "burst": str(burst),
                                      "tokens": str(burst)})
    client.hdel(keys.budget, "ts")


class UploadBudget:
    """A worker's handle on the fleet's bucket; call :meth:`take` with a
    number of bytes, it returns once the fleet may send them."""

    def __init__(self, settings: FleetSettings, client: Any | None = None) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.r = client if client is not None else redis_client(settings.broker)
        self._script = self.r.register_script(_TAKE)
        self.granted = 0
        self.waited = 0.0

    def take(self, nbytes: int, check: Any = None) -> None:
        """Block until ``nbytes`` tokens are granted (in grants of at most the
        bucket's burst).  ``check()``, if given, is called between waits and
        may raise to give up (a cancelled job)."""
        left = int(nbytes)
        while left > 0:
            want = min(left, MAX_GRANT)
            got, wait_us = retrying(
                lambda: self._script(keys=[self.keys.budget, self.keys.granted()],
                                     args=[want, ACCOUNTING_TTL]),
                seconds=max(30.0, self.settings.lease), what="upload budget")
            got = int(got)
            if got:
                left -= got
                self.granted += got
                continue
            pause = min(1.0, max(0.001, int(wait_us) / 1e6))
            self.waited += pause
            if check is not None:
                check()
            time.sleep(pause)


def granted_per_second(client: Any, keys: Keys, since: int, until: int) -> dict[int, int]:
    """Bytes the bucket granted in each server second of [since, until]."""
    secs = list(range(since, until + 1))
    vals = client.mget([keys.granted(s) for s in secs]) if secs else []
    return {s: int(v or 0) for s, v in zip(secs, vals)}
