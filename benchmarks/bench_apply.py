"""Per-item overhead of corral's pool against hand-written code and the peers.

One process per backend (asyncio, asyncio+uvloop, trio), every contender run
interleaved (A B A B ...) over the same input, medians (min-max) of µs per item
and the ratio to the hand-written anyio pool of the same run. Handlers: one
that does not await (what is measured is the engine alone) and one that awaits
``anyio.sleep(0)`` (every item goes through the event loop once).

Contenders (each where it runs):

* hand-written anyio pool: a bounded memory object stream, ``*_nowait`` fast
  paths on both ends, results or errors stored by index (the baseline);
* corral: ``apply_to_all``, ``apply_to_each`` (consuming every outcome),
  ``Pool.submit`` (a producer awaiting ``submit`` for every item, a checkpoint
  each) and ``Pool.submit_nowait`` (awaiting ``submit`` only when full);
* ``asyncio.Queue`` + workers, as one writes it with asyncio alone;
* ``aiometer.run_on_each`` and ``aiometer.amap`` with ``max_at_once=workers``;
* ``aqute`` (``Aqute.process_all``, asyncio only);
* ``anyio.amap`` (one task per item, unbounded: the workers setting does not
  apply to it).

    python benchmarks/bench_apply.py [--items 50000] [--workers 10 100 1000]
        [--handler no-await sleep0] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from time import monotonic
from typing import Any

import anyio
from _harness import (  # the script's own folder is on sys.path
    Contender,
    compare,
    installed,
    key_ratio,
)
from anyio.streams.memory import MemoryObjectSendStream

import corral

Handler = Callable[[int], Awaitable[int]]


async def no_await(x: int) -> int:
    return x + 1


async def sleep_zero(x: int) -> int:
    await anyio.sleep(0)  # noqa: ASYNC115 - the benchmark is of sleep(0), as users write it
    return x + 1


HANDLERS = {"no-await": no_await, "sleep0": sleep_zero}

BASELINE = "hand-written anyio pool"
AWAIT_SEND = "hand-written, `await send` per item"
STREAMED = "hand-written, results streamed to `async for`"
OUTCOMES = "hand-written, building corral's `Outcome` per item"
#: Each corral row is compared with the hand-written code that does the same
#: job: a checkpoint per submitted item, or per outcome consumed.
BASELINES = {
    AWAIT_SEND: BASELINE,
    STREAMED: BASELINE,
    "corral Pool.submit": AWAIT_SEND,
    "corral apply_to_each": STREAMED,
}


async def hand_written(
    fn: Handler, items: int, workers: int, *, nowait: bool = True, stream: bool = False
) -> int:
    """The best plain-anyio pool we know how to write: a bounded memory stream,
    nowait fast paths on both ends, results (or errors) stored by index.

    ``nowait=False``: the producer awaits ``send`` for every item (a checkpoint
    each, as ``await pool.submit`` is). ``stream=True``: the workers send each
    result into a second bounded stream that the caller iterates with
    ``async for`` (a checkpoint each, as ``apply_to_each`` is); the producer
    runs in its own task.
    """
    results: list[Any] = []
    send, receive = anyio.create_memory_object_stream[tuple[int, int]](2 * workers)
    out_send, out_receive = anyio.create_memory_object_stream[Any](2 * workers)

    async def worker(out: MemoryObjectSendStream[Any] | None) -> None:
        receive_nowait = receive.receive_nowait
        with out if out is not None else nullcontext():
            while True:
                try:
                    index, item = receive_nowait()
                except anyio.WouldBlock:
                    try:
                        index, item = await receive.receive()
                    except anyio.EndOfStream:
                        return
                except anyio.EndOfStream:
                    return
                try:
                    result = await fn(item)
                except Exception as exc:
                    result = exc
                if out is None:
                    results[index] = result
                else:
                    try:
                        out.send_nowait(result)
                    except anyio.WouldBlock:
                        await out.send(result)

    async def produce() -> None:
        with send:
            send_nowait = send.send_nowait
            for index in range(items):
                if not stream:
                    results.append(None)
                if nowait:
                    try:
                        send_nowait((index, index))
                    except anyio.WouldBlock:
                        await send.send((index, index))
                else:
                    await send.send((index, index))

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker, out_send.clone() if stream else None)
        out_send.close()
        if not stream:
            await produce()
            return len(results)
        tg.start_soon(produce)
        count = 0
        with out_receive:
            async for _ in out_receive:
                count += 1
    return count


def building_outcomes(fn: Handler) -> Callable[[int], Awaitable[corral.Outcome[int, int]]]:
    """``fn`` returning what corral returns for each item: an ``Outcome`` with
    the result or the error and the time it took (items are their own index)."""

    async def call(item: int) -> corral.Outcome[int, int]:
        start = monotonic()
        try:
            result = await fn(item)
        except Exception as exc:
            return corral.Outcome(item, item, item, None, exc, 1, monotonic() - start)
        return corral.Outcome(item, item, item, result, None, 1, monotonic() - start)

    return call


async def asyncio_queue(fn: Handler, items: int, workers: int) -> int:
    """asyncio.Queue and worker tasks, as written with asyncio alone."""
    import asyncio

    queue: asyncio.Queue[int | None] = asyncio.Queue(2 * workers)
    results: list[Any] = [None] * items

    async def worker() -> None:
        while (item := await queue.get()) is not None:
            try:
                results[item] = await fn(item)
            except Exception as exc:
                results[item] = exc

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    for index in range(items):
        await queue.put(index)
    for _ in tasks:
        await queue.put(None)
    await asyncio.gather(*tasks)
    return len(results)


async def corral_apply_to_all(fn: Handler, items: int, workers: int) -> int:
    return len(await corral.apply_to_all(fn, range(items), workers=workers))


async def corral_apply_to_each(fn: Handler, items: int, workers: int) -> int:
    count = 0
    async with corral.apply_to_each(fn, range(items), workers=workers) as outcomes:
        async for _ in outcomes:
            count += 1
    return count


async def corral_submit(fn: Handler, items: int, workers: int) -> int:
    async with corral.Pool(fn, workers=workers) as pool:
        submit = pool.submit
        for x in range(items):
            await submit(x)
    return pool.stats.succeeded


async def corral_submit_nowait(fn: Handler, items: int, workers: int) -> int:
    async with corral.Pool(fn, workers=workers) as pool:
        submit_nowait = pool.submit_nowait
        for x in range(items):
            try:
                submit_nowait(x)
            except corral.QueueFull:
                await pool.submit(x)
    return pool.stats.succeeded


async def aiometer_run_on_each(fn: Handler, items: int, workers: int) -> int:
    import aiometer

    await aiometer.run_on_each(fn, range(items), max_at_once=workers)
    return items  # it returns nothing; it raises if a call failed


async def aiometer_amap(fn: Handler, items: int, workers: int) -> int:
    import aiometer

    count = 0
    async with aiometer.amap(fn, range(items), max_at_once=workers) as results:
        async for _ in results:
            count += 1
    return count


async def aqute_process_all(fn: Handler, items: int, workers: int) -> int:
    from aqute import Aqute

    engine: Aqute[int, int] = Aqute(handle_coro=fn, workers_count=workers)
    return len(await engine.process_all(range(items)))


async def anyio_amap(fn: Handler, items: int, workers: int) -> int:
    return len(await anyio.amap(fn, range(items)))  # type: ignore[attr-defined]


def lineup(backend: str, fn: Handler, items: int, workers: int) -> dict[str, Contender | str]:
    def bind(run: Callable[[Handler, int, int], Awaitable[int]]) -> Contender:
        return lambda: run(fn, items, workers)

    on_asyncio = backend in ("asyncio", "uvloop")
    entries: dict[str, Contender | str] = {
        BASELINE: bind(hand_written),
        AWAIT_SEND: lambda: hand_written(fn, items, workers, nowait=False),
        STREAMED: lambda: hand_written(fn, items, workers, stream=True),
        OUTCOMES: lambda: hand_written(building_outcomes(fn), items, workers),  # type: ignore[arg-type]
        "corral apply_to_all": bind(corral_apply_to_all),
        "corral apply_to_each": bind(corral_apply_to_each),
        "corral Pool.submit": bind(corral_submit),
        "corral Pool.submit_nowait": bind(corral_submit_nowait),
        "asyncio.Queue + workers": bind(asyncio_queue) if on_asyncio else "asyncio only",
    }
    if installed("aiometer"):
        entries["aiometer.run_on_each"] = bind(aiometer_run_on_each)
        entries["aiometer.amap"] = bind(aiometer_amap)
    if installed("aqute"):
        entries["aqute"] = bind(aqute_process_all) if on_asyncio else "asyncio only"
    if hasattr(anyio, "amap"):
        entries["anyio.amap (unbounded)"] = bind(anyio_amap)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--handler", nargs="+", choices=sorted(HANDLERS), default=["no-await", "sleep0"]
    )
    parser.add_argument("--quick", action="store_true", help="5k items, 100 workers, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.workers, args.repeat = 5_000, [100], 3
    keys: list[tuple[str, dict[str, dict[str, list[float]]]]] = []
    for handler in args.handler:
        for workers in args.workers:
            results = compare(
                f"#### `{handler}` handler, {workers} workers: µs per item, median (min-max) "
                f"of {args.repeat} interleaved runs of {args.items} items; "
                f"**ratio** to the {BASELINE} (or the hand-written row doing the same job)",
                lambda backend, h=handler, w=workers: lineup(  # type: ignore[misc]
                    backend, HANDLERS[h], args.items, w
                ),
                args.items,
                args.repeat,
                BASELINE,
                BASELINES,
            )
            keys.append((f"`{handler}`, {workers} workers", results))
    print()
    for label, results in keys:
        for row in ("corral apply_to_all", "corral Pool.submit_nowait"):
            key_ratio(f"{row} / {BASELINE}, {label}", results, row, BASELINE)
        row = "corral apply_to_all"
        key_ratio(f"{row} / {OUTCOMES}, {label}", results, row, OUTCOMES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
