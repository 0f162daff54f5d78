"""Plain handlers in threads, cut off by timeout=: the same on every backend.

A timed-out thread cannot be stopped; corral abandons it. These tests pin what
that means: a pool never has more than 2 * workers threads at once (abandoned
ones included), a shared CapacityLimiter is never exceeded by calls that are
still running in a thread, and Outcome.attempts counts only calls that started.
"""

from __future__ import annotations

import contextvars
import random
import threading
import time
from typing import Any

import anyio
import pytest

from corral import Batcher, Job, Pool, Retry, apply_to_all

pytestmark = pytest.mark.anyio


class Blocking:
    """A plain handler whose calls block their thread until released; counts the
    calls that started and the most running at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.started: list[Any] = []
        self.running = 0
        self.peak = 0
        self.all_ended = threading.Event()
        self.all_ended.set()

    def __call__(self, item: Any) -> Any:
        with self.lock:
            self.started.append(item)
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.all_ended.clear()
        try:
            if not self.release.wait(10):
                raise RuntimeError("never released")
            return item
        finally:
            with self.lock:
                self.running -= 1
                if not self.running:
                    self.all_ended.set()

    async def finish(self) -> None:
        """Release every thread and wait until they have all ended."""
        self.release.set()
        await anyio.to_thread.run_sync(self.all_ended.wait, 10)


async def test_abandoned_threads_stay_bounded_and_only_started_calls_count() -> None:
    """workers=2, timeout=0.05, 8 blocked calls: at most 4 threads ever run
    (2 * workers, the abandoned ones included); the 4 items that never got a
    thread fail with a TimeoutError saying so and count no attempt."""
    handler = Blocking()
    try:
        outcomes = await apply_to_all(handler, range(8), workers=2, timeout=0.05)
        assert handler.peak == 4
        assert sorted(handler.started) == [0, 1, 2, 3]
        for outcome in outcomes:
            assert isinstance(outcome.error, TimeoutError)
            if outcome.item in handler.started:
                assert outcome.attempts == 1
                assert str(outcome.error) == "attempt timed out after timeout=0.05 s"
            else:
                assert outcome.attempts == 0
                assert "waiting for a free thread" in str(outcome.error)
                assert "4 threads are busy, 4 of them abandoned" in str(outcome.error)
    finally:
        await handler.finish()


async def test_retried_counts_only_calls_that_started() -> None:
    """With Retry around a timeout, stats.retried and Outcome.attempts add up to
    the calls the handler really got, whatever waited for a thread."""
    handler = Blocking()
    try:
        async with Pool(handler, workers=2, timeout=0.05, retry=Retry(3, wait_initial=0)) as pool:
            jobs = [await pool.submit(i) for i in range(4)]
        attempts = sum(job.outcome.attempts for job in jobs if job.outcome is not None)
        assert attempts == len(handler.started) <= 4
        assert pool.stats.retried == attempts - sum(
            1 for job in jobs if job.outcome is not None and job.outcome.attempts
        )
    finally:
        await handler.finish()


async def test_shared_capacity_limiter_is_never_exceeded_by_running_calls() -> None:
    """CapacityLimiter(2) shared by a pool of 8 workers whose calls time out: a
    timed-out call keeps its token while its thread runs, so no more than 2
    calls ever run at once, and the others go on once the threads end."""
    handler = Blocking()
    limiter = anyio.CapacityLimiter(2)
    timed_out = anyio.Event()
    failures: list[Any] = []

    def on_outcome(outcome: Any) -> None:
        if outcome.error is not None:
            failures.append(outcome.item)
            if len(failures) == 2:
                timed_out.set()

    try:
        async with Pool(
            handler, workers=8, timeout=0.05, limiter=limiter, on_outcome=on_outcome
        ) as pool:
            for i in range(16):
                await pool.submit(i)
            await timed_out.wait()
            # a negative check needs a window: time for a call that should not
            # start (its worker holds no token) to show up in the handler
            await anyio.sleep(0.2)
            assert sorted(handler.started) == sorted(failures)  # abandoned, still running
            assert limiter.borrowed_tokens == 2
            handler.release.set()  # the threads end; their tokens come back
        assert handler.peak == 2
        assert pool.stats.succeeded == 14
        assert limiter.borrowed_tokens == 0
    finally:
        await handler.finish()


async def test_batcher_plain_flush_threads_stay_bounded() -> None:
    """A plain flush cut off by timeout=: at most 2 * concurrency threads; the
    third attempt finds none free and fails saying so; after the threads end,
    everything is flushed, nothing lost."""
    handler = Blocking()
    try:
        async with Batcher(
            handler,
            max_size=1,
            max_wait=None,
            concurrency=1,
            timeout=0.05,
            retry=Retry(3, wait_initial=0),
        ) as batcher:
            for i in range(3):
                await batcher.add(i)
            with pytest.raises(TimeoutError, match="waiting for a free thread"):
                await batcher.flush()
            assert handler.started == [[0], [0]]
            handler.release.set()
        assert batcher.stats.flushed == 3
        assert handler.peak == 2
    finally:
        await handler.finish()


class Sleeper:
    """A plain handler that sleeps a few milliseconds in its thread; counts
    the calls running at once, and signals when none is left running."""

    def __init__(self, rng_seed: int) -> None:
        self.lock = threading.Lock()
        self.rng = random.Random(rng_seed)
        self.running = 0
        self.peak = 0
        self.idle = threading.Event()
        self.idle.set()

    def __call__(self, item: int) -> int:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.idle.clear()
            pause = self.rng.random() * 0.004
        try:
            time.sleep(pause)
            return item
        finally:
            with self.lock:
                self.running -= 1
                if not self.running:
                    self.idle.set()


@pytest.mark.parametrize("seed", range(40))
async def test_random_cancellation_with_abandoned_threads_keeps_every_bound(seed: int) -> None:
    """Plain handlers cut off by timeouts and a cancellation at a random moment:
    every item has one outcome or is unfinished; never more calls run at once
    than the shared CapacityLimiter's 3 tokens; and once the threads end, every
    token is back."""
    rng = random.Random(seed)
    handler = Sleeper(seed)
    limiter = anyio.CapacityLimiter(3)
    done: list[Any] = []
    items = list(range(rng.randrange(5, 40)))
    submitted: list[int] = []
    with anyio.CancelScope() as scope:
        scope.deadline = anyio.current_time() + rng.random() * 0.03
        async with Pool(
            handler,
            workers=rng.choice([1, 4, 8]),
            timeout=rng.choice([0.001, 0.002, 0.01]),
            retry=Retry(2, wait_initial=0) if rng.random() < 0.5 else None,
            limiter=limiter,
            on_outcome=done.append,
        ) as pool:
            for item in items:
                await pool.submit(item)
                submitted.append(item)
    finished = sorted(outcome.item for outcome in done)
    assert set(finished).isdisjoint(pool.unfinished)
    assert sorted(finished + pool.unfinished) == submitted
    await anyio.to_thread.run_sync(handler.idle.wait, 10)
    assert handler.peak <= 3
    await anyio.wait_all_tasks_blocked()
    assert limiter.borrowed_tokens == 0


request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class TagRequest:
    """User middleware that sets a context variable for its item."""

    async def __call__(self, item: int, call_next: Any) -> Any:
        request_id.set(f"req-{item}")
        return await call_next(item)


async def test_a_threaded_call_sees_its_own_callers_context() -> None:
    """A plain handler behind middleware (its calls go to reused runner tasks)
    sees the context variables of its own item's call, not another's."""

    def handler(item: int) -> str:
        time.sleep(0.001)
        return request_id.get()

    outcomes = await apply_to_all(handler, range(20), workers=3, middleware=[TagRequest()])
    assert [o.result for o in outcomes] == [f"req-{i}" for i in range(20)]


async def test_workers_do_not_take_the_context_of_whoever_submitted() -> None:
    """Workers start on demand, but as if at entry: a context variable set by one
    submitter is not seen by the handler of another's items."""

    async def handler(item: str) -> str:
        await anyio.lowlevel.checkpoint()
        return request_id.get()

    jobs: dict[str, Job[str, str]] = {}

    async def submit_as(pool: Pool[str, str], who: str) -> None:
        request_id.set(who)
        jobs[who] = await pool.submit(who)

    async with Pool(handler, workers=4) as pool:
        async with anyio.create_task_group() as tg:
            for who in ("alice", "bob", "carol"):
                tg.start_soon(submit_as, pool, who)
        jobs["block"] = await pool.submit("block")
    assert {who: job.outcome and job.outcome.result for who, job in jobs.items()} == dict.fromkeys(
        ("alice", "bob", "carol", "block"), "-"
    )


async def test_a_plain_handler_raising_cancelled_error_fails_only_its_item(
    backend_name: str,
) -> None:
    """asyncio: a plain handler that raises CancelledError itself (behind a
    timeout, so in a runner) fails its own item; the others are unaffected."""
    if backend_name != "asyncio":
        pytest.skip("raising a bare cancellation from user code is an asyncio notion")
    import asyncio

    def handler(item: int) -> int:
        if item == 0:
            raise asyncio.CancelledError
        return item

    outcomes = await apply_to_all(handler, range(8), workers=2, timeout=5)
    assert [o.ok for o in outcomes] == [False] + [True] * 7
    assert isinstance(outcomes[0].error, RuntimeError)


async def test_an_awaitable_returned_by_a_plain_handler_stays_within_the_limiter() -> None:
    """A plain callable returning a coroutine (lambda x: fetch(x)) under timeout=
    and CapacityLimiter(2): the coroutine is awaited holding the token."""
    running = 0
    peak = 0

    async def fetch(item: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.001)
        running -= 1
        return item

    def handler(item: int) -> Any:
        return fetch(item)

    outcomes = await apply_to_all(
        handler, range(12), workers=8, timeout=5, limiter=anyio.CapacityLimiter(2)
    )
    assert [o.result for o in outcomes] == list(range(12))
    assert peak == 2


async def test_a_call_given_up_before_its_thread_started_is_not_an_attempt() -> None:
    """Middleware that gives up on every attempt at once: the calls whose thread
    never started are not counted in Outcome.attempts."""
    calls = 0
    called = threading.Condition()

    def handler(item: int) -> int:
        nonlocal calls
        with called:
            calls += 1
            called.notify_all()
        return item

    class GiveUpAtOnce:
        async def __call__(self, item: int, call_next: Any) -> Any:
            with anyio.move_on_after(0):
                return await call_next(item)
            raise LookupError("gave up")

    async with Pool(handler, workers=2, middleware=[GiveUpAtOnce()]) as pool:
        jobs = [await pool.submit(i) for i in range(5)]
        await pool.join()
        attempts = sum(job.outcome.attempts for job in jobs if job.outcome is not None)

        def counted_calls_ran() -> None:  # a call counted as started is on its way
            with called:
                called.wait_for(lambda: calls >= attempts, timeout=5)

        await anyio.to_thread.run_sync(counted_calls_ran)
    assert calls == attempts


async def test_system_exit_racing_an_outer_cancellation_is_not_swallowed() -> None:
    """A handler raises SystemExit as an outer scope is cancelled: the
    SystemExit comes out (as asyncio.TaskGroup lets it), not the cancellation
    that the scope would absorb."""
    with pytest.raises(SystemExit):
        with anyio.CancelScope() as outer:

            async def handler(item: int) -> int:
                outer.cancel()
                raise SystemExit(3)

            async with Pool(handler, workers=1) as pool:
                await pool.submit(1)
                await anyio.sleep_forever()
