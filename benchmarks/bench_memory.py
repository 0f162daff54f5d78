"""Peak memory (RSS) for pushing many items, each contender in a fresh process.

``asyncio.gather`` over one coroutine per item holds every item's task at once;
the hand-written anyio pool, aiometer and aqute hold a bounded number of tasks
(aqute and the hand-written pool also keep every result);
``apply_to_all`` holds every item's outcome (it returns them all) but only a
bounded number of tasks; ``apply_to_each``, ``Pool.submit`` and ``Batcher.add``
hold a bounded window of items whatever the input length. The baseline is an
empty interpreter with anyio and corral imported.

    python benchmarks/bench_memory.py [--items 1000000]
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import subprocess
import sys
from typing import Any

CONTENDERS = [
    ("baseline (imports only)", "asyncio"),
    ("asyncio.gather", "asyncio"),
    ("hand-written anyio pool", "asyncio"),
    ("aiometer.run_on_each", "asyncio"),
    ("aqute process_all", "asyncio"),
    ("flushq enqueue", "asyncio"),
    ("apply_to_all", "asyncio"),
    ("apply_to_each", "asyncio"),
    ("Pool.submit", "asyncio"),
    ("Batcher.add", "asyncio"),
    ("apply_to_each", "trio"),
    ("Pool.submit", "trio"),
    ("Batcher.add", "trio"),
]


def child(name: str, backend: str, items: int) -> None:
    import anyio

    import corral

    async def handler(x: int) -> int:
        await anyio.sleep(0)  # noqa: ASYNC115 - a handler that yields, as real ones do
        return x + 1

    async def sink(batch: list[int]) -> None:
        await anyio.sleep(0)  # noqa: ASYNC115

    async def main() -> Any:
        if name == "asyncio.gather":
            import asyncio

            return len(await asyncio.gather(*(handler(i) for i in range(items))))
        if name == "hand-written anyio pool":
            from bench_apply import hand_written  # results stored by index

            return await hand_written(handler, items, 100)
        if name == "aiometer.run_on_each":
            import aiometer

            await aiometer.run_on_each(handler, range(items), max_at_once=100)
            return items
        if name == "aqute process_all":
            from aqute import Aqute

            return len(
                await Aqute(handle_coro=handler, workers_count=100).process_all(range(items))
            )
        if name == "flushq enqueue":
            from bench_batcher import flushq_enqueue

            return await flushq_enqueue(items, 1000)
        if name == "apply_to_all":
            return len(await corral.apply_to_all(handler, range(items), workers=100))
        if name == "apply_to_each":
            count = 0
            async with corral.apply_to_each(handler, range(items), workers=100) as outcomes:
                async for _ in outcomes:
                    count += 1
            return count
        if name == "Pool.submit":
            async with corral.Pool(handler, workers=100) as pool:
                for i in range(items):
                    await pool.submit(i)
            return pool.stats.succeeded
        if name == "Batcher.add":
            async with corral.Batcher(sink, max_size=1000, max_wait=None) as batcher:
                for i in range(items):
                    await batcher.add(i)
            return batcher.stats.flushed
        return items

    done = anyio.run(main, backend=backend)
    assert done == items, (name, done)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="50k items")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.items)
        return 0
    if args.quick:
        args.items = 50_000
    print(
        f"\n#### Peak RSS (MiB) for {args.items} items (a handler that awaits `sleep(0)`, "
        "100 workers; batches of <= 1000), each run in a fresh process\n"
    )
    print("| contender | backend | peak RSS (MiB) |")
    print("| --- | --- | ---: |")
    for name, backend in CONTENDERS:
        module = {
            "aiometer.run_on_each": "aiometer",
            "aqute process_all": "aqute",
            "flushq enqueue": "flushq",
        }.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            print(f"| {name} | {backend} | not installed |")
            continue
        result = subprocess.run(
            [sys.executable, __file__, "--items", str(args.items), "--child", name, backend],
            capture_output=True,
            text=True,
            check=True,
        )
        kib = int(result.stdout.strip().splitlines()[-1])
        print(f"| {name} | {backend} | {kib / 1024:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
