"""Scheduling a pool: priority, per-key order and caps, resize, pause, cancel a job."""

from __future__ import annotations

import logging
import math
import threading
from collections import defaultdict
from typing import Any

import anyio
import pytest

from corral import (
    JobCancelled,
    Outcome,
    Pool,
    PoolClosed,
    QueueFull,
    Retry,
    apply_to_all,
    apply_to_each,
)

pytestmark = pytest.mark.anyio


class Gates:
    """A handler whose calls block until the test releases their item (or all)."""

    def __init__(self) -> None:
        self.started: list[Any] = []
        self.finished: list[Any] = []
        self.cancelled: list[Any] = []
        self.released: set[Any] = set()
        self.everything = False
        self.changed = anyio.Event()
        self.running = 0
        self.most = 0

    async def __call__(self, item: Any) -> Any:
        self.started.append(item)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            while not (self.everything or item in self.released):
                await self.changed.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(item)
            raise
        finally:
            self.running -= 1
        self.finished.append(item)
        return item

    def release(self, item: Any) -> None:
        self.released.add(item)
        self.changed.set()
        self.changed = anyio.Event()

    def release_all(self) -> None:
        self.everything = True
        self.release(None)


async def record_order(item: Any) -> Any:
    await anyio.lowlevel.checkpoint()
    return item


# ---------------------------------------------------------------- priority


async def test_lowest_priority_starts_first_and_ties_keep_submission_order() -> None:
    started: list[str] = []

    async def handler(item: str) -> None:
        started.append(item)
        await anyio.lowlevel.checkpoint()

    pool: Pool[str, None] = Pool(handler, workers=1)
    pool.pause()  # everything queues first, then the order is the queue's
    async with pool:
        for name, priority in [("a", 5), ("b", 1), ("c", 5), ("d", -2.5), ("e", 1), ("f", 0)]:
            await pool.submit(name, priority=priority)
        pool.submit_nowait("g", priority=-math.inf)
        pool.submit_nowait("h")
        pool.resume()
    assert started == ["g", "d", "f", "h", "b", "e", "a", "c"]


async def test_a_priority_jumps_items_already_queued_in_submission_order() -> None:
    gates = Gates()
    async with Pool(gates, workers=1) as pool:
        await pool.submit("running")
        await anyio.wait_all_tasks_blocked()
        for name in ["q1", "q2", "q3"]:
            await pool.submit(name)  # FIFO so far
        await pool.submit("urgent", priority=-1)
        await pool.submit("late", priority=1)
        gates.release_all()
    assert gates.started == ["running", "urgent", "q1", "q2", "q3", "late"]


@pytest.mark.parametrize("bad", ["1", None, True, [1], 1j])
async def test_priority_must_be_a_real_number(bad: Any) -> None:
    async with Pool(record_order) as pool:
        with pytest.raises(TypeError, match="priority"):
            await pool.submit(1, priority=bad)
        with pytest.raises(TypeError, match="priority"):
            pool.submit_nowait(1, priority=bad)
        assert pool.stats.submitted == 0


async def test_priority_nan_is_refused() -> None:
    async with Pool(record_order) as pool:
        with pytest.raises(ValueError, match="priority"):
            await pool.submit(1, priority=math.nan)
        with pytest.raises(ValueError, match="priority"):
            pool.submit_nowait(1, priority=float("nan"))
        assert pool.stats.submitted == 0


# ---------------------------------------------------------------- per-key


async def test_equal_keys_run_one_at_a_time_in_submission_order() -> None:
    gates = Gates()
    async with Pool(gates, workers=4, key=lambda item: item[0]) as pool:
        jobs = [await pool.submit(item) for item in ["a1", "a2", "a3", "b1", "b2"]]
        await anyio.wait_all_tasks_blocked()
        # no head-of-line blocking: b1 runs although a2 and a3 wait
        assert gates.started == ["a1", "b1"]
        assert pool.stats.waiting_for_key == 3
        assert pool.stats.busy_keys == 2
        assert pool.stats.running == 2
        for item in ["b1", "a1", "a2", "b2", "a3"]:
            gates.release(item)
            await anyio.wait_all_tasks_blocked()
    assert [job.outcome.result for job in jobs if job.outcome] == ["a1", "a2", "a3", "b1", "b2"]
    assert gates.started == ["a1", "b1", "b2", "a2", "a3"]
    assert pool.stats.waiting_for_key == 0
    assert pool.stats.busy_keys == 0


async def test_per_key_caps_how_many_of_a_key_run_at_once() -> None:
    running: dict[int, int] = defaultdict(int)
    most: dict[int, int] = defaultdict(int)

    async def handler(item: int) -> int:
        key = item % 3
        running[key] += 1
        most[key] = max(most[key], running[key])
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        running[key] -= 1
        return item

    outcomes = await apply_to_all(handler, range(300), workers=20, key=lambda i: i % 3, per_key=2)
    assert [o.result for o in outcomes] == list(range(300))
    assert dict(most) == {0: 2, 1: 2, 2: 2}


async def test_keyed_items_start_in_submission_order_per_key_with_many_keys() -> None:
    started: list[int] = []

    async def handler(item: int) -> None:
        started.append(item)
        for _ in range(item % 4):
            await anyio.lowlevel.checkpoint()

    async with apply_to_each(
        handler, range(500), workers=8, key=lambda i: i % 7, ordered=True
    ) as outcomes:
        assert [o.index async for o in outcomes] == list(range(500))
    for key in range(7):
        mine = [item for item in started if item % 7 == key]
        assert mine == sorted(mine)
    assert sorted(started) == list(range(500))


async def test_items_waiting_for_a_key_hold_their_room() -> None:
    gates = Gates()
    async with Pool(gates, workers=4, max_pending=2, key=lambda item: "same") as pool:
        pool.submit_nowait(1)
        await anyio.wait_all_tasks_blocked()  # 1 runs, its room is free again
        pool.submit_nowait(2)
        pool.submit_nowait(3)
        with pytest.raises(QueueFull):
            pool.submit_nowait(4)
        assert pool.stats.queued == 2
        assert pool.stats.waiting_for_key == 2
        gates.release_all()


async def test_a_key_function_that_raises_fails_only_that_item() -> None:
    def key(item: int) -> int:
        if item == 2:
            raise KeyError("no key for 2")
        return item % 2

    seen: list[Outcome[int, int]] = []
    async with Pool(record_order, key=key, on_outcome=seen.append) as pool:
        jobs = [await pool.submit(i) for i in range(4)]
    assert [job.outcome.ok for job in jobs if job.outcome] == [True, True, False, True]
    failed = jobs[2].outcome
    assert failed is not None
    assert isinstance(failed.error, KeyError)
    assert failed.attempts == 0
    assert len(seen) == 4
    assert pool.stats.failed == 1


async def test_an_unhashable_key_fails_that_item() -> None:
    outcomes = await apply_to_all(record_order, [1, 2], key=lambda item: [item])
    assert all(isinstance(o.error, TypeError) for o in outcomes)


async def test_a_retried_item_keeps_its_key_through_the_backoff() -> None:
    calls: list[tuple[str, int]] = []
    failed_once: set[str] = set()

    async def flaky(item: str) -> str:
        calls.append((item, len(calls)))
        await anyio.lowlevel.checkpoint()
        if item == "a1" and item not in failed_once:
            failed_once.add(item)
            raise ConnectionError("try again")
        return item

    retry = Retry(attempts=3, on=ConnectionError, wait_initial=0.01)
    async with Pool(flaky, workers=4, key=lambda item: item[0], retry=retry) as pool:
        for item in ["a1", "a2", "b1"]:
            await pool.submit(item)
    order = [item for item, _ in calls]
    assert order.count("a1") == 2
    # a2 starts only after a1's second attempt, although a worker was free
    assert order.index("a2") > len(order) - 1 - order[::-1].index("a1")


async def test_key_and_per_key_are_checked() -> None:
    with pytest.raises(TypeError, match="key"):
        Pool(record_order, key="name")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_key"):
        Pool(record_order, key=str, per_key=0)
    with pytest.raises(ValueError, match="per_key"):
        Pool(record_order, per_key=2)
    with pytest.raises(TypeError, match="per_key"):
        await apply_to_all(record_order, [1], key=str, per_key=1.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------- resize


async def test_resize_up_starts_workers_at_once_and_down_lets_running_items_finish() -> None:
    gates = Gates()
    async with Pool(gates, workers=1) as pool:
        for i in range(8):
            await pool.submit(i)
        await anyio.wait_all_tasks_blocked()
        assert pool.stats.running == 1
        pool.resize(5)
        await anyio.wait_all_tasks_blocked()
        assert pool.workers == 5
        assert pool.stats.workers == 5
        assert pool.stats.running == 5
        pool.resize(2)
        await anyio.wait_all_tasks_blocked()
        assert pool.stats.running == 5  # nothing is interrupted
        for i in range(5):
            gates.release(i)
        await anyio.wait_all_tasks_blocked()
        assert sorted(gates.finished) == [0, 1, 2, 3, 4]
        assert pool.stats.running == 2  # the surplus workers stopped
        assert gates.started == [0, 1, 2, 3, 4, 5, 6]
        gates.release_all()
    assert gates.cancelled == []
    assert gates.most == 5


async def test_resize_applies_to_a_plain_handlers_threads() -> None:
    inside = threading.Semaphore(0)
    out = threading.Event()

    def blocking(item: int) -> int:
        inside.release()
        out.wait(5)
        return item

    def six_inside() -> bool:
        return all(inside.acquire(timeout=5) for _ in range(6))

    async with Pool(blocking, workers=1) as pool:
        for i in range(6):
            await pool.submit(i)
        pool.resize(6)
        all_six = await anyio.to_thread.run_sync(six_inside)
        out.set()
    assert all_six  # six threads at once, beyond the bound of workers=1 (2 threads)


async def test_resize_is_checked() -> None:
    pool = Pool(record_order)
    with pytest.raises(ValueError, match="n"):
        pool.resize(0)
    with pytest.raises(TypeError, match="n"):
        pool.resize(2.0)  # type: ignore[arg-type]
    pool.resize(3)  # before entry: the next entry's bound
    assert pool.workers == 3
    assert "workers=3" in repr(pool)


# ---------------------------------------------------------------- pause


async def test_pause_lets_running_items_finish_and_starts_nothing_until_resume() -> None:
    gates = Gates()
    async with Pool(gates, workers=2) as pool:
        await pool.submit(0)
        await pool.submit(1)
        await anyio.wait_all_tasks_blocked()
        pool.pause()
        assert pool.paused
        assert pool.stats.paused
        await pool.submit(2)
        pool.submit_nowait(3)
        gates.release(0)
        gates.release(1)
        await anyio.wait_all_tasks_blocked()
        assert sorted(gates.finished) == [0, 1]
        assert gates.started == [0, 1]
        assert pool.stats.queued == 2
        assert pool.stats.running == 0
        pool.resume()
        assert not pool.paused
        await anyio.wait_all_tasks_blocked()
        assert gates.started == [0, 1, 2, 3]
        gates.release_all()
    assert pool.unfinished == []


async def test_submits_wait_for_room_while_paused() -> None:
    async with Pool(record_order, workers=1, max_pending=2) as pool:
        pool.pause()
        pool.submit_nowait(1)
        pool.submit_nowait(2)
        with pytest.raises(QueueFull):
            pool.submit_nowait(3)
        with anyio.move_on_after(1) as waited:
            await pool.submit(3)
        assert waited.cancelled_caught
        pool.resume()
        job = await pool.submit(3)
    assert job.outcome is not None
    assert job.outcome.result == 3


async def test_leaving_the_block_while_paused_leaves_queued_items_unfinished(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gates = Gates()
    caplog.set_level(logging.WARNING)
    async with Pool(gates, workers=1, name="paused") as pool:
        running = await pool.submit("running")
        await anyio.wait_all_tasks_blocked()
        pool.pause()
        queued = [await pool.submit(i) for i in range(3)]

        async def finish_later() -> None:
            await anyio.wait_all_tasks_blocked()
            gates.release("running")

        async with anyio.create_task_group() as tg:
            tg.start_soon(finish_later)
    assert running.outcome is not None
    assert running.outcome.result == "running"
    assert pool.unfinished == [0, 1, 2]
    assert pool.stats.unfinished == 3
    for job in queued:
        with pytest.raises(PoolClosed):
            await job.wait()
    assert any("exits while paused" in r.getMessage() for r in caplog.records)


async def test_resume_during_the_exit_runs_the_queued_items() -> None:
    async with Pool(record_order, workers=1) as pool:
        pool.pause()
        jobs = [await pool.submit(i) for i in range(3)]

        async def resume_soon() -> None:
            await anyio.wait_all_tasks_blocked()
            pool.resume()

        pool._run.start_soon(resume_soon, name="resume")  # runs while the exit waits
        pool.resume()
    assert [job.outcome.result for job in jobs if job.outcome] == [0, 1, 2]


async def test_a_pool_paused_before_entry_starts_paused() -> None:
    started: list[int] = []

    async def handler(item: int) -> None:
        started.append(item)

    pool: Pool[int, None] = Pool(handler)
    pool.pause()
    async with pool:
        await pool.submit(1)
        await anyio.wait_all_tasks_blocked()
        assert started == []
        pool.resume()
    assert started == [1]


# ---------------------------------------------------------------- cancel a job


async def test_cancelling_a_queued_job_records_job_cancelled_at_once() -> None:
    gates = Gates()
    seen: list[Outcome[Any, Any]] = []
    async with Pool(gates, workers=1, on_outcome=seen.append) as pool:
        await pool.submit("running")
        job = await pool.submit("queued")
        other = await pool.submit("other")
        await anyio.wait_all_tasks_blocked()
        assert job.cancel() is True
        assert job.done
        outcome = await job.wait()
        assert isinstance(outcome.error, JobCancelled)
        assert outcome.attempts == 0
        assert job.cancel() is False  # it has its outcome
        assert pool.stats.queued == 1
        gates.release_all()
    assert gates.started == ["running", "other"]
    assert other.outcome is not None
    assert other.outcome.ok
    assert pool.stats.cancelled == 1
    assert pool.stats.failed == 1
    assert [o.item for o in seen if not o.ok] == ["queued"]


async def test_cancelling_a_running_job_cancels_its_attempt_without_retry() -> None:
    gates = Gates()
    retry = Retry(attempts=5, on=Exception)
    async with Pool(gates, workers=2, retry=retry, fail_fast=True) as pool:
        job = await pool.submit("a")
        other = await pool.submit("b")
        await anyio.wait_all_tasks_blocked()
        assert job.cancel() is True
        assert job.cancel() is False  # already being cancelled
        outcome = await job.wait()
        assert isinstance(outcome.error, JobCancelled)
        assert outcome.attempts == 1
        assert gates.cancelled == ["a"]
        after = await pool.submit("c")  # the worker serves on
        gates.release("b")
        gates.release("c")
    assert other.outcome is not None
    assert other.outcome.ok
    assert after.outcome is not None
    assert after.outcome.ok
    assert gates.started == ["a", "b", "c"]  # no retry of "a"
    assert pool.stats.cancelled == 1


async def test_cancelling_a_job_that_runs_in_a_thread() -> None:
    started = threading.Event()
    release = threading.Event()

    def blocking(item: int) -> int:
        started.set()
        release.wait(5)
        return item

    async with Pool(blocking, workers=1) as pool:
        job = await pool.submit(1)
        assert await anyio.to_thread.run_sync(started.wait, 5)
        assert job.cancel()
        outcome = await job.wait()
        release.set()
        assert isinstance(outcome.error, JobCancelled)
        second = await pool.submit(2)
    assert second.outcome is not None
    assert second.outcome.result == 2


async def test_cancel_of_a_job_whose_pool_exited_is_false() -> None:
    async with Pool(record_order) as pool:
        job = await pool.submit(1)
    assert job.cancel() is False
    assert job.outcome is not None
    assert job.outcome.ok


async def test_cancel_of_a_keyed_job_lets_the_next_of_its_key_start() -> None:
    gates = Gates()
    async with Pool(gates, workers=2, key=lambda item: item[0]) as pool:
        first = await pool.submit("a1")
        waiting = await pool.submit("a2")
        third = await pool.submit("a3")
        await anyio.wait_all_tasks_blocked()
        assert waiting.cancel()  # waiting for its key
        assert first.cancel()  # running: a3 starts next
        await anyio.wait_all_tasks_blocked()
        assert gates.started == ["a1", "a3"]
        gates.release_all()
    assert third.outcome is not None
    assert third.outcome.ok
    assert pool.stats.cancelled == 2
    assert pool.stats.busy_keys == 0


# ---------------------------------------------------------------- cost


class RecordingLimiter:
    """A rate limiter that admits at once and records each cost."""

    def __init__(self) -> None:
        self.costs: list[int] = []

    async def acquire(self, cost: int = 1) -> None:
        self.costs.append(cost)


async def test_cost_is_acquired_for_every_attempt() -> None:
    limiter = RecordingLimiter()
    tried: set[str] = set()

    async def flaky(item: str) -> str:
        if item == "bb" and item not in tried:
            tried.add(item)
            raise ConnectionError("again")
        return item

    retry = Retry(attempts=2, on=ConnectionError, wait_initial=0.0001)
    async with Pool(flaky, workers=1, rate_limit=limiter, retry=retry, cost=len) as pool:
        for item in ["a", "bb", "cccc"]:
            await pool.submit(item)
    assert limiter.costs == [1, 2, 2, 4]  # "bb" twice: once per attempt


async def test_a_cost_above_what_the_limiter_admits_at_once_is_taken_in_parts() -> None:
    limiter = RecordingLimiter()
    limiter.burst = 3  # type: ignore[attr-defined]  # admits at most 3 at once
    await apply_to_all(record_order, ["seven..", "ab"], rate_limit=limiter, workers=1, cost=len)
    assert limiter.costs == [3, 3, 1, 2]


async def test_without_cost_each_attempt_acquires_one() -> None:
    limiter = RecordingLimiter()
    await apply_to_all(record_order, ["a", "bb"], rate_limit=limiter, workers=1)
    assert limiter.costs == [1, 1]


async def test_a_cost_that_raises_or_is_refused_fails_that_item() -> None:
    from corral import TokenBucket

    def cost(item: int) -> int:
        if item == 1:
            raise OverflowError("no cost")
        return 0 if item == 2 else 1

    outcomes = await apply_to_all(
        record_order, [0, 1, 2, 3], rate_limit=TokenBucket(1000), cost=cost
    )
    assert [o.ok for o in outcomes] == [True, False, False, True]
    assert isinstance(outcomes[1].error, OverflowError)
    assert isinstance(outcomes[2].error, ValueError)
    with pytest.raises(TypeError, match="cost"):
        Pool(record_order, cost=3)  # type: ignore[arg-type]


async def test_a_running_job_cancelled_as_its_call_ends_still_gets_job_cancelled() -> None:
    gates = Gates()
    async with Pool(gates, workers=1) as pool:
        job = await pool.submit("a")
        after = await pool.submit("b")
        await anyio.wait_all_tasks_blocked()
        gates.release("a")  # its call can now end without another checkpoint
        assert job.cancel()
        gates.release("b")
    assert job.outcome is not None
    assert isinstance(job.outcome.error, JobCancelled)
    assert after.outcome is not None
    assert after.outcome.ok  # the next item is not hit by the cancellation


async def test_a_cancelled_job_reaches_an_async_on_outcome() -> None:
    gates = Gates()
    seen: list[Outcome[Any, Any]] = []

    async def on_outcome(outcome: Outcome[Any, Any]) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(outcome)

    async with Pool(gates, workers=1, on_outcome=on_outcome) as pool:
        running = await pool.submit("running")
        queued = await pool.submit("queued")
        await anyio.wait_all_tasks_blocked()
        assert queued.cancel()
        assert running.cancel()
    assert sorted(o.item for o in seen) == ["queued", "running"]
    assert all(isinstance(o.error, JobCancelled) for o in seen)


async def test_cancelling_a_job_during_its_retry_backoff_ends_it() -> None:
    calls: list[int] = []

    async def failing(item: int) -> int:
        calls.append(item)
        raise ConnectionError("down")

    retry = Retry(attempts=5, on=ConnectionError, wait_initial=60, wait_jitter=False)
    async with Pool(failing, retry=retry) as pool:
        job = await pool.submit(1)
        await anyio.wait_all_tasks_blocked()  # in its first backoff
        assert job.cancel()
        outcome = await job.wait()
    assert calls == [1]
    assert isinstance(outcome.error, JobCancelled)
    assert outcome.attempts == 1


# ------------------------------------------------ found by review: each once broke


async def test_a_job_cancelled_on_its_way_to_a_worker_then_paused_never_runs() -> None:
    ran: list[str] = []

    async def handler(item: str) -> str:
        ran.append(item)
        await anyio.lowlevel.checkpoint()
        return item

    async with Pool(handler, workers=3) as pool:
        await (await pool.submit("a")).wait()
        await anyio.wait_all_tasks_blocked()  # its worker parks
        job = pool.submit_nowait("x")  # handed to the parked worker
        assert job.cancel()
        pool.pause()
        await anyio.wait_all_tasks_blocked()
        pool.resume()
    assert ran == ["a"]
    assert job.outcome is not None
    assert isinstance(job.outcome.error, JobCancelled)


@pytest.mark.parametrize("how", ["a worker not yet running", "a worker after a cancel"])
async def test_resize_down_holds_for_every_worker(how: str) -> None:
    gates = Gates()
    async with Pool(gates, workers=4) as pool:
        first = await pool.submit("first")
        if how == "a worker after a cancel":
            doomed = await pool.submit("doomed")
            await anyio.wait_all_tasks_blocked()
            pool.resize(1)
            assert doomed.cancel()  # its worker serves again, in a new scope
        else:
            await anyio.wait_all_tasks_blocked()
        for i in range(10):
            pool.submit_nowait(i)  # no checkpoint: a worker is started, not yet running
        pool.resize(1)
        await anyio.wait_all_tasks_blocked()
        assert gates.running == 1, gates.started
        gates.release("first")
        gates.release_all()
    assert first.outcome is not None
    assert gates.most == (2 if how == "a worker after a cancel" else 1)
    assert pool.stats.succeeded == 11


async def test_a_key_whose_comparison_raises_fails_that_item() -> None:
    class Key:
        def __hash__(self) -> int:
            return 1

        def __eq__(self, other: object) -> bool:
            raise TypeError("keys cannot be compared")

    async with Pool(record_order, key=lambda item: Key(), workers=2) as pool:
        first = pool.submit_nowait(1)
        second = pool.submit_nowait(2)  # its key meets the first one's
    assert first.outcome is not None
    assert first.outcome.ok
    assert second.outcome is not None
    assert isinstance(second.outcome.error, TypeError)
    assert pool.unfinished == []


async def test_cancel_is_false_once_the_pool_is_stopping() -> None:
    jobs: dict[str, Any] = {}
    answers: list[bool] = []

    async def handler(item: str) -> str:
        if item == "boom":
            raise ValueError("boom")
        try:
            await anyio.sleep_forever()
        finally:  # the pool is stopping (fail_fast) when this runs
            answers.append(jobs["queued"].cancel())
        return item

    with pytest.raises(ValueError, match="boom"):
        async with Pool(handler, workers=2, fail_fast=True) as pool:
            await pool.submit("slow")
            await anyio.wait_all_tasks_blocked()
            pool.submit_nowait("boom")  # to the other worker
            jobs["queued"] = pool.submit_nowait("queued")  # queued behind both
            await anyio.sleep_forever()
    assert answers == [False]
    assert "queued" in pool.unfinished


async def test_a_huge_or_infinite_priority_is_a_number_like_any_other() -> None:
    started: list[int] = []

    async def handler(item: int) -> None:
        started.append(item)

    pool: Pool[int, None] = Pool(handler, workers=1)
    pool.pause()
    async with pool:
        pool.submit_nowait(1, priority=10**400)
        pool.submit_nowait(2, priority=math.inf)
        pool.submit_nowait(3, priority=-math.inf)
        pool.submit_nowait(4, priority=-(10**400))
        pool.resume()
    assert started == [3, 4, 1, 2]
