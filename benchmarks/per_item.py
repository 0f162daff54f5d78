"""One scenario of the engine's per-item path, for counting instructions.

Timings on a shared machine move by 10-30 % from run to run; the number of
instructions a scenario executes does not. Count them with valgrind, once with
N items and once with none, and divide the difference by N::

    valgrind --tool=cachegrind --cache-sim=no python benchmarks/per_item.py apply asyncio 20000
    valgrind --tool=cachegrind --cache-sim=no python benchmarks/per_item.py apply asyncio 0

Scenarios (100 workers; ``sleep0``: the handler or flush awaits ``sleep(0)``):
``apply`` / ``apply0`` (``apply_to_all``), ``nowait`` / ``nowait0``
(``Pool.submit_nowait``), ``add`` (``await Batcher.add``), ``add_nowait``
(``Batcher.add_nowait``, waiting a step when the queue is full).
"""

from __future__ import annotations

import sys
from typing import Any

import anyio
import anyio.lowlevel

from corral import Batcher, Pool, QueueFull, apply_to_all


async def no_await(x: int) -> int:
    return x


async def sleep0(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return x


async def sink(batch: list[int]) -> None:
    await anyio.lowlevel.checkpoint()


async def submit_nowait(handler: Any, n: int) -> None:
    async with Pool(handler, workers=100, max_pending=max(n, 1)) as pool:
        for i in range(n):
            pool.submit_nowait(i)


async def add(n: int) -> None:
    async with Batcher(sink, max_size=100, max_wait=None) as batcher:
        for i in range(n):
            await batcher.add(i)


async def add_nowait(n: int) -> None:
    async with Batcher(sink, max_size=100, max_wait=None, max_pending=1000) as batcher:
        for i in range(n):
            while True:
                try:
                    batcher.add_nowait(i)
                    break
                except QueueFull:
                    await anyio.lowlevel.checkpoint()


async def main(scenario: str, n: int) -> None:
    if scenario in ("apply", "apply0"):
        await apply_to_all(no_await if scenario == "apply" else sleep0, range(n), workers=100)
    elif scenario in ("nowait", "nowait0"):
        await submit_nowait(no_await if scenario == "nowait" else sleep0, n)
    elif scenario == "add":
        await add(n)
    elif scenario == "add_nowait":
        await add_nowait(n)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    scenario, backend, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    anyio.run(main, scenario, n, backend=backend)
