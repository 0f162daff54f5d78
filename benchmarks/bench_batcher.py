"""Batcher against a hand-written anyio collector (and async-batcher for submit).

Runs every contender in the same process, interleaved (A B A B ...), on
asyncio, asyncio+uvloop and trio, and prints medians (min-max) of µs per item
and the ratio corral / hand-written.

* ``add``: one producer awaits ``add`` for every item (a checkpoint each, as
  anyio's ``send`` does); the sink is a no-op that receives batches of up to
  ``--batch`` items. The hand-written collector is a bounded memory object
  stream and one task draining it with ``receive_nowait``.
* ``add_nowait``: the same with the producer using the ``*_nowait`` fast path
  and awaiting only when the buffer is full, on both sides.
* ``submit``: ``--callers`` tasks each await one result through a batching
  function (dynamic batching, as for model inference); against a hand-written
  anyio version and, on asyncio, the ``async-batcher`` package if installed.

    python benchmarks/bench_batcher.py [--items 1000000] [--batch 1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from _harness import backends, fmt, measure, ratio  # the script's folder is on sys.path
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


# -------------------------------------------------------------------- measuring


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--callers", type=int, default=20_000)
    parser.add_argument("--submit-batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100k items, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.callers, args.repeat = 100_000, 5_000, 3

    for nowait in (False, True):
        name = "add_nowait (await add when full)" if nowait else "await add"
        print(
            f"\nBatcher {name}: {args.items} items, batches of <= {args.batch}, no-op sink, "
            f"median (min-max) of {args.repeat} interleaved runs, µs/item"
        )
        print(f"{'backend':<8} {'hand-written':>22} {'corral':>22} {'ratio':>6}")
        for label, backend, options in backends():

            def bind(fn: Any, nowait: bool = nowait) -> Callable[[], Awaitable[int]]:
                return lambda: fn(args.items, args.batch, nowait)

            t = measure(
                backend,
                options,
                {"hand": bind(hand_written_add), "corral": bind(corral_add)},
                args.items,
                args.repeat,
            )
            print(
                f"{label:<8} {fmt(t['hand']):>22} {fmt(t['corral']):>22} "
                f"{ratio(t['corral'], t['hand']):>6}"
            )

    peer = async_batcher_submit()
    print(
        f"\nBatcher.submit: {args.callers} concurrent callers, batches of <= "
        f"{args.submit_batch}, median (min-max) of {args.repeat} interleaved runs, µs/item"
    )
    print(
        f"{'backend':<8} {'hand-written':>22} {'corral':>22} {'ratio':>6} "
        f"{'async-batcher':>22} {'corral/it':>9}"
    )
    for label, backend, options in backends():
        contenders: dict[str, Callable[[], Awaitable[int]]] = {
            "hand": lambda: hand_written_submit(args.callers, args.submit_batch),
            "corral": lambda: corral_submit(args.callers, args.submit_batch),
        }
        if peer is not None and backend == "asyncio":
            contenders["peer"] = lambda: peer(args.callers, args.submit_batch)
        t = measure(backend, options, contenders, args.callers, args.repeat)
        line = (
            f"{label:<8} {fmt(t['hand']):>22} {fmt(t['corral']):>22} "
            f"{ratio(t['corral'], t['hand']):>6}"
        )
        if "peer" in t:
            line += f" {fmt(t['peer']):>22} {ratio(t['corral'], t['peer']):>9}"
        else:
            line += f" {'n/a':>22} {'':>9}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
