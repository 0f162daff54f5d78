"""Middleware cost per item, and rate-limiter accuracy next to aiolimiter.

1. Overhead: apply_to_all with a handler that does not await, bare and with
   retry + rate_limit (a limit too high to bind) + timeout, interleaved in
   one process; medians (min-max) of µs per item and the ratio.
2. Accuracy: 50 tasks acquire a limiter of 100 per 0.1 s as fast as they can,
   for 1,000 admissions; the most admissions seen in any 0.1 s window (the
   promise is 100) and the rate achieved. aiolimiter (asyncio only) in the same
   run for comparison.

    python benchmarks/bench_middleware.py [--quick]
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import sys
import time
from typing import Any

import anyio
from _harness import backends, fmt  # the script's own folder is on sys.path

import corral


async def no_await(x: int) -> int:
    return x + 1


def middleware_overhead(
    backend: str, options: dict[str, Any], items: int, repeat: int
) -> tuple[list[float], list[float]]:
    bare: list[float] = []
    layered: list[float] = []

    async def main() -> None:
        for _ in range(repeat):
            for times, kwargs in (
                (bare, {}),
                (
                    layered,
                    {
                        "retry": corral.Retry(3),
                        "rate_limit": corral.TokenBucket(1e12, burst=10**9),
                        "timeout": 60.0,
                    },
                ),
            ):
                start = time.perf_counter()
                outcomes = await corral.apply_to_all(no_await, range(items), workers=100, **kwargs)
                times.append((time.perf_counter() - start) / items * 1e6)
                assert len(outcomes) == items

    anyio.run(main, backend=backend, backend_options=options)
    return bare, layered


def max_in_window(times: list[float], per: float) -> int:
    times = sorted(times)
    return max(bisect.bisect_left(times, t + per) - i for i, t in enumerate(times))


async def hammer(acquire: Any, total: int, tasks: int = 50) -> list[float]:
    times: list[float] = []
    each = total // tasks

    async def worker() -> None:
        for _ in range(each):
            await acquire()
            times.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)
    return times


def accuracy(backend: str, options: dict[str, Any], total: int) -> list[tuple[str, int, float]]:
    rows: list[tuple[str, int, float]] = []

    async def main() -> None:
        limiters: list[tuple[str, Any]] = [
            ("corral SlidingWindow(100, 0.1)", corral.SlidingWindow(100, 0.1).acquire),
            (
                "corral TokenBucket(1000, 1.0, burst=100)",
                corral.TokenBucket(1000, burst=100).acquire,
            ),
        ]
        if backend == "asyncio":
            try:
                from aiolimiter import AsyncLimiter

                limiter = AsyncLimiter(100, 0.1)
                limiters.append(("aiolimiter AsyncLimiter(100, 0.1)", limiter.acquire))
            except ImportError:
                pass
        for label, acquire in limiters:
            start = anyio.current_time()
            times = await hammer(acquire, total)
            elapsed = anyio.current_time() - start
            rows.append((label, max_in_window(times, 0.1), len(times) / elapsed))

    anyio.run(main, backend=backend, backend_options=options)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--admissions", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="20k items, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.repeat, args.admissions = 20_000, 3, 500

    print(
        f"middleware overhead: apply_to_all, no-await handler, {args.items} items, "
        f"100 workers, median (min-max) of {args.repeat} interleaved runs, µs/item"
    )
    print(f"{'backend':<8} {'bare':>20} {'retry+rate+timeout':>20} {'ratio':>6}")
    for label, backend, options in backends():
        bare, layered = middleware_overhead(backend, options, args.items, args.repeat)
        ratio = statistics.median(m / b for m, b in zip(layered, bare, strict=True))
        print(f"{label:<8} {fmt(bare):>20} {fmt(layered):>20} {ratio:>5.2f}x")

    print()
    print(
        f"limiter accuracy: 50 tasks, {args.admissions} admissions, limit 100 per 0.1 s "
        "(most in any 0.1 s window must be <= 100)"
    )
    print(f"{'backend':<8} {'limiter':<42} {'max/0.1s':>9} {'rate/s':>8}")
    for label, backend, options in backends():
        for name, worst, rate in accuracy(backend, options, args.admissions):
            print(f"{label:<8} {name:<42} {worst:>9} {rate:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
