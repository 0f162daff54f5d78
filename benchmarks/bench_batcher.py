"""Batcher against a hand-written anyio collector and the peers.

Every contender runs in the same process, interleaved (A B A B ...), on
asyncio, asyncio+uvloop and trio (the peers where they run), and the tables
give medians (min-max) of µs per item and the ratio to the hand-written code
that does the same job.

* ``add``: one producer pushes ``--items`` items into a no-op sink that
  receives batches of up to ``--batch`` items. The hand-written collector is a
  bounded memory object stream and one task draining it with
  ``receive_nowait`` (natural batching). ``await add`` checkpoints on every
  item, as anyio's ``await send`` does; ``add_nowait`` awaits only when the
  queue is full, as ``send_nowait`` with a fallback does. ``beque`` (never a
  checkpoint, no backpressure) and ``flushq`` (a checkpoint every 512th item)
  are asyncio only.
* ``submit``: ``--callers`` tasks each await one result through a batching
  function (dynamic batching, as for model inference); against a hand-written
  anyio version and ``async-batcher`` (asyncio only). beque and flushq hand
  no result back to the caller.

    python benchmarks/bench_batcher.py [--items 200000] [--batch 1000] [--repeat 5]
        [--callers 20000] [--submit-batch 64] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from _harness import Contender, compare, installed, key_ratio  # the script's folder is on sys.path
from anyio.streams.memory import MemoryObjectReceiveStream

import corral


async def no_op(batch: list[int]) -> None:
    pass


async def double_all(batch: list[int]) -> list[int]:
    return [2 * x for x in batch]


# ---------------------------------------------------------------- add contenders


async def collect(
    receive: MemoryObjectReceiveStream[Any],
    batch: int,
    flush: Callable[[list[Any]], Awaitable[None]],
) -> None:
    """The hand-written collector: take what has accumulated (up to ``batch``
    items) as soon as it is free and flush it: natural batching."""
    receive_nowait = receive.receive_nowait
    while True:
        try:
            first = await receive.receive()
        except anyio.EndOfStream:
            return
        chunk = [first]
        while len(chunk) < batch:
            try:
                chunk.append(receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
        await flush(chunk)


async def hand_written_add(items: int, batch: int, nowait: bool) -> int:
    """A bounded stream and one collector task."""
    send, receive = anyio.create_memory_object_stream[int](2 * batch)
    flushed = 0

    async def flush(chunk: list[int]) -> None:
        nonlocal flushed
        await no_op(chunk)
        flushed += len(chunk)

    async with anyio.create_task_group() as tg:
        tg.start_soon(collect, receive, batch, flush)
        with send:
            if nowait:
                send_nowait = send.send_nowait
                for x in range(items):
                    try:
                        send_nowait(x)
                    except anyio.WouldBlock:
                        await send.send(x)
            else:
                for x in range(items):
                    await send.send(x)
    return flushed


async def corral_add(items: int, batch: int, nowait: bool) -> int:
    async with corral.Batcher(no_op, max_size=batch, max_wait=None) as batcher:
        if nowait:
            add_nowait = batcher.add_nowait
            for x in range(items):
                try:
                    add_nowait(x)
                except corral.QueueFull:
                    await batcher.add(x)
        else:
            add = batcher.add
            for x in range(items):
                await add(x)
    return batcher.stats.flushed


# ------------------------------------------------------------- submit contenders


class _Slot:
    __slots__ = ("event", "result")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.result: Any = None


async def hand_written_submit(callers: int, batch: int) -> int:
    send, receive = anyio.create_memory_object_stream[tuple[int, _Slot]](2 * batch)
    done = 0

    async def flush(chunk: list[tuple[int, _Slot]]) -> None:
        results = await double_all([x for x, _ in chunk])
        for (_, slot), result in zip(chunk, results, strict=True):
            slot.result = result
            slot.event.set()

    async def caller(x: int) -> None:
        nonlocal done
        slot = _Slot()
        await send.send((x, slot))
        await slot.event.wait()
        assert slot.result == 2 * x
        done += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(collect, receive, batch, flush)
        async with anyio.create_task_group() as callers_tg:
            for x in range(callers):
                callers_tg.start_soon(caller, x)
        send.close()
    return done


async def corral_submit(callers: int, batch: int) -> int:
    done = 0

    async def caller(x: int) -> None:
        nonlocal done
        result = await batcher.submit(x)
        assert result == 2 * x
        done += 1

    async with (
        corral.Batcher(double_all, max_size=batch, max_wait=None) as batcher,
        anyio.create_task_group() as tg,
    ):
        for x in range(callers):
            tg.start_soon(caller, x)
    return done


def async_batcher_submit() -> Callable[[int, int], Awaitable[int]] | None:
    try:
        from async_batcher.batcher import AsyncBatcher
    except ImportError:
        return None

    class Doubler(AsyncBatcher[int, int]):
        async def process_batch(self, batch: list[int]) -> list[int]:
            return await double_all(batch)

    async def run(callers: int, batch: int) -> int:
        # max_queue_time: how long it waits for a batch to fill; small, so that
        # it is not measured waiting
        batcher = Doubler(max_batch_size=batch, max_queue_time=0.0005)
        done = 0

        async def caller(x: int) -> None:
            nonlocal done
            assert await batcher.process(x) == 2 * x
            done += 1

        async with anyio.create_task_group() as tg:
            for x in range(callers):
                tg.start_soon(caller, x)
        await batcher.stop()
        return done

    return run


# ---------------------------------------------------------------- add peers


async def beque_add(items: int, batch: int) -> int:
    from beque import Beque

    flushed = 0

    async def sink(chunk: list[int]) -> None:
        nonlocal flushed
        flushed += len(chunk)

    async with Beque(on_flush=sink, max_batch_size=batch, flush_interval=0.05) as queue:
        add = queue.add
        for x in range(items):
            await add(x)
    return flushed


async def flushq_enqueue(items: int, batch: int) -> int:
    from flushq import FlushQueue, NaturalPolicy

    flushed = 0

    async def sink(chunk: list[int]) -> None:
        nonlocal flushed
        flushed += len(chunk)

    queue = FlushQueue(sink, NaturalPolicy(max_records=batch), max_queue_size=2 * batch)
    async with queue:
        enqueue = queue.enqueue
        for x in range(items):
            await enqueue(x)
    return flushed


# -------------------------------------------------------------------- measuring

HAND_AWAIT = "hand-written collector, `await send`"
HAND_NOWAIT = "hand-written collector, `send_nowait`"
ADD_PAIRS = {
    HAND_NOWAIT: HAND_AWAIT,
    "corral `add_nowait` (`await add` when full)": HAND_NOWAIT,
    # neither checkpoints on every item (beque never, flushq every 512th), so
    # the hand-written loop that does the same is the one without checkpoints
    "beque `await add`": HAND_NOWAIT,
    "flushq `await enqueue`": HAND_NOWAIT,
}


def add_lineup(backend: str, items: int, batch: int) -> dict[str, Contender | str]:
    on_asyncio = backend in ("asyncio", "uvloop")
    entries: dict[str, Contender | str] = {
        HAND_AWAIT: lambda: hand_written_add(items, batch, False),
        HAND_NOWAIT: lambda: hand_written_add(items, batch, True),
        "corral `await add`": lambda: corral_add(items, batch, False),
        "corral `add_nowait` (`await add` when full)": lambda: corral_add(items, batch, True),
    }
    if installed("beque"):
        entries["beque `await add`"] = (
            (lambda: beque_add(items, batch)) if on_asyncio else "asyncio only"
        )
    if installed("flushq"):
        entries["flushq `await enqueue`"] = (
            (lambda: flushq_enqueue(items, batch)) if on_asyncio else "asyncio only"
        )
    return entries


def submit_lineup(backend: str, callers: int, batch: int) -> dict[str, Contender | str]:
    entries: dict[str, Contender | str] = {
        "hand-written": lambda: hand_written_submit(callers, batch),
        "corral `submit`": lambda: corral_submit(callers, batch),
    }
    peer = async_batcher_submit()
    if peer is not None:
        entries["async-batcher `process`"] = (
            (lambda: peer(callers, batch)) if backend in ("asyncio", "uvloop") else "asyncio only"
        )
    for name in ("beque", "flushq"):
        if installed(name):
            entries[name] = "no per-item result"
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--callers", type=int, default=20_000)
    parser.add_argument("--submit-batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100k items, 3k callers, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.callers, args.repeat = 100_000, 3_000, 3

    added = compare(
        f"#### Batcher `add`: one producer, {args.items} items, batches of <= {args.batch}, "
        f"no-op sink: µs per item, median (min-max) of {args.repeat} interleaved runs; "
        "**ratio** to the hand-written collector with the same producer loop",
        lambda backend: add_lineup(backend, args.items, args.batch),
        args.items,
        args.repeat,
        HAND_AWAIT,
        ADD_PAIRS,
    )
    submitted = compare(
        f"#### Batcher `submit`: {args.callers} concurrent callers each awaiting its result, "
        f"batches of <= {args.submit_batch}: µs per item, median (min-max) of {args.repeat} "
        "interleaved runs; **ratio** to the hand-written version",
        lambda backend: submit_lineup(backend, args.callers, args.submit_batch),
        args.callers,
        args.repeat,
        "hand-written",
    )
    print()
    key_ratio(f"corral `await add` / {HAND_AWAIT}", added, "corral `await add`", HAND_AWAIT)
    key_ratio(
        f"corral `add_nowait` / {HAND_NOWAIT}",
        added,
        "corral `add_nowait` (`await add` when full)",
        HAND_NOWAIT,
    )
    key_ratio("corral `submit` / hand-written", submitted, "corral `submit`", "hand-written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
