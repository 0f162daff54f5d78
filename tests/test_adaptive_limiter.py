"""AdaptiveLimiter: a limiter= whose limit follows latency and drops.

On trio the clock is a MockClock (times exact, the simulated service runs in
no time); asyncio and uvloop run the same scenarios in real time, with a
shorter service time.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from typing import Any

import anyio
import pytest

from corral import AdaptiveLimiter, Batcher, Pool, Retry, apply_to_all
from corral._concurrency import Latency
from corral._pool import _pool_progress

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend(timing_anyio_backend: Any) -> Any:
    return timing_anyio_backend


class Overloaded(Exception):
    """The simulated service's 503."""


class Service:
    """Serves ``capacity`` calls at once in ``seconds`` each, queues up to
    ``queue`` more (first come, first served) and rejects the rest."""

    def __init__(self, capacity: int, seconds: float, queue: int = 0) -> None:
        self.capacity, self.seconds, self.queue = capacity, seconds, queue
        self.serving = self.waiting = 0
        self.calls = self.rejected = 0
        self.down = False  # refuses every call
        self._freed = anyio.Event()

    async def __call__(self, item: Any) -> Any:
        self.calls += 1
        if self.down or (self.serving >= self.capacity and self.waiting >= self.queue):
            self.rejected += 1
            raise Overloaded
        self.waiting += 1
        try:
            while self.serving >= self.capacity:
                await self._freed.wait()
        finally:
            self.waiting -= 1
        self.serving += 1
        try:
            await anyio.sleep(self.seconds)
        finally:
            self.serving -= 1
            self._freed.set()
            self._freed = anyio.Event()
        return item


def service_time(exact: bool) -> float:
    """The simulated service time: 50 ms on the MockClock, 20 ms in real time."""
    return 0.05 if exact else 0.02


async def run_for(seconds: float, pool: Pool[Any, Any]) -> None:
    """Keep ``pool`` fed for ``seconds``."""
    with anyio.move_on_after(seconds):
        index = 0
        while True:
            await pool.submit(index)
            index += 1


async def median_limit(seconds: float, pool: Pool[Any, Any], limiter: AdaptiveLimiter) -> int:
    """Keep ``pool`` fed for ``seconds``; the median of the limit over the last
    half of them, read every 10 ms (a probe halves it for a moment now and then)."""
    limits: list[int] = []

    async def watch() -> None:
        await anyio.sleep(seconds / 2)
        while True:
            limits.append(limiter.limit)
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await run_for(seconds, pool)
        tg.cancel_scope.cancel()
    return statistics.median_low(limits)


def overload_retry() -> Retry:
    return Retry(attempts=1000, on=Overloaded, wait_initial=0.005, wait_max=0.05)


# --- the contract of a capacity limiter ----------------------------------------


async def test_async_with_holds_a_slot_and_waiters_queue_in_order() -> None:
    limiter = AdaptiveLimiter(2)
    order: list[int] = []
    release = anyio.Event()

    async def hold(n: int) -> None:
        async with limiter:
            order.append(n)
            await release.wait()

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(hold, n)
            await anyio.wait_all_tasks_blocked()
        stats = limiter.statistics()
        assert (stats.in_flight, stats.waiting) == (2, 2)
        release.set()
    assert order == [0, 1, 2, 3]
    assert limiter.statistics().in_flight == 0


async def test_a_cancelled_waiter_holds_nothing() -> None:
    limiter = AdaptiveLimiter(1)

    async def wait_for_a_slot() -> None:
        async with limiter:
            pytest.fail("the second slot was granted")  # pragma: no cover

    async with limiter, anyio.create_task_group() as tg:
        tg.start_soon(wait_for_a_slot)
        await anyio.wait_all_tasks_blocked()
        assert limiter.statistics().waiting == 1
        tg.cancel_scope.cancel()
    assert limiter.statistics().in_flight == 0
    async with limiter:  # the slot is free again
        assert limiter.statistics().in_flight == 1


# --- drops -------------------------------------------------------------------------


async def test_a_burst_of_drops_lowers_the_limit_once() -> None:
    limiter = AdaptiveLimiter(20, on=Overloaded)
    entered = anyio.Event()

    async def overloaded() -> None:
        with pytest.raises(Overloaded):
            async with limiter:
                await entered.wait()
                raise Overloaded

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(overloaded)
        await anyio.wait_all_tasks_blocked()
        entered.set()
    stats = limiter.statistics()
    assert (stats.limit, stats.drops, stats.decreases) == (18, 20, 1)
    # an attempt that started after the decrease is news: 18 * 0.9 = 16.2
    with pytest.raises(Overloaded):
        async with limiter:
            raise Overloaded
    assert (limiter.limit, limiter.statistics().decreases) == (16, 2)


async def test_timeouts_are_drops_by_default_and_other_errors_teach_nothing() -> None:
    limiter = AdaptiveLimiter(10)
    with pytest.raises(ValueError, match="a bad item"):
        async with limiter:
            raise ValueError("a bad item, not an overload")
    assert (limiter.limit, limiter.statistics().drops) == (10, 0)
    with pytest.raises(TimeoutError):
        async with limiter:
            raise TimeoutError
    assert (limiter.limit, limiter.statistics().drops) == (9, 1)


async def test_a_predicate_decides_what_is_a_drop() -> None:
    limiter = AdaptiveLimiter(10, on=lambda error: "503" in str(error))
    with pytest.raises(RuntimeError):
        async with limiter:
            raise RuntimeError("HTTP 404")
    assert limiter.limit == 10
    with pytest.raises(RuntimeError):
        async with limiter:
            raise RuntimeError("HTTP 503")
    assert limiter.limit == 9


async def test_drops_never_take_it_below_min() -> None:
    limiter = AdaptiveLimiter(3, min=2)
    for _ in range(5):
        with pytest.raises(TimeoutError):
            async with limiter:
                raise TimeoutError
    assert limiter.limit == 2
    assert limiter.statistics().decreases == 1  # 3 -> 2; then it could not go lower


async def test_a_predicate_that_raises_is_logged_and_the_slot_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(error: Exception) -> bool:
        raise KeyError("bug")

    limiter = AdaptiveLimiter(2, on=broken)

    async def fail(item: int) -> int:
        raise ValueError(item)

    outcomes = await apply_to_all(fail, range(5), workers=5, limiter=limiter)
    assert [type(outcome.error) for outcome in outcomes] == [ValueError] * 5
    stats = limiter.statistics()
    assert (stats.in_flight, stats.drops, stats.limit) == (0, 0, 2)
    assert "raised: not a drop" in caplog.text


async def test_a_task_cannot_take_a_second_slot() -> None:
    limiter = AdaptiveLimiter(5)
    async with limiter:
        with pytest.raises(RuntimeError, match="already holds a slot"):
            async with limiter:
                pass  # pragma: no cover
    assert limiter.statistics().in_flight == 0


async def test_async_with_is_a_checkpoint() -> None:
    limiter = AdaptiveLimiter(5)
    with anyio.CancelScope() as scope:
        scope.cancel()
        async with limiter:
            pytest.fail("entered in a cancelled scope")  # pragma: no cover
    assert limiter.statistics().in_flight == 0


async def test_a_pool_timeout_is_a_drop_and_retries_do_not_hold_slots(exact: bool) -> None:
    limiter = AdaptiveLimiter(10)

    async def slow(item: int) -> int:
        await anyio.sleep(1)
        return item

    retry = Retry(attempts=2, on=TimeoutError, wait_initial=5, wait_jitter=False)
    async with Pool(slow, workers=5, limiter=limiter, timeout=0.05, retry=retry) as pool:
        for i in range(5):
            await pool.submit(i)
        await anyio.sleep(0.5)  # every first attempt timed out; all are in backoff
        assert limiter.statistics().in_flight == 0
        assert limiter.statistics().drops == 5
        assert limiter.limit == 9  # five correlated timeouts, one decrease


# --- learning from latency ------------------------------------------------------


async def test_it_grows_while_it_is_the_bottleneck_and_latency_holds(exact: bool) -> None:
    service = Service(capacity=1000, seconds=service_time(exact))
    limiter = AdaptiveLimiter(4, on=Overloaded)
    async with Pool(service, workers=64, limiter=limiter) as pool:
        await run_for(2.0, pool)
        pool.pause()
    # it grew to what the 64 workers use, and stopped near twice that (there
    # half its slots are idle: it is not the bottleneck)
    assert 64 <= limiter.limit <= 128 + 6 * 3
    assert service.rejected == 0


@pytest.mark.parametrize("algorithm", ["vegas", "gradient2"])
async def test_a_handler_faster_than_the_clock_is_fine(algorithm: Any, exact: bool) -> None:
    """Latencies of (nearly) nothing, 0 on the MockClock, break nothing; on the
    MockClock, where they are exactly 0, the limit grows."""
    limiter = AdaptiveLimiter(2, algorithm=algorithm)

    async def instant(item: int) -> int:
        await anyio.lowlevel.checkpoint()  # (the 16 workers overlap)
        return item

    outcomes = await apply_to_all(instant, range(2000), workers=16, limiter=limiter)
    assert all(outcome.ok for outcome in outcomes)
    stats = limiter.statistics()
    assert stats.in_flight == 0
    assert stats.latency is not None
    if exact:  # its slots were in use and nothing queued: it grew
        assert stats.limit > 2
    else:  # in real time tens of µs of jitter may read as queueing: it holds
        assert stats.limit >= 2
        assert stats.drops == 0


async def test_it_does_not_grow_while_not_the_bottleneck(exact: bool) -> None:
    service = Service(capacity=1000, seconds=service_time(exact))
    limiter = AdaptiveLimiter(10, on=Overloaded)
    async with Pool(service, workers=4, limiter=limiter) as pool:
        await run_for(2.0, pool)
        pool.pause()
    assert limiter.limit == 10
    assert limiter.statistics().latency is not None


@pytest.mark.parametrize("algorithm", ["vegas", "gradient2"])
async def test_it_finds_a_hidden_capacity(exact: bool, algorithm: Any) -> None:
    seconds = service_time(exact)
    service = Service(capacity=20, seconds=seconds, queue=10)
    limiter = AdaptiveLimiter(on=Overloaded, algorithm=algorithm)
    done: list[float] = []

    async def call(item: int) -> None:
        await service(item)
        done.append(anyio.current_time())

    async with Pool(call, workers=200, limiter=limiter, retry=overload_retry()) as pool:
        await run_for(2.0, pool)
        start = anyio.current_time()
        calls, rejected = service.calls, service.rejected
        limit = await median_limit(4.0, pool, limiter)
        pool.pause()
    steady = [t for t in done if t >= start]
    goodput = len(steady) / 4.0 / (20 / seconds)
    rejected_share = (service.rejected - rejected) / (service.calls - calls)
    assert 20 <= limit <= 30 + 5  # capacity plus the service's queue, or about
    # (in real time a loaded machine's late wake-ups blur the latencies)
    assert goodput >= (0.9 if exact else 0.7)
    assert rejected_share <= (0.02 if exact else 0.1)


async def test_it_follows_the_capacity_down_and_up(exact: bool) -> None:
    seconds = service_time(exact)
    service = Service(capacity=40, seconds=seconds, queue=10)
    limiter = AdaptiveLimiter(on=Overloaded)
    async with Pool(service, workers=300, limiter=limiter, retry=overload_retry()) as pool:
        assert 40 <= await median_limit(2.0, pool, limiter) <= 55
        service.capacity = 20
        assert 20 <= await median_limit(2.0, pool, limiter) <= 35
        service.capacity = 40
        assert 40 <= await median_limit(2.0, pool, limiter) <= 55
        pool.pause()


async def test_a_slow_start_does_not_poison_the_baseline(exact: bool) -> None:
    seconds = service_time(exact)
    service = Service(capacity=30, seconds=5 * seconds, queue=10)  # cold: 5 times slower
    limiter = AdaptiveLimiter(on=Overloaded)
    async with Pool(service, workers=300, limiter=limiter, retry=overload_retry()) as pool:
        await run_for(1.0, pool)
        service.seconds = seconds  # warm: a probe (every 100 windows) sees it
        limit = await median_limit(200 * seconds, pool, limiter)
        pool.pause()
    baseline = limiter.statistics().baseline
    assert baseline is not None
    assert baseline <= 1.3 * seconds
    assert 30 <= limit <= 45


# --- where it shows ------------------------------------------------------------------


async def test_its_limit_shows_in_the_stats_and_on_the_progress_bar() -> None:
    limiter = AdaptiveLimiter(7)

    async def echo(item: int) -> int:
        return item

    async with Pool(echo, limiter=limiter) as pool:
        assert pool.stats.limit == 7
        assert _pool_progress(pool.stats)[1]["limit"] == 7
    async with Pool(echo, limiter=anyio.CapacityLimiter(3)) as pool:
        assert pool.stats.limit is None
        assert "limit" not in _pool_progress(pool.stats)[1]

    async def flush(batch: list[int]) -> None:
        pass

    async with Batcher(flush, limiter=limiter) as batcher:
        assert batcher.stats.limit == 7


async def test_a_change_of_the_limit_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    limiter = AdaptiveLimiter(10)
    with caplog.at_level(logging.DEBUG, logger="corral.limits"), pytest.raises(TimeoutError):
        async with limiter:
            raise TimeoutError
    assert any("10 -> 9" in record.getMessage() for record in caplog.records)


async def test_pools_sharing_it_share_its_slots(exact: bool) -> None:
    limiter = AdaptiveLimiter(6, max=6)
    running = peak = 0

    async def call(item: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.01)
        running -= 1

    async with (
        Pool(call, workers=10, limiter=limiter) as a,
        Pool(call, workers=10, limiter=limiter) as b,
    ):
        for i in range(40):
            await a.submit(i)
            await b.submit(i)
    assert peak == 6
    outcomes = await apply_to_all(call, range(20), workers=10, limiter=limiter)
    assert all(outcome.ok for outcome in outcomes)


# --- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"initial": 0}, ValueError, "initial"),
        ({"initial": 2.5}, TypeError, "initial"),
        ({"min": 0}, ValueError, "min"),
        ({"max": "10"}, TypeError, "max"),
        ({"min": 5, "max": 4}, ValueError, "min must be at most max, got min=5, max=4"),
        ({"initial": 20, "max": 10}, ValueError, "initial must be within min and max"),
        ({"initial": 1, "min": 2}, ValueError, "initial must be within min and max"),
        ({"max": 10**12}, ValueError, "max must be at most"),
        ({"on": 503}, TypeError, "on"),
        ({"on": (ValueError, KeyboardInterrupt)}, TypeError, "on"),
        ({"algorithm": "aimd"}, ValueError, "algorithm"),
    ],
)
def test_bad_input_is_refused_naming_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        AdaptiveLimiter(**kwargs)


def test_initial_defaults_to_10_within_min_and_max() -> None:
    assert AdaptiveLimiter().limit == 10
    assert AdaptiveLimiter(max=5).limit == 5
    assert AdaptiveLimiter(min=20).limit == 20


def test_its_settings_are_read_only() -> None:
    limiter = AdaptiveLimiter(min=2, max=50, on=Overloaded, algorithm="gradient2")
    assert (limiter.min, limiter.max, limiter.on, limiter.algorithm) == (
        2,
        50,
        Overloaded,
        "gradient2",
    )
    with pytest.raises(AttributeError):
        limiter.min = 0  # type: ignore[misc]


# --- threads, outages, clocks ----------------------------------------------------


async def test_a_plain_handler_keeps_its_slot_until_its_thread_ends(exact: bool) -> None:
    limiter = AdaptiveLimiter(2, max=2)
    release = threading.Event()
    started = threading.Semaphore(0)

    def blocking(item: int) -> int:
        started.release()
        release.wait(10)
        return item

    async with Pool(blocking, workers=4, limiter=limiter, timeout=0.05) as pool:
        jobs = [pool.submit_nowait(i) for i in range(2)]
        for job in jobs:
            outcome = await job.wait()
            assert isinstance(outcome.error, TimeoutError)
        # both timed out (two drops, one decrease) but their threads still run
        stats = limiter.statistics()
        assert (stats.in_flight, stats.drops) == (2, 2)
        release.set()
    assert limiter.statistics().in_flight == 0


async def test_after_an_outage_it_climbs_back_fast(exact: bool) -> None:
    seconds = service_time(exact)
    service = Service(capacity=40, seconds=seconds, queue=10)
    limiter = AdaptiveLimiter(on=Overloaded)
    async with Pool(service, workers=300, limiter=limiter, retry=overload_retry()) as pool:
        before = await median_limit(2.0, pool, limiter)
        service.down = True  # every call refused: every round of retries fails
        await run_for(20 * seconds, pool)
        assert limiter.limit < before / 2
        service.down = False
        after = await median_limit(60 * seconds, pool, limiter)
        pool.pause()
    assert after >= 0.75 * before


async def test_after_an_outage_soon_after_a_drop_it_climbs_back_fast(exact: bool) -> None:
    seconds = service_time(exact)
    service = Service(capacity=40, seconds=seconds, queue=10)
    limiter = AdaptiveLimiter(on=Overloaded)
    async with Pool(service, workers=300, limiter=limiter, retry=overload_retry()) as pool:
        before = await median_limit(2.0, pool, limiter)
        with pytest.raises(Overloaded):  # a drop of its own, just before
            async with limiter:
                raise Overloaded
        service.down = True
        await run_for(20 * seconds, pool)
        service.down = False
        after = await median_limit(60 * seconds, pool, limiter)
        pool.pause()
    assert after >= 0.75 * before


def test_growth_near_the_last_drop_is_an_eighth() -> None:
    limiter = AdaptiveLimiter(100)
    limiter._learning.ceiling = 100.0
    limiter._learning.starting = False
    limiter._learning.baseline = 1.0
    limiter._learning.window.busiest = 100
    for estimate in (90.0, 100.0, 110.0):
        limiter._estimate = estimate
        step = limiter._next_estimate(Latency(1.0, 1.0)) - estimate
        assert step == pytest.approx(math.log10(estimate) * 6 / 8)
    limiter._estimate = 120.0  # beyond it: as usual
    assert limiter._next_estimate(Latency(1.0, 1.0)) - 120 == pytest.approx(6 * math.log10(120))


async def test_a_drop_during_a_probe_lowers_from_where_it_probes() -> None:
    limiter = AdaptiveLimiter(40)
    limiter._learning.latency = limiter._learning.baseline = 0.01
    limiter._probe(anyio.current_time(), 40.0)
    assert limiter.limit == 20
    with pytest.raises(TimeoutError):
        async with limiter:  # started during the probe: the half limit was too much
            raise TimeoutError
    assert limiter.limit == 18


async def test_a_limiter_used_by_a_later_event_loop_keeps_learning() -> None:
    limiter = AdaptiveLimiter(4, on=Overloaded)
    limiter._learning.last = anyio.current_time() + 10**6  # as if an earlier loop's clock
    window = limiter._learning.window
    window.opened = window.closes_at = anyio.current_time() + 10**6

    async def call(item: int) -> int:
        await anyio.sleep(0.001)
        return item

    await apply_to_all(call, range(200), workers=16, limiter=limiter)
    assert limiter.statistics().latency is not None  # windows closed on this clock
