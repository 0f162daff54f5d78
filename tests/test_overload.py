"""Overload: a producer far faster than the workers keeps memory bounded.

The number of live items (submitted or added, without an outcome or flush yet)
never exceeds the configured bounds, however many items the producer pushes,
and the same run with five times more items does not allocate more.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
from anyio.lowlevel import checkpoint

from corral import Batcher, Outcome, Pool, apply_to_each

pytestmark = pytest.mark.anyio

ITEMS = 20_000


async def slow(x: int) -> int:
    for _ in range(100):  # each item takes 100 loop turns: the producer is ~100x faster
        await checkpoint()
    return x


async def test_pool_live_items_stay_within_workers_plus_max_pending() -> None:
    done = 0
    peak = 0

    def on_outcome(outcome: Outcome[int, int]) -> None:
        nonlocal done
        done += 1

    async with Pool(slow, workers=8, max_pending=16, on_outcome=on_outcome) as pool:
        for i in range(ITEMS // 10):
            await pool.submit(i)
            peak = max(peak, pool.stats.submitted - done)
    assert peak <= 8 + 16
    assert done == ITEMS // 10


async def test_apply_to_each_takes_input_only_as_fast_as_it_is_consumed() -> None:
    taken = 0

    def endless() -> Any:
        nonlocal taken
        while True:
            taken += 1
            yield taken

    seen = 0
    async with apply_to_each(slow, endless(), workers=4, max_pending=8) as outcomes:
        async for _ in outcomes:
            seen += 1
            assert taken - seen <= 4 + 8 + 1 + 4 + 8  # pool, hand-over, unconsumed outcomes
            if seen == 2_000:
                break


async def test_batcher_queue_stays_within_max_pending_under_a_fast_producer() -> None:
    peak = 0

    async def slow_sink(batch: list[int]) -> None:
        for _ in range(100 * len(batch)):
            await checkpoint()

    async with Batcher(slow_sink, max_size=10, max_wait=None, max_pending=40) as batcher:
        for i in range(ITEMS // 10):
            await batcher.add(i)
            stats = batcher.stats
            peak = max(peak, stats.queued + stats.flushing)
    assert peak <= 40 + 10
    assert batcher.stats.flushed == ITEMS // 10


# untraced: under coverage's tracer and tracemalloc together, 24,000 items took
# a minute per backend
@pytest.mark.untraced
async def test_memory_does_not_grow_with_the_number_of_items() -> None:
    """Peak traced memory for 10,000 and for 50,000 items through a pool and a
    batcher is the same within a small margin: nothing is kept per item."""

    async def fast(x: int) -> int:
        await checkpoint()
        return x

    async def sink(batch: list[int]) -> None:
        await checkpoint()

    async def run(items: int) -> int:
        tracemalloc.start()
        try:
            async with (
                Pool(fast, workers=8, max_pending=16) as pool,
                Batcher(sink, max_size=50, max_wait=None) as batcher,
            ):
                for i in range(items):
                    job = await pool.submit(i)
                    del job
                    await batcher.add(i)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small = await run(ITEMS // 5)
    large = await run(ITEMS)
    assert large < small * 1.5 + 200_000, (small, large)
