"""On an asyncio loop with Python 3.12's eager task factory, which runs a new
task's first step inside ``create_task`` instead of at the next loop iteration,
corral behaves as on any other loop: pools and batchers start their workers and
flushers, bound them, and account for every item when cancelled.

The factory is asyncio's alone, so these tests run on asyncio with it set.
trio has no such notion, and uvloop with the factory fails inside anyio before
any corral code runs (anyio asks for a lazy start with a keyword that
asyncio's factory does not take when uvloop passes it on).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import anyio
import pytest

from corral import Batcher, Outcome, Pool, apply_to_all

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        sys.version_info < (3, 12), reason="asyncio.eager_task_factory is new in Python 3.12"
    ),
]


def eager_asyncio_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
    return loop


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"loop_factory": eager_asyncio_loop})


def assert_loop_is_eager() -> None:
    """The test really runs on an eager loop (so that it can fail)."""
    assert asyncio.get_running_loop().get_task_factory() is asyncio.eager_task_factory  # type: ignore[attr-defined,unused-ignore]


async def test_apply_to_all_keeps_order_and_the_worker_bound() -> None:
    assert_loop_is_eager()
    running = peak = 0

    async def handler(x: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.001 * (x % 3))
        running -= 1
        return x * x

    outcomes = await apply_to_all(handler, range(200), workers=8)
    assert [outcome.result for outcome in outcomes] == [x * x for x in range(200)]
    assert peak == 8


async def test_cancelled_pool_accounts_for_every_item() -> None:
    assert_loop_is_eager()
    done: list[Outcome[int, int]] = []

    async def handler(x: int) -> int:
        if x % 3:
            await anyio.sleep_forever()
        return x

    with anyio.CancelScope() as scope:
        async with Pool(handler, workers=4, max_pending=30, on_outcome=done.append) as pool:
            for i in range(30):
                await pool.submit(i)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    finished = sorted(outcome.item for outcome in done)
    assert finished
    assert sorted(finished + pool.unfinished) == list(range(30))


async def test_batcher_submit_answers_each_caller_and_bounds_flushes() -> None:
    assert_loop_is_eager()
    running = peak = 0

    async def flush(items: list[int]) -> list[int]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.001)
        running -= 1
        return [-item for item in items]

    answers: dict[int, int] = {}

    async def caller(batcher: Batcher[int, int], item: int) -> None:
        answers[item] = await batcher.submit(item)

    async with (
        Batcher(flush, max_size=10, max_wait=0.01, concurrency=2) as batcher,
        anyio.create_task_group() as tg,
    ):
        for item in range(100):
            tg.start_soon(caller, batcher, item)
    assert answers == {item: -item for item in range(100)}
    assert batcher.stats.flushed == 100
    assert 1 <= peak <= 2


async def test_plain_handler_runs_in_threads_within_the_bound() -> None:
    assert_loop_is_eager()
    lock = threading.Lock()
    running = peak = 0

    def handler(x: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.002)
        with lock:
            running -= 1
        return x + 1

    outcomes = await apply_to_all(handler, range(50), workers=4)
    assert [outcome.result for outcome in outcomes] == list(range(1, 51))
    assert 1 <= peak <= 4
