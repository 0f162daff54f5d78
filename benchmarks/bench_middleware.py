"""Middleware and rate-limiter cost per item, and limiter accuracy, next to the peers.

1. Middleware: the pool of ``bench_apply.py`` (100 workers) with retry + rate
   limit (a limit too high to bind) + per-attempt timeout configured, against
   the same hand-written anyio pool doing the same (a retry loop, an inline
   GCRA check, ``anyio.fail_after`` per attempt) and ``aqute`` with its retry,
   rate limiter and task timeout (asyncio only).
2. Limiter overhead: the µs a non-binding rate limit adds per item, each
   limiter measured against its own bare pool: corral's ``SlidingWindow`` and
   ``TokenBucket`` (``rate_limit=``), aiolimiter's ``AsyncLimiter`` in the
   hand-written pool (asyncio only), aiometer's ``max_per_second``.
3. Accuracy: 50 tasks admitted as fast as a limit of 100 per 0.1 s allows,
   for ``--admissions`` admissions; the most admissions seen in any 0.1 s
   window (the promise is 100 for the exact limiters) and the rate achieved.

    python benchmarks/bench_middleware.py [--items 50000] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import bisect
import math
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from _harness import (
    Contender,
    backends,
    compare,
    installed,
    key_ratio,
)  # the script's own folder is on sys.path
from bench_apply import HANDLERS, Handler, hand_written

import corral

WORKERS = 100
BASELINE = "hand-written anyio pool"
HAND_MW = "hand-written, retry + rate + timeout"


class InlineBucket:
    """The rate check one writes by hand: GCRA on one timestamp."""

    def __init__(self, rate: float, burst: int) -> None:
        self.interval = 1.0 / rate
        self.tolerance = burst * self.interval
        self.tat = -math.inf

    async def acquire(self) -> None:
        now = anyio.current_time()
        tat = max(self.tat, now)
        if tat - now > self.tolerance:
            await anyio.sleep(tat - now - self.tolerance)
        self.tat = tat + self.interval


def with_middleware(fn: Handler) -> Handler:
    """``fn`` wrapped as a user would by hand: 3 attempts, a rate check, a timeout."""
    bucket = InlineBucket(1e12, 10**9)

    async def call(item: int) -> int:
        for attempt in range(3):
            await bucket.acquire()
            try:
                with anyio.fail_after(60):
                    return await fn(item)
            except Exception:
                if attempt == 2:
                    raise
                await anyio.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    return call


async def corral_bare(fn: Handler, items: int, **options: Any) -> int:
    return len(await corral.apply_to_all(fn, range(items), workers=WORKERS, **options))


async def corral_layered(fn: Handler, items: int) -> int:
    return await corral_bare(
        fn,
        items,
        retry=corral.Retry(3),
        rate_limit=corral.TokenBucket(1e12, burst=10**9),
        timeout=60.0,
    )


async def aqute_layered(fn: Handler, items: int) -> int:
    from aqute import Aqute
    from aqute.ratelimiter import TokenBucketRateLimiter

    engine: Aqute[int, int] = Aqute(
        handle_coro=fn,
        workers_count=WORKERS,
        retry_count=2,
        rate_limiter=TokenBucketRateLimiter(10**9, 1.0),
        task_timeout_seconds=60,
    )
    return len(await engine.process_all(range(items)))


def middleware_lineup(backend: str, fn: Handler, items: int) -> dict[str, Contender | str]:
    on_asyncio = backend in ("asyncio", "uvloop")
    entries: dict[str, Contender | str] = {
        BASELINE: lambda: hand_written(fn, items, WORKERS),
        HAND_MW: lambda: hand_written(with_middleware(fn), items, WORKERS),
        "corral apply_to_all, bare": lambda: corral_bare(fn, items),
        "corral apply_to_all, retry + rate_limit + timeout": lambda: corral_layered(fn, items),
    }
    if installed("aqute"):
        entries["aqute, retry + rate limiter + timeout"] = (
            (lambda: aqute_layered(fn, items)) if on_asyncio else "asyncio only"
        )
    return entries


MIDDLEWARE_PAIRS = {
    "corral apply_to_all, retry + rate_limit + timeout": HAND_MW,
    "aqute, retry + rate limiter + timeout": HAND_MW,
}

# ----------------------------------------------------------- limiter overhead

NO_LIMIT = 10**9  # per second: never binds


def with_aiolimiter(fn: Handler) -> Handler:
    from aiolimiter import AsyncLimiter

    limiter = AsyncLimiter(NO_LIMIT, 1.0)

    async def call(item: int) -> int:
        async with limiter:
            return await fn(item)

    return call


async def aiometer_run(fn: Handler, items: int, **options: Any) -> int:
    import aiometer

    await aiometer.run_on_each(fn, range(items), max_at_once=WORKERS, **options)
    return items


def limiter_lineup(backend: str, fn: Handler, items: int) -> dict[str, Contender | str]:
    on_asyncio = backend in ("asyncio", "uvloop")
    entries: dict[str, Contender | str] = {
        "corral, no limit": lambda: corral_bare(fn, items),
        "corral, SlidingWindow": lambda: corral_bare(
            fn, items, rate_limit=corral.SlidingWindow(NO_LIMIT, 1.0)
        ),
        "corral, TokenBucket": lambda: corral_bare(
            fn, items, rate_limit=corral.TokenBucket(NO_LIMIT, burst=NO_LIMIT)
        ),
        BASELINE: lambda: hand_written(fn, items, WORKERS),
    }
    if installed("aiolimiter"):
        entries["hand-written + aiolimiter"] = (
            (lambda: hand_written(with_aiolimiter(fn), items, WORKERS))
            if on_asyncio
            else "asyncio only"
        )
    if installed("aiometer"):
        entries["aiometer.run_on_each, no limit"] = lambda: aiometer_run(fn, items)
        entries["aiometer.run_on_each, max_per_second"] = (
            # measured once at 10,000 items: 1000 µs per item, for aiometer
            # sleeps until the next clock tick, and uvloop's clock ticks per ms
            "not run: ~1000 (sleeps a 1 ms clock tick per item)"
            if backend == "uvloop"
            else lambda: aiometer_run(fn, items, max_per_second=NO_LIMIT)
        )
    return entries


LIMITER_PAIRS = {
    "corral, no limit": "corral, no limit",
    "aiometer.run_on_each, no limit": "aiometer.run_on_each, no limit",
    "corral, SlidingWindow": "corral, no limit",
    "corral, TokenBucket": "corral, no limit",
    "hand-written + aiolimiter": BASELINE,
    "aiometer.run_on_each, max_per_second": "aiometer.run_on_each, no limit",
}

# ------------------------------------------------------------------- accuracy


def max_in_window(times: list[float], per: float) -> int:
    times = sorted(times)
    return max(bisect.bisect_left(times, t + per) - i for i, t in enumerate(times))


async def hammer(acquire: Callable[[], Awaitable[Any]], total: int, tasks: int = 50) -> list[float]:
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


async def aiometer_times(total: int) -> list[float]:
    """aiometer's limiter lives inside run_on_each: record when each call starts."""
    import aiometer

    times: list[float] = []

    async def record(_: int) -> None:
        times.append(anyio.current_time())

    await aiometer.run_on_each(record, range(total), max_at_once=50, max_per_second=1000)
    return times


def accuracy(backend: str, options: dict[str, Any], total: int) -> list[tuple[str, int, float]]:
    rows: list[tuple[str, int, float]] = []

    async def main() -> None:
        runs: list[tuple[str, Callable[[], Awaitable[list[float]]]]] = [
            (
                "corral `SlidingWindow(100, 0.1)`",
                lambda: hammer(corral.SlidingWindow(100, 0.1).acquire, total),
            ),
            (
                "corral `TokenBucket(1000, burst=100)`",
                lambda: hammer(corral.TokenBucket(1000, burst=100).acquire, total),
            ),
        ]
        if backend == "asyncio" and installed("aiolimiter"):
            from aiolimiter import AsyncLimiter

            runs.append(
                (
                    "aiolimiter `AsyncLimiter(100, 0.1)`",
                    lambda: hammer(AsyncLimiter(100, 0.1).acquire, total),
                )
            )
        if installed("aiometer"):
            runs.append(("aiometer `max_per_second=1000`", lambda: aiometer_times(total)))
        for label, run in runs:
            start = anyio.current_time()
            times = await run()
            elapsed = anyio.current_time() - start
            rows.append((label, max_in_window(times, 0.1), len(times) / elapsed))

    anyio.run(main, backend=backend, backend_options=options)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--admissions", type=int, default=1000)
    parser.add_argument(
        "--handler", nargs="+", choices=sorted(HANDLERS), default=["no-await", "sleep0"]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="5k items, 3 repeats, no-await handler only, 300 admissions",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.repeat, args.admissions = 5_000, 3, 300
        args.handler = ["no-await"]

    keys = []
    for handler in args.handler:
        fn = HANDLERS[handler]
        results = compare(
            f"#### Middleware, `{handler}` handler, {WORKERS} workers: µs per item, median "
            f"(min-max) of {args.repeat} interleaved runs of {args.items} items; **ratio** "
            "to the hand-written pool doing the same",
            lambda backend, fn=fn: middleware_lineup(backend, fn, args.items),  # type: ignore[misc]
            args.items,
            args.repeat,
            BASELINE,
            MIDDLEWARE_PAIRS,
        )
        keys.append((handler, results))
    compare(
        f"#### Limiter overhead, a limit that never binds, `no-await` handler, {WORKERS} "
        f"workers: µs per item, median (min-max) of {args.repeat} interleaved runs of "
        f"{args.items} items; **ratio** to the same runner without a limit",
        lambda backend: limiter_lineup(backend, HANDLERS["no-await"], args.items),
        args.items,
        args.repeat,
        BASELINE,
        LIMITER_PAIRS,
    )

    print(
        f"\n#### Limiter accuracy: 50 tasks, {args.admissions} admissions, limit 100 per "
        "0.1 s; the most admissions in any 0.1 s window (read with the backend's clock)\n"
    )
    print("| backend | limiter | most in any 0.1 s | admissions/s |")
    print("| --- | --- | ---: | ---: |")
    for label, backend, options in backends():
        for name, worst, rate in accuracy(backend, options, args.admissions):
            print(f"| {label} | {name} | {worst} | {rate:.0f} |")
    print()
    layered = "corral apply_to_all, retry + rate_limit + timeout"
    for handler, results in keys:
        key_ratio(f"{layered} / {HAND_MW}, `{handler}`", results, layered, HAND_MW)
    return 0


if __name__ == "__main__":
    sys.exit(main())
