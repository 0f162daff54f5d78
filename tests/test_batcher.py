"""Batcher: policies, add/add_many/submit/flush, failures, shutdown, cancellation.

Tests named ``test_regression_*`` pin bugs seen in the batch queues and per-item
batchers that corral replaces.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint

from corral import (
    Batcher,
    BatcherStats,
    FlushError,
    PoolClosed,
    QueueFull,
    Retry,
    SlidingWindow,
)

pytestmark = pytest.mark.anyio

# a failed flush waits before the next one; keep that short in real time
QUICK = Retry(attempts=1, wait_initial=0.001, wait_max=0.002)


class SinkDown(Exception):
    pass


class Sink:
    """A flush function that records batches; can be gated and made to fail."""

    def __init__(
        self,
        *,
        gated: bool = False,
        fail: int = 0,
        results: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.gate: anyio.Event | None = anyio.Event() if gated else None
        self.fail = fail
        self.results = results
        self.calls: list[list[Any]] = []  # every call, also failed ones
        self.batches: list[list[Any]] = []  # successful flushes
        self.cancelled: list[list[Any]] = []
        self.running = 0
        self.max_running = 0

    def open(self) -> None:
        assert self.gate is not None
        self.gate.set()

    async def __call__(self, batch: list[Any]) -> Any:
        self.calls.append(list(batch))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await checkpoint()
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(list(batch))
            raise
        finally:
            self.running -= 1
        if self.fail:
            self.fail -= 1
            raise SinkDown(f"sink down for {batch}")
        self.batches.append(list(batch))
        return None if self.results is None else self.results(batch)


def flat(batches: Sequence[Sequence[Any]]) -> list[Any]:
    return [item for batch in batches for item in batch]


async def waits_until_open(sink: Sink, call: Callable[[], Awaitable[Any]]) -> None:
    """``call()`` is still waiting once every task is blocked on the gated
    ``sink``; then the sink opens and ``call()`` returns."""
    returned = anyio.Event()

    async def run() -> None:
        await call()
        returned.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.wait_all_tasks_blocked()
        assert not returned.is_set()
        sink.open()
    assert returned.is_set()


async def submit_one_at_a_time(
    batcher: Batcher[Any, Any], items: Iterable[Any], expected: type[Exception]
) -> list[Exception]:
    """Submit each item from its own task, in order; collect ``expected`` errors."""
    errors: list[Exception] = []

    async def one(item: Any) -> None:
        try:
            await batcher.submit(item)
        except expected as error:
            errors.append(error)

    async with anyio.create_task_group() as tg:
        for item in items:
            tg.start_soon(one, item)
            await anyio.wait_all_tasks_blocked()
    return errors


# ------------------------------------------------------------------ policies


async def test_size_policy_flushes_full_batches_in_order_and_the_rest_at_exit() -> None:
    sink = Sink()
    async with Batcher(sink, max_size=4, max_wait=60) as batcher:
        for i in range(10):
            await batcher.add(i)
        await anyio.wait_all_tasks_blocked()
        assert sink.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the rest is not due yet
    assert sink.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    stats = batcher.stats
    assert (stats.added, stats.flushes, stats.flushed, stats.queued) == (10, 3, 10, 0)
    assert stats.last_flush_time is not None
    assert batcher.unflushed == []


async def test_natural_policy_batches_grow_while_the_sink_is_busy() -> None:
    """max_wait=None: the first item goes out alone at once; everything added while
    that flush runs goes out together as soon as the flusher is free."""
    sink = Sink(gated=True)
    async with Batcher(sink, max_size=100, max_wait=None) as batcher:
        await batcher.add(0)
        await anyio.wait_all_tasks_blocked()
        assert sink.calls == [[0]]
        for i in range(1, 31):
            await batcher.add(i)
        await anyio.wait_all_tasks_blocked()
        assert sink.calls == [[0]]
        sink.open()
    assert sink.batches == [[0], list(range(1, 31))]


async def test_natural_policy_with_a_fast_sink_flushes_small_batches_promptly() -> None:
    sink = Sink()
    async with Batcher(sink, max_size=100, max_wait=None) as batcher:
        for i in range(5):
            await batcher.add(i)
            await anyio.wait_all_tasks_blocked()
            assert flat(sink.batches) == list(range(i + 1))  # nothing waits for a timer


async def test_at_most_concurrency_flushes_run_at_once() -> None:
    sink = Sink(gated=True)
    async with Batcher(sink, max_size=2, max_wait=None, concurrency=3, max_pending=12) as batcher:
        await batcher.add_many(range(12))
        await anyio.wait_all_tasks_blocked()
        assert sink.running == 3
        sink.open()
    assert sink.max_running == 3
    assert sorted(flat(sink.batches)) == list(range(12))
    assert all(len(batch) <= 2 for batch in sink.calls)


async def test_regression_timed_final_and_retried_flushes_never_exceed_max_size() -> None:
    """Other batchers flush "everything" on a timer, at shutdown or after a
    failure, producing batches larger than max_size. Here every path is capped."""
    sink = Sink(gated=True, fail=1)
    async with Batcher(sink, max_size=3, max_wait=0.001, max_pending=30, retry=QUICK) as batcher:
        await batcher.add(0)
        await anyio.wait_all_tasks_blocked()  # [0] is in flight (and will fail)
        await batcher.add_many(range(1, 20))  # piles up behind it
        await anyio.sleep(0.01)  # every queued item is past max_wait
        sink.open()
        await batcher.add_many(range(20, 27))
    assert max(len(batch) for batch in sink.calls) <= 3
    assert flat(sink.batches) == list(range(27))
    assert batcher.stats.flush_failures == 1


# ---------------------------------------------------------------- add & friends


async def test_add_nowait_raises_queue_full_and_add_waits_for_room() -> None:
    sink = Sink(gated=True)
    async with Batcher(sink, max_size=2, max_wait=None, max_pending=3) as batcher:
        batcher.add_nowait("a")
        await anyio.wait_all_tasks_blocked()  # ["a"] in flight
        for item in "bcd":
            batcher.add_nowait(item)
        with pytest.raises(QueueFull):
            batcher.add_nowait("e")
        assert batcher.stats.queued == 3
        await waits_until_open(sink, lambda: batcher.add("e"))
    assert flat(sink.batches) == list("abcde")
    assert batcher.stats.backpressure_waits == 1


async def test_blocked_adders_are_served_in_order_and_a_cancelled_one_adds_nothing() -> None:
    sink = Sink(gated=True)
    async with Batcher(sink, max_size=1, max_wait=None, max_pending=1) as batcher:
        await batcher.add(0)
        await anyio.wait_all_tasks_blocked()  # 0 in flight
        await batcher.add(1)  # queued: full
        async with anyio.create_task_group() as tg:
            for item in (2, 3, 4):
                tg.start_soon(batcher.add, item)
                await anyio.wait_all_tasks_blocked()
            with anyio.CancelScope() as scope:
                scope.cancel()
                await batcher.add(99)
            tg.cancel_scope.cancel()  # 2, 3, 4 give up waiting: nothing added
        assert batcher.stats.added == 2
        async with anyio.create_task_group() as tg:
            for item in (5, 6, 7):
                tg.start_soon(batcher.add, item)
                await anyio.wait_all_tasks_blocked()
            sink.open()
    assert flat(sink.batches) == [0, 1, 5, 6, 7]


async def test_add_natively_cancelled_by_asyncio_timeout_adds_nothing(backend_name: str) -> None:
    if backend_name != "asyncio":
        pytest.skip("asyncio.timeout is an asyncio notion")
    import asyncio

    sink = Sink(gated=True)
    async with Batcher(sink, max_size=1, max_wait=None, max_pending=1) as batcher:
        await batcher.add(0)
        await anyio.wait_all_tasks_blocked()
        await batcher.add(1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await batcher.add(2)
        assert batcher.stats.added == 2
        sink.open()
    assert flat(sink.batches) == [0, 1]


async def test_add_many_is_atomic_and_in_order() -> None:
    """Nothing of another adder comes in between; a cancelled add_many adds
    nothing; more items than max_pending go into an empty queue whole."""
    sink = Sink(gated=True)
    async with Batcher(sink, max_size=4, max_wait=None, max_pending=8) as batcher:
        await batcher.add("x")
        await anyio.wait_all_tasks_blocked()  # ["x"] in flight
        await batcher.add_many(list("abcdef"))  # 6 queued
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.add_many, [1, 2, 3, 4])  # needs 4: waits
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(batcher.add, "late")  # behind it, although 2 slots are free
            await anyio.wait_all_tasks_blocked()
            assert batcher.stats.added == 7
            with anyio.move_on_after(0.01):
                await batcher.add_many([97, 98, 99])
            sink.open()
        await batcher.flush()
        sink.gate = anyio.Event()
        await batcher.add("y")
        await anyio.wait_all_tasks_blocked()  # ["y"] in flight
        await batcher.add("z")
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.add_many, range(10, 20))  # more than max_pending
            await anyio.wait_all_tasks_blocked()
            assert batcher.stats.added == 14  # waits for an empty queue,
            tg.start_soon(batcher.add, 20)  # and later adders wait behind it
            await anyio.wait_all_tasks_blocked()
            assert batcher.stats.added == 14
            sink.open()
    assert flat(sink.batches) == ["x", *"abcdef", 1, 2, 3, 4, "late", "y", "z", *range(10, 21)]
    with pytest.raises(TypeError, match="items"):
        await Batcher(sink).add_many(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="items"):
        await Batcher(sink).add_many("abc")  # a str is one item, not an iterable of them


async def test_add_before_entry_and_after_exit_raises_pool_closed() -> None:
    batcher = Batcher(Sink())
    with pytest.raises(PoolClosed, match="not running"):
        await batcher.add(1)
    with pytest.raises(PoolClosed, match="not running"):
        batcher.add_nowait(1)
    async with batcher:
        await batcher.add(1)
    for call in (batcher.add(2), batcher.submit(2), batcher.add_many([2]), batcher.flush()):
        with pytest.raises(PoolClosed, match="exited"):
            await call
    assert batcher.stats.added == 1


async def test_adding_while_the_block_exits_raises_pool_closed() -> None:
    sink = Sink(gated=True)
    errors: list[BaseException] = []
    async with (
        anyio.create_task_group() as tg,
        Batcher(sink, max_size=1, max_wait=None, max_pending=1) as batcher,
    ):
        await batcher.add(0)
        await anyio.wait_all_tasks_blocked()
        await batcher.add(1)

        async def late() -> None:
            try:
                await batcher.add(2)  # waits for room, then the batcher closes
            except PoolClosed as error:
                errors.append(error)

        tg.start_soon(late)
        await anyio.wait_all_tasks_blocked()
        sink.open()
    assert len(errors) == 1
    assert flat(sink.batches) == [0, 1]


async def test_reentry_accumulates_stats_and_entering_twice_is_an_error() -> None:
    sink = Sink()
    batcher = Batcher(sink, max_size=10)
    async with batcher:
        await batcher.add(1)
        with pytest.raises(RuntimeError, match="already running"):
            await batcher.__aenter__()
    async with batcher:
        await batcher.add(2)
    assert sink.batches == [[1], [2]]
    assert batcher.stats.added == 2
    assert batcher.stats.flushes == 2


async def test_stats_is_a_frozen_snapshot_that_accounts_for_every_item() -> None:
    sink = Sink(gated=True)
    async with Batcher(sink, max_size=2, max_wait=None) as batcher:
        await batcher.add_many(range(5))
        await anyio.wait_all_tasks_blocked()
        stats = batcher.stats
        assert isinstance(stats, BatcherStats)
        assert (stats.added, stats.flushing, stats.queued) == (5, 2, 3)
        with pytest.raises(AttributeError):
            stats.added = 0  # type: ignore[misc]
        sink.open()
    assert batcher.stats.flushed == 5


# -------------------------------------------------------------------- submit


async def test_submit_returns_each_items_result() -> None:
    async def square_all(batch: list[int]) -> list[int]:
        await checkpoint()
        return [x * x for x in batch]

    results: dict[int, int] = {}
    async with Batcher(square_all, max_size=8, max_wait=None) as batcher:

        async def one(i: int) -> None:
            results[i] = await batcher.submit(i)

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
    assert results == {i: i * i for i in range(50)}
    assert batcher.stats.flushes < 50  # they were batched


async def test_submit_gets_none_when_flush_returns_none() -> None:
    sink = Sink()
    async with Batcher(sink, max_size=5, max_wait=None) as batcher:
        assert await batcher.submit("a") is None


@pytest.mark.parametrize("returned", [[1], [1, 2, 3, 4], 42])
async def test_flush_result_of_wrong_shape_is_a_value_error_for_every_caller(
    returned: Any,
) -> None:
    """The batch was flushed (it is not retried); each caller learns the mismatch."""
    sink = Sink(results=lambda batch: returned)
    errors: list[BaseException] = []
    async with Batcher(sink, max_size=3, max_wait=60) as batcher:
        errors = await submit_one_at_a_time(batcher, range(3), ValueError)
    assert len(errors) == 3
    assert "results" in str(errors[0]) or "sequence" in str(errors[0])
    assert sink.batches == [[0, 1, 2]]
    assert batcher.stats.flushed == 3


async def test_regression_one_cancelled_caller_does_not_strand_its_batch_mates() -> None:
    """A caller cancelled while its batch is in flight, and one cancelled while
    queued, leave their items in the batch; every other caller gets its result."""
    sink = Sink(gated=True, results=lambda batch: [f"r{x}" for x in batch])
    results: dict[int, str] = {}
    scopes: dict[int, anyio.CancelScope] = {}
    async with Batcher(sink, max_size=3, max_wait=None) as batcher:

        async def one(i: int) -> None:
            with anyio.CancelScope() as scopes[i]:
                results[i] = await batcher.submit(i)

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(one, i)
                await anyio.wait_all_tasks_blocked()
            assert sink.calls == [[0]]
            scopes[0].cancel()  # in flight
            scopes[4].cancel()  # queued
            await anyio.wait_all_tasks_blocked()
            sink.open()
    assert results == {1: "r1", 2: "r2", 3: "r3", 5: "r5"}
    assert sink.batches == [[0], [1, 2, 3], [4, 5]]


async def test_regression_forced_stop_wakes_every_waiting_caller() -> None:
    """Callers outside the batcher's scope get PoolClosed when it is cancelled;
    none hangs, and their items are in unflushed."""
    sink = Sink(gated=True)
    errors: dict[int, BaseException] = {}
    with anyio.fail_after(5):
        async with anyio.create_task_group() as callers:
            with anyio.CancelScope() as stop:
                async with Batcher(sink, max_size=2, max_wait=None) as batcher:

                    async def one(i: int) -> None:
                        try:
                            await batcher.submit(i)
                        except PoolClosed as error:
                            errors[i] = error

                    for i in range(5):
                        callers.start_soon(one, i)
                        await anyio.wait_all_tasks_blocked()
                    stop.cancel()
                    await checkpoint()
    assert sorted(errors) == [0, 1, 2, 3, 4]
    assert "unflushed" in str(errors[0])
    assert batcher.unflushed == [0, 1, 2, 3, 4]
    assert sink.cancelled == [[0]]


async def test_failed_flush_gives_submit_callers_the_error_and_requeues_add_items() -> None:
    sink = Sink(gated=True, fail=1)
    outcome: dict[str, Any] = {}
    async with Batcher(sink, max_size=4, max_wait=None, retry=QUICK) as batcher:
        await batcher.add("first")
        await anyio.wait_all_tasks_blocked()  # ["first"] in flight, will fail

        async def caller() -> None:
            try:
                outcome["result"] = await batcher.submit("asked")
            except SinkDown as error:
                outcome["error"] = error

        async with anyio.create_task_group() as tg:
            await batcher.add("a")
            tg.start_soon(caller)
            await anyio.wait_all_tasks_blocked()
            await batcher.add("b")
            sink.fail = 2  # the first flush and the next one fail
            sink.open()
    assert isinstance(outcome["error"], SinkDown)
    assert "result" not in outcome
    assert flat(sink.batches) == ["first", "a", "b"]
    stats = batcher.stats
    assert stats.flush_failures == 2
    assert stats.failed == 1
    assert stats.added == stats.flushed + stats.failed


async def test_submit_cancelled_just_after_its_failure_was_handed_over(
    backend_name: str,
) -> None:
    """asyncio task.cancel() landing after a failed flush handed the error to a
    submit caller but before it resumed: the caller never saw the error, so the
    item is not dropped: it is queued again in its place and flushed."""
    if backend_name != "asyncio":
        pytest.skip("native task cancellation is an asyncio notion")
    import asyncio

    failing = anyio.Event()
    calls: list[list[str]] = []

    async def sink(batch: list[str]) -> None:
        calls.append(list(batch))
        if len(calls) == 1:
            failing.set()  # wakes the canceller just before the caller
            raise SinkDown

    async with Batcher(sink, max_size=3, max_wait=60, retry=QUICK) as batcher:
        caller = asyncio.ensure_future(batcher.submit("asked"))

        async def canceller() -> None:
            await failing.wait()
            caller.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(canceller)
            await anyio.wait_all_tasks_blocked()
            await batcher.add_many(["a", "b"])  # full: flushes, fails
            with pytest.raises(asyncio.CancelledError):
                await caller
    assert calls == [["asked", "a", "b"], ["asked", "a", "b"]]
    assert batcher.stats.failed == 0
    assert batcher.stats.flushed == 3


# ------------------------------------------------------------------- dedupe


async def test_dedupe_drops_later_duplicates_within_a_batch_and_shares_results() -> None:
    async def lookup(batch: list[dict[str, Any]]) -> list[str]:
        return [f"user {row['id']}" for row in batch]

    calls: list[list[Any]] = []

    async def recording(batch: list[dict[str, Any]]) -> list[str]:
        calls.append([row["v"] for row in batch])
        return await lookup(batch)

    results: dict[int, str] = {}
    async with Batcher(
        recording, max_size=5, max_wait=60, dedupe_key=lambda row: row["id"]
    ) as batcher:
        rows = [{"id": i % 3, "v": i} for i in range(5)]

        async def one(row: dict[str, Any]) -> None:
            results[row["v"]] = await batcher.submit(row)

        async with anyio.create_task_group() as tg:
            for row in rows:
                tg.start_soon(one, row)
                await anyio.wait_all_tasks_blocked()
    # one full batch of five, three unique ids
    assert calls == [[0, 1, 2]]
    assert results == {0: "user 0", 1: "user 1", 2: "user 2", 3: "user 0", 4: "user 1"}
    stats = batcher.stats
    assert (stats.flushed, stats.deduped, stats.added) == (3, 2, 5)


async def test_dedupe_only_within_one_batch() -> None:
    sink = Sink()
    async with Batcher(sink, max_size=2, max_wait=60, dedupe_key=str) as batcher:
        await batcher.add_many(["a", "a", "a", "b"])
    assert sink.batches == [["a"], ["a", "b"]]
    assert batcher.stats.deduped == 1


async def test_dedupe_key_errors_surface_at_add() -> None:
    async with Batcher(Sink(), dedupe_key=lambda item: item["key"]) as batcher:
        with pytest.raises(KeyError):
            await batcher.add({})
        with pytest.raises(TypeError, match="hashable"):
            await batcher.add({"key": []})
        assert batcher.stats.added == 0


async def test_a_bad_dedupe_key_is_refused_before_a_full_queue() -> None:
    """add_nowait, like add, names the bad input rather than the full queue."""
    sink = Sink(gated=True)
    async with Batcher(sink, max_size=1, max_pending=1, dedupe_key=lambda item: item) as batcher:
        try:
            batcher.add_nowait(1)
            await anyio.wait_all_tasks_blocked()  # 1 is in flight, held by the gate
            batcher.add_nowait(2)  # the queue is full now
            with pytest.raises(QueueFull):
                batcher.add_nowait(3)
            with pytest.raises(TypeError, match="hashable"):
                batcher.add_nowait([3])
        finally:
            sink.open()  # so that a failure here does not hold the exit flush
    assert flat(sink.batches) == [1, 2]


# -------------------------------------------------------------------- flush()


async def test_manual_flush_sends_what_is_queued_now_and_waits_for_it() -> None:
    sink = Sink()
    async with Batcher(sink, max_size=3, max_wait=3600) as batcher:
        await batcher.add_many(range(7))
        await anyio.wait_all_tasks_blocked()
        assert sink.batches == [[0, 1, 2], [3, 4, 5]]
        await batcher.flush()
        assert sink.batches == [[0, 1, 2], [3, 4, 5], [6]]
        await batcher.flush()  # nothing queued: returns at once
        await batcher.add(7)
        await anyio.wait_all_tasks_blocked()
        assert flat(sink.batches) == list(range(7))  # 7 is not due
    assert flat(sink.batches) == list(range(8))


async def test_manual_flush_waits_for_batches_already_in_flight() -> None:
    sink = Sink(gated=True)
    async with Batcher(sink, max_size=2, max_wait=None) as batcher:
        await batcher.add_many([1, 2])
        await anyio.wait_all_tasks_blocked()
        await waits_until_open(sink, batcher.flush)
        assert sink.batches == [[1, 2]]


async def test_regression_manual_flush_racing_a_failing_flush_keeps_the_order() -> None:
    """A manual flush while a background flush is failing must not send newer
    items ahead of the failed batch: the failed batch goes back to the front."""
    sink = Sink(gated=True, fail=1)
    errors: list[BaseException] = []
    async with Batcher(sink, max_size=3, max_wait=3600, retry=QUICK) as batcher:
        await batcher.add_many([0, 1, 2])  # full: flushing, will fail
        await anyio.wait_all_tasks_blocked()
        await batcher.add_many([3, 4])

        async def manual() -> None:
            try:
                await batcher.flush()
            except SinkDown as error:
                errors.append(error)

        async with anyio.create_task_group() as tg:
            tg.start_soon(manual)
            await anyio.wait_all_tasks_blocked()
            sink.open()
    assert len(errors) == 1  # flush() reports that its items' flush failed
    assert sink.batches == [[0, 1, 2], [3, 4]]
    assert sink.calls[0] == [0, 1, 2]


# ------------------------------------------------------------------ failures


async def test_regression_a_failing_flush_does_not_kill_the_batcher() -> None:
    """The flush loop survives errors: items added after a failure are flushed."""
    sink = Sink(fail=3)
    async with Batcher(sink, max_size=2, max_wait=None, retry=QUICK) as batcher:
        for i in range(6):
            await batcher.add(i)
            await anyio.wait_all_tasks_blocked()  # its flush ran (and maybe failed)
    assert flat(sink.batches) == list(range(6))
    assert batcher.stats.flush_failures == 3
    assert batcher.stats.flushed == 6


async def test_retry_retries_a_flush_within_one_attempt_of_the_batch() -> None:
    """retry= runs per batch: a flush that fails once and then succeeds is not a
    flush failure and the batch is not requeued."""
    sink = Sink(fail=1)
    async with Batcher(
        sink, max_size=3, max_wait=None, retry=Retry(attempts=2, wait_initial=0)
    ) as batcher:
        await batcher.add_many(list("abc"))
    assert sink.calls == [list("abc"), list("abc")]
    assert batcher.stats.flush_failures == 0


async def test_timeout_cuts_off_a_hanging_flush_which_counts_as_failed() -> None:
    calls: list[list[int]] = []

    async def hangs_once(batch: list[int]) -> None:
        calls.append(batch)
        if len(calls) == 1:
            await anyio.sleep_forever()

    with anyio.fail_after(5):
        async with Batcher(
            hangs_once, max_size=5, max_wait=None, timeout=0.01, retry=QUICK
        ) as batcher:
            await batcher.add_many([1, 2])
            await anyio.wait_all_tasks_blocked()  # in flight before the block ends
    assert calls == [[1, 2], [1, 2]]
    assert batcher.stats.flush_failures == 1


async def test_middleware_and_rate_limit_see_each_batch() -> None:
    seen: list[list[int]] = []

    class Spy:
        async def __call__(self, batch: list[int], call_next: Any) -> Any:
            seen.append(list(batch))
            return await call_next(batch)

    limiter = SlidingWindow(100)
    async with Batcher(
        Sink(), max_size=2, max_wait=60, middleware=[Spy()], rate_limit=limiter
    ) as batcher:
        await batcher.add_many(range(5))
    assert seen == [[0, 1], [2, 3], [4]]


async def test_sync_flush_runs_in_a_worker_thread() -> None:
    threads: list[int] = []

    def save(batch: list[int]) -> list[int]:
        threads.append(threading.get_ident())
        return [x + 1 for x in batch]

    async with Batcher(save, max_size=2, max_wait=None) as batcher:
        assert await batcher.submit(41) == 42
    assert threads
    assert threading.get_ident() not in threads


class Interrupt(BaseException):
    """Stands in for KeyboardInterrupt / SystemExit raised inside flush."""


async def test_base_exception_from_flush_stops_the_batcher_and_is_reraised() -> None:
    async def broken(batch: list[int]) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):
        async with Batcher(broken, max_size=2, max_wait=None) as batcher:
            await batcher.add_many([1, 2, 3])
            await anyio.sleep_forever()
    assert batcher.unflushed == [1, 2, 3]


async def test_a_retry_policy_without_waits_still_never_makes_a_hot_loop() -> None:
    """Retry(wait_max=0) would retry a failed flush at once, forever: the batcher
    falls back to its own backoff, and the enclosing scope can still stop it."""
    calls = 0

    async def down(batch: list[int]) -> None:
        nonlocal calls
        calls += 1
        raise SinkDown  # without awaiting: a hot loop would never yield

    with anyio.fail_after(5), anyio.move_on_after(0.3):
        async with Batcher(
            down, max_size=2, max_wait=None, retry=Retry(1, wait_initial=0.1, wait_max=0)
        ) as batcher:
            await batcher.add(1)
            await anyio.sleep_forever()
    assert 1 <= calls <= 8
    assert batcher.unflushed == [1]


async def test_max_pending_holds_with_several_waiting_adders() -> None:
    """When a flush frees room, waiting adders are let in one after another, and
    the queue never holds more than max_pending."""
    gates: list[anyio.Event] = []
    batches: list[list[int]] = []

    async def sink(batch: list[int]) -> None:
        gates.append(anyio.Event())
        await gates[-1].wait()  # each flush waits until the test lets it finish
        batches.append(batch)

    peak = 0
    async with Batcher(sink, max_size=4, max_wait=None, max_pending=4) as batcher:
        await batcher.add(0)
        await anyio.wait_all_tasks_blocked()  # [0] in flight
        await batcher.add_many([1, 2, 3])

        async def adder(k: int) -> None:
            nonlocal peak
            await batcher.add_many([10 * k + j for j in range(3)])
            peak = max(peak, batcher.stats.queued)

        async with anyio.create_task_group() as tg:
            for k in range(1, 4):
                tg.start_soon(adder, k)
                await anyio.wait_all_tasks_blocked()
            while len(batches) < 5:
                gates[-1].set()  # one flush finishes; the next takes up to 4 items
                await anyio.wait_all_tasks_blocked()
                assert batcher.stats.queued <= 4
                peak = max(peak, batcher.stats.queued)
    assert peak <= 4
    assert flat(batches) == [0, 1, 2, 3, 10, 11, 12, 20, 21, 22, 30, 31, 32]
    assert max(len(batch) for batch in batches) <= 4


async def test_flush_result_that_is_not_indexable_is_a_value_error_per_caller() -> None:
    """A set of the right length cannot give each caller its own result: every
    caller gets a ValueError and the batcher keeps running."""

    async def as_set(batch: list[int]) -> set[int]:
        return {x * 10 for x in batch}

    errors: list[BaseException] = []
    async with Batcher(as_set, max_size=2, max_wait=60) as batcher:
        errors = await submit_one_at_a_time(batcher, range(4), ValueError)
    assert len(errors) == 4
    assert "set" in str(errors[0])
    assert batcher.stats.flushes == 2


async def test_flush_result_whose_len_fails_is_a_value_error_per_caller() -> None:
    class Scalar:  # like a 0-d array: indexable type, but len() raises
        def __len__(self) -> int:
            raise TypeError("len() of unsized object")

        def __getitem__(self, index: int) -> int:
            raise IndexError(index)

    async def scalar(batch: list[int]) -> Scalar:
        return Scalar()

    with anyio.fail_after(5):
        async with Batcher(scalar, max_size=2, max_wait=None) as batcher:
            with pytest.raises(ValueError, match="length"):
                await batcher.submit(1)
            await batcher.add(2)  # the batcher still runs
    assert batcher.stats.flushed == 2


async def test_add_many_never_waits_for_a_batch_that_is_not_due() -> None:
    """An add_many that does not fit next to a partial batch makes the queue due
    instead of waiting for max_wait (here: forever); adders behind it follow."""
    sink = Sink()
    with anyio.fail_after(5):
        async with Batcher(sink, max_size=10, max_wait=math.inf, max_pending=10) as batcher:
            await batcher.add_many(range(5))
            await batcher.add_many(range(5, 13))
            await batcher.add(13)
            await anyio.wait_all_tasks_blocked()
            assert sink.batches == [[0, 1, 2, 3, 4]]  # the rest is not due yet
    assert flat(sink.batches) == list(range(14))


async def test_base_exception_from_the_exit_flush_wins_over_the_block_exception() -> None:
    async def broken(batch: list[int]) -> None:
        raise Interrupt

    with pytest.raises(Interrupt) as caught:
        async with Batcher(broken, max_size=10, max_wait=60) as batcher:
            await batcher.add(1)
            raise KeyError("body")
    assert isinstance(caught.value.__context__, KeyError)
    assert batcher.unflushed == [1]


async def test_item_taken_back_during_exit_is_still_flushed(backend_name: str) -> None:
    """A submit caller cancelled (natively) after its batch's failure was handed
    to it, while the block exits: the item comes back and the exit flushes it."""
    if backend_name != "asyncio":
        pytest.skip("native task cancellation is an asyncio notion")
    import asyncio

    gate = anyio.Event()
    batches: list[list[str]] = []
    caller: asyncio.Future[Any] | None = None

    async def sink(batch: list[str]) -> None:
        if not batches:
            batches.append([])
            await gate.wait()
            assert caller is not None
            asyncio.get_running_loop().call_soon(caller.cancel)  # before it resumes
            raise SinkDown
        batches.append(list(batch))

    async with Batcher(sink, max_size=3, max_wait=60, retry=QUICK) as batcher:
        caller = asyncio.ensure_future(batcher.submit("asked"))
        await anyio.wait_all_tasks_blocked()
        flushing = asyncio.ensure_future(batcher.flush())
        await anyio.wait_all_tasks_blocked()
        gate.set()  # the flush fails while the block exits
    assert batches == [[], ["asked"]]
    assert batcher.unflushed == []
    with pytest.raises(asyncio.CancelledError):
        await caller
    with pytest.raises(SinkDown):
        await flushing


# ------------------------------------------------------------ exit & cancellation


async def test_block_exception_flushes_everything_then_is_reraised_unwrapped() -> None:
    sink = Sink()
    error = KeyError("boom")
    with pytest.raises(KeyError) as caught:
        async with Batcher(sink, max_size=3, max_wait=3600) as batcher:
            await batcher.add_many(range(5))
            raise error
    assert caught.value is error
    assert flat(sink.batches) == list(range(5))
    assert batcher.unflushed == []


async def test_final_flush_failure_raises_flush_error_with_every_unflushed_item() -> None:
    sink = Sink(gated=True, fail=100)
    with pytest.raises(FlushError) as caught:
        async with Batcher(sink, max_size=2, max_wait=3600, retry=QUICK) as batcher:
            await batcher.add_many(range(5))
            await anyio.wait_all_tasks_blocked()  # [0, 1] in flight
            sink.open()
    assert list(caught.value.items) == [0, 1, 2, 3, 4]
    assert batcher.unflushed == [0, 1, 2, 3, 4]
    assert isinstance(caught.value.__cause__, SinkDown)
    assert sink.calls == [[0, 1], [0, 1]]  # failed before the exit; failed again after it
    assert batcher.stats.unflushed == 5


async def test_final_flush_failure_after_a_block_exception_keeps_it_as_context() -> None:
    sink = Sink(fail=100)
    with pytest.raises(FlushError) as caught:
        async with Batcher(sink, max_size=2, max_wait=3600, retry=QUICK) as batcher:
            await batcher.add(1)
            raise KeyError("body")
    assert isinstance(caught.value.__context__, KeyError)
    assert list(caught.value.items) == [1]


async def test_regression_cancellation_loses_no_batch_in_flight() -> None:
    """Cancelled while a batch is being flushed: that batch and the queued items
    are all in unflushed, in the order they were added; nothing is flushed."""
    sink = Sink(gated=True)
    with anyio.CancelScope() as scope:
        async with Batcher(sink, max_size=3, max_wait=None) as batcher:
            await batcher.add_many(range(3))
            await anyio.wait_all_tasks_blocked()
            await batcher.add_many(range(3, 8))
            scope.cancel()
            await checkpoint()
    assert sink.cancelled == [[0, 1, 2]]
    assert sink.batches == []
    assert batcher.unflushed == list(range(8))
    stats = batcher.stats
    assert (stats.unflushed, stats.queued, stats.flushing) == (8, 0, 0)


async def test_regression_a_flush_loop_cannot_swallow_cancellation() -> None:
    """A flush that never returns (async, or plain in a thread) does not stop the
    enclosing scope from ending the batcher."""
    release = threading.Event()

    def stuck_in_thread(batch: list[int]) -> None:
        release.wait(10)

    async def stuck(batch: list[int]) -> None:
        await anyio.sleep_forever()

    try:
        for flush in (stuck, stuck_in_thread):
            with anyio.fail_after(5):
                with anyio.move_on_after(0.05):
                    async with Batcher(flush, max_size=1, max_wait=None) as batcher:
                        await batcher.add(1)
                        await batcher.add(2)
            assert batcher.unflushed == [1, 2]
    finally:
        release.set()


async def test_regression_idle_batcher_uses_no_cpu() -> None:
    """Idle for a second with nothing queued, with and without max_wait, and with
    an item waiting out a long max_wait: the process uses (almost) no CPU."""
    async with (
        Batcher(Sink(), max_wait=1.0) as timed,
        Batcher(Sink(), max_wait=None) as natural,
        Batcher(Sink(), max_wait=3600, concurrency=4) as waiting,
    ):
        await waiting.add("waits")
        start = time.process_time()
        await anyio.sleep(1.0)
        used = time.process_time() - start
        del timed, natural
        await waiting.flush()
    assert used < 0.05, f"{used:.3f} s of CPU in an idle second"


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_size": 0}, ValueError, "max_size"),
        ({"max_size": 1.5}, TypeError, "max_size"),
        ({"max_wait": -1}, ValueError, "max_wait"),
        ({"max_wait": "1"}, TypeError, "max_wait"),
        ({"concurrency": 0}, ValueError, "concurrency"),
        ({"max_size": 10, "max_pending": 5}, ValueError, "max_pending"),
        ({"max_pending": 0}, ValueError, "max_pending"),
        ({"dedupe_key": 5}, TypeError, "dedupe_key"),
        ({"retry": 3}, TypeError, "retry"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"name": 5}, TypeError, "name"),
    ],
)
def test_bad_arguments_are_rejected_naming_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Batcher(Sink(), **kwargs)


def test_flush_must_be_a_function() -> None:
    async def save(batch: list[int]) -> None:
        pass

    with pytest.raises(TypeError, match="flush"):
        Batcher(5)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="coroutine object"):
        Batcher(save([1]))  # type: ignore[call-overload]

    async def async_key(item: int) -> int:
        return item

    with pytest.raises(TypeError, match="dedupe_key"):
        Batcher(save, dedupe_key=async_key)  # type: ignore[arg-type]


def test_repr_names_the_batcher() -> None:
    assert "'events'" in repr(Batcher(Sink(), name="events"))


async def test_outer_cancellation_racing_a_stop_wins(caplog: pytest.LogCaptureFixture) -> None:
    """on_stats raises in the same step as an outer scope is cancelled: the
    cancellation propagates (the scope catches it) instead of the callback's
    error, which is logged at ERROR rather than lost."""

    async def save(batch: list[int]) -> None:
        await checkpoint()

    with anyio.CancelScope() as outer:

        def on_stats(stats: BatcherStats) -> None:
            outer.cancel()
            raise LookupError("on_stats broke")

        async with Batcher(save, on_stats=on_stats, stats_interval=0.001) as batcher:
            await batcher.add(1)
            await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert batcher.unflushed == [1]
    assert any("on_stats broke" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def _flusher_tasks() -> int:
    return sum(1 for t in anyio.get_running_tasks() if (t.name or "").startswith("corral flusher"))


async def test_flushers_start_on_demand_so_a_huge_concurrency_costs_nothing() -> None:
    """concurrency=10**100 is accepted and entering is instant; flushers start as
    batches are flushed, one spare ahead (3 batches stuck in flight: 4 flushers),
    and concurrent flushes still happen."""
    release = anyio.Event()
    flushing = 0
    peak = 0

    async def save(batch: list[int]) -> None:
        nonlocal flushing, peak
        flushing += 1
        peak = max(peak, flushing)
        await release.wait()
        flushing -= 1

    with anyio.fail_after(5):
        async with Batcher(save, max_size=2, concurrency=10**100) as batcher:
            assert _flusher_tasks() == 1
            for i in range(6):
                await batcher.add(i)
            await anyio.wait_all_tasks_blocked()
            assert peak == 3
            assert _flusher_tasks() == 4
            release.set()
    assert batcher.stats.flushed == 6


async def test_max_consecutive_failures_gives_up_with_flush_error() -> None:
    """A flush that can never succeed, with max_consecutive_failures=3: after
    the third failed flush in a row the block is cancelled and raises
    FlushError holding every item, instead of retrying forever (a silent hang
    for a producer waiting on a full queue)."""

    def broken(batch: list[int]) -> None:
        raise SinkDown("the database is gone")

    with anyio.fail_after(10):
        with pytest.raises(FlushError, match="3 consecutive flushes failed") as raised:
            async with Batcher(
                broken, max_size=2, max_pending=4, retry=QUICK, max_consecutive_failures=3
            ) as batcher:
                for i in range(10):
                    await batcher.add(i)  # blocks on the full queue, until the end
    assert isinstance(raised.value.__cause__, SinkDown)
    assert raised.value.items == batcher.unflushed == list(range(batcher.stats.added))
    assert batcher.stats.added >= 4
    assert batcher.stats.flush_failures == 3


async def test_max_consecutive_failures_counts_only_failures_in_a_row() -> None:
    """A success resets the count: failures that alternate with successes never
    reach max_consecutive_failures=2, and everything is flushed."""
    calls = 0

    def flaky(batch: list[int]) -> None:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise SinkDown(calls)

    async with Batcher(flaky, max_size=1, retry=QUICK, max_consecutive_failures=2) as batcher:
        for i in range(4):
            await batcher.add(i)
        while batcher.stats.flushed < 4:
            with contextlib.suppress(SinkDown):
                await batcher.flush()
    assert batcher.stats.flush_failures == 4


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_max_consecutive_failures_is_checked(value: Any, error: type[Exception]) -> None:
    """A bad max_consecutive_failures is refused at construction, naming it."""
    with pytest.raises(error, match="max_consecutive_failures"):
        Batcher(print, max_consecutive_failures=value)


async def test_flushes_failing_together_count_once_toward_giving_up() -> None:
    """concurrency=3: three flushes that fail at the same moment are one failure
    in a row, not three: the batcher backs off and tries again before giving up
    at max_consecutive_failures=3."""
    all_in = anyio.Event()
    running = 0

    async def broken(batch: list[int]) -> None:
        nonlocal running
        running += 1
        if running >= 3:
            all_in.set()
        await all_in.wait()
        raise SinkDown(batch)

    with pytest.raises(FlushError, match="3 consecutive flushes failed"):
        async with Batcher(
            broken,
            max_size=1,
            max_wait=None,
            concurrency=3,
            retry=QUICK,
            max_consecutive_failures=3,
        ) as batcher:
            for i in range(3):
                await batcher.add(i)
            await anyio.sleep_forever()
    assert batcher.stats.flush_failures > 3


class TestLastFlushAge:
    """``last_flush_time`` on the event loop's clock and ``last_flush_age``,
    exact on trio's MockClock, in real time with a tolerance elsewhere."""

    @pytest.fixture
    def anyio_backend(self, timing_anyio_backend: Any) -> Any:
        return timing_anyio_backend

    async def test_the_age_is_the_time_since_the_last_flush_ended(self, exact: bool) -> None:
        """A flush that takes a unit of time ends at ``last_flush_time``, read
        on anyio.current_time()'s clock; a snapshot taken two units later has
        ``last_flush_age`` 2 units; a later one has more, and compares equal
        (the age is not compared)."""
        unit = 1.0 if exact else 0.05
        slack = 0.05  # how late a real-time sleep may end
        early = 0.0 if exact else 0.002  # how early (uvloop's clock counts milliseconds)

        async def save(batch: list[int]) -> None:
            await anyio.sleep(unit)

        async with Batcher(save, max_size=10, max_wait=None) as batcher:
            assert (batcher.stats.last_flush_time, batcher.stats.last_flush_age) == (None, None)
            start = anyio.current_time()
            await batcher.add(1)
            await batcher.flush()
            ended = anyio.current_time()
            await anyio.sleep(2 * unit)
            stats = batcher.stats
            taken = anyio.current_time()
        assert stats.last_flush_time is not None
        assert stats.last_flush_age is not None
        assert start + unit - early <= stats.last_flush_time <= ended
        assert stats.last_flush_age <= taken - stats.last_flush_time  # the same clock
        if exact:
            assert (stats.last_flush_time, stats.last_flush_age) == (start + unit, 2 * unit)
        else:
            late = ended - stats.last_flush_time + slack
            assert 2 * unit - early <= stats.last_flush_age <= 2 * unit + late
        await anyio.sleep(unit)
        later = batcher.stats  # after the block, in the event loop still
        assert later.last_flush_age is not None
        assert later.last_flush_age >= stats.last_flush_age + unit - early - 1e-9
        assert later == stats

    def test_the_age_is_none_outside_an_event_loop(self, anyio_backend: Any) -> None:
        """A snapshot taken outside an event loop (after anyio.run returned)
        has ``last_flush_time`` but no age, on every backend (trio's clock
        cannot be read there)."""

        async def main() -> Batcher[int, None]:
            async def save(batch: list[int]) -> None:
                await checkpoint()

            async with Batcher(save) as batcher:
                await batcher.add(1)
            assert batcher.stats.last_flush_age is not None
            return batcher

        name, options = anyio_backend
        stats = anyio.run(main, backend=name, backend_options=options).stats
        assert stats.last_flush_time is not None
        assert stats.last_flush_age is None


def test_the_age_is_none_in_another_event_loop() -> None:
    """A snapshot taken in a later ``anyio.run`` than the last flush's has no
    age: each trio run has a clock of its own, so it would be meaningless."""
    batcher: Batcher[int, None] = Batcher(lambda batch: checkpoint(), max_wait=None)

    async def flush_one() -> None:
        async with batcher:
            await batcher.add(1)

    async def age() -> float | None:
        return batcher.stats.last_flush_age

    for backend in ("asyncio", "trio"):
        anyio.run(flush_one, backend=backend)
        assert batcher.stats.last_flush_time is not None
        assert anyio.run(age, backend=backend) is None
