"""Cross-cutting guarantees: every item accounted for exactly once, exceptions
surfacing as themselves, bounds holding — including under random cancellation."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import anyio
import pytest

from corral import (
    AdaptiveLimiter,
    Batcher,
    CircuitBreaker,
    CircuitOpen,
    FlushError,
    Hedge,
    Job,
    JobCancelled,
    Outcome,
    Pool,
    PoolClosed,
    QueueFull,
    Retry,
    RetryBudget,
    SlidingWindow,
    TokenBucket,
    apply_to_all,
    apply_to_each,
)

pytestmark = pytest.mark.anyio


class Boom(BaseException):
    """A BaseException that is not a cancellation (like KeyboardInterrupt)."""


async def echo(x: Any) -> Any:
    await anyio.lowlevel.checkpoint()
    return x


async def test_block_exception_group_comes_out_as_the_same_object() -> None:
    """A group the block raises itself (e.g. from its own task group) is re-raised
    as that very object, not unwrapped or re-wrapped."""
    own = ExceptionGroup("mine", [ValueError("child")])
    with pytest.raises(ExceptionGroup) as info:
        async with Pool(echo) as pool:
            await pool.submit(1)
            raise own
    assert info.value is own


async def test_on_outcome_exception_group_comes_out_as_the_same_object() -> None:
    """A group raised by on_outcome is re-raised as that very object."""
    raised = ExceptionGroup("from callback", [KeyError("k")])

    def on_outcome(outcome: Outcome[int, int]) -> None:
        raise raised

    with pytest.raises(ExceptionGroup) as info:
        async with Pool(echo, on_outcome=on_outcome) as pool:
            await pool.submit(1)
    assert info.value is raised


async def test_base_exception_from_handler_stops_the_pool_and_surfaces_unwrapped() -> None:
    """A handler raising a non-cancellation BaseException (KeyboardInterrupt-like)
    stops the pool; the block re-raises it as itself; its item is unfinished."""

    async def handler(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        if x == 2:
            raise Boom
        await anyio.sleep_forever()
        return x

    pool = Pool(handler, workers=4)
    with pytest.raises(Boom):
        async with pool:
            for i in range(6):
                pool.submit_nowait(i)
    assert pool.unfinished == [0, 1, 2, 3, 4, 5]


async def test_stray_cancelled_error_from_handler_is_that_items_error(backend_name: str) -> None:
    """asyncio: a handler that raises CancelledError without being cancelled (it
    awaited a cancelled future) fails that item only; the block runs on."""
    if backend_name != "asyncio":
        pytest.skip("only asyncio lets user code raise a bare cancellation")
    import asyncio

    async def handler(x: int) -> int:
        if x == 1:
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            future.cancel()
            return await future
        return x

    body_finished = False
    async with Pool(handler, workers=2) as pool:
        jobs = [await pool.submit(i) for i in range(3)]
        await pool.join()
        body_finished = True
    assert body_finished
    assert [job.done for job in jobs] == [True, True, True]
    error = jobs[1].outcome.error if jobs[1].outcome else None
    assert isinstance(error, RuntimeError)
    assert isinstance(error.__cause__, asyncio.CancelledError)
    assert pool.unfinished == []


async def test_max_pending_holds_for_outside_submitters_after_follow_ups() -> None:
    """Follow-ups from handlers may exceed max_pending, but outside submitters
    are only let in when fewer than max_pending items wait."""
    gate = anyio.Event()
    admitted_at: list[int] = []

    async def handler(x: int) -> int:
        if x == 0:
            for i in range(100, 110):
                pool.submit_nowait(i)  # bypasses the bound: from the pool's own handler
        await gate.wait()
        return x

    pool: Pool[int, int] = Pool(handler, workers=1, max_pending=2)
    async with pool, anyio.create_task_group() as tg:
        await pool.submit(0)
        await anyio.wait_all_tasks_blocked()
        assert pool.stats.queued == 10
        with pytest.raises(QueueFull):
            pool.submit_nowait(1)

        async def outside(i: int) -> None:
            await pool.submit(i)
            admitted_at.append(pool.stats.queued)

        for i in range(1, 4):
            tg.start_soon(outside, i)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert len(admitted_at) == 3
    assert all(queued <= 2 for queued in admitted_at)


async def test_apply_to_each_awaits_async_on_outcome_to_the_end() -> None:
    """With every outcome consumed, leaving the block lets running async on_outcome
    callbacks finish instead of cancelling them."""
    finished: list[int] = []

    async def on_outcome(outcome: Outcome[int, int]) -> None:
        await anyio.sleep(0.001)
        finished.append(outcome.item)

    async with apply_to_each(echo, range(20), workers=4, on_outcome=on_outcome) as outcomes:
        got = [o.item async for o in outcomes]
    assert sorted(got) == list(range(20))
    assert sorted(finished) == list(range(20))


@pytest.mark.parametrize("ordered", [False, True])
async def test_apply_to_each_after_break_every_item_is_in_exactly_one_place(
    ordered: bool,
) -> None:
    """After a break: yielded, or ready and yielded by iterating again after the
    block, or unfinished — each item exactly once; iterating again never hangs."""
    release = anyio.Event()

    async def handler(x: int) -> int:
        if x >= 6:
            await release.wait()
        await anyio.lowlevel.checkpoint()
        return x

    taken: list[int] = []
    async with apply_to_each(handler, range(12), workers=3, ordered=ordered) as outcomes:
        async for outcome in outcomes:
            taken.append(outcome.item)
            await anyio.wait_all_tasks_blocked()
            break
    with anyio.fail_after(5):
        leftover = [o.item async for o in outcomes]
    unfinished = outcomes.unfinished
    everything = taken + leftover + unfinished
    assert sorted(everything) == list(range(len(everything)))
    assert len(set(everything)) == len(everything)
    assert leftover, "some outcomes were ready and not yet consumed"
    if ordered:
        assert leftover == sorted(leftover)


async def test_apply_to_each_second_consumer_is_refused() -> None:
    """Two tasks waiting on the same outcomes: the second gets BusyResourceError."""
    gate = anyio.Event()

    async def handler(x: int) -> int:
        await gate.wait()
        return x

    async with apply_to_each(handler, range(3)) as outcomes:
        async with anyio.create_task_group() as tg:
            tg.start_soon(outcomes.__anext__)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(anyio.BusyResourceError):
                await outcomes.__anext__()
            gate.set()
        rest = [o async for o in outcomes]
    assert len(rest) == 2


async def trial(
    seed: int, *, layered: bool = False, scheduled: bool = False, resilient: bool = False
) -> None:
    """One random scenario; asserts the accounting invariant. ``layered`` adds
    random retry, timeout, rate limit and capacity limit (fixed or adaptive); ``scheduled`` adds
    priorities, keys (a key function that sometimes raises), and a task that
    resizes, pauses, resumes and cancels jobs at random moments; ``resilient``
    adds a circuit breaker, hedged attempts, and a retry on results with a
    budget and a hook."""
    rng = random.Random(seed)
    seen: list[Outcome[int, int]] = []
    returned: list[int] = []  # in the order the submits returned = submission order

    async def handler(x: int) -> int:
        roll = rng.random()
        if roll < 0.3:
            await anyio.sleep(rng.random() * 0.001)
        elif roll < 0.4:
            raise ValueError(x)
        elif roll < 0.5:
            await anyio.sleep_forever()
        for _ in range(rng.randrange(3)):
            await anyio.lowlevel.checkpoint()
        return x

    options: dict[str, Any] = {}
    if layered:
        if rng.random() < 0.7:
            options["retry"] = Retry(rng.choice([1, 2, 3]), wait_initial=rng.random() * 0.001)
        if rng.random() < 0.5:
            options["timeout"] = rng.random() * 0.002 + 0.0001
        if rng.random() < 0.5:
            options["rate_limit"] = rng.choice(
                [SlidingWindow(rng.randrange(1, 4), 0.001), TokenBucket(2000, burst=2)]
            )
        if rng.random() < 0.5:
            options["limiter"] = rng.choice([anyio.CapacityLimiter, _adaptive])(rng.randrange(1, 3))
    if resilient:
        options.update(_resilience(rng))
    if scheduled and rng.random() < 0.6:
        options["key"] = _chaos_key
        options["per_key"] = rng.choice([1, 2])
    pool = Pool(
        handler,
        workers=rng.choice([1, 2, 4]),
        max_pending=rng.choice([1, 2, 5]),
        on_outcome=seen.append,
        **options,
    )
    counter = iter(range(10**9))
    jobs: list[Job[int, int]] = []
    cancelled: list[Job[int, int]] = []

    async def producer(n: int) -> None:
        for _ in range(n):
            x = next(counter)
            priority = rng.choice([0, 0, -1, 2.5]) if scheduled else 0
            with anyio.CancelScope() as scope:
                if rng.random() < 0.2:
                    scope.deadline = anyio.current_time() + rng.random() * 0.001
                try:
                    if rng.random() < 0.3:
                        jobs.append(pool.submit_nowait(x, priority=priority))
                    else:
                        jobs.append(await pool.submit(x, priority=priority))
                except (QueueFull, PoolClosed):
                    continue
                returned.append(x)

    async def scheduler(n: int) -> None:
        for _ in range(n):
            await anyio.sleep(rng.random() * 0.001)
            action = rng.random()
            if action < 0.3:
                pool.resize(rng.choice([1, 2, 4]))
            elif action < 0.45:
                pool.pause()
            elif action < 0.7:
                pool.resume()
            elif jobs:
                job = rng.choice(jobs)
                if job.cancel():
                    cancelled.append(job)

    tasks_before = len(anyio.get_running_tasks())
    with anyio.CancelScope() as outer:
        outer.deadline = anyio.current_time() + rng.random() * 0.01
        async with pool, anyio.create_task_group() as tg:
            for _ in range(rng.choice([1, 2, 3])):
                tg.start_soon(producer, rng.randrange(1, 30))
            if scheduled:
                tg.start_soon(scheduler, rng.randrange(1, 20))
    assert len(anyio.get_running_tasks()) == tasks_before, "a task outlived the pool"
    for job in cancelled:
        assert job.outcome is None or isinstance(job.outcome.error, JobCancelled), job.outcome
    done = [o.item for o in seen]
    assert len(done) == len(set(done)), "an item got two outcomes"
    assert set(done).isdisjoint(pool.unfinished), "an item both finished and unfinished"
    assert set(done) | set(pool.unfinished) == set(returned), "an item went missing"
    unfinished = set(pool.unfinished)
    assert pool.unfinished == [x for x in returned if x in unfinished], "not in submit order"


async def test_random_cancellation_accounts_for_every_item() -> None:
    """Random workers, bounds, producers, failures, hangs and cancellation at random
    moments: each submitted item has exactly one outcome or is unfinished."""
    for seed in range(150):
        await trial(seed)


async def test_random_cancellation_with_middleware_accounts_for_every_item() -> None:
    """The same with retries (cancelled during backoff too), timeouts, a shared
    rate limiter and a capacity limiter (anyio's, or an AdaptiveLimiter) in the
    chain."""
    for seed in range(150):
        await trial(seed, layered=True)


async def test_random_cancellation_with_resilience_accounts_for_every_item() -> None:
    """The same with a circuit breaker, hedged attempts, and retries of
    results under a retry budget with a hook before each wait."""
    for seed in range(150):
        await trial(seed, resilient=True)


def _resilience(rng: random.Random) -> dict[str, Any]:
    """Random resilience options for a trial (each may be absent)."""
    options: dict[str, Any] = {}
    if rng.random() < 0.8:
        hooked: list[int] = []
        options["retry"] = Retry(
            rng.choice([1, 2, 3]),
            wait_initial=rng.random() * 0.001,
            on_result=_chaos_result if rng.random() < 0.5 else None,
            budget=rng.choice([None, RetryBudget(ratio=0.5, min_per_second=rng.choice([0, 50]))]),
            before_sleep=rng.choice([None, lambda *args: hooked.append(args[2])]),
        )
    if rng.random() < 0.6:
        options["breaker"] = CircuitBreaker(
            failure_rate=0.5,
            min_calls=rng.choice([1, 3]),
            window=0.01,
            cooldown=rng.random() * 0.002 + 0.0001,
        )
    if rng.random() < 0.6:
        options["hedge"] = Hedge(rng.random() * 0.001 + 0.00001, max_extra=rng.choice([1, 2]))
    if rng.random() < 0.4:
        options["timeout"] = rng.random() * 0.002 + 0.0001
    if rng.random() < 0.4:
        options["limiter"] = anyio.CapacityLimiter(rng.randrange(1, 3))
    return options


def _chaos_result(result: int) -> bool:
    return result % 5 == 0


async def test_random_cancellation_with_scheduling_accounts_for_every_item() -> None:
    """The same with priorities, keys, resizes, pauses and job cancellations."""
    for seed in range(150):
        await trial(seed, scheduled=True)


def _adaptive(initial: int) -> AdaptiveLimiter:
    """An AdaptiveLimiter that drops on timeouts and on the handler's errors."""
    return AdaptiveLimiter(initial, max=4, on=(TimeoutError, ValueError))


def _chaos_key(x: int) -> int:
    if x % 17 == 16:
        raise LookupError(f"no key for {x}")
    return x % 3


async def test_random_cancellation_of_apply_to_each() -> None:
    """The helper under a random deadline: what was yielded and what is unfinished
    (plus leftovers) never overlap and never repeat."""
    for seed in range(100):
        rng = random.Random(seed)

        async def handler(x: int, rng: random.Random = rng) -> int:
            if rng.random() < 0.5:
                await anyio.sleep(rng.random() * 0.0005)
            return x

        got: list[int] = []
        with anyio.CancelScope() as scope:
            scope.deadline = anyio.current_time() + rng.random() * 0.005
            async with apply_to_each(
                handler, range(10**6), workers=rng.choice([1, 3, 8]), ordered=rng.random() < 0.5
            ) as outcomes:
                async for outcome in outcomes:
                    got.append(outcome.item)
        got += [o.item async for o in outcomes]
        everything = got + outcomes.unfinished
        assert len(everything) == len(set(everything))
        assert sorted(everything) == list(range(len(everything)))


async def test_apply_to_all_random_fail_fast_raises_the_failure() -> None:
    """apply_to_all with fail_fast under random timing raises exactly the handler's error."""
    for seed in range(60):
        rng = random.Random(seed)
        failing = rng.randrange(50)

        async def handler(x: int, rng: random.Random = rng, failing: int = failing) -> int:
            for _ in range(rng.randrange(3)):
                await anyio.lowlevel.checkpoint()
            if x == failing:
                raise LookupError(x)
            return x

        with pytest.raises(LookupError):
            await apply_to_all(handler, range(50), workers=rng.choice([1, 2, 5]), fail_fast=True)


class SinkDown(Exception):
    pass


async def batcher_trial(seed: int) -> None:
    """One random Batcher scenario: every item whose add returned is flushed
    exactly once, or handed back to its submit caller as an error, or unflushed."""
    rng = random.Random(seed)
    flushed: list[int] = []
    failed: list[int] = []  # submit callers that got the flush's error
    added: set[int] = set()  # add / add_nowait / add_many / submit returned
    refused: set[int] = set()  # add raised: must not be anywhere
    maybe: set[int] = set()  # submit cancelled after it may have added
    timeout = rng.choice([None, 0.002])

    async def sink(batch: list[int]) -> list[int]:
        roll = rng.random()
        if roll < 0.3:
            await anyio.sleep(rng.random() * 0.001)
        elif roll < 0.45:
            raise SinkDown
        elif roll < 0.5 and timeout is not None:
            await anyio.sleep_forever()
        for _ in range(rng.randrange(3)):
            await anyio.lowlevel.checkpoint()
        flushed.extend(batch)  # no await after this: the flush succeeded
        return batch

    max_size = rng.choice([1, 2, 3, 5])
    batcher = Batcher(
        sink,
        max_size=max_size,
        max_wait=rng.choice([None, 0.0, 0.0005, 0.002, 1.0]),
        concurrency=rng.choice([1, 2, 3]),
        max_pending=max_size * rng.choice([1, 2, 4]),
        retry=rng.choice([None, Retry(2, wait_initial=0.0002)]),
        timeout=timeout,
        breaker=rng.choice([None, CircuitBreaker(min_calls=2, window=0.01, cooldown=0.0005)]),
    )
    counter = iter(range(10**9))

    async def producer(n: int) -> None:
        for _ in range(n):
            roll = rng.random()
            with anyio.CancelScope() as scope:
                if rng.random() < 0.2:
                    scope.deadline = anyio.current_time() + rng.random() * 0.001
                if roll < 0.2:
                    xs = [next(counter) for _ in range(rng.randrange(1, 2 * max_size + 1))]
                    try:
                        await batcher.add_many(xs)
                    except BaseException:
                        refused.update(xs)
                        raise
                    added.update(xs)
                    continue
                x = next(counter)
                if roll < 0.5:
                    try:
                        if roll < 0.3:
                            batcher.add_nowait(x)
                        else:
                            await batcher.add(x)
                    except BaseException:
                        refused.add(x)
                        raise
                    added.add(x)
                elif roll < 0.55:
                    before = set(added)
                    await batcher.flush()
                    done = set(flushed) | set(failed)
                    assert before <= done, "flush() returned before its items were flushed"
                else:
                    maybe.add(x)
                    try:
                        result = await batcher.submit(x)
                    except (SinkDown, TimeoutError, CircuitOpen):
                        failed.append(x)  # its batch failed: the error is its outcome
                    else:
                        assert result == x
                    added.add(x)
            # leaving the with block: cancellation stops here, errors propagate

    async def guarded(n: int) -> None:
        # flush() reports a failed flush of its items with the flush's error
        with contextlib.suppress(QueueFull, PoolClosed, SinkDown, TimeoutError, CircuitOpen):
            await producer(n)

    exit_normally = rng.random() < 0.5
    tasks_before = len(anyio.get_running_tasks())
    with anyio.CancelScope() as outer:
        outer.deadline = anyio.current_time() + rng.random() * 0.02
        flush_error: FlushError | None = None
        try:
            async with batcher, anyio.create_task_group() as tg:
                for _ in range(rng.choice([1, 2, 3])):
                    tg.start_soon(guarded, rng.randrange(1, 30))
                if not exit_normally:
                    await anyio.sleep_forever()
        except FlushError as error:
            flush_error = error
    if flush_error is not None:
        assert list(flush_error.items) == batcher.unflushed
    assert len(anyio.get_running_tasks()) == tasks_before, "a task outlived the batcher"
    unflushed = batcher.unflushed
    everything = flushed + failed + unflushed
    assert len(everything) == len(set(everything)), "an item was flushed or reported twice"
    assert added <= set(everything), "an item went missing"
    assert set(everything) <= added | maybe, "an item appeared that was never added"
    assert refused.isdisjoint(everything), "an item whose add raised was added"
    stats = batcher.stats
    assert stats.flushed == len(flushed)
    assert stats.added == len(everything)
    assert (stats.queued, stats.flushing) == (0, 0)


async def test_random_cancellation_of_a_batcher_accounts_for_every_item() -> None:
    """Random sizes, timers, concurrency, bounds, producers (add, add_nowait,
    add_many, submit, flush), failing and hanging flushes, cancellation at random
    moments: each added item is flushed once, failed to its caller, or unflushed."""
    for seed in range(150):
        await batcher_trial(seed)
