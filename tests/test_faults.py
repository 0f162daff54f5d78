"""Faults in user code: each surfaces to the caller after cleanup, nothing is
lost silently, nothing hangs (see "What corral guarantees" in the README)."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from corral import Batcher, FlushError, Outcome, Pool, apply_to_all, apply_to_each

pytestmark = pytest.mark.anyio


async def echo(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return x


async def test_async_on_outcome_that_raises_stops_the_pool() -> None:
    """The callback's exception comes out of the block; the item it was called
    for keeps its outcome; items that had none are unfinished."""
    seen: list[int] = []

    async def on_outcome(outcome: Outcome[int, int]) -> None:
        seen.append(outcome.item)
        if outcome.item == 1:
            raise RuntimeError("callback broke")

    async def handler(x: int) -> int:
        if x >= 2:
            await anyio.sleep_forever()
        return x

    pool = Pool(handler, workers=4, on_outcome=on_outcome)
    with pytest.raises(RuntimeError, match="callback broke"):
        async with pool:
            for i in range(4):
                pool.submit_nowait(i)
    assert sorted(seen) == [0, 1]
    assert pool.unfinished == [2, 3]
    assert pool.stats.succeeded == 2


async def test_handler_that_never_returns() -> None:
    """With timeout= it is a TimeoutError outcome and the block ends by itself;
    without, the block waits for it until the caller's deadline, and then it is
    unfinished."""

    async def hangs(x: int) -> int:
        if x == 1:
            await anyio.sleep_forever()
        return x

    with anyio.fail_after(5):
        outcomes = await apply_to_all(hangs, range(3), timeout=0.05)
    assert [type(o.error) for o in outcomes] == [type(None), TimeoutError, type(None)]

    pool = Pool(hangs, workers=2)
    with anyio.move_on_after(0.05) as scope:
        async with pool:
            for i in range(3):
                await pool.submit(i)
    assert scope.cancelled_caught
    assert pool.unfinished == [1]
    assert pool.stats.succeeded == 2


async def test_sync_input_that_raises_midway_in_apply_to_each() -> None:
    """The input's error comes out of the block after cleanup; every item taken
    from the input was either yielded or is listed as unfinished."""

    def items() -> Iterator[int]:
        yield from range(5)
        raise OSError("input broke")

    got: list[int] = []
    with pytest.raises(OSError, match="input broke"):
        async with apply_to_each(echo, items(), workers=2) as outcomes:
            async for outcome in outcomes:
                got.append(outcome.item)
    assert sorted(got + outcomes.unfinished) == list(range(5))


async def test_base_exception_from_a_handler_surfaces_as_itself() -> None:
    async def exits(x: int) -> int:
        if x == 3:
            raise SystemExit(3)
        return x

    with pytest.raises(SystemExit) as caught:
        await apply_to_all(exits, range(10), workers=2)
    assert caught.value.code == 3


async def test_flush_that_hangs_at_shutdown() -> None:
    """With timeout=, the exit's flush times out and ends as FlushError with the
    items; without, the caller's deadline ends it and the items are unflushed."""

    async def hangs(batch: list[int]) -> None:
        await anyio.sleep_forever()

    with anyio.fail_after(5), pytest.raises(FlushError) as caught:
        async with Batcher(hangs, max_size=10, max_wait=60, timeout=0.05) as batcher:
            await batcher.add_many([1, 2, 3])
    assert list(caught.value.items) == [1, 2, 3]
    assert isinstance(caught.value.__cause__, TimeoutError)

    with anyio.move_on_after(0.05) as scope:
        async with Batcher(hangs, max_size=10, max_wait=60) as batcher:
            await batcher.add_many([1, 2, 3])
    assert scope.cancelled_caught
    assert batcher.unflushed == [1, 2, 3]
