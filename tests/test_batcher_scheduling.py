"""Batcher: submit_nowait and its jobs, weighted batches, weighted rate limits.

Timing is checked on trio's MockClock (exact virtual time); those tests skip on
the real-time backends. The others run on asyncio, uvloop and trio.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import random
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint

from corral import (
    AdaptiveRate,
    Batcher,
    FlushError,
    Job,
    JobCancelled,
    PoolClosed,
    QueueFull,
    Retry,
    SlidingWindow,
    TokenBucket,
)
from corral._middleware import build_chain, check_middleware

pytestmark = pytest.mark.anyio

# a failed flush waits before the next one; keep that short in real time
QUICK = Retry(attempts=1, wait_initial=0.001, wait_max=0.002)


@pytest.fixture
def anyio_backend(timing_anyio_backend: Any) -> Any:
    return timing_anyio_backend


class SinkDown(Exception):
    pass


class Sink:
    """Records batches (with the time each flush started); can be gated, made
    to fail, and returns one result per item (the item doubled)."""

    def __init__(self, *, gated: bool = False, fail: int = 0) -> None:
        self.gate: anyio.Event | None = anyio.Event() if gated else None
        self.fail = fail
        self.calls: list[list[Any]] = []
        self.batches: list[list[Any]] = []
        self.times: list[float] = []

    def open(self) -> None:
        assert self.gate is not None
        self.gate.set()

    async def __call__(self, batch: list[Any]) -> list[Any]:
        self.calls.append(list(batch))
        self.times.append(anyio.current_time())
        if self.gate is not None:
            await self.gate.wait()
        else:
            await checkpoint()
        if self.fail:
            self.fail -= 1
            raise SinkDown(f"sink down for {batch}")
        self.batches.append(list(batch))
        return [2 * x for x in batch]


class Counting:
    """A third-party rate limiter that records the cost of every acquire."""

    def __init__(self) -> None:
        self.costs: list[int] = []

    async def acquire(self, cost: int = 1) -> None:
        self.costs.append(cost)
        await checkpoint()


class CountingNowait(Counting):
    """One with ``acquire_nowait`` too (that never has to wait)."""

    def acquire_nowait(self, cost: int = 1) -> None:
        self.costs.append(cost)


def admissions_of(limiter: Any) -> list[tuple[float, int]]:
    """From now on, (time, cost) of every admission ``limiter`` makes, read where
    it decides."""
    admitted: list[tuple[float, int]] = []
    admit = limiter._admit

    def recording(cost: int, now: float) -> None:
        admit(cost, now)
        admitted.append((now, cost))

    limiter._admit = recording
    return admitted


def most_in_any_window(admitted: list[tuple[float, int]], per: float) -> int:
    """The most units admitted in any half-open window [t, t + per)."""
    admitted = sorted(admitted)
    times = [t for t, _ in admitted]
    sums = list(itertools.accumulate((cost for _, cost in admitted), initial=0))
    return max(sums[bisect.bisect_left(times, t + per)] - sums[i] for i, t in enumerate(times))


def needs_virtual_time(exact: bool) -> None:
    if not exact:
        pytest.skip("needs the virtual clock (trio's MockClock)")


# ------------------------------------------------------------ submit_nowait


async def test_submit_nowait_job_gets_what_submit_would_return() -> None:
    """Each job's outcome holds its item's result from its batch; index and id
    count the batcher's items; submit and submit_nowait items share batches."""
    sink = Sink()
    async with Batcher(sink, max_size=3, max_wait=None) as batcher:
        jobs = [batcher.submit_nowait(x) for x in range(4)]
        assert isinstance(jobs[0], Job)
        assert await batcher.submit(10) == 20
        outcomes = [await job.wait() for job in jobs]
    assert [o.result for o in outcomes] == [0, 2, 4, 6]
    assert all(o.ok and o.attempts == 1 and o.elapsed >= 0 for o in outcomes)
    assert [(o.item, o.index, o.id) for o in outcomes] == [(x, x, x) for x in range(4)]
    assert batcher.stats.flushed == 5


async def test_submit_nowait_is_not_a_checkpoint() -> None:
    """It never waits: it works in a cancelled scope, and the caller is not
    interrupted."""
    async with Batcher(Sink(), max_size=10, max_wait=None) as batcher:
        with anyio.CancelScope() as scope:  # noqa: ASYNC100 - no checkpoint is the point
            scope.cancel()
            job = batcher.submit_nowait(1)
            job2 = batcher.submit_nowait(2)
        assert not scope.cancelled_caught
        assert (await job.wait()).result == 2
        assert (await job2.wait()).result == 4


async def test_submit_nowait_refuses_like_add_nowait() -> None:
    """QueueFull when max_pending items are queued (nothing added), PoolClosed
    before entry and after exit."""
    sink = Sink(gated=True)
    batcher: Batcher[int, int] = Batcher(sink, max_size=2, max_wait=None, max_pending=2)
    with pytest.raises(PoolClosed, match="not running yet"):
        batcher.submit_nowait(0)
    async with batcher:
        batcher.add_nowait(1)
        batcher.add_nowait(2)
        await anyio.wait_all_tasks_blocked()  # [1, 2] in flight, room given back
        batcher.submit_nowait(3)
        batcher.add_nowait(4)
        with pytest.raises(QueueFull, match="max_pending=2"):
            batcher.submit_nowait(5)
        with pytest.raises(QueueFull):
            batcher.add_nowait(5)  # the same rule
        assert batcher.stats.added == 4
        sink.open()
    with pytest.raises(PoolClosed, match="has exited"):
        batcher.submit_nowait(6)
    assert sink.batches == [[1, 2], [3, 4]]


async def test_a_failed_flush_gives_its_jobs_the_error_and_queues_added_items_again() -> None:
    sink = Sink(fail=1)
    async with Batcher(sink, max_size=3, max_wait=None, retry=QUICK) as batcher:
        batcher.add_nowait(1)
        job = batcher.submit_nowait(2)
        outcome = await job.wait()
        assert isinstance(outcome.error, SinkDown)
        assert outcome.result is None
    assert sink.batches == [[1]]  # the added item went again; the job's left
    stats = batcher.stats
    assert (stats.failed, stats.flushed, stats.flush_failures) == (1, 1, 1)


async def test_a_final_flush_that_fails_gives_its_jobs_the_error() -> None:
    """At exit, a failed flush ends flushing: the job of that batch gets the
    error (it left the batcher), the added item is unflushed."""
    sink = Sink(fail=1)
    with pytest.raises(FlushError):
        async with Batcher(sink, max_size=5, max_wait=60) as batcher:
            batcher.add_nowait(1)
            job = batcher.submit_nowait(2)
    assert isinstance(job.outcome and job.outcome.error, SinkDown)
    assert batcher.unflushed == [1]


@pytest.mark.parametrize("where", ["queued", "in flight"])
async def test_jobs_of_a_cancelled_batcher_end_unfinished(where: str) -> None:
    """Cancelled with its item queued or in flight: the job ends unfinished
    (wait raises PoolClosed) and the item is in unflushed, once."""
    sink = Sink(gated=True)
    with anyio.CancelScope() as outer:
        async with Batcher(sink, max_size=5, max_wait=60) as batcher:
            job = batcher.submit_nowait(7)
            if where == "in flight":
                await batcher.add_many([8, 9, 10, 11])
                await anyio.wait_all_tasks_blocked()
                assert batcher.stats.flushing == 5
            outer.cancel()
    assert batcher.unflushed == ([7] if where == "queued" else [7, 8, 9, 10, 11])
    assert not job.done
    with pytest.raises(PoolClosed, match="ended unfinished"):
        await job.wait()
    assert job.cancel() is False


async def test_cancel_takes_a_queued_job_out() -> None:
    """A queued job's cancel: True, its outcome is a JobCancelled error at once,
    the item is never flushed and its room is free again."""
    sink = Sink()
    async with Batcher(sink, max_size=10, max_wait=60, max_pending=10) as batcher:
        jobs = [batcher.submit_nowait(x) for x in range(10)]
        with pytest.raises(QueueFull):
            batcher.add_nowait(99)
        assert jobs[4].cancel() is True
        outcome = jobs[4].outcome
        assert outcome is not None
        assert isinstance(outcome.error, JobCancelled)
        assert jobs[4].cancel() is False  # it has its outcome
        batcher.add_nowait(10)  # its room is free
        stats = batcher.stats
        assert (stats.queued, stats.cancelled, stats.failed) == (10, 1, 1)
    assert sink.batches == [[0, 1, 2, 3, 5, 6, 7, 8, 9, 10]]
    assert all(job.outcome and job.outcome.ok for job in jobs if job is not jobs[4])
    assert jobs[0].cancel() is False


async def test_cancel_does_not_split_a_batch_in_flight() -> None:
    """A job whose batch is being flushed cannot be cancelled: False, and it
    gets its batch's result."""
    sink = Sink(gated=True)
    async with Batcher(sink, max_size=2, max_wait=None) as batcher:
        job = batcher.submit_nowait(1)
        await anyio.wait_all_tasks_blocked()
        assert batcher.stats.flushing == 1
        assert job.cancel() is False
        sink.open()
    assert (await job.wait()).result == 2
    assert batcher.stats.cancelled == 0


async def test_cancelling_the_last_pending_item_settles_flush() -> None:
    """flush() waits for the items added before it; if the only one left is
    cancelled, it returns at once (not after the failure backoff)."""
    sink = Sink(fail=1)
    slow = Retry(attempts=1, wait_initial=10, wait_max=10, wait_jitter=False)
    async with Batcher(sink, max_size=5, max_wait=None, retry=slow) as batcher:
        failed = batcher.submit_nowait(1)
        await failed.wait()  # the flush failed: no flush for 10 s
        job = batcher.submit_nowait(2)
        returned: list[float] = []

        async def flush() -> None:
            await batcher.flush()
            returned.append(anyio.current_time())

        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(flush)
            await anyio.wait_all_tasks_blocked()
            assert not returned
            assert job.cancel() is True
        assert returned[0] - start < 1
    assert sink.batches == []
    assert batcher.unflushed == []


# ----------------------------------------------------------- weighted batches


async def test_no_batch_weighs_more_than_max_weight_and_max_size_still_holds() -> None:
    rng = random.Random(3)
    items = [(i, rng.choice([0, 0.5, 1, 3, 7, 10])) for i in range(300)]
    sink = Sink()
    async with Batcher(
        sink.__call__,
        max_size=5,
        max_wait=None,
        weight=lambda item: item[1],
        max_weight=10,
        max_pending=20,
    ) as batcher:
        for item in items:
            await batcher.add(item)
    flat = [item for batch in sink.batches for item in batch]
    assert flat == items  # in order, each once
    assert all(len(batch) <= 5 for batch in sink.batches)
    assert all(sum(w for _, w in batch) <= 10 for batch in sink.batches)


async def test_batches_cut_as_full_as_the_weights_allow() -> None:
    """Everything queued at once: each batch takes items in order while they fit."""
    sink = Sink()
    weights = [4, 4, 4, 1, 10, 0, 0, 3, 3, 3, 2]
    async with Batcher(
        sink.__call__, max_size=3, max_wait=60, weight=lambda w: w, max_weight=10
    ) as batcher:
        await batcher.add_many(weights)
    assert sink.batches == [[4, 4], [4, 1], [10, 0, 0], [3, 3, 3], [2]]


async def test_a_batch_full_by_weight_is_due_at_once(exact: bool) -> None:
    """With max_wait=60: a batch that reaches max_weight, or whose next item
    would not fit, is flushed at once; a lighter one waits for max_wait."""
    needs_virtual_time(exact)
    sink = Sink()
    async with Batcher(
        sink.__call__, max_size=100, max_wait=60, weight=lambda w: w, max_weight=10
    ) as batcher:
        batcher.add_nowait(4)
        batcher.add_nowait(4)
        await anyio.sleep(1)
        assert sink.batches == []  # 8 of 10: not full
        batcher.add_nowait(4)  # would not fit: [4, 4] is full
        await anyio.sleep(1)
        batcher.add_nowait(6)  # [4, 6] reaches 10
        await anyio.sleep(1)
        batcher.add_nowait(1)
        await anyio.sleep(100)
    assert sink.batches == [[4, 4], [4, 6], [1]]
    assert sink.times == [1, 2, 63]


async def test_an_item_heavier_than_max_weight_is_refused_by_every_add() -> None:
    sink = Sink()
    async with Batcher(
        sink.__call__, max_size=10, max_wait=None, weight=len, max_weight=3
    ) as batcher:
        heavy = "abcd"
        with pytest.raises(ValueError, match="max_weight=3"):
            await batcher.add(heavy)
        with pytest.raises(ValueError, match="max_weight"):
            batcher.add_nowait(heavy)
        with pytest.raises(ValueError, match="max_weight"):
            await batcher.submit(heavy)
        with pytest.raises(ValueError, match="max_weight"):
            batcher.submit_nowait(heavy)
        with pytest.raises(ValueError, match="max_weight"):
            await batcher.add_many(["a", "bb", heavy, "c"])
        assert batcher.stats.added == 0
        await batcher.add_many(["a", "bb", "c"])
    assert sink.batches == [["a", "bb"], ["c"]]


@pytest.mark.parametrize(
    ("weight", "error", "match"),
    [
        (-1, ValueError, "weight must return a number >= 0, got -1"),
        (math.nan, ValueError, "weight must return a number >= 0"),
        ("3", TypeError, "weight must return a number, got '3'"),
        (True, TypeError, "weight must return a number"),
        (None, TypeError, "weight must return a number"),
    ],
)
async def test_a_bad_weight_is_refused_at_the_add(
    weight: object, error: type[Exception], match: str
) -> None:
    async with Batcher(
        Sink(), max_size=10, max_wait=None, weight=lambda _: weight, max_weight=5
    ) as batcher:
        with pytest.raises(error, match=match):
            batcher.add_nowait(1)
        with pytest.raises(error, match=match):
            await batcher.add(1)
        with pytest.raises(error, match=match):
            batcher.submit_nowait(1)
        assert batcher.stats.added == 0


async def test_what_weight_raises_propagates_from_the_add() -> None:
    class Unweighable(Exception):
        pass

    def weight(item: int) -> float:
        if item == 3:
            raise Unweighable
        return 1

    sink = Sink()
    async with Batcher(
        sink.__call__, max_size=10, max_wait=None, weight=weight, max_weight=5
    ) as batcher:
        with pytest.raises(Unweighable):
            await batcher.add_many([1, 2, 3])
        with pytest.raises(Unweighable):
            batcher.add_nowait(3)
        assert batcher.stats.added == 0
        await batcher.add(1)
    assert sink.batches == [[1]]


async def test_weights_survive_a_failed_flush_and_a_cancelled_job(exact: bool) -> None:
    """Items queued again after a failed flush keep their weight; a cancelled
    job's weight leaves the queue's (what is left is not full any more)."""
    needs_virtual_time(exact)
    sink = Sink(fail=1)
    async with Batcher(
        sink.__call__,
        max_size=10,
        max_wait=60,
        weight=lambda w: w,
        max_weight=10,
        retry=QUICK,
    ) as batcher:
        batcher.add_nowait(6)
        job = batcher.submit_nowait(3)
        heavy = batcher.submit_nowait(5)  # 14 > 10: [6, 3] is due
        await job.wait()  # it failed; [6] is queued again, before [5]
        assert isinstance(job.outcome and job.outcome.error, SinkDown)
        assert heavy.cancel() is True
        await anyio.sleep(1)
        assert sink.batches == []  # [6] weighs 6: it waits for max_wait
        batcher.add_nowait(4)  # [6, 4] reaches 10
        await anyio.sleep(1)
        batcher.add_nowait(9)
    assert sink.calls == [[6, 3], [6, 4], [9]]
    assert sink.times == [0, 1, 2]


async def test_weighted_dedupe_drops_duplicates() -> None:
    sink = Sink()
    async with Batcher(
        sink.__call__,
        max_size=10,
        max_wait=60,
        dedupe_key=lambda item: item[0],
        weight=lambda item: item[1],
        max_weight=5,
    ) as batcher:
        await batcher.add_many([("a", 1), ("b", 1), ("a", 1), ("c", 3)])
    assert sink.batches == [[("a", 1), ("b", 1)], [("c", 3)]]
    assert batcher.stats.deduped == 1


def test_weight_options_are_checked_at_construction() -> None:
    def w(item: Any) -> float:
        return 1

    async def async_weight(item: Any) -> float:
        return 1

    with pytest.raises(ValueError, match="max_weight needs weight"):
        Batcher(Sink(), max_weight=10)
    with pytest.raises(ValueError, match="weight needs max_weight"):
        Batcher(Sink(), weight=w)
    with pytest.raises(TypeError, match="weight must be a callable, got 3"):
        Batcher(Sink(), weight=3, max_weight=10)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="weight must be a plain function"):
        Batcher(Sink(), weight=async_weight, max_weight=10)  # type: ignore[call-overload]
    for bad, error in [
        (0, ValueError),
        (-1, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (True, TypeError),
        ("3", TypeError),
    ]:
        with pytest.raises(error, match="max_weight"):
            Batcher(Sink(), weight=w, max_weight=bad)  # type: ignore[call-overload]
    Batcher(Sink(), weight=w, max_weight=0.5)


# ------------------------------------------------------- weighted rate limits


async def test_quota_token_bucket_admits_a_cost_up_to_its_rate(exact: bool) -> None:
    """TokenBucket(100): a cost of 50 at once and the next 0.505 s later (one
    spacing of 10.1 ms per unit); over 10 s at most 100 units in any second,
    at 99% of the rate; a cost of 100 is admitted, 101 never could be."""
    needs_virtual_time(exact)
    limiter = TokenBucket(100)
    admitted = admissions_of(limiter)
    start = anyio.current_time()
    await limiter.acquire(50)
    await limiter.acquire(50)
    assert [t - start for t, _ in admitted] == pytest.approx([0, 0.505], abs=1e-9)
    while anyio.current_time() - start < 10:
        await limiter.acquire(50)
    times = [t - start for t, _ in admitted]
    assert most_in_any_window(admitted, 1.0) <= 100
    units = sum(cost for _, cost in admitted)
    assert units <= 100 * times[-1] + 50  # the rate plus one admission's cost
    assert units - 50 >= 0.99 * 100 * times[-1]
    await limiter.acquire(100)
    with pytest.raises(ValueError, match="cost must be <= 100"):
        await limiter.acquire(101)


async def test_quota_token_bucket_mixed_costs_keep_the_long_run_rate(exact: bool) -> None:
    """Costs from 1 to 100 in random order: the long-run rate holds, any second
    holds at most the rate plus one admission's cost."""
    needs_virtual_time(exact)
    rng = random.Random(7)
    limiter = TokenBucket(100)
    admitted = admissions_of(limiter)
    start = anyio.current_time()
    for _ in range(200):
        await limiter.acquire(rng.randint(1, 100))
    elapsed = admitted[-1][0] - start
    units = sum(cost for _, cost in admitted)
    assert units - admitted[-1][1] <= 100 * elapsed / 1.01 + 1e-6
    assert units - admitted[-1][1] >= 0.99 * 100 * elapsed / 1.01
    assert most_in_any_window(admitted, 1.0) <= 200


def test_a_quota_takes_costs_up_to_its_rate_a_burst_up_to_its_burst() -> None:
    """A cost that could never be admitted is refused at once, naming the most."""
    assert TokenBucket(500)._capacity == 500
    assert TokenBucket(7.5, per=0.3)._capacity == 7
    assert TokenBucket(0.5)._capacity == 1
    assert TokenBucket(500, burst=4)._capacity == 4
    assert SlidingWindow(300)._capacity == 300
    limiter = AdaptiveRate(100)
    assert limiter._capacity == 100
    limiter._set_rate(20)  # throttled: a batch of 100 is still admitted, slowly
    assert limiter._capacity == 100


async def test_batcher_rate_limit_counts_rows(exact: bool) -> None:
    """rate_limit=TokenBucket(100) and batches of 50: 1,000 rows take ~9.6 s
    (the first batch at once, each next one 50 spacings of 10.1 ms later), and
    no second holds more than 100 rows."""
    needs_virtual_time(exact)
    limiter = TokenBucket(100, per=1)
    admitted = admissions_of(limiter)
    sink = Sink()
    start = anyio.current_time()
    async with Batcher(sink, max_size=50, max_wait=60, rate_limit=limiter) as batcher:
        await batcher.add_many(range(1000))
    elapsed = anyio.current_time() - start
    assert [len(batch) for batch in sink.batches] == [50] * 20
    assert [cost for _, cost in admitted] == [50] * 20
    assert 9.5 <= elapsed <= 9.7
    assert elapsed == pytest.approx(19 * 50 * 1.01 / 100)
    rows = [(when, 50) for when in sink.times]
    assert most_in_any_window(rows, 1.0) <= 100


async def test_batcher_rate_limit_counts_rows_through_a_sliding_window(exact: bool) -> None:
    """SlidingWindow(100) and batches of 50: exact, never more than 100 rows in
    any second, at 98% of the rate."""
    needs_virtual_time(exact)
    limiter = SlidingWindow(100)
    admitted = admissions_of(limiter)
    sink = Sink()
    start = anyio.current_time()
    async with Batcher(sink, max_size=50, max_wait=60, rate_limit=limiter) as batcher:
        await batcher.add_many(range(1000))
    elapsed = anyio.current_time() - start
    assert most_in_any_window(admitted, 1.0) <= 100
    assert elapsed == pytest.approx(19 * 50 * 1.02 / 100)


async def test_cost_of_one_per_flush_counts_flushes(exact: bool) -> None:
    """cost=lambda batch: 1 is one token per flush, as before rows were
    counted: 20 flushes at TokenBucket(10) take 19 spacings of 0.101 s."""
    needs_virtual_time(exact)
    limiter = TokenBucket(10)
    admitted = admissions_of(limiter)
    sink = Sink()
    start = anyio.current_time()
    async with Batcher(
        sink, max_size=50, max_wait=60, rate_limit=limiter, cost=lambda batch: 1
    ) as batcher:
        await batcher.add_many(range(1000))
    assert [cost for _, cost in admitted] == [1] * 20
    assert anyio.current_time() - start == pytest.approx(19 * 1.01 / 10)


@pytest.mark.parametrize("kind", [Counting, CountingNowait])
async def test_a_batch_costs_its_rows_after_dedupe_or_what_cost_says(
    kind: type[Counting],
) -> None:
    limiter = kind()
    async with Batcher(
        Sink(), max_size=3, max_wait=60, rate_limit=limiter, dedupe_key=lambda x: x
    ) as batcher:
        await batcher.add_many([1, 2, 1, 3, 4])
    assert limiter.costs == [2, 2]  # [1, 2, (1)], [3, 4]
    seen: list[list[int]] = []

    def cost(batch: list[int]) -> int:
        seen.append(batch)
        return sum(batch)

    limiter = kind()
    async with Batcher(Sink(), max_size=2, max_wait=60, rate_limit=limiter, cost=cost) as batcher:
        await batcher.add_many([1, 2, 3])
    assert limiter.costs == [3, 3]
    assert seen == [[1, 2], [3]]


@pytest.mark.parametrize(
    "make",
    [lambda: TokenBucket(1000), lambda: SlidingWindow(1000), lambda: AdaptiveRate(1000), Counting],
    ids=["TokenBucket", "SlidingWindow", "AdaptiveRate", "third-party"],
)
async def test_a_cost_that_raises_or_is_refused_fails_the_attempt(
    make: Callable[[], Any],
) -> None:
    """What cost raises is the attempt's error (Retry decides, as for any error);
    a cost the limiter refuses fails the attempt with its ValueError/TypeError."""
    calls = 0

    def cost(batch: list[int]) -> int:
        nonlocal calls
        calls += 1
        if batch == [1]:
            raise KeyError("no cost")
        return {2: 0, 4: 1.5}.get(batch[0], 1)  # type: ignore[return-value]

    limiter = make()
    sink = Sink()
    async with Batcher(
        sink,
        max_size=1,
        max_wait=None,
        rate_limit=limiter,
        cost=cost,
        retry=Retry(2, wait_initial=0, on=KeyError),
    ) as batcher:
        with pytest.raises(KeyError, match="no cost"):
            await batcher.submit(1)
        assert calls == 2  # retried, as Retry(on=KeyError) says
        if not isinstance(limiter, Counting):  # it takes any cost
            with pytest.raises(ValueError, match="cost must be >= 1"):
                await batcher.submit(2)
            with pytest.raises(TypeError, match="cost must be an int"):
                await batcher.submit(4)
        assert await batcher.submit(5) == 10
    assert sink.batches == [[5]]


@pytest.mark.parametrize(
    "make",
    [lambda: TokenBucket(1000), lambda: AdaptiveRate(1000), Counting, CountingNowait],
    ids=["own", "adaptive", "acquire", "acquire_nowait"],
)
async def test_every_attempt_asks_for_its_cost(make: Callable[[], Any]) -> None:
    """Through each kind of rate-limit layer: cost(item) per attempt; without
    cost, one unit."""
    limiter = make()
    admitted = [] if isinstance(limiter, Counting) else admissions_of(limiter)
    attempts = 0

    async def handler(item: str) -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError
        return item

    chain = build_chain(
        handler,
        retry=Retry(3, wait_initial=0),
        rate_limit=limiter,
        cost=len,
        clock=anyio.current_time,
    )
    assert await chain("abc") == "abc"
    plain = build_chain(handler, rate_limit=limiter, clock=anyio.current_time)
    assert await plain("abcd") == "abcd"
    asked = limiter.costs if isinstance(limiter, Counting) else [cost for _, cost in admitted]
    assert asked == [3, 3, 1]


def test_cost_is_checked_at_construction() -> None:
    async def async_cost(batch: list[int]) -> int:
        return 1

    with pytest.raises(TypeError, match="cost must be a callable, got 3"):
        Batcher(Sink(), cost=3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="cost must be a plain function"):
        Batcher(Sink(), cost=async_cost)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="cost must be a callable"):
        check_middleware(
            retry=None, rate_limit=None, limiter=None, timeout=None, middleware=(), cost="len"
        )
    assert check_middleware(retry=None, rate_limit=None, limiter=None, timeout=None, middleware=())
    assert (
        check_middleware(
            retry=None, rate_limit=None, limiter=None, timeout=None, middleware=()
        ).cost
        is None
    )


# ------------------------------------------------------------- accounting


async def trial(seed: int) -> None:
    """One random scenario with submit_nowait, cancelled jobs, weights, failing
    and hanging flushes and cancellation at random moments: every item whose
    call returned is flushed once, failed to its caller or job, cancelled, or
    unflushed, and each job agrees."""
    rng = random.Random(seed)
    flushed: list[int] = []
    failed: list[int] = []
    cancelled: list[int] = []
    jobs: dict[int, Job[int, int]] = {}
    added: set[int] = set()
    maybe: set[int] = set()
    weighted = rng.random() < 0.5
    timeout = rng.choice([None, 0.002])

    async def sink(batch: list[int]) -> list[int]:
        roll = rng.random()
        if roll < 0.3:
            await anyio.sleep(rng.random() * 0.001)
        elif roll < 0.45:
            raise SinkDown
        elif roll < 0.5 and timeout is not None:
            await anyio.sleep_forever()
        if weighted:
            assert sum(x % 4 for x in batch) <= 5
        flushed.extend(batch)
        return batch

    max_size = rng.choice([1, 2, 3, 5])
    weights: dict[str, Any] = {"weight": lambda x: x % 4, "max_weight": 5} if weighted else {}
    batcher: Batcher[int, int] = Batcher(
        sink,
        max_size=max_size,
        max_wait=rng.choice([None, 0.0, 0.0005, 0.002, 1.0]),
        concurrency=rng.choice([1, 2, 3]),
        max_pending=max_size * rng.choice([1, 2, 4]),
        retry=rng.choice([None, Retry(2, wait_initial=0.0002)]),
        timeout=timeout,
        **weights,
    )
    counter = iter(range(10**9))

    async def producer(n: int) -> None:
        for _ in range(n):
            roll = rng.random()
            x = next(counter)
            with anyio.CancelScope() as scope:
                if rng.random() < 0.2:
                    scope.deadline = anyio.current_time() + rng.random() * 0.001
                if roll < 0.4:
                    with contextlib.suppress(QueueFull):
                        jobs[x] = batcher.submit_nowait(x)
                        added.add(x)
                elif roll < 0.55 and jobs:
                    y = rng.choice(list(jobs))
                    if jobs[y].cancel():
                        cancelled.append(y)
                elif roll < 0.75:
                    await batcher.add(x)
                    added.add(x)
                else:
                    maybe.add(x)
                    try:
                        await batcher.submit(x)
                    except (SinkDown, TimeoutError):
                        failed.append(x)
                    added.add(x)
                await checkpoint()

    async def guarded(n: int) -> None:
        with contextlib.suppress(PoolClosed, SinkDown, TimeoutError):
            await producer(n)

    with anyio.CancelScope() as outer:
        outer.deadline = anyio.current_time() + rng.random() * 0.02
        with contextlib.suppress(FlushError):
            async with batcher, anyio.create_task_group() as tg:
                for _ in range(rng.choice([1, 2, 3])):
                    tg.start_soon(guarded, rng.randrange(1, 30))
                if rng.random() < 0.5:
                    await anyio.sleep_forever()
    for x, job in jobs.items():
        outcome = job.outcome
        if outcome is None:
            assert x in batcher.unflushed
            with pytest.raises(PoolClosed):
                await job.wait()
        elif outcome.ok:
            assert outcome.result == x
            assert x in flushed
        elif isinstance(outcome.error, JobCancelled):
            assert x in cancelled
        else:
            failed.append(x)
    unflushed = batcher.unflushed
    everything = flushed + failed + cancelled + unflushed
    assert len(everything) == len(set(everything)), "an item was accounted for twice"
    assert added <= set(everything), "an item went missing"
    assert set(everything) <= added | maybe, "an item appeared that was never added"
    stats = batcher.stats
    assert stats.cancelled == len(cancelled)
    assert stats.failed == len(failed) + len(cancelled)
    assert stats.added == len(everything)
    assert (stats.queued, stats.flushing) == (0, 0)


async def test_random_cancellation_accounts_for_every_job() -> None:
    for seed in range(120):
        await trial(seed)
