"""Retries with exponential backoff and jitter for object store requests.

Only *transient* failures are retried: time-outs, connection errors, HTTP 5xx
(except 501 and 505) and a few 4xx that mean "try again" (408, 422 for a body damaged in transit,
429, 499).  Authentication and not-found answers are final at once.  Attempts
and total time are both bounded.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["RetryPolicy", "RetryExhausted", "call_with_retry", "TRANSIENT_HTTP_STATUSES"]

T = TypeVar("T")

#: HTTP statuses below 500 that are worth retrying
TRANSIENT_HTTP_STATUSES = frozenset({408, 422, 429, 499})


def is_transient_status(status: int | None) -> bool:
    """True for an HTTP status worth retrying (5xx and :data:`TRANSIENT_HTTP_STATUSES`)."""
    if status is None:
        return False
    return (status >= 500 and status not in (501, 505)) or status in TRANSIENT_HTTP_STATUSES


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry.

    The delay before retry ``n`` (1-based) is drawn uniformly from
    ``[d * (1 - jitter), d]`` with ``d = min(max_delay, initial_delay *
    multiplier ** (n - 1))``.  No retry starts after ``deadline`` seconds
    from the first attempt (``None``: no time bound).
    """

    attempts: int = 6
    initial_delay: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 20.0
    jitter: float = 0.5
    deadline: float | None = 300.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ValueError("delays must not be negative and multiplier must be >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter}")

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        base = min(self.max_delay, self.initial_delay * self.multiplier ** (retry - 1))
        r = (rng or random).random()
        return base * (1.0 - self.jitter * r)


class RetryExhausted(Exception):
    """A transient failure persisted through every allowed attempt.

    ``last`` is the final exception; ``attempts`` how many were made.
    Store back ends turn it into :class:`~vhdcore.errors.UploadError` or
    :class:`~vhdcore.errors.StoreError`.
    """

    def __init__(self, last: BaseException, attempts: int, elapsed: float) -> None:
        super().__init__(f"{last} (gave up after {attempts} attempts in {elapsed:.1f} s)")
        self.last = last
        self.attempts = attempts
        self.elapsed = elapsed


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    *,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T:
    """Call ``fn()`` until it succeeds, a failure is not transient, or the policy runs out.

    A non-transient exception propagates unchanged at once.  When transient
    failures exhaust the attempts or the deadline, :class:`RetryExhausted` is
    raised from the last one.  ``on_retry(exc, retry_number, delay)`` is called
    before each sleep (for logging, or to reset a connection).
    """
    start = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            elapsed = clock() - start
            if attempt >= policy.attempts:
                raise RetryExhausted(exc, attempt, elapsed) from exc
            delay = policy.delay(attempt, rng)
            if policy.deadline is not None and elapsed + delay > policy.deadline:
                raise RetryExhausted(exc, attempt, elapsed) from exc
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            sleep(delay)
