"""Retry: the pure backoff function, attempt counts, retry_after, deadline, filters."""

from __future__ import annotations

import itertools
import logging
import math
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from fractions import Fraction
from typing import Any

import anyio
import pytest

from corral import Outcome, Pool, Retry, Timeout, apply_to_all, backoff
from corral._retry import _parse_retry_after

pytestmark = pytest.mark.anyio

# uvloop's loop.time() advances in whole milliseconds
CLOCK_GRAIN = 0.002


@pytest.fixture
def anyio_backend(timing_anyio_backend: Any) -> Any:
    return timing_anyio_backend


# ------------------------------------------------------------ pure backoff


def test_backoff_without_jitter_is_exponential_and_capped() -> None:
    """min(wait_max, wait_initial * base ** (k - 1)) for k = 1, 2, ..."""
    delays = [
        backoff(k, wait_initial=0.1, wait_max=1.0, wait_exp_base=2.0, jitter=False)
        for k in range(1, 7)
    ]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_backoff_full_jitter_draws_between_zero_and_the_ceiling() -> None:
    """With jitter the draw is uniform over [0, ceiling]: the bounds passed prove it."""
    calls: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        calls.append((low, high))
        return high / 2

    delay = backoff(
        3, wait_initial=1.0, wait_max=10.0, wait_exp_base=3.0, jitter=True, uniform=uniform
    )
    assert calls == [(0.0, 9.0)]
    assert delay == 4.5


def test_backoff_retry_after_wins_over_wait_max_unless_capped() -> None:
    """A retry_after hint is a floor, beyond wait_max unless cap_retry_after."""
    common: dict[str, Any] = {"wait_initial": 0.1, "wait_max": 5.0, "wait_exp_base": 2.0}
    assert backoff(1, jitter=False, retry_after=30.0, **common) == 30.0
    assert backoff(1, jitter=False, retry_after=30.0, cap_retry_after=True, **common) == 5.0
    assert backoff(4, jitter=False, retry_after=0.05, **common) == pytest.approx(0.8)
    assert backoff(1, jitter=True, retry_after=2.0, uniform=lambda a, b: a, **common) == 2.0


def test_backoff_survives_huge_retry_numbers() -> None:
    """No OverflowError for a large k: the wait is simply wait_max."""
    assert backoff(5000, wait_initial=1.0, wait_max=7.0, wait_exp_base=10.0, jitter=False) == 7.0


def test_backoff_zero_initial_retries_at_once() -> None:
    """wait_initial=0 means retry immediately."""
    assert backoff(3, wait_initial=0.0, wait_max=10.0, wait_exp_base=2.0, jitter=True) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"attempts": 0}, ValueError, "attempts must be >= 1, got 0"),
        ({"attempts": 1.5}, TypeError, "attempts must be an int"),
        ({"wait_initial": -1}, ValueError, "wait_initial must be >= 0"),
        ({"wait_max": "x"}, TypeError, "wait_max must be a number"),
        ({"wait_exp_base": 0.5}, ValueError, "wait_exp_base must be >= 1"),
        ({"wait_jitter": "yes"}, TypeError, "wait_jitter must be True or False"),
        ({"deadline": 0}, ValueError, "deadline must be > 0"),
        ({"on": KeyboardInterrupt}, TypeError, "never retried"),
        ({"on": 3}, TypeError, "on must be an Exception subclass"),
        ({"on": ()}, TypeError, "on must be an Exception subclass"),
    ],
)
def test_retry_rejects_bad_arguments(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Each bad argument names itself."""
    with pytest.raises(error, match=match):
        Retry(**kwargs)


# ------------------------------------------------------------ in a pool


def flaky(failures: dict[int, int], error: type[Exception] = ConnectionError) -> Any:
    """A handler whose item x fails failures[x] times (-1: always), then succeeds."""
    calls: dict[int, int] = {}

    async def handler(x: int) -> int:
        calls[x] = calls.get(x, 0) + 1
        await anyio.lowlevel.checkpoint()
        if failures[x] < 0 or calls[x] <= failures[x]:
            raise error(f"item {x} call {calls[x]}")
        return x

    handler.calls = calls  # type: ignore[attr-defined]
    return handler


async def test_attempts_and_retried_are_exact() -> None:
    """Items failing 0, 1, 2 times and always, with attempts=3: 1, 2, 3, 3 calls;
    stats.retried counts the extra calls exactly."""
    handler = flaky({0: 0, 1: 1, 2: 2, 3: -1})
    pool = Pool(handler, workers=4, retry=Retry(attempts=3, wait_initial=0.01))
    async with pool:
        jobs = [await pool.submit(i) for i in range(4)]
    outcomes = [job.outcome for job in jobs]
    assert [o.attempts for o in outcomes if o] == [1, 2, 3, 3]
    assert [o.ok for o in outcomes if o] == [True, True, True, False]
    assert handler.calls == {0: 1, 1: 2, 2: 3, 3: 3}
    assert pool.stats.retried == 0 + 1 + 2 + 2
    assert pool.stats.failed == 1
    assert pool.stats.succeeded == 3


async def test_waits_follow_the_backoff_schedule(exact: bool) -> None:
    """Without jitter the calls are wait_initial * 2 ** (k - 1) apart."""
    times: list[float] = []

    async def handler(x: int) -> int:
        times.append(anyio.current_time())
        raise ConnectionError

    retry = Retry(attempts=4, wait_initial=0.02, wait_jitter=False)
    [outcome] = await apply_to_all(handler, [1], retry=retry)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert outcome.attempts == 4
    if exact:
        assert gaps == pytest.approx([0.02, 0.04, 0.08], abs=1e-9)
        assert outcome.elapsed == pytest.approx(0.14, abs=1e-9)
    else:
        for gap, wanted in zip(gaps, [0.02, 0.04, 0.08], strict=True):
            assert wanted - CLOCK_GRAIN <= gap < wanted + 0.05


class TooManyRequests(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"429, retry after {retry_after}s")
        self.retry_after = retry_after


async def test_retry_after_hint_is_respected_beyond_wait_max(exact: bool) -> None:
    """An error carrying retry_after waits at least that long, even past wait_max."""
    times: list[float] = []

    async def handler(x: int) -> int:
        times.append(anyio.current_time())
        if len(times) == 1:
            raise TooManyRequests(retry_after=0.3)
        return x

    retry = Retry(attempts=2, wait_initial=0.001, wait_max=0.01)
    [outcome] = await apply_to_all(handler, [7], retry=retry)
    assert outcome.ok
    assert outcome.attempts == 2
    gap = times[1] - times[0]
    if exact:
        assert gap == pytest.approx(0.3, abs=1e-9)
    else:
        assert 0.3 - CLOCK_GRAIN <= gap < 0.4


async def test_non_matching_errors_are_not_retried() -> None:
    """on= as a type, a tuple or a predicate: only matching errors are retried."""
    for on in (ConnectionError, (TimeoutError, ConnectionError), lambda e: "retry" in str(e)):
        handler = flaky({0: 1, 1: 1}, error=ValueError)
        outcomes = await apply_to_all(handler, [0, 1], retry=Retry(3, on=on, wait_initial=0))
        assert [o.attempts for o in outcomes] == [1, 1]
        assert not any(o.ok for o in outcomes)
    handler = flaky({0: 2})
    [outcome] = await apply_to_all(
        handler, [0], retry=Retry(3, on=lambda e: "call" in str(e), wait_initial=0)
    )
    assert outcome.ok
    assert outcome.attempts == 3


async def test_deadline_stops_retries_that_could_not_start_in_time(exact: bool) -> None:
    """deadline=0.25 with waits 0.1, 0.2, ...: the retry due at 0.3 is not made."""
    times: list[float] = []

    async def handler(x: int) -> int:
        times.append(anyio.current_time())
        raise ConnectionError

    retry = Retry(attempts=10, wait_initial=0.1, wait_jitter=False, deadline=0.25)
    [outcome] = await apply_to_all(handler, [1], retry=retry)
    assert outcome.attempts == 2
    assert isinstance(outcome.error, ConnectionError)
    if exact:
        assert outcome.elapsed == pytest.approx(0.1, abs=1e-9)


async def test_deadline_cuts_off_a_running_attempt(exact: bool) -> None:
    """An attempt still running at the deadline is cancelled: TimeoutError."""

    async def handler(x: int) -> int:
        await anyio.sleep(10)
        return x

    [outcome] = await apply_to_all(handler, [1], retry=Retry(3, deadline=0.2))
    assert isinstance(outcome.error, TimeoutError)
    assert outcome.attempts == 1
    if exact:
        assert outcome.elapsed == pytest.approx(0.2, abs=1e-9)
    else:
        assert 0.2 - CLOCK_GRAIN <= outcome.elapsed < 1


async def test_timed_out_attempt_is_retried_and_then_succeeds(exact: bool) -> None:
    """timeout= is per attempt; its TimeoutError is retried like any error."""
    calls = 0

    async def handler(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await anyio.sleep(10)
        return x

    [outcome] = await apply_to_all(
        handler, [5], timeout=0.1, retry=Retry(2, wait_initial=0.05, wait_jitter=False)
    )
    assert outcome.ok
    assert outcome.result == 5
    assert outcome.attempts == 2
    if exact:
        assert outcome.elapsed == pytest.approx(0.15, abs=1e-9)


async def test_timeout_alone_gives_timeout_error() -> None:
    """Timeout(seconds) as an option or object: a slow attempt is a TimeoutError."""

    async def slow(x: int) -> int:
        await anyio.sleep(10)
        return x

    for timeout in (0.05, Timeout(0.05)):
        [outcome] = await apply_to_all(slow, [1], timeout=timeout)
        assert isinstance(outcome.error, TimeoutError)
        assert outcome.attempts == 1


async def test_cancellation_during_backoff_is_not_retried() -> None:
    """Cancelling the pool while an item waits to retry: no further call, the item
    is unfinished."""
    handler = flaky({0: -1})
    pool = Pool(handler, retry=Retry(5, wait_initial=5, wait_jitter=False))
    with anyio.CancelScope() as scope:
        async with pool:
            await pool.submit(0)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    assert handler.calls == {0: 1}
    assert pool.unfinished == [0]
    assert pool.stats.retried == 0


async def test_retry_works_as_user_middleware_too() -> None:
    """A Retry in middleware=[...] retries and its calls are counted in attempts."""
    handler = flaky({0: 2})
    seen: list[Outcome[int, int]] = []
    await apply_to_all(handler, [0], middleware=[Retry(3, wait_initial=0)], on_outcome=seen.append)
    assert seen[0].ok
    assert seen[0].attempts == 3


def test_backoff_zero_initial_stays_zero_for_huge_retry_numbers() -> None:
    """wait_initial=0 retries at once even when the exponent overflows."""
    assert backoff(1100, wait_initial=0.0, wait_max=10.0, wait_exp_base=2.0, jitter=False) == 0.0


async def test_retry_after_too_large_for_a_float_means_no_retry() -> None:
    """A retry_after no wait can honour (10**400 s) ends retrying with the
    handler's own error, not an OverflowError."""
    calls = 0

    async def handler(x: int) -> int:
        nonlocal calls
        calls += 1
        raise TooManyRequests(retry_after=10**400)  # type: ignore[arg-type]

    [outcome] = await apply_to_all(handler, [1], retry=Retry(3))
    assert isinstance(outcome.error, TooManyRequests)
    assert calls == 1


async def test_retry_after_as_a_fraction_is_honoured(exact: bool) -> None:
    """Any real number works as retry_after."""
    times: list[float] = []

    async def handler(x: int) -> int:
        times.append(anyio.current_time())
        if len(times) == 1:
            raise TooManyRequests(retry_after=Fraction(1, 4))  # type: ignore[arg-type]
        return x

    [outcome] = await apply_to_all(handler, [1], retry=Retry(2, wait_initial=0))
    assert outcome.ok
    if exact:
        assert times[1] - times[0] == pytest.approx(0.25, abs=1e-9)
    else:
        assert times[1] - times[0] >= 0.25 - CLOCK_GRAIN


async def test_retried_counts_extra_calls_of_items_that_end_unfinished() -> None:
    """stats.retried counts every extra call made, also for an item cancelled
    before it got an outcome."""
    third_call = anyio.Event()
    calls = 0

    async def handler(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            third_call.set()
        raise ConnectionError

    pool = Pool(handler, retry=Retry(5, wait_initial=0.01, wait_jitter=False))
    with anyio.CancelScope() as scope:
        async with pool:
            await pool.submit(0)
            await third_call.wait()
            scope.cancel()
    assert pool.unfinished == [0]
    assert calls == 3
    assert pool.stats.retried == 2


async def test_capacity_is_not_held_during_a_retry_backoff(exact: bool) -> None:
    """With limiter=CapacityLimiter(1), another item runs while the first waits
    to retry; the retry comes when its backoff says."""
    order: list[str] = []
    first_failed = anyio.Event()
    started = 0.0

    async def handler(x: str) -> str:
        order.append(x)
        if x == "flaky" and not first_failed.is_set():
            first_failed.set()
            raise ConnectionError
        return x

    async with Pool(
        handler,
        workers=2,
        limiter=anyio.CapacityLimiter(1),
        retry=Retry(2, wait_initial=0.2, wait_jitter=False),
    ) as pool:
        await pool.submit("flaky")
        await first_failed.wait()
        await pool.submit("steady")
        started = anyio.current_time()
    assert order == ["flaky", "steady", "flaky"]
    if exact:
        assert anyio.current_time() - started == pytest.approx(0.2, abs=1e-9)


# ------------------------------------------------- retry_after as a header


# 2026-10-21 07:28:00 UTC, the moment the table's dates are read at
TABLE_NOW = 1_792_567_680.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (2, 2.0),
        (0.25, 0.25),
        (Fraction(1, 4), 0.25),
        (Decimal("1.5"), 1.5),
        (10**400, math.inf),
        (math.inf, math.inf),
        ("120", 120.0),
        (" 1.5\t", 1.5),
        ("0", 0.0),
        ("9" * 400, math.inf),
        (b"120", 120.0),
        (b" 0.3\r\n", 0.3),
        (bytearray(b"7"), 7.0),
        (timedelta(minutes=2), 120.0),
        (timedelta(0), 0.0),
        # IMF-fixdate, obsolete RFC 850 and asctime: all 30 s after TABLE_NOW
        ("Wed, 21 Oct 2026 07:28:30 GMT", 30.0),
        ("Wednesday, 21-Oct-26 07:28:30 GMT", 30.0),
        ("Wed Oct 21 07:28:30 2026", 30.0),  # no zone: UTC
        (b"Wed, 21 Oct 2026 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2026 09:28:30 +0200", 30.0),
        ("Wed, 21 Oct 2026 07:28:00 GMT", 0.0),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),  # passed: no wait
    ],
)
def test_parse_retry_after_reads_every_form(value: object, seconds: float) -> None:
    """Numbers, header text (str or bytes) in seconds or as an HTTP-date in any
    of RFC 9110's formats, and timedeltas give the wait in seconds; a date is
    read against the wall clock passed in, and one that has passed is 0."""
    assert _parse_retry_after(value, now=lambda: TABLE_NOW) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (-1, ValueError),
        (math.nan, ValueError),
        (timedelta(seconds=-1), ValueError),
        ("-1", ValueError),
        ("soon", ValueError),
        ("", ValueError),
        ("inf", ValueError),
        ("1e3", ValueError),
        ("120 s", ValueError),
        ("Wed, 32 Oct 2026 07:28:00 GMT", ValueError),
        (b"\xff", ValueError),
        (True, TypeError),
        (complex(1, 1), TypeError),
        ([120], TypeError),
        (object(), TypeError),
    ],
)
def test_parse_retry_after_refuses_what_it_cannot_read(
    value: object, error: type[Exception]
) -> None:
    """Negative, NaN, junk text and other types are refused, not guessed at."""
    with pytest.raises(error):
        _parse_retry_after(value, now=lambda: TABLE_NOW)


class Throttled(Exception):
    """A 429 whose Retry-After header value was copied as it came."""

    def __init__(self, retry_after: object) -> None:
        super().__init__(f"429, Retry-After: {retry_after!r}")
        self.retry_after = retry_after


async def first_gap(retry_after: object, retry: Retry) -> tuple[Outcome[int, int], float]:
    """Run one item that fails once with ``retry_after``: its outcome and the
    time between its two calls."""
    times: list[float] = []

    async def handler(x: int) -> int:
        times.append(anyio.current_time())
        if len(times) == 1:
            raise Throttled(retry_after)
        return x

    [outcome] = await apply_to_all(handler, [1], retry=retry)
    assert outcome.ok
    assert outcome.attempts == 2
    return outcome, times[1] - times[0]


@pytest.mark.parametrize(
    "retry_after",
    ["0.3", " 0.3 ", b"0.3", b" 0.3\r\n", timedelta(milliseconds=300)],
    ids=["str", "str-spaces", "bytes", "bytes-crlf", "timedelta"],
)
async def test_retry_after_header_text_and_timedelta_are_waited(
    retry_after: object, exact: bool
) -> None:
    """A Retry-After header's seconds as str or bytes, or a timedelta, make the
    retry wait that long, past wait_max."""
    _, gap = await first_gap(retry_after, Retry(2, wait_initial=0.001, wait_max=0.01))
    if exact:
        assert gap == pytest.approx(0.3, abs=1e-9)
    else:
        assert 0.3 - CLOCK_GRAIN <= gap < 0.4


async def test_retry_after_http_date_waits_until_that_time(exact: bool) -> None:
    """An HTTP-date ahead by the wall clock makes the retry wait until then; one
    that has passed asks for no wait, and the backoff alone decides."""
    # a whole second, so the header's 1-second resolution loses nothing
    target = math.ceil(time.time() + 0.2)
    header = format_datetime(datetime.fromtimestamp(target, UTC), usegmt=True)
    assert header.endswith(" GMT")
    raised_at: list[float] = []
    times: list[float] = []

    async def handler(x: int) -> int:
        times.append(anyio.current_time())
        if len(times) == 1:
            raised_at.append(time.time())
            raise Throttled(header)
        return x

    [outcome] = await apply_to_all(handler, [1], retry=Retry(2, wait_initial=0, wait_max=0))
    assert outcome.ok
    assert outcome.attempts == 2
    wanted = target - raised_at[0]  # the wait, read a moment after the raise
    gap = times[1] - times[0]
    assert gap >= 0.15  # the header, not the backoff (0)
    assert wanted - 0.05 <= gap <= wanted + (1e-9 if exact else 0.05)

    retry = Retry(2, wait_initial=0.02, wait_jitter=False)
    _, gap = await first_gap("Sun, 06 Nov 1994 08:49:37 GMT", retry)
    if exact:
        assert gap == pytest.approx(0.02, abs=1e-9)
    else:
        assert 0.02 - CLOCK_GRAIN <= gap < 0.1


@pytest.mark.parametrize("retry_after", ["soon", "-5", -5, math.nan, True])
async def test_unreadable_retry_after_is_ignored_and_logged_at_debug(
    retry_after: object, exact: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A retry_after that cannot be read leaves the backoff alone, and a DEBUG
    record on corral.retry names the value and says it is ignored."""
    caplog.set_level(logging.DEBUG, logger="corral.retry")
    _, gap = await first_gap(retry_after, Retry(2, wait_initial=0.02, wait_jitter=False))
    if exact:
        assert gap == pytest.approx(0.02, abs=1e-9)
    else:
        assert 0.02 - CLOCK_GRAIN <= gap < 0.1
    [record] = [r for r in caplog.records if r.name == "corral.retry"]
    assert record.levelno == logging.DEBUG
    message = record.getMessage()
    assert f"retry_after={retry_after!r}" in message
    assert "ignoring" in message
    assert "Throttled" in message


# ------------------------------------------- which limit a TimeoutError names


async def test_per_attempt_timeout_says_which_limit_fired() -> None:
    """timeout=0.05 (a number or a Timeout) names itself in the TimeoutError, on
    a helper and a pool; a TimeoutError the handler raises is its own, untouched."""
    own = TimeoutError("the upstream's own timeout")

    async def handler(x: int) -> int:
        if x == 1:
            raise own
        await anyio.sleep(10)
        return x

    for timeout in (0.05, Timeout(0.05)):
        slow, mine = await apply_to_all(handler, [0, 1], timeout=timeout)
        assert isinstance(slow.error, TimeoutError)
        assert str(slow.error) == "attempt timed out after timeout=0.05 s"
        assert mine.error is own
        assert str(mine.error) == "the upstream's own timeout"

    async with Pool(handler, timeout=0.05) as pool:
        slow_job = await pool.submit(0)
        mine_job = await pool.submit(1)
    assert slow_job.outcome is not None
    assert mine_job.outcome is not None
    with pytest.raises(TimeoutError, match=r"^attempt timed out after timeout=0\.05 s$"):
        slow_job.outcome.unwrap()
    assert mine_job.outcome.error is own


async def test_timeout_as_middleware_says_so() -> None:
    """Timeout(0.05) in middleware=[...] names itself as Timeout(0.05); a bare
    TimeoutError() from the handler stays bare."""
    own = TimeoutError()

    async def handler(x: int) -> int:
        if x == 1:
            raise own
        await anyio.sleep(10)
        return x

    slow, mine = await apply_to_all(handler, [0, 1], middleware=[Timeout(0.05)])
    assert isinstance(slow.error, TimeoutError)
    assert str(slow.error) == "timed out after Timeout(0.05)"
    assert mine.error is own
    assert str(mine.error) == ""


async def test_retry_deadline_says_which_limit_fired(exact: bool) -> None:
    """An attempt cut off by Retry(deadline=0.2) is a TimeoutError naming the
    deadline; one the handler raises itself is left alone."""
    own = TimeoutError("handler's own")

    async def handler(x: int) -> int:
        if x == 1:
            raise own
        await anyio.sleep(10)
        return x

    retry = Retry(3, deadline=0.2, on=ConnectionError)
    slow, mine = await apply_to_all(handler, [0, 1], retry=retry)
    assert isinstance(slow.error, TimeoutError)
    assert str(slow.error) == (
        "Retry deadline=0.2 s passed (this item's total time, waits included)"
    )
    assert slow.attempts == 1
    if exact:
        assert slow.elapsed == pytest.approx(0.2, abs=1e-9)
    assert mine.error is own
    assert mine.attempts == 1


async def test_per_attempt_timeout_message_survives_the_retry_deadline() -> None:
    """When the last attempt's own timeout is the error, Retry passes it on with
    its message; the deadline's message is only for a cut-off by the deadline."""
    calls = 0

    async def handler(x: int) -> int:
        nonlocal calls
        calls += 1
        await anyio.sleep(10)
        return x

    retry = Retry(2, wait_initial=0, deadline=5.0)
    [outcome] = await apply_to_all(handler, [1], retry=retry, timeout=0.05)
    assert calls == 2
    assert outcome.attempts == 2
    with pytest.raises(TimeoutError, match=r"^attempt timed out after timeout=0\.05 s$"):
        outcome.unwrap()
