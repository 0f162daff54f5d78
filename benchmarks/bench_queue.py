"""corral.Queue against anyio's memory object stream, asyncio.Queue and trio's channel.

Every contender runs in the same process, interleaved (A B A B ...), on
asyncio, asyncio+uvloop and trio (each where it runs), and the tables give
medians (min-max) of µs per item, one put and one get, and the ratio to the
anyio memory object stream of the same run (``create_memory_object_stream``,
which checkpoints on every ``send`` and ``receive``, as ``put`` and ``get``
do: the same kind of queue).

Contenders, each a bounded queue of ``maxsize`` items between producer tasks
and consumer tasks, every item counted by the consumers:

* ``corral.Queue``: ``await put``, ``await get`` until ``EndOfStream`` after
  ``close()``;
* an anyio memory object stream (the baseline): ``await send``,
  ``await receive`` until ``EndOfStream`` once the sending end is closed;
* ``asyncio.Queue`` (asyncio and uvloop only): ``await put``, ``await get``
  until one end marker per consumer;
* a trio memory channel (trio only, ``trio.open_memory_channel``): ``await
  send``, ``await receive`` until ``EndOfChannel``.

Scenarios, and the path of the queue each one takes:

* one producer and one consumer, ``maxsize`` 100 and 1: the two take turns at
  their checkpoints, so neither waits and every call takes the fast path after
  its checkpoint (on trio, which runs the tasks made ready together in either
  order, a third of the puts wait with ``maxsize`` 1);
* four producers and four consumers, ``maxsize`` 100: the same, among eight
  tasks;
* one producer and four consumers, ``maxsize`` 100: the consumers outnumber
  the producer, so nearly every get waits and every put hands its item to a
  waiting getter (the hand-off);
* four producers and one consumer, ``maxsize`` 100: nearly every put waits for
  room (backpressure);
* the fast path without checkpoints: one producer calls ``put_nowait``
  (``send_nowait``) and awaits ``put`` only when the queue is full, one
  consumer calls ``get_nowait`` (``receive_nowait``) and awaits ``get`` only
  when it is empty, ``maxsize`` 100. ``asyncio.Queue`` skips the checkpoint
  whenever it need not wait, so its awaited rows with room to spare run the
  same way, in bursts.

    python benchmarks/bench_queue.py [--items 100000] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import anyio
from _harness import Contender, compare, installed, key_ratio  # the script's folder is on sys.path

import corral


class Scenario(NamedTuple):
    label: str
    producers: int
    consumers: int
    maxsize: int
    nowait: bool
    target: float = 1.10  # of the key ratio, corral.Queue / the anyio stream


SCENARIOS = [
    Scenario("1 producer, 1 consumer, `maxsize` 100", 1, 1, 100, False),
    # an item handed to a waiting getter holds its room until the getter
    # resumes; the anyio stream hands it over outside its buffer. With room for
    # one, and trio running the two tasks in either order, corral's put waits
    # more often (a third of the items against a fifth)
    Scenario("1 producer, 1 consumer, `maxsize` 1", 1, 1, 1, False, target=1.20),
    Scenario("4 producers, 4 consumers, `maxsize` 100", 4, 4, 100, False),
    Scenario("1 producer, 4 consumers, `maxsize` 100", 1, 4, 100, False),
    Scenario("4 producers, 1 consumer, `maxsize` 100", 4, 1, 100, False),
    # without checkpoints a pair costs a quarter of a microsecond, and the
    # queue's own counts (puts, gets, unfinished, the room and who waits for
    # it) are a third of that more than the stream keeps
    Scenario(
        "`put_nowait` / `get_nowait`, awaiting only when full / empty, "
        "1 producer, 1 consumer, `maxsize` 100",
        1,
        1,
        100,
        True,
        target=1.50,
    ),
]

Run = Callable[[int, Scenario], Awaitable[int]]


def shares(items: int, producers: int) -> list[range]:
    """The items each producer puts: every item once, split evenly."""
    return [range(first, items, producers) for first in range(producers)]


async def produce(
    share: range,
    put: Callable[[int], Awaitable[None]],
    put_nowait: Callable[[int], None],
    full: type[Exception],
    nowait: bool,
) -> None:
    """Put every item of ``share``; with ``nowait``, await ``put`` only when
    ``put_nowait`` raises ``full``."""
    if nowait:
        for x in share:
            try:
                put_nowait(x)
            except full:
                await put(x)
    else:
        for x in share:
            await put(x)


async def consume(
    get: Callable[[], Awaitable[object]],
    get_nowait: Callable[[], object],
    empty: type[Exception],
    end: type[Exception],
    nowait: bool,
) -> int:
    """Take items until ``end`` is raised: how many; with ``nowait``, await
    ``get`` only when ``get_nowait`` raises ``empty``."""
    count = 0
    try:
        if nowait:
            while True:
                try:
                    get_nowait()
                except empty:
                    await get()
                count += 1
        else:
            while True:
                await get()
                count += 1
    except end:
        pass
    return count


async def corral_queue(items: int, scenario: Scenario) -> int:
    queue: corral.Queue[int] = corral.Queue(scenario.maxsize)
    counts: list[int] = []
    taking = (queue.get, queue.get_nowait, anyio.WouldBlock, anyio.EndOfStream, scenario.nowait)

    async def consumer() -> None:
        counts.append(await consume(*taking))

    async with anyio.create_task_group() as tg:
        for _ in range(scenario.consumers):
            tg.start_soon(consumer)
        async with anyio.create_task_group() as producing:
            for share in shares(items, scenario.producers):
                producing.start_soon(
                    produce, share, queue.put, queue.put_nowait, corral.QueueFull, scenario.nowait
                )
        queue.close()
    return sum(counts)


async def channel(
    send: Any,
    receive: Any,
    full: type[Exception],
    end: type[Exception],
    items: int,
    scenario: Scenario,
) -> int:
    """A memory channel's two ends (anyio's stream or trio's channel, which
    have the same methods): the input ends when the sending end is closed."""
    counts: list[int] = []
    nowait = scenario.nowait
    taking = (receive.receive, receive.receive_nowait, full, end, nowait)

    async def consumer() -> None:
        counts.append(await consume(*taking))

    with receive:
        async with anyio.create_task_group() as tg:
            for _ in range(scenario.consumers):
                tg.start_soon(consumer)
            with send:
                async with anyio.create_task_group() as producing:
                    for share in shares(items, scenario.producers):
                        producing.start_soon(
                            produce, share, send.send, send.send_nowait, full, nowait
                        )
    return sum(counts)


async def anyio_stream(items: int, scenario: Scenario) -> int:
    send, receive = anyio.create_memory_object_stream[int](scenario.maxsize)
    return await channel(send, receive, anyio.WouldBlock, anyio.EndOfStream, items, scenario)


async def asyncio_queue(items: int, scenario: Scenario) -> int:
    """asyncio.Queue has no close (before Python 3.13): one end marker per consumer."""
    queue: asyncio.Queue[object] = asyncio.Queue(scenario.maxsize)
    done = object()
    handled = 0

    async def produce(share: range) -> None:
        put = queue.put
        if scenario.nowait:
            put_nowait = queue.put_nowait
            for x in share:
                try:
                    put_nowait(x)
                except asyncio.QueueFull:
                    await put(x)
        else:
            for x in share:
                await put(x)

    async def consume() -> None:
        nonlocal handled
        count = 0
        get = queue.get
        if scenario.nowait:
            get_nowait = queue.get_nowait
            while True:
                try:
                    item = get_nowait()
                except asyncio.QueueEmpty:
                    item = await get()
                if item is done:
                    break
                count += 1
        else:
            while await get() is not done:
                count += 1
        handled += count

    async with anyio.create_task_group() as tg:
        for _ in range(scenario.consumers):
            tg.start_soon(consume)
        async with anyio.create_task_group() as producing:
            for share in shares(items, scenario.producers):
                producing.start_soon(produce, share)
        for _ in range(scenario.consumers):
            await queue.put(done)
    return handled


async def trio_channel(items: int, scenario: Scenario) -> int:
    import trio

    send, receive = trio.open_memory_channel[int](scenario.maxsize)
    return await channel(send, receive, trio.WouldBlock, trio.EndOfChannel, items, scenario)


BASELINE = "anyio memory object stream"
CORRAL = "corral.Queue"


def lineup(backend: str, items: int, scenario: Scenario) -> dict[str, Contender | str]:
    def bind(run: Run) -> Contender:
        return lambda: run(items, scenario)

    entries: dict[str, Contender | str] = {
        BASELINE: bind(anyio_stream),
        CORRAL: bind(corral_queue),
        "asyncio.Queue": bind(asyncio_queue) if backend != "trio" else "asyncio only",
    }
    if installed("trio"):
        entries["trio memory channel"] = bind(trio_channel) if backend == "trio" else "trio only"
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="20k items, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.repeat = 20_000, 3
    keys = []
    for scenario in SCENARIOS:
        results = compare(
            f"#### Queue, {scenario.label}: µs per item (one put and one get), median "
            f"(min-max) of {args.repeat} interleaved runs of {args.items} items; "
            f"**ratio** to the {BASELINE}",
            lambda backend, s=scenario: lineup(backend, args.items, s),  # type: ignore[misc]
            args.items,
            args.repeat,
            BASELINE,
        )
        keys.append((scenario, results))
    print()
    for scenario, results in keys:
        label = f"{CORRAL} / {BASELINE}, {scenario.label}"
        key_ratio(label, results, CORRAL, BASELINE, scenario.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
