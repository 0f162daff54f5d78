"""What the scheduling options cost: a pool with ``priority=`` or ``key=`` (1,
100 and 10,000 keys) against the same pool without them, and a batcher with
``weight=`` against the same batcher without it.

Every contender runs in the same process, interleaved (A B A B ...), on
asyncio, asyncio+uvloop and trio, and the tables give medians (min-max) of µs
per item and the ratio to the plain pool (or batcher) doing the same job.

* pool: ``--items`` items submitted with ``submit_nowait`` (``await submit``
  when full) to 100 workers whose handler awaits one checkpoint. ``priority=``
  gives each item one of ten priorities; ``key=`` with ``k`` keys gives item
  ``x`` the key ``x % k`` (``per_key=1``: with one key the items run one after
  the other, which is what that key asks for).
* batcher: one producer, ``add_nowait`` (``await add`` when full), batches of
  up to ``--batch`` items into a no-op sink; ``weight=`` gives every item a
  weight of 1 and ``max_weight`` the batch size, so that the batches are the
  same and only the weighing costs.

    python benchmarks/bench_scheduling.py [--items 100000] [--batch 1000] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio
import anyio.lowlevel
from _harness import Contender, compare, key_ratio  # the script's folder is on sys.path

import corral

PLAIN = "corral Pool"
PLAIN_BATCHER = "corral Batcher"


async def one_checkpoint(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return x


async def no_op(batch: list[int]) -> None:
    pass


async def pool_run(items: int, *, priorities: int = 0, keys: int = 0) -> int:
    options: dict[str, Any] = {}
    if keys:
        options["key"] = lambda x: x % keys
    async with corral.Pool(one_checkpoint, workers=100, **options) as pool:
        submit_nowait, submit = pool.submit_nowait, pool.submit
        for x in range(items):
            priority = x % priorities if priorities else 0
            try:
                submit_nowait(x, priority=priority)
            except corral.QueueFull:
                await submit(x, priority=priority)
    return pool.stats.succeeded


async def batcher_run(items: int, batch: int, *, weighed: bool) -> int:
    options: dict[str, Any] = {}
    if weighed:
        options = {"weight": lambda x: 1, "max_weight": batch}
    async with corral.Batcher(no_op, max_size=batch, max_wait=None, **options) as batcher:
        add_nowait = batcher.add_nowait
        for x in range(items):
            try:
                add_nowait(x)
            except corral.QueueFull:
                await batcher.add(x)
    return batcher.stats.flushed


def pool_lineup(items: int) -> dict[str, Contender | str]:
    return {
        PLAIN: lambda: pool_run(items),
        "corral `priority=` (10 levels)": lambda: pool_run(items, priorities=10),
        "corral `key=`, 1 key": lambda: pool_run(items, keys=1),
        "corral `key=`, 100 keys": lambda: pool_run(items, keys=100),
        "corral `key=`, 10,000 keys": lambda: pool_run(items, keys=10_000),
    }


def batcher_lineup(items: int, batch: int) -> dict[str, Contender | str]:
    return {
        PLAIN_BATCHER: lambda: batcher_run(items, batch, weighed=False),
        "corral `weight=`": lambda: batcher_run(items, batch, weighed=True),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="20k items, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.repeat = 20_000, 3

    pools = compare(
        f"#### Pool scheduling: {args.items} items, 100 workers, a handler that awaits one "
        f"checkpoint: µs per item, median (min-max) of {args.repeat} interleaved runs; "
        "**ratio** to the plain pool",
        lambda backend: pool_lineup(args.items),
        args.items,
        args.repeat,
        PLAIN,
    )
    batchers = compare(
        f"#### Batcher weights: one producer, {args.items} items, batches of <= {args.batch}, "
        f"no-op sink: µs per item, median (min-max) of {args.repeat} interleaved runs; "
        "**ratio** to the plain batcher",
        lambda backend: batcher_lineup(args.items, args.batch),
        args.items,
        args.repeat,
        PLAIN_BATCHER,
    )
    print()
    key_ratio(
        "`priority=` / plain pool", pools, "corral `priority=` (10 levels)", PLAIN, target=1.5
    )
    key_ratio("`key=` 100 keys / plain pool", pools, "corral `key=`, 100 keys", PLAIN, target=2.0)
    key_ratio("`weight=` / plain batcher", batchers, "corral `weight=`", PLAIN_BATCHER, target=1.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
