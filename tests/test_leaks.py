"""Nothing is left behind: after many pools and batchers were entered and exited
(cleanly, by an error, or cancelled), no task runs on, no worker thread piles up,
and the objects themselves can be garbage-collected."""

from __future__ import annotations

import gc
import random
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from corral import Batcher, Pool, Retry, apply_to_each

pytestmark = pytest.mark.anyio


async def async_handler(x: int) -> int:
    await anyio.sleep(random.random() * 0.0005)
    return x


def sync_handler(x: int) -> int:
    time.sleep(random.random() * 0.0005)
    return x


async def sink(batch: list[int]) -> None:
    await anyio.sleep(random.random() * 0.0005)


async def one_round(rng: random.Random, refs: list[weakref.ref[Any]]) -> None:
    """Enter and leave a pool, a batcher and a helper; end the block cleanly, with
    an error, or by cancellation."""
    ending = rng.choice(["clean", "error", "cancel"])
    handler = rng.choice([async_handler, sync_handler])
    pool: Pool[int, int] = Pool(handler, workers=rng.choice([1, 4]), retry=Retry(2))
    batcher = Batcher(sink, max_size=3, max_wait=rng.choice([None, 0.001]), timeout=1)
    refs += [weakref.ref(pool), weakref.ref(batcher)]
    with anyio.CancelScope() as scope:
        try:
            async with pool, batcher:
                for i in range(rng.randrange(1, 20)):
                    await pool.submit(i)
                    await batcher.add(i)
                async with apply_to_each(handler, range(10), workers=2) as outcomes:
                    async for _ in outcomes:
                        break
                if ending == "error":
                    raise LookupError("the block failed")
                if ending == "cancel":
                    scope.cancel()
                    await anyio.sleep_forever()
        except LookupError:
            pass


async def test_no_task_thread_or_object_outlives_the_blocks() -> None:
    rng = random.Random(7)
    refs: list[weakref.ref[Any]] = []
    tasks_before = len(anyio.get_running_tasks())
    # threads already there: idle ones that earlier tests left in anyio's and
    # trio's thread caches (they expire after 10 s of idleness)
    threads_before = threading.active_count()
    for _ in range(60):
        await one_round(rng, refs)
    assert len(anyio.get_running_tasks()) == tasks_before
    # Threads of plain handlers go back to anyio's pool of idle workers and are
    # reused: 60 rounds of pools with up to 4 threads do not pile up 60 x 4.
    assert threading.active_count() <= threads_before + 16, threading.enumerate()
    gc.collect()
    alive = [ref() for ref in refs if ref() is not None]
    assert alive == [], f"{len(alive)} pools/batchers are still referenced"


async def test_a_thread_abandoned_by_a_cancelled_pool_does_not_keep_it_alive() -> None:
    """A plain handler's thread runs on after its pool was cancelled; the pool
    (with everything it holds) can be collected before that thread ends."""
    release = threading.Event()
    started = anyio.Event()

    def blocking(x: int) -> int:
        anyio.from_thread.run_sync(started.set)
        release.wait(10)
        return x

    pool: Pool[int, int] = Pool(blocking, workers=1)
    ref = weakref.ref(pool)
    try:
        with anyio.CancelScope() as scope:
            async with pool:
                await pool.submit(1)
                await started.wait()
                scope.cancel()
        del pool
        gc.collect()
        assert ref() is None, "the abandoned thread keeps the pool alive"
    finally:
        release.set()


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_a_block_that_ended_cleanly_is_freed_without_the_cyclic_collector() -> None:
    """No reference cycle keeps a pool or a batcher (and what it holds, such as
    apply_to_all's outcomes) alive after its block: it goes as soon as the last
    reference does, not at some later run of the garbage collector."""
    refs: list[weakref.ref[Any]] = []
    pool: Pool[int, int] = Pool(async_handler, workers=4, max_pending=2, retry=Retry(2))
    batcher = Batcher(sink, max_size=3, max_wait=0.001, max_pending=4)
    refs += [weakref.ref(pool), weakref.ref(batcher)]
    async with pool, batcher:
        for i in range(20):
            job = await pool.submit(i)
            await batcher.add(i)
        await job.wait()
    del pool, batcher, job
    assert [ref() for ref in refs] == [None, None]
