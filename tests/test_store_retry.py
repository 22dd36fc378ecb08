"""Retries: exponential backoff with jitter, bounded by attempts and time; only transient errors."""

from __future__ import annotations

import random

import pytest

from vhdcore.errors import StoreAuthError, StoreError, UploadError
from vhdcore.store.retry import RetryExhausted, RetryPolicy, call_with_retry, is_transient_status


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


class Flaky:
    """Fails with ``errors`` in turn, then returns ``value``."""

    def __init__(self, errors: list[BaseException], value: object = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


def transient(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionError, TimeoutError))


def run(fn, policy: RetryPolicy, clock: FakeClock, **kw):
    return call_with_retry(fn, policy, transient, sleep=clock.sleep, clock=clock, rng=random.Random(1), **kw)


def test_succeeds_after_transient_failures() -> None:
    clock = FakeClock()
    fn = Flaky([ConnectionResetError("reset"), TimeoutError("slow")])
    assert run(fn, RetryPolicy(attempts=5, initial_delay=1.0, jitter=0.0), clock) == "ok"
    assert fn.calls == 3
    assert clock.sleeps == [1.0, 2.0]


def test_backoff_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(attempts=10, initial_delay=0.5, multiplier=2.0, max_delay=4.0, jitter=0.5)
    rng = random.Random(42)
    for retry, base in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (9, 4.0)]:
        for _ in range(50):
            d = policy.delay(retry, rng)
            assert base * 0.5 <= d <= base
    delays = {round(policy.delay(3, rng), 6) for _ in range(20)}
    assert len(delays) > 10  # jitter really varies


def test_attempts_are_bounded() -> None:
    clock = FakeClock()
    fn = Flaky([ConnectionError("down")] * 10)
    with pytest.raises(RetryExhausted) as info:
        run(fn, RetryPolicy(attempts=4, initial_delay=0.1), clock)
    assert fn.calls == 4
    assert len(clock.sleeps) == 3
    assert info.value.attempts == 4
    assert isinstance(info.value.last, ConnectionError)
    assert "gave up after 4 attempts" in str(info.value)


def test_time_is_bounded() -> None:
    clock = FakeClock()
    fn = Flaky([ConnectionError("down")] * 100)
    with pytest.raises(RetryExhausted):
        run(fn, RetryPolicy(attempts=100, initial_delay=1.0, max_delay=8.0, jitter=0.0, deadline=20.0), clock)
    assert clock.now <= 20.0
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0]  # the next 8 s would pass the 20 s deadline


def test_non_transient_errors_are_not_retried() -> None:
    clock = FakeClock()
    fn = Flaky([PermissionError("denied")])
    with pytest.raises(PermissionError):
        run(fn, RetryPolicy(attempts=5), clock)
    assert fn.calls == 1 and clock.sleeps == []


def test_on_retry_hook_sees_each_retry() -> None:
    clock = FakeClock()
    seen = []
    fn = Flaky([ConnectionError("a"), ConnectionError("b")])
    run(
        fn,
        RetryPolicy(attempts=3, jitter=0.0, initial_delay=0.25),
        clock,
        on_retry=lambda exc, n, d: seen.append((str(exc), n, d)),
    )
    assert seen == [("a", 1, 0.25), ("b", 2, 0.5)]


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=2.0)
    with pytest.raises(ValueError):
        RetryPolicy(multiplier=0.5)


@pytest.mark.parametrize(
    "status, expected",
    [
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (408, True),
        (429, True),
        (422, True),
        (499, True),
        (501, False),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (409, False),
        (None, False),
    ],
)
def test_transient_statuses(status, expected) -> None:
    assert is_transient_status(status) is expected


def _store():
    from vhdcore.store.directory import DirectoryStore

    class Probe(DirectoryStore):
        def _is_transient(self, exc):
            return isinstance(exc, ConnectionError)

        def _translate(self, exc, what, upload):
            if isinstance(exc, PermissionError):
                return StoreAuthError(f"{self.describe()}: {what}: rejected")
            return super()._translate(exc, what, upload)

    return Probe("/nonexistent-dir-for-tests", "img", retry=RetryPolicy(attempts=3, initial_delay=0.0))


def test_store_call_turns_exhausted_retries_into_upload_error() -> None:
    store = _store()
    fn = Flaky([ConnectionError("down")] * 5)
    with pytest.raises(UploadError, match="img: putting: failed.*gave up after 3 attempts") as info:
        store._call("putting:", fn, upload=True)
    assert fn.calls == 3
    assert isinstance(info.value.__cause__, ConnectionError)
    with pytest.raises(StoreError, match="gave up") as info2:
        store._call("getting", Flaky([ConnectionError("down")] * 5))
    assert not isinstance(info2.value, UploadError)


def test_store_call_raises_auth_errors_at_once() -> None:
    store = _store()
    fn = Flaky([PermissionError("401")])
    with pytest.raises(StoreAuthError, match="rejected"):
        store._call("listing", fn)
    assert fn.calls == 1
