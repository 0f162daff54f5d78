"""Pool: submit, backpressure, jobs, join, on_outcome, fail_fast, lifecycle."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest

from corral import Job, Outcome, Pool, PoolClosed, QueueFull, apply_to_all

pytestmark = pytest.mark.anyio


class Gate:
    """A handler whose calls block until the test opens the gate."""

    def __init__(self) -> None:
        self.open = anyio.Event()
        self.started: list[Any] = []
        self.cancelled: list[Any] = []

    async def __call__(self, item: Any) -> Any:
        self.started.append(item)
        try:
            await self.open.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(item)
            raise
        return item


async def double(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return 2 * x


async def test_submit_returns_jobs_with_outcomes() -> None:
    """Every submitted item ends as one Outcome on its Job, ids default to index."""
    async with Pool(double, workers=3) as pool:
        jobs = [await pool.submit(i) for i in range(20)]
        custom = pool.submit_nowait(100, id="hundred")
    assert [job.outcome.result for job in jobs if job.outcome] == [2 * i for i in range(20)]
    assert all(job.done for job in jobs)
    assert [job.id for job in jobs] == list(range(20))
    assert custom.id == "hundred"
    assert custom.outcome is not None
    assert custom.outcome.id == "hundred"
    assert custom.outcome.index == 20
    assert custom.outcome.result == 200


async def test_job_wait_returns_outcome_and_creates_event_only_when_needed() -> None:
    """job.wait() gives the outcome; no event exists for jobs nobody waited on."""
    gate = Gate()
    async with Pool(gate, workers=2) as pool:
        waited = await pool.submit("a")
        ignored = await pool.submit("b")
        await anyio.wait_all_tasks_blocked()
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                outcome = await waited.wait()
                assert outcome.result == "a"

            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            gate.open.set()
    assert waited._event is not None
    assert ignored._event is None
    assert ignored.outcome is not None
    assert (await ignored.wait()).result == "b"  # already done: returns at once


async def test_error_in_one_item_does_not_disturb_others() -> None:
    """A handler exception is that item's Outcome.error; the rest succeed."""

    async def handler(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        if x == 3:
            raise ValueError("three")
        return x

    async with Pool(handler, workers=4) as pool:
        jobs = [await pool.submit(i) for i in range(10)]
    outcomes = [job.outcome for job in jobs]
    assert all(o is not None for o in outcomes)
    bad = [o for o in outcomes if o is not None and not o.ok]
    assert len(bad) == 1
    assert bad[0].item == 3
    assert isinstance(bad[0].error, ValueError)
    assert [o.result for o in outcomes if o is not None and o.ok] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert pool.stats.failed == 1
    assert pool.stats.succeeded == 9


async def test_backpressure_holds_exactly_max_pending() -> None:
    """With every worker busy, exactly max_pending items can wait; then submit blocks
    and submit_nowait raises QueueFull; a freed slot lets exactly one more in."""
    gate = Gate()
    async with Pool(gate, workers=2, max_pending=3) as pool:
        for i in range(2):
            await pool.submit(i)
        await anyio.wait_all_tasks_blocked()
        assert gate.started == [0, 1]
        for i in range(2, 5):
            pool.submit_nowait(i)
        assert pool.stats.queued == 3
        with pytest.raises(QueueFull):
            pool.submit_nowait(99)
        blocked_done = anyio.Event()

        async def blocked_submit() -> None:
            await pool.submit(5)
            blocked_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(blocked_submit)
            await anyio.wait_all_tasks_blocked()
            assert not blocked_done.is_set()
            assert pool.stats.backpressure_waits == 1
            assert pool.stats.queued == 3
            gate.open.set()
            await blocked_done.wait()
    assert pool.stats.submitted == 6
    assert pool.stats.succeeded == 6


async def test_blocked_submitters_are_served_in_order() -> None:
    """Submitters waiting for room get it first come, first served."""
    gate = Gate()
    order: list[int] = []
    async with Pool(gate, workers=1, max_pending=1) as pool:
        await pool.submit(-1)
        await anyio.wait_all_tasks_blocked()
        pool.submit_nowait(-2)
        async with anyio.create_task_group() as tg:
            for i in range(5):

                async def submitter(i: int = i) -> None:
                    job = await pool.submit(i)
                    order.append(job.item)

                tg.start_soon(submitter)
                await anyio.wait_all_tasks_blocked()
            gate.open.set()
    assert order == [0, 1, 2, 3, 4]


async def test_submit_cancelled_while_blocked_leaves_no_trace() -> None:
    """A submit cancelled while waiting for room enqueued nothing and gave no slot away."""
    gate = Gate()
    async with Pool(gate, workers=1, max_pending=1) as pool:
        await pool.submit("running")
        await anyio.wait_all_tasks_blocked()
        pool.submit_nowait("queued")
        with anyio.CancelScope() as scope:

            async def cancel_soon() -> None:
                await anyio.wait_all_tasks_blocked()
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_soon)
                await pool.submit("cancelled")
        assert scope.cancelled_caught
        stats = pool.stats
        assert stats.submitted == 2
        assert stats.queued == 1
        with pytest.raises(QueueFull):
            pool.submit_nowait("still full")
        gate.open.set()
    assert [*gate.started] == ["running", "queued"]
    assert pool.stats.succeeded == 2


async def test_submit_natively_cancelled_after_being_granted_a_slot(backend_name: str) -> None:
    """asyncio task.cancel() landing right after a slot was granted: the submit raises,
    the item is not enqueued, and the slot passes to the next waiter."""
    if backend_name != "asyncio":
        pytest.skip("native task cancellation is an asyncio notion")
    import asyncio

    release = anyio.Event()
    seen: list[str] = []

    async def handler(item: str) -> str:
        seen.append(item)
        if item == "first":
            await release.wait()
        return item

    tasks: dict[str, asyncio.Task[Any]] = {}

    def on_outcome(outcome: Outcome[str, str]) -> None:
        if outcome.item == "first":
            # same step as the worker's next take, which grants a slot to "victim"
            tasks["victim"].cancel()

    async with Pool(handler, workers=1, max_pending=1, on_outcome=on_outcome) as pool:
        await pool.submit("first")
        await anyio.wait_all_tasks_blocked()
        pool.submit_nowait("queued")
        tasks["victim"] = asyncio.ensure_future(pool.submit("victim"))
        await anyio.wait_all_tasks_blocked()
        tasks["next"] = asyncio.ensure_future(pool.submit("next"))
        await anyio.wait_all_tasks_blocked()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await tasks["victim"]
        job = await tasks["next"]
        assert job.item == "next"
    assert seen == ["first", "queued", "next"]
    assert pool.stats.submitted == 3
    assert pool.stats.succeeded == 3


async def test_submit_natively_cancelled_by_asyncio_timeout(backend_name: str) -> None:
    """asyncio.timeout around a blocked submit: raises TimeoutError, enqueues nothing."""
    if backend_name != "asyncio":
        pytest.skip("asyncio.timeout is an asyncio notion")
    import asyncio

    gate = Gate()
    async with Pool(gate, workers=1, max_pending=1) as pool:
        await pool.submit(0)
        await anyio.wait_all_tasks_blocked()
        pool.submit_nowait(1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await pool.submit(2)
        assert pool.stats.submitted == 2
        assert pool.stats.queued == 1
        gate.open.set()
    assert gate.started == [0, 1]


async def test_unfinished_lists_exactly_items_without_outcome_after_cancellation() -> None:
    """Cancelled mid-flight: finished items have outcomes, the rest are unfinished,
    in submission order, and the two sets are disjoint and complete."""
    done: list[Outcome[int, int]] = []

    async def handler(x: int) -> int:
        if x % 3 == 0:
            return x
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    with anyio.CancelScope() as scope:
        async with Pool(handler, workers=4, max_pending=20, on_outcome=done.append) as pool:
            for i in range(20):
                await pool.submit(i)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    assert scope.cancelled_caught
    finished = sorted(o.item for o in done)
    assert set(finished).isdisjoint(pool.unfinished)
    assert sorted(finished + pool.unfinished) == list(range(20))
    assert pool.unfinished == sorted(pool.unfinished)
    assert finished
    assert all(x % 3 == 0 for x in finished)
    assert pool.stats.unfinished == len(pool.unfinished)
    assert pool.stats.running == 0
    assert pool.stats.queued == 0


async def test_block_exception_cancels_workers_and_is_reraised_unwrapped() -> None:
    """An exception in the block stops the workers, lists unfinished items and is
    re-raised as itself (not in an exception group)."""
    gate = Gate()
    pool = Pool(gate, workers=2)
    with pytest.raises(KeyError, match="boom"):
        async with pool:
            await pool.submit("a")
            await pool.submit("b")
            await pool.submit("c")
            await anyio.wait_all_tasks_blocked()
            raise KeyError("boom")
    assert sorted(gate.cancelled) == ["a", "b"]
    assert pool.unfinished == ["a", "b", "c"]


async def test_job_wait_on_unfinished_item_raises_pool_closed() -> None:
    """Waiting on a job that ended unfinished raises PoolClosed, before and after."""
    gate = Gate()
    pool = Pool(gate, workers=1)
    results: list[BaseException] = []
    with anyio.CancelScope() as scope:
        async with pool:
            job = await pool.submit("x")
            await anyio.wait_all_tasks_blocked()

            async def wait_for_it() -> None:
                try:
                    await job.wait()
                except PoolClosed as exc:
                    results.append(exc)

            pool._tg.start_soon(wait_for_it)  # type: ignore[union-attr]
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    assert not results  # the waiter was inside the pool: it was cancelled too
    with pytest.raises(PoolClosed, match="unfinished"):
        await job.wait()
    assert job.outcome is None
    assert not job.done


async def test_job_waiter_outside_the_pool_gets_pool_closed() -> None:
    """A task outside the pool waiting on a job learns it ended unfinished."""
    gate = Gate()
    pool = Pool(gate, workers=1)
    got: list[BaseException] = []
    async with anyio.create_task_group() as outer:
        with anyio.CancelScope() as scope:
            async with pool:
                job = await pool.submit("x")

                async def wait_for_it() -> None:
                    with pytest.raises(PoolClosed) as info:
                        await job.wait()
                    got.append(info.value)

                outer.start_soon(wait_for_it)
                await anyio.wait_all_tasks_blocked()
                scope.cancel()
    assert len(got) == 1


async def test_submit_before_entry_and_after_exit_raises_pool_closed() -> None:
    """PoolClosed with a message saying what to do, before entry and after exit."""
    pool = Pool(double)
    with pytest.raises(PoolClosed, match="not running yet"):
        await pool.submit(1)
    with pytest.raises(PoolClosed, match="not running yet"):
        pool.submit_nowait(1)
    async with pool:
        pass
    with pytest.raises(PoolClosed, match="has exited"):
        await pool.submit(1)
    with pytest.raises(PoolClosed, match="has exited"):
        pool.submit_nowait(1)
    with pytest.raises(PoolClosed):
        await pool.join()


async def test_reentry_after_clean_exit_accumulates_stats() -> None:
    """A pool can be entered again; stats and submission indices carry on."""
    pool = Pool(double, workers=2)
    async with pool:
        first = [await pool.submit(i) for i in range(3)]
    async with pool:
        second = [await pool.submit(i) for i in range(4)]
    assert [j.index for j in first + second] == list(range(7))
    assert pool.stats.submitted == 7
    assert pool.stats.succeeded == 7


async def test_entering_twice_at_once_is_an_error() -> None:
    """Nesting the same pool is refused clearly."""
    pool = Pool(double)
    async with pool:
        with pytest.raises(RuntimeError, match="already running"):
            await pool.__aenter__()


async def test_entering_while_the_last_exit_is_still_ending_is_an_error() -> None:
    """Another task cannot enter the pool while the last block's exit still waits
    for its workers to end (a handler that finishes its work while cancelled):
    the two entries would share the workers and the room."""
    release = anyio.Event()
    running = anyio.Event()

    async def stubborn(x: int) -> int:
        running.set()
        with anyio.CancelScope(shield=True):
            await release.wait()
        return x

    pool = Pool(stubborn, workers=1)

    async def first_block() -> None:
        with pytest.raises(LookupError):
            async with pool:
                await pool.submit(1)
                await running.wait()
                raise LookupError("the block failed")

    async with anyio.create_task_group() as tg:
        tg.start_soon(first_block)
        await running.wait()
        await anyio.wait_all_tasks_blocked()
        try:
            with pytest.raises(RuntimeError, match="already running"):
                await pool.__aenter__()
        finally:
            release.set()
    async with pool:  # its exit returned: it can be entered again
        assert (await (await pool.submit(2)).wait()).result == 2


async def test_exit_waits_until_idle_and_handlers_can_submit_follow_ups() -> None:
    """A crawler: handlers submit follow-up work to their own pool (never blocking on
    max_pending); leaving the block waits until the work runs out."""
    seen: list[int] = []

    async def crawl(n: int) -> int:
        seen.append(n)
        await anyio.lowlevel.checkpoint()
        if n < 100:
            await pool.submit(2 * n + 1)
            await pool.submit(2 * n + 2)
        return n

    pool: Pool[int, int] = Pool(crawl, workers=2, max_pending=1)
    async with pool:
        await pool.submit(0)
    assert sorted(seen) == list(range(201))
    assert pool.stats.succeeded == 201
    assert pool.stats.queued == 0


async def test_join_waits_for_items_submitted_before_the_call() -> None:
    """join() returns once the earlier items have outcomes, not later ones."""
    first = anyio.Event()
    later = anyio.Event()

    async def handler(item: str) -> str:
        await (first if item.startswith("early") else later).wait()
        return item

    async with Pool(handler, workers=4) as pool:
        early = [await pool.submit(f"early{i}") for i in range(3)]
        joined = anyio.Event()

        async def joiner() -> None:
            await pool.join()
            joined.set()

        pool._tg.start_soon(joiner)  # type: ignore[union-attr]
        await anyio.wait_all_tasks_blocked()
        late = await pool.submit("late")
        first.set()
        await joined.wait()
        assert all(job.done for job in early)
        assert not late.done
        later.set()


async def test_on_outcome_sync_is_called_in_the_recording_step() -> None:
    """A plain on_outcome sees the job already done, the item already out of the
    live set, and is called once per item."""
    calls: list[tuple[Any, bool]] = []
    jobs: dict[int, Job[int, int]] = {}

    def on_outcome(outcome: Outcome[int, int]) -> None:
        calls.append((outcome.item, jobs[outcome.index].done))
        assert outcome.index not in pool._live

    pool = Pool(double, workers=3, on_outcome=on_outcome)
    async with pool:
        for i in range(10):
            job = await pool.submit(i)
            jobs[job.index] = job
    assert sorted(calls) == [(i, True) for i in range(10)]


async def test_on_outcome_async_is_awaited_before_exit() -> None:
    """An async on_outcome is awaited by the worker; exit waits for it too."""
    got: list[int] = []

    async def on_outcome(outcome: Outcome[int, int]) -> None:
        await anyio.sleep(0.001)
        got.append(outcome.unwrap())

    async with Pool(double, workers=2, on_outcome=on_outcome) as pool:
        for i in range(5):
            await pool.submit(i)
    assert sorted(got) == [0, 2, 4, 6, 8]


async def test_on_outcome_error_stops_the_pool_and_is_reraised() -> None:
    """An exception from on_outcome is a bug in the caller's code: the pool stops and
    the exception comes out of the async with, unwrapped."""

    def on_outcome(outcome: Outcome[int, int]) -> None:
        if outcome.item == 2:
            raise RuntimeError("callback broke")

    pool = Pool(double, workers=1, on_outcome=on_outcome)
    with pytest.raises(RuntimeError, match="callback broke"):
        async with pool:
            for i in range(5):
                await pool.submit(i)


async def test_fail_fast_cancels_pool_and_block_and_reraises_the_error() -> None:
    """fail_fast: the first final failure cancels workers and the block's own code;
    the failing item keeps its error outcome and the error is re-raised unwrapped."""
    reached_end_of_block = False
    started = anyio.Event()

    async def handler(x: int) -> int:
        if x == 0:
            await started.wait()
            raise ValueError("first failure")
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    pool = Pool(handler, workers=3, fail_fast=True)
    jobs = []
    with pytest.raises(ValueError, match="first failure"):
        async with pool:
            for i in range(5):
                jobs.append(pool.submit_nowait(i))
            await anyio.sleep_forever()
            reached_end_of_block = True
    assert not reached_end_of_block
    assert jobs[0].outcome is not None
    assert isinstance(jobs[0].outcome.error, ValueError)
    assert 0 not in pool.unfinished
    assert pool.unfinished == [1, 2, 3, 4]
    with pytest.raises(PoolClosed):
        pool.submit_nowait(9)


@pytest.mark.parametrize("stop_by", ["fail_fast", "on_outcome"])
async def test_no_item_starts_after_the_pool_stopped_itself(stop_by: str) -> None:
    """Once fail_fast or a raising on_outcome stops the pool, no queued item
    starts: not even with a handler that never awaits, which cancellation
    (delivered at a checkpoint) would not interrupt. They end unfinished."""
    calls: list[int] = []

    async def handler(x: int) -> int:
        calls.append(x)
        if x == 10 and stop_by == "fail_fast":
            raise ValueError("first failure")
        return x

    def on_outcome(outcome: Outcome[int, int]) -> None:
        if outcome.item == 10 and stop_by == "on_outcome":
            raise RuntimeError("callback broke")

    pool = Pool(
        handler, workers=4, max_pending=500, fail_fast=stop_by == "fail_fast", on_outcome=on_outcome
    )
    with pytest.raises((ValueError, RuntimeError)):
        async with pool:
            for i in range(500):
                pool.submit_nowait(i)
    assert calls[-1] == 10
    assert pool.unfinished == list(range(11, 500))
    assert pool.stats.succeeded + pool.stats.failed == 11


async def test_fail_fast_while_exit_is_waiting() -> None:
    """fail_fast also works when the block already ended and exit is draining."""

    async def handler(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        if x == 5:
            raise ValueError(x)
        return x

    with pytest.raises(ValueError, match="5"):
        async with Pool(handler, workers=2, fail_fast=True) as pool:
            for i in range(10):
                pool.submit_nowait(i)


async def test_stats_is_a_frozen_snapshot() -> None:
    """stats returns a frozen value that does not change under the caller."""
    gate = Gate()
    async with Pool(gate, workers=1, max_pending=4) as pool:
        for i in range(3):
            pool.submit_nowait(i)
        await anyio.wait_all_tasks_blocked()
        snapshot = pool.stats
        assert (snapshot.submitted, snapshot.queued, snapshot.running) == (3, 2, 1)
        gate.open.set()
    assert snapshot.succeeded == 0
    assert pool.stats.succeeded == 3
    with pytest.raises(AttributeError):
        snapshot.submitted = 0  # type: ignore[misc]


async def test_sync_handler_runs_in_a_worker_thread() -> None:
    """A plain handler never runs on the event loop thread."""
    loop_thread = threading.get_ident()

    def handler(x: int) -> int:
        assert threading.get_ident() != loop_thread
        return x + 1

    async with Pool(handler, workers=3) as pool:
        jobs = [await pool.submit(i) for i in range(10)]
    assert [job.outcome.unwrap() for job in jobs if job.outcome] == list(range(1, 11))


async def test_sync_handlers_are_not_capped_by_anyios_default_thread_limit() -> None:
    """50 workers run 50 plain calls at once (anyio's default limiter allows 40)."""
    barrier = threading.Barrier(50, timeout=20)

    def handler(x: int) -> int:
        barrier.wait()
        return x

    async with Pool(handler, workers=50) as pool:
        jobs = [await pool.submit(i) for i in range(50)]
    assert all(job.outcome is not None and job.outcome.ok for job in jobs)


async def test_sync_handler_returning_an_awaitable_is_awaited() -> None:
    """A plain callable that returns an awaitable has it awaited on the loop."""

    async def later(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x * 10

    def handler(x: int) -> Any:
        return later(x)

    async with Pool(handler, workers=2) as pool:
        job = await pool.submit(4)
    assert job.outcome is not None
    assert job.outcome.result == 40


async def test_handler_that_never_awaits_does_not_starve_the_loop() -> None:
    """A handler with no await still lets other tasks run between items."""
    ticks = 0

    async def busy(x: int) -> int:
        return x

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        async with Pool(busy, workers=1, max_pending=10_000) as pool:
            for i in range(10_000):
                pool.submit_nowait(i)
            before = ticks
        assert ticks - before >= 10_000 // 64 // 2
        tg.cancel_scope.cancel()


async def test_outcome_elapsed_measures_the_call() -> None:
    """elapsed is the time from the start of the call to the outcome."""

    async def slow(x: int) -> int:
        await anyio.sleep(0.05)
        return x

    async with Pool(slow) as pool:
        job = await pool.submit(1)
    assert job.outcome is not None
    assert 0.04 <= job.outcome.elapsed < 5
    assert job.outcome.attempts == 1


async def test_repr_names_the_pool() -> None:
    """repr shows the name and state, which PoolClosed messages reuse."""
    pool = Pool(double, name="fetch")
    assert "fetch" in repr(pool)
    assert "new" in repr(pool)


async def test_idle_pool_uses_no_cpu() -> None:
    """Workers parked for a second, with and without a timeout configured: the
    process uses (almost) no CPU."""
    async with Pool(double, workers=50) as plain, Pool(double, workers=50, timeout=5) as timed:
        await plain.submit(1)
        await timed.submit(1)
        start = time.process_time()
        await anyio.sleep(1.0)
        used = time.process_time() - start
    assert used < 0.05, f"{used:.3f} s of CPU in an idle second"


async def test_outer_cancellation_racing_fail_fast_wins() -> None:
    """The handler fails in the same step as an outer scope is cancelled: the
    cancellation propagates (the scope catches it), the failing item keeps its
    error outcome, and the failure does not escape in its place."""
    with anyio.CancelScope() as outer:

        async def handler(item: int) -> int:
            outer.cancel()
            raise ValueError(item)

        async with Pool(handler, workers=1, fail_fast=True) as pool:
            job = await pool.submit(7)
            await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert job.outcome is not None
    assert isinstance(job.outcome.error, ValueError)


async def test_native_cancellation_racing_fail_fast_wins(backend_name: str) -> None:
    """asyncio.timeout expiring as a fail_fast handler fails (the case that lost the
    cancellation): the block raises CancelledError, which asyncio.timeout turns into
    TimeoutError; the item keeps its error outcome."""
    if backend_name != "asyncio":
        pytest.skip("native task cancellation is an asyncio notion")
    import asyncio

    jobs: list[Job[int, int]] = []
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(60) as deadline:

            async def handler(item: int) -> int:
                # the deadline expires at the loop's next step, before the
                # pool's own cancellation reaches the block
                deadline.reschedule(asyncio.get_running_loop().time())
                raise ValueError(item)

            async with Pool(handler, workers=1, fail_fast=True) as pool:
                jobs.append(await pool.submit(3))
                await anyio.sleep_forever()
    assert isinstance(jobs[0].outcome and jobs[0].outcome.error, ValueError)


async def test_native_cancel_racing_on_outcome_error_ends_the_task_cancelled(
    backend_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """task.cancel() in the same step as on_outcome raises: the task ends cancelled
    (the cancellation is not swallowed), and the callback's error is logged at
    ERROR rather than lost."""
    if backend_name != "asyncio":
        pytest.skip("native task cancellation is an asyncio notion")
    import asyncio

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None

        def on_outcome(outcome: Outcome[int, int]) -> None:
            task.cancel()
            raise LookupError("on_outcome broke")

        async with Pool(double, workers=1, on_outcome=on_outcome) as pool:
            await pool.submit(1)
            await anyio.sleep_forever()

    task = asyncio.ensure_future(run())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "on_outcome broke" in record.getMessage()


def _corral_tasks(prefix: str) -> int:
    return sum(1 for task in anyio.get_running_tasks() if (task.name or "").startswith(prefix))


async def test_workers_start_on_demand_so_a_huge_bound_costs_nothing() -> None:
    """workers=10**100 is accepted, entering is instant (no worker runs before an
    item arrives), and only as many workers start as the items need (plus at
    most one spare): a generous bound costs nothing."""
    gate = Gate()
    with anyio.fail_after(5):
        async with Pool(gate, workers=10**100) as pool:
            assert _corral_tasks("corral worker") == 0
            for i in range(5):
                await pool.submit(i)
            await anyio.wait_all_tasks_blocked()
            assert sorted(gate.started) == [0, 1, 2, 3, 4]  # all five run at once
            assert 5 <= _corral_tasks("corral worker") <= 6
            gate.open.set()
    assert pool.stats.succeeded == 5


async def test_apply_to_all_with_100_000_workers_starts_only_what_it_needs() -> None:
    """apply_to_all over 10 items with workers=100_000 starts at most 11 workers
    (before: 100,000 tasks, 5 s)."""
    peak = 0

    async def handler(x: int) -> int:
        nonlocal peak
        await anyio.lowlevel.checkpoint()
        peak = max(peak, _corral_tasks("corral worker"))
        return x

    with anyio.fail_after(5):
        outcomes = await apply_to_all(handler, range(10), workers=100_000)
    assert [o.result for o in outcomes] == list(range(10))
    assert 1 <= peak <= 11


async def test_on_demand_workers_still_reach_the_bound() -> None:
    """Starting workers on demand does not cap concurrency below ``workers``: 20
    blocked items with workers=8 run 8 at once, and no more."""
    gate = Gate()
    async with Pool(gate, workers=8, max_pending=20) as pool:
        for i in range(20):
            await pool.submit(i)
        await anyio.wait_all_tasks_blocked()
        assert len(gate.started) == 8
        assert _corral_tasks("corral worker") == 8
        gate.open.set()
    assert pool.stats.succeeded == 20


async def test_pool_inside_the_producers_task_group_exits_first_and_says_what_to_do() -> None:
    """A pool whose block ends before the producers (started in a task group
    outside it) run exits at once, being idle; their submit raises a PoolClosed
    that says where the task group goes."""
    errors: list[PoolClosed] = []

    async def producer(pool: Pool[int, int]) -> None:
        await pool.submit(1)

    try:
        async with anyio.create_task_group() as tg, Pool(double) as pool:  # the wrong order
            tg.start_soon(producer, pool)
    except* PoolClosed as group:
        errors.extend(error for error in group.exceptions if isinstance(error, PoolClosed))
    assert len(errors) == 1
    message = str(errors[0])
    assert "has exited" in message
    assert "waits only for the items already submitted" in message
    assert "task group opened inside the pool's `async with` block" in message
    assert "Pools in task groups and nurseries" in message
    assert pool.stats.submitted == 0


async def test_task_group_inside_the_pool_block_gives_every_item_an_outcome() -> None:
    """The pool around the producers: its task group waits for the producers,
    then the pool for their items, each of which gets one outcome."""
    outcomes: list[Outcome[int, int]] = []

    async def producer(pool: Pool[int, int], start: int) -> None:
        for n in range(start, start + 10):
            await pool.submit(n)
            if n % 3 == 0:
                await anyio.sleep(0.001)  # the pool goes idle between items

    async with (
        Pool(double, workers=2, max_pending=2, on_outcome=outcomes.append) as pool,
        anyio.create_task_group() as tg,
    ):
        for start in (0, 100, 200):
            tg.start_soon(producer, pool, start)
    expected = [n for start in (0, 100, 200) for n in range(start, start + 10)]
    assert sorted(outcome.item for outcome in outcomes) == expected
    assert all(outcome.result == 2 * outcome.item for outcome in outcomes)
    assert pool.stats.succeeded == 30
    assert pool.unfinished == []
