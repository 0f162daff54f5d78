"""apply_to_all against a hand-written anyio pool, per-item overhead.

Runs both in the same process, interleaved (A B A B ...), on asyncio,
asyncio+uvloop and trio, and prints medians (min-max) of µs per item and the
ratio corral / hand-written. The handler does not await, so what is measured is
the engine: queueing, task switches, bookkeeping.

    python benchmarks/bench_apply.py [--items 100000] [--workers 100] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
from _harness import backends, fmt  # the script's own folder is on sys.path

import corral


async def no_await(x: int) -> int:
    return x + 1


async def sleep_zero(x: int) -> int:
    await anyio.sleep(0)  # noqa: ASYNC115 - the benchmark is of sleep(0), as users write it
    return x + 1


HANDLERS = {"no-await": no_await, "sleep0": sleep_zero}


async def hand_written(
    fn: Callable[[int], Awaitable[int]], items: Iterable[int], workers: int
) -> list[Any]:
    """The best plain-anyio pool we know how to write: a bounded memory stream,
    nowait fast paths on both ends, results (or errors) stored by index."""
    results: list[Any] = []
    send, receive = anyio.create_memory_object_stream[tuple[int, int]](2 * workers)

    async def worker() -> None:
        receive_nowait = receive.receive_nowait
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
                results[index] = await fn(item)
            except Exception as exc:
                results[index] = exc

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)
        with send:
            send_nowait = send.send_nowait
            for index, item in enumerate(items):
                results.append(None)
                try:
                    send_nowait((index, item))
                except anyio.WouldBlock:
                    await send.send((index, item))
    return results


async def with_corral(
    fn: Callable[[int], Awaitable[int]], items: Iterable[int], workers: int
) -> list[Any]:
    return await corral.apply_to_all(fn, items, workers=workers)


def measure(
    backend: str,
    options: dict[str, Any],
    handler: Callable[[int], Awaitable[int]],
    items: int,
    workers: int,
    repeat: int,
) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {"hand-written": [], "corral": []}

    async def main() -> None:
        for _ in range(repeat):
            for label, runner in (("hand-written", hand_written), ("corral", with_corral)):
                start = time.perf_counter()
                results = await runner(handler, range(items), workers)
                elapsed = time.perf_counter() - start
                assert len(results) == items
                timings[label].append(elapsed / items * 1e6)

    anyio.run(main, backend=backend, backend_options=options)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--handler", choices=sorted(HANDLERS), default="no-await")
    parser.add_argument("--quick", action="store_true", help="20k items, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.repeat = 20_000, 3
    print(
        f"apply_to_all, {args.handler} handler, {args.items} items, {args.workers} workers, "
        f"median (min-max) of {args.repeat} interleaved runs, µs/item"
    )
    print(f"{'backend':<8} {'hand-written':>22} {'corral':>22} {'ratio':>6}")
    for label, backend, options in backends():
        t = measure(backend, options, HANDLERS[args.handler], args.items, args.workers, args.repeat)
        base, ours = t["hand-written"], t["corral"]
        ratio = statistics.median(o / b for o, b in zip(ours, base, strict=True))

        print(f"{label:<8} {fmt(base):>22} {fmt(ours):>22} {ratio:>5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
