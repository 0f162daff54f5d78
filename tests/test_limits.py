"""SlidingWindow and TokenBucket: exact bounds, FIFO, one timer, cancel-safety."""

from __future__ import annotations

import bisect
import itertools
from typing import Any

import anyio
import pytest

import corral
import corral._limits
from corral import Pool, SlidingWindow, TokenBucket, apply_to_all

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend(timing_anyio_backend: Any) -> Any:
    return timing_anyio_backend


def slack(exact: bool) -> float:
    """How much later than the admission a timestamp the caller reads right after
    acquire() returns may be. On trio's MockClock none. In real time the clock
    moves between the limiter's reading and the caller's: microseconds on
    asyncio, but a whole tick on uvloop, whose clock moves in milliseconds."""
    return 0.0 if exact else 0.0015


def max_in_any_window(times: list[float], per: float, shrink: float) -> int:
    """The most admissions in any half-open window [t, t + per - shrink)."""
    times = sorted(times)
    return max(bisect.bisect_left(times, t + per - shrink) - i for i, t in enumerate(times))


def admissions_of(limiter: Any) -> list[float]:
    """From now on, the instants ``limiter`` admits at (one per unit), read where
    it decides. Its bound is about these: a timestamp that a caller reads after
    acquire() returns can be later by however long the process was not
    scheduled (more than a millisecond at times, on a loaded machine), which
    crowds a window the limiter did not."""
    times: list[float] = []
    admit = limiter._admit

    def recording(cost: int, now: float) -> None:
        admit(cost, now)
        times.extend([now] * cost)

    limiter._admit = recording
    return times


async def admit_concurrently(limiter: Any, tasks: int, each: int, costs: int = 1) -> list[float]:
    times: list[float] = []

    async def worker() -> None:
        for _ in range(each):
            await limiter.acquire(costs)
            times.extend([anyio.current_time()] * costs)

    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)
    return times


async def test_sliding_window_never_exceeds_limit_in_any_window(exact: bool) -> None:
    """1,000 admissions from 50 concurrent tasks: every window of `per` seconds
    holds at most `limit` of them, and the limiter runs at 99% of its rate or
    more, paced: (per + 1% of per) / limit apart."""
    limiter = SlidingWindow(50, per=0.05)
    admitted = admissions_of(limiter)
    start = anyio.current_time()
    times = await admit_concurrently(limiter, tasks=50, each=20)
    assert len(times) == len(admitted) == 1000
    assert max_in_any_window(admitted, 0.05, 0.0) <= 50
    duration = anyio.current_time() - start
    spacing = 0.051 / 50  # (per + 2 * slack) / limit
    if exact:  # on time: every one (per + slack) / limit after the one before
        assert duration == pytest.approx(999 * spacing, abs=1e-6)
        gaps = [b - a for a, b in itertools.pairwise(sorted(admitted))]
        assert min(gaps) == pytest.approx(spacing, abs=1e-6)
    else:  # uvloop's timers fire on whole milliseconds: late by more than the slack
        assert 999 * spacing - 0.002 <= duration < 3 * 999 * spacing


async def test_sliding_window_with_burst_is_the_unpaced_window(exact: bool) -> None:
    """SlidingWindow(50, 0.05, burst=50): the whole window at once, 20 full
    windows for 1,000 admissions, never more than 50 in any window."""
    limiter = SlidingWindow(50, per=0.05, burst=50)
    admitted = admissions_of(limiter)
    start = anyio.current_time()
    await admit_concurrently(limiter, tasks=50, each=20)
    assert max_in_any_window(admitted, 0.05, 0.0) <= 50
    duration = anyio.current_time() - start
    if exact:
        assert duration == pytest.approx(19 * 0.05, abs=1e-9)  # 20 full windows
    else:
        assert 19 * 0.05 - 0.002 <= duration < 19 * 0.05 + 1.0


async def test_sliding_window_first_period(exact: bool) -> None:
    """SlidingWindow(3, 0.1): paced, one every (0.1 + 2 * 0.001) / 3 s, so
    that any four span 2 ms more than the window."""
    limiter = SlidingWindow(3, per=0.1)
    start = anyio.current_time()
    times = [t - start for t in await admit_concurrently(limiter, tasks=1, each=7)]
    expected = [k * 0.102 / 3 for k in range(7)]
    if exact:
        assert times == pytest.approx(expected, abs=1e-6)
    else:
        assert all(e - slack(exact) <= t < e + 0.05 for t, e in zip(times, expected, strict=True))


async def test_sliding_window_burst_first_period(exact: bool) -> None:
    """SlidingWindow(3, 0.1, burst=3): 3 at once, then one each time the oldest
    admission leaves the window."""
    limiter = SlidingWindow(3, per=0.1, burst=3)
    start = anyio.current_time()
    times = [t - start for t in await admit_concurrently(limiter, tasks=1, each=7)]
    if exact:
        assert times == pytest.approx([0, 0, 0, 0.1, 0.1, 0.1, 0.2], abs=1e-9)
    else:
        assert times[2] < 0.01
        assert all(0.1 - slack(exact) <= t < 0.15 for t in times[3:6])


async def test_sliding_window_cost_counts_as_several_admissions(exact: bool) -> None:
    """acquire(cost=k) is k admissions at once: the window bound holds for units."""
    limiter = SlidingWindow(5, per=0.02)
    admitted = admissions_of(limiter)
    await admit_concurrently(limiter, tasks=4, each=10, costs=2)
    assert len(admitted) == 80
    assert max_in_any_window(admitted, 0.02, 0.0) <= 5


@pytest.mark.parametrize(
    ("rate", "per", "burst"), [(200, 1.0, 1), (100, 0.5, 7), (500, 1.0, 3), (500, 1.0, None)]
)
async def test_token_bucket_bound_over_every_pair(
    exact: bool, rate: float, per: float, burst: int | None
) -> None:
    """For every pair of admissions i < j: j - i + 1 <= burst + rate * t / per
    (without burst=, with the burst the bucket reports)."""
    limiter = TokenBucket(rate, per, burst=burst)
    admitted = admissions_of(limiter)
    await admit_concurrently(limiter, tasks=10, each=10)
    times = sorted(admitted)
    assert len(times) == 100
    eps = 1e-6  # uvloop's times are whole milliseconds, their differences a hair off
    for i in range(len(times)):
        for j in range(i + 1, len(times)):
            assert j - i + 1 <= limiter.burst + rate * (times[j] - times[i]) / per + eps


@pytest.mark.parametrize(("rate", "per"), [(50, 0.1), (7, 0.3), (1000, 1.0)])
async def test_token_bucket_is_a_quota_without_burst(exact: bool, rate: float, per: float) -> None:
    """TokenBucket(rate, per): never more than rate in any per seconds, and at
    least 99% of the rate over a busy run."""
    limiter = TokenBucket(rate, per)
    admitted = admissions_of(limiter)
    start = anyio.current_time()
    each = 30 if exact or rate / per > 100 else 3  # 23 a second in real time: a few
    await admit_concurrently(limiter, tasks=10, each=each)
    duration = anyio.current_time() - start
    assert max_in_any_window(admitted, per, 0.0) <= rate
    if exact:
        assert (len(admitted) - 1) / duration >= 0.99 * rate / per


async def test_token_bucket_starts_full_then_is_smooth(exact: bool) -> None:
    """TokenBucket(10, 1.0, burst=5): 5 at once, then one every 0.1 s."""
    limiter = TokenBucket(10, 1.0, burst=5)
    start = anyio.current_time()
    times = [t - start for t in await admit_concurrently(limiter, tasks=1, each=8)]
    if exact:
        assert times == pytest.approx([0, 0, 0, 0, 0, 0.1, 0.2, 0.3], abs=1e-9)
    else:
        assert times[4] < 0.05
        assert times[7] == pytest.approx(0.3, abs=0.05)


@pytest.mark.parametrize("kind", ["window", "bucket"])
async def test_waiters_are_served_in_arrival_order_whatever_their_cost(
    kind: str, exact: bool
) -> None:
    """20 waiters with costs 1..3 are admitted exactly in the order they arrived."""
    limiter: Any = (
        SlidingWindow(3, per=0.02) if kind == "window" else TokenBucket(150, 1.0, burst=3)
    )
    await limiter.acquire(3)  # drain: everyone below has to wait
    order: list[int] = []

    async def waiter(i: int) -> None:
        await limiter.acquire(1 + i % 3)
        order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(waiter, i)
            while limiter.waiting + len(order) < i + 1:  # until it stands in line
                await anyio.lowlevel.checkpoint()
        if exact:  # in real time the first ones may be through already
            assert limiter.waiting == 20
    assert order == list(range(20))


async def test_cancelled_waiter_consumes_nothing_and_gives_its_place_back(exact: bool) -> None:
    """A waiter cancelled while waiting leaves the line; the one behind it is
    admitted as early as if the cancelled one had never come."""
    limiter = SlidingWindow(1, per=1.0, burst=1)
    start = anyio.current_time()
    await limiter.acquire()
    admitted: list[float] = []

    async def second() -> None:
        await limiter.acquire()
        admitted.append(anyio.current_time() - start)

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as doomed:

            async def cancel_when_queued() -> None:
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(second)
                await anyio.wait_all_tasks_blocked()
                doomed.cancel()

            tg.start_soon(cancel_when_queued)
            await limiter.acquire()  # first in line, then cancelled
        assert doomed.cancelled_caught
    assert limiter.waiting == 0
    if exact:
        assert admitted == [pytest.approx(1.0, abs=1e-9)]
    else:
        assert 0.995 <= admitted[0] < 1.5


async def test_one_timer_for_all_waiters(exact: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the head of the line sleeps: 20 waiters behind a full window cost 20
    sleeps in total, not a wake-up per waiter per admission."""
    sleeps = 0
    real_sleep_until = anyio.sleep_until

    async def counting_sleep_until(deadline: float) -> None:
        nonlocal sleeps
        sleeps += 1
        await real_sleep_until(deadline)

    monkeypatch.setattr(corral._limits.anyio, "sleep_until", counting_sleep_until)
    limiter = SlidingWindow(1, per=0.01)
    await admit_concurrently(limiter, tasks=20, each=1)
    if exact:
        assert sleeps == 19
    else:
        assert sleeps <= 19 * 3  # a real clock may wake a tick early and sleep again


@pytest.mark.parametrize("limiter", [SlidingWindow(3, 1.0), TokenBucket(10, 1.0, burst=3)])
async def test_cost_larger_than_capacity_is_a_clear_error(limiter: Any) -> None:
    """A cost that could never be admitted is refused at once, naming `cost`."""
    with pytest.raises(ValueError, match="cost must be <= 3"):
        await limiter.acquire(4)
    with pytest.raises(ValueError, match="cost must be >= 1"):
        await limiter.acquire(0)
    with pytest.raises(TypeError, match="cost must be an int"):
        await limiter.acquire(1.5)


def test_constructors_validate() -> None:
    """Bad limits and rates name the parameter."""
    with pytest.raises(ValueError, match="limit must be >= 1"):
        SlidingWindow(0)
    with pytest.raises(ValueError, match="per must be > 0"):
        SlidingWindow(5, per=0)
    with pytest.raises(ValueError, match="rate must be > 0"):
        TokenBucket(0)
    with pytest.raises(ValueError, match="burst must be >= 1"):
        TokenBucket(5, burst=0)


async def test_two_pools_share_one_rate_limit(exact: bool) -> None:
    """One SlidingWindow shared by two pools bounds their admissions together."""
    limiter = SlidingWindow(10, per=0.05)
    admitted = admissions_of(limiter)
    times: list[float] = []

    async def record(x: int) -> int:
        times.append(anyio.current_time())
        return x

    async with anyio.create_task_group() as tg:
        for _ in range(2):
            tg.start_soon(lambda: apply_to_all(record, range(100), workers=10, rate_limit=limiter))
    assert len(times) == len(admitted) == 200
    assert max_in_any_window(admitted, 0.05, 0.0) <= 10


async def test_rate_limiter_sees_every_attempt(exact: bool) -> None:
    """With retries, each attempt acquires the rate limiter once."""
    acquired = 0

    class Counting:
        async def acquire(self, cost: int = 1) -> None:
            nonlocal acquired
            acquired += cost
            await anyio.lowlevel.checkpoint()

    calls = 0

    async def fails_twice(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ConnectionError
        return x

    from corral import Retry

    async with Pool(fails_twice, rate_limit=Counting(), retry=Retry(3, wait_initial=0)) as pool:
        job = await pool.submit(1)
    assert job.outcome is not None
    assert job.outcome.attempts == 3
    assert acquired == 3


@pytest.mark.parametrize("kind", ["window", "bucket"])
async def test_acquire_nowait_admits_or_raises_would_block(kind: str) -> None:
    """The *_nowait twin: admits when no wait is needed, raises WouldBlock (having
    consumed nothing) otherwise, and never jumps the line."""
    limiter: Any = (
        SlidingWindow(2, per=10.0, burst=2) if kind == "window" else TokenBucket(0.2, burst=2)
    )
    limiter.acquire_nowait()
    limiter.acquire_nowait()
    with pytest.raises(anyio.WouldBlock):
        limiter.acquire_nowait()
    fresh: Any = (
        SlidingWindow(2, per=10.0, burst=2) if kind == "window" else TokenBucket(0.2, burst=2)
    )
    fresh.acquire_nowait(2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(fresh.acquire)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(anyio.WouldBlock):
            fresh.acquire_nowait()  # someone is waiting: no barging
        tg.cancel_scope.cancel()
    with pytest.raises(ValueError, match="cost must be <= 2"):
        limiter.acquire_nowait(3)


@pytest.mark.parametrize("kind", ["window", "bucket"])
async def test_admission_follows_call_order_even_within_one_scheduler_step(kind: str) -> None:
    """Tasks that call acquire() in the same scheduling step (trio shuffles those)
    are admitted in the order they called, not the order they were resumed."""
    limiter: Any = SlidingWindow(1, per=0.005) if kind == "window" else TokenBucket(200, 1.0)
    limiter.acquire_nowait()
    called: list[int] = []
    admitted: list[int] = []

    async def caller(i: int) -> None:
        called.append(i)
        await limiter.acquire()
        admitted.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(caller, i)
    assert admitted == called


async def test_token_bucket_exact_over_a_long_busy_run(exact: bool) -> None:
    """2,000 back-to-back admissions of TokenBucket(7, 0.3, burst=3), checked with
    exact rational arithmetic: no admission early, however long the run (a
    schedule kept as a running float sum drifts ahead)."""
    if not exact:
        pytest.skip("needs the virtual clock: 2,000 admissions at 23/s")
    from fractions import Fraction

    limiter = TokenBucket(7, 0.3, burst=3)
    times = [Fraction(t) for t in await admit_concurrently(limiter, tasks=1, each=2000)]
    rate, per = Fraction(7), Fraction(0.3)
    for i in range(len(times)):
        for j in (*range(i + 1, min(i + 25, len(times))), len(times) - 1):
            if j > i:
                assert j - i + 1 <= 3 + rate * (times[j] - times[i]) / per


async def test_sliding_window_exact_spacing_on_float_boundaries(exact: bool) -> None:
    """SlidingWindow(1, 0.1): successive admissions are at least 0.1 s apart in
    exact arithmetic, although 0.1 is not a binary fraction."""
    if not exact:
        pytest.skip("needs the virtual clock")
    from fractions import Fraction

    limiter = SlidingWindow(1, per=0.1)
    times = [Fraction(t) for t in await admit_concurrently(limiter, tasks=3, each=20)]
    times.sort()
    assert all(b - a >= Fraction(0.1) for a, b in itertools.pairwise(times))


@pytest.mark.untraced  # a burst of 64 must be taken within one token's time (1 ms)
async def test_fresh_token_bucket_admits_its_burst_at_once_at_any_time() -> None:
    """A new bucket is full whatever the clock reads: `burst` admissions at once."""
    await anyio.sleep(0.01)  # the clock reads something other than its start
    # rates slow enough that no token refills while the loop runs (a loaded
    # machine once took a millisecond over 64 calls, a token at 1000/s)
    for rate, burst in [(10, 5), (3, 7), (0.7, 2), (20, 64)]:
        limiter = TokenBucket(rate, 1.0, burst=burst)
        for _ in range(burst):
            limiter.acquire_nowait()
        with pytest.raises(anyio.WouldBlock):
            limiter.acquire_nowait()


def test_token_bucket_rejects_a_rate_too_small_to_compute() -> None:
    """A rate so small that the arithmetic overflows is refused up front."""
    with pytest.raises(ValueError, match="rate must be larger"):
        TokenBucket(1e-310)
    with pytest.raises(ValueError, match="rate must be finite"):
        TokenBucket(float("inf"))


# -- async with limiter: one acquisition per block ------------------------------


@pytest.mark.parametrize("make", [lambda: TokenBucket(10), lambda: SlidingWindow(1, 0.1)])
async def test_async_with_acquires_one_unit_per_block_in_order(make: Any, exact: bool) -> None:
    """``async with limiter:`` admits one unit per block, paced as ``acquire``
    is (10 per second here), and the blocks enter in the order they asked."""
    limiter = make()
    entered: list[tuple[int, float]] = []

    async def enter(n: int) -> None:
        async with limiter:
            entered.append((n, anyio.current_time()))

    start = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(enter, n)
            await anyio.wait_all_tasks_blocked()
    assert [n for n, _ in entered] == [0, 1, 2, 3]
    elapsed = entered[-1][1] - start
    assert 0.3 - slack(exact) <= elapsed < (0.31 if exact else 0.36)  # a quota adds slack


async def test_async_with_releases_nothing_and_a_retry_after_pauses_it(exact: bool) -> None:
    """Leaving the block returns no unit (a rate is spent), and an error leaving
    it with a Retry-After pauses the limiter for everyone."""

    class Throttled(Exception):
        retry_after = 0.5

    bucket = TokenBucket(1000)
    with pytest.raises(Throttled):
        async with bucket:
            raise Throttled
    start = anyio.current_time()
    async with bucket:
        waited = anyio.current_time() - start
    assert waited == pytest.approx(0.5, abs=1e-9 if exact else 0.05)


async def test_async_with_is_cancel_safe_while_waiting() -> None:
    """A block cancelled while waiting for its unit consumed nothing and left
    the line: the next caller is admitted as if it had never asked."""
    bucket = TokenBucket(1, 10.0)  # one unit per 10 s
    async with bucket:
        pass
    with anyio.move_on_after(1):
        async with bucket:
            pytest.fail("admitted before its time")
    assert bucket.waiting == 0
    with pytest.raises(anyio.WouldBlock):
        bucket.acquire_nowait()


async def test_async_with_adaptive_rate_learns_from_the_block() -> None:
    """An AdaptiveRate used as ``async with`` hears how each block ended: a
    throttling error lowers its rate."""

    class TooMany(Exception):
        status_code = 429

    rate = corral.AdaptiveRate(100, on=TooMany)
    for _ in range(5):
        async with rate:
            pass
    with pytest.raises(TooMany):
        async with rate:
            raise TooMany
    assert rate.statistics().throttles == 1
    assert rate.rate < 100


@pytest.mark.parametrize("limiter", [TokenBucket(5), SlidingWindow(5)])
def test_a_rate_limiter_given_as_limiter_is_refused_by_name(limiter: Any) -> None:
    """``limiter=`` takes a concurrency limiter; a rate limiter there (it is an
    async context manager too) is refused, pointing at ``rate_limit=``."""

    async def handler(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="rate_limit="):
        Pool(handler, limiter=limiter)


async def test_async_with_cancelled_on_entry_consumes_nothing() -> None:
    """A block entered in an already cancelled scope raises the cancellation
    and leaves its unit for the next caller."""
    bucket = TokenBucket(1, 100.0)  # one unit, then one per 100 s
    with anyio.CancelScope() as scope:
        scope.cancel()
        async with bucket:
            pytest.fail("entered a cancelled scope")
    bucket.acquire_nowait()  # the unit is still there


async def test_a_circuit_open_leaving_a_limiter_does_not_pause_it() -> None:
    """CircuitOpen carries the breaker's retry_after for a Retry; a rate
    limiter it passes through must not read it as the server's Retry-After
    and stop everyone else."""
    bucket = TokenBucket(1000)
    with pytest.raises(corral.CircuitOpen):
        async with bucket:
            raise corral.CircuitOpen("open", retry_after=30.0)
    with anyio.fail_after(1):
        await bucket.acquire()
