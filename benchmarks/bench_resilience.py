"""What the resilience layers cost when they never fire, and the same jobs
done by the peers: circuit breakers (purgatory, aiobreaker) and retries
(tenacity, stamina).

1. Overhead: ``apply_to_all`` with 100 workers and ``breaker=CircuitBreaker()``,
   ``retry=Retry()`` (plain, with a ``RetryBudget``, with an ``on_result``
   predicate that accepts every result), ``hedge=Hedge(10.0)`` (never fires)
   or ``hedge=Hedge("p99")`` (fires for the attempts slower than the p99 of
   the latest latencies: about 1 in 100), or all three, against the same
   ``apply_to_all`` without them; the budget and ``on_result`` rows also
   against the plain ``Retry``. Each run uses fresh layers. The extra calls
   each contender made (hedged copies, retries) are counted and printed.
2. Circuit breaker, closed: ``--calls`` calls, one after the other, of an
   async function that succeeds, through a closed breaker: corral's
   ``CircuitBreaker`` as middleware (``await breaker(x, fn)``) and as
   ``breaker=`` of a one-worker ``apply_to_all`` (against the same pool
   without it), purgatory's ``AsyncCircuitBreakerFactory`` decorator and
   aiobreaker's ``call_async`` and decorator (both asyncio only), against
   ``await fn(x)``. Then open (once, not per handler): the same calls
   refused by an open breaker, each refusal caught, against a hand-written
   ``if open: raise`` caught the same way.
3. Retry of a call that succeeds the first time: corral's
   ``await retry.call(fn, x)``, a ``@retry``-decorated function and ``Retry``
   as middleware (``await retry(x, fn)``); tenacity's ``@retry`` and
   ``AsyncRetrying(...)(fn, x)`` with ``stop_after_attempt(3)`` and an
   exponential wait; stamina's ``@stamina.retry(on=Exception, attempts=3)``
   and ``retry_context``; against ``await fn(x)``. Every policy allows 3
   attempts with an exponential wait, and none ever waits here.

Every table is run on asyncio, asyncio + uvloop and trio (a peer that is
asyncio only says so in its cell); a peer that is not installed is left out,
and the output says so. Besides the ratios, the added µs per call (the median
of the per-run differences with the baseline) let the rows be compared across
tables.

    python benchmarks/bench_resilience.py [--items 50000] [--calls 50000] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

import anyio
import anyio.lowlevel
from _harness import Contender, compare, installed, key_ratio  # the script's folder is on sys.path

import corral

Handler = Callable[[int], Awaitable[int]]
Results = Mapping[str, Mapping[str, list[float]]]

WORKERS = 100
ON_ASYNCIO = ("asyncio", "uvloop")
ASYNCIO_ONLY = "asyncio only"


async def no_await(x: int) -> int:
    return x


async def one_checkpoint(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return x


HANDLERS: dict[str, Handler] = {"no-await": no_await, "checkpoint": one_checkpoint}


class Boom(Exception):
    """The failure that trips the breakers before the open-breaker runs."""


async def fail(x: int) -> int:
    raise Boom(x)


def added_table(title: str, results: Results, rows: Mapping[str, str]) -> None:
    """Print, from timings already measured, the µs each row adds per item to
    its baseline: the median of the per-run differences (runs are paired)."""
    columns = list(results)
    print(f"\n{title}\n")
    print("| contender | baseline | " + " | ".join(columns) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in columns) + " |")
    for row, base in rows.items():
        cells = []
        for column in columns:
            timings = results[column]
            if row in timings and base in timings:
                diffs = [o - b for o, b in zip(timings[row], timings[base], strict=True)]
                cells.append(f"{statistics.median(diffs):+.2f}")
            else:
                cells.append("n/a")
        print(f"| {row} | {base} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


def missing(*modules: str) -> None:
    gone = [module for module in modules if not installed(module)]
    if gone:
        print(f"\n(not installed, left out: {', '.join(gone)})")


# ------------------------------------------------------------ 1. overhead


BARE = "corral apply_to_all, bare"
RETRY = "corral `retry=Retry()`"
BREAKER = "corral `breaker=CircuitBreaker()`"
BUDGET = "corral `retry=Retry(budget=RetryBudget())`"
ON_RESULT = "corral `retry=Retry(on_result=lambda r: False)`"
HEDGE = "corral `hedge=Hedge(10.0)`"
HEDGE_P99 = 'corral `hedge=Hedge("p99")`'
ALL = "corral breaker + retry (budget, on_result) + `Hedge(10.0)`"

#: Each run's layers are made fresh: name -> the options of apply_to_all.
LAYERS: dict[str, Callable[[], dict[str, Any]]] = {
    BARE: dict,
    BREAKER: lambda: {"breaker": corral.CircuitBreaker()},
    RETRY: lambda: {"retry": corral.Retry()},
    BUDGET: lambda: {"retry": corral.Retry(budget=corral.RetryBudget())},
    ON_RESULT: lambda: {"retry": corral.Retry(on_result=lambda r: False)},
    HEDGE: lambda: {"hedge": corral.Hedge(10.0)},
    HEDGE_P99: lambda: {"hedge": corral.Hedge("p99")},
    ALL: lambda: {
        "breaker": corral.CircuitBreaker(),
        "retry": corral.Retry(budget=corral.RetryBudget(), on_result=lambda r: False),
        "hedge": corral.Hedge(10.0),
    },
}

#: backend -> contender -> the calls beyond one per item in its latest run
EXTRA_CALLS: dict[str, dict[str, int]] = {}


async def pool_run(fn: Handler, items: int, backend: str, name: str) -> int:
    outcomes = await corral.apply_to_all(fn, range(items), workers=WORKERS, **LAYERS[name]())
    EXTRA_CALLS.setdefault(backend, {})[name] = sum(o.attempts for o in outcomes) - items
    return sum(o.error is None for o in outcomes)


def overhead_lineup(backend: str, fn: Handler, items: int) -> dict[str, Contender | str]:
    return {
        name: (lambda name=name: pool_run(fn, items, backend, name))  # type: ignore[misc]
        for name in LAYERS
    }


def print_extra_calls() -> None:
    columns = list(EXTRA_CALLS)
    print("\nCalls beyond one per item in each contender's latest run (hedged copies, retries):\n")
    print("| contender | " + " | ".join(columns) + " |")
    print("| --- | " + " | ".join("---:" for _ in columns) + " |")
    for name in LAYERS:
        cells = [str(EXTRA_CALLS[column].get(name, "n/a")) for column in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    EXTRA_CALLS.clear()


def retry_ratios(title: str, results: Results) -> None:
    """The budget and on_result rows against the plain Retry (same timings)."""
    columns = list(results)
    print(f"\n{title}\n")
    print("| contender | " + " | ".join(columns) + " |")
    print("| --- | " + " | ".join("---:" for _ in columns) + " |")
    for row in (BUDGET, ON_RESULT):
        cells = []
        for column in columns:
            timings = results[column]
            value = statistics.median(
                o / b for o, b in zip(timings[row], timings[RETRY], strict=True)
            )
            cells.append(f"**{value:.2f}x**")
        print(f"| {row} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


# ------------------------------------------------------- 2. circuit breaker

DIRECT = "`await fn(x)`"
BREAKER_MW = "corral `await breaker(x, fn)`"
POOL_1 = "corral apply_to_all, 1 worker, bare"
POOL_1_BREAKER = "corral apply_to_all, 1 worker, `breaker=`"
PURGATORY = "purgatory `@AsyncCircuitBreakerFactory()(name)`"
AIOBREAKER_CALL = "aiobreaker `await breaker.call_async(fn, x)`"
AIOBREAKER_DECO = "aiobreaker `@breaker`"


async def loop(fn: Handler, calls: int) -> int:
    done = 0
    for x in range(calls):
        done += await fn(x) == x
    return done


async def corral_breaker_loop(fn: Handler, calls: int) -> int:
    breaker = corral.CircuitBreaker()
    done = 0
    for x in range(calls):
        done += await breaker(x, fn) == x
    return done


async def pool_one(fn: Handler, calls: int, **options: Any) -> int:
    outcomes = await corral.apply_to_all(fn, range(calls), workers=1, **options)
    return sum(o.error is None for o in outcomes)


async def purgatory_loop(fn: Handler, calls: int) -> int:
    from purgatory import AsyncCircuitBreakerFactory

    factory = AsyncCircuitBreakerFactory()
    await factory.initialize()
    return await loop(factory("bench")(fn), calls)


async def aiobreaker_call(fn: Handler, calls: int) -> int:
    from aiobreaker import CircuitBreaker

    breaker = CircuitBreaker()
    done = 0
    for x in range(calls):
        done += await breaker.call_async(fn, x) == x
    return done


async def aiobreaker_decorated(fn: Handler, calls: int) -> int:
    from aiobreaker import CircuitBreaker

    return await loop(CircuitBreaker()(fn), calls)


def closed_lineup(backend: str, fn: Handler, calls: int) -> dict[str, Contender | str]:
    on_asyncio = backend in ON_ASYNCIO
    entries: dict[str, Contender | str] = {
        DIRECT: lambda: loop(fn, calls),
        BREAKER_MW: lambda: corral_breaker_loop(fn, calls),
        POOL_1: lambda: pool_one(fn, calls),
        POOL_1_BREAKER: lambda: pool_one(fn, calls, breaker=corral.CircuitBreaker()),
    }
    if installed("purgatory"):
        entries[PURGATORY] = (lambda: purgatory_loop(fn, calls)) if on_asyncio else ASYNCIO_ONLY
    if installed("aiobreaker"):
        entries[AIOBREAKER_CALL] = (
            (lambda: aiobreaker_call(fn, calls)) if on_asyncio else ASYNCIO_ONLY
        )
        entries[AIOBREAKER_DECO] = (
            (lambda: aiobreaker_decorated(fn, calls)) if on_asyncio else ASYNCIO_ONLY
        )
    return entries


CLOSED_PAIRS = {POOL_1: POOL_1, POOL_1_BREAKER: POOL_1}
CLOSED_ADDED = {
    BREAKER_MW: DIRECT,
    POOL_1_BREAKER: POOL_1,
    PURGATORY: DIRECT,
    AIOBREAKER_CALL: DIRECT,
    AIOBREAKER_DECO: DIRECT,
}

HAND_OPEN = "hand-written `if open: raise`"
OPEN_CORRAL = "corral `await breaker(x, fn)`, open"
OPEN_PURGATORY = "purgatory decorator, open"
OPEN_AIOBREAKER = "aiobreaker `call_async`, open"


class Refused(Exception):
    pass


async def hand_open(fn: Handler, calls: int) -> int:
    is_open = True

    async def guarded(x: int) -> int:
        if is_open:
            raise Refused
        return await fn(x)

    refused = 0
    for x in range(calls):
        try:
            await guarded(x)
        except Refused:
            refused += 1
    return refused


async def corral_open(fn: Handler, calls: int) -> int:
    breaker = corral.CircuitBreaker(min_calls=4, cooldown=3600.0)
    for x in range(4):
        with contextlib.suppress(Boom):
            await breaker(x, fail)
    assert breaker.state == "open", breaker.state
    refused = 0
    for x in range(calls):
        try:
            await breaker(x, fn)
        except corral.CircuitOpen:
            refused += 1
    return refused


async def purgatory_open(fn: Handler, calls: int) -> int:
    from purgatory import AsyncCircuitBreakerFactory
    from purgatory.domain.model import OpenedState

    factory = AsyncCircuitBreakerFactory(default_threshold=1, default_ttl=3600)
    await factory.initialize()
    with contextlib.suppress(Boom):
        await factory("bench")(fail)(0)
    guarded = factory("bench")(fn)
    refused = 0
    for x in range(calls):
        try:
            await guarded(x)
        except OpenedState:
            refused += 1
    return refused


async def aiobreaker_open(fn: Handler, calls: int) -> int:
    from aiobreaker import CircuitBreaker, CircuitBreakerError

    breaker = CircuitBreaker(timeout_duration=timedelta(hours=1))
    breaker.open()
    refused = 0
    for x in range(calls):
        try:
            await breaker.call_async(fn, x)
        except CircuitBreakerError:
            refused += 1
    return refused


def open_lineup(backend: str, fn: Handler, calls: int) -> dict[str, Contender | str]:
    on_asyncio = backend in ON_ASYNCIO
    entries: dict[str, Contender | str] = {
        HAND_OPEN: lambda: hand_open(fn, calls),
        OPEN_CORRAL: lambda: corral_open(fn, calls),
    }
    if installed("purgatory"):
        entries[OPEN_PURGATORY] = (
            (lambda: purgatory_open(fn, calls)) if on_asyncio else ASYNCIO_ONLY
        )
    if installed("aiobreaker"):
        entries[OPEN_AIOBREAKER] = (
            (lambda: aiobreaker_open(fn, calls)) if on_asyncio else ASYNCIO_ONLY
        )
    return entries


# ------------------------------------------------------------------ 3. retry

RETRY_CALL = "corral `await retry.call(fn, x)`"
RETRY_DECO = "corral `@retry`"
RETRY_MW = "corral `await retry(x, fn)`"
TENACITY_DECO = "tenacity `@retry`"
TENACITY_CALL = "tenacity `await AsyncRetrying(...)(fn, x)`"
STAMINA_DECO = "stamina `@stamina.retry`"
STAMINA_CONTEXT = "stamina `retry_context`"


async def retry_call(fn: Handler, calls: int) -> int:
    retry = corral.Retry()
    done = 0
    for x in range(calls):
        done += await retry.call(fn, x) == x
    return done


async def retry_middleware(fn: Handler, calls: int) -> int:
    retry = corral.Retry()
    done = 0
    for x in range(calls):
        done += await retry(x, fn) == x
    return done


def tenacity_options() -> dict[str, Any]:
    import tenacity

    return {
        "stop": tenacity.stop_after_attempt(3),
        "wait": tenacity.wait_exponential(multiplier=0.1, max=10.0),
        "reraise": True,
    }


async def tenacity_call(fn: Handler, calls: int) -> int:
    from tenacity import AsyncRetrying

    retrying = AsyncRetrying(**tenacity_options())
    done = 0
    for x in range(calls):
        done += await retrying(fn, x) == x
    return done


async def stamina_context(fn: Handler, calls: int) -> int:
    import stamina

    done = 0
    for x in range(calls):
        async for attempt in stamina.retry_context(on=Exception, attempts=3):
            with attempt:
                done += await fn(x) == x
    return done


def retry_lineup(backend: str, fn: Handler, calls: int) -> dict[str, Contender | str]:
    entries: dict[str, Contender | str] = {
        DIRECT: lambda: loop(fn, calls),
        RETRY_CALL: lambda: retry_call(fn, calls),
        RETRY_DECO: lambda: loop(corral.Retry()(fn), calls),
        RETRY_MW: lambda: retry_middleware(fn, calls),
    }
    if installed("tenacity"):
        import tenacity

        entries[TENACITY_DECO] = lambda: loop(tenacity.retry(**tenacity_options())(fn), calls)
        entries[TENACITY_CALL] = lambda: tenacity_call(fn, calls)
    if installed("stamina"):
        import stamina

        entries[STAMINA_DECO] = lambda: loop(stamina.retry(on=Exception, attempts=3)(fn), calls)
        entries[STAMINA_CONTEXT] = lambda: stamina_context(fn, calls)
    return entries


RETRY_ADDED = dict.fromkeys(
    (RETRY_CALL, RETRY_DECO, RETRY_MW, TENACITY_DECO, TENACITY_CALL, STAMINA_DECO, STAMINA_CONTEXT),
    DIRECT,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000, help="items per pool run")
    parser.add_argument("--calls", type=int, default=50_000, help="calls per loop run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--handler", nargs="+", choices=sorted(HANDLERS), default=["no-await", "checkpoint"]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="5k items, 10k calls, 3 repeats, checkpoint handler only",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.calls, args.repeat = 5_000, 10_000, 3
        args.handler = ["checkpoint"]

    keys: list[tuple[str, Results, Results, Results]] = []
    for handler in args.handler:
        fn = HANDLERS[handler]
        overhead = compare(
            f"#### Overhead when nothing fires, `{handler}` handler, {WORKERS} workers: "
            f"µs per item, median (min-max) of {args.repeat} interleaved runs of "
            f"{args.items} items; **ratio** to `apply_to_all` without them",
            lambda backend, fn=fn: overhead_lineup(backend, fn, args.items),  # type: ignore[misc]
            args.items,
            args.repeat,
            BARE,
        )
        print_extra_calls()
        retry_ratios(
            f"#### The same runs, `{handler}` handler: **ratio** to `retry=Retry()`", overhead
        )
        added_table(
            f"#### The same runs, `{handler}` handler: µs added per item",
            overhead,
            {name: BARE for name in LAYERS if name != BARE},
        )

        missing("purgatory", "aiobreaker")
        closed = compare(
            f"#### Circuit breaker, closed, `{handler}` function: {args.calls} calls one "
            f"after the other, µs per call, median (min-max) of {args.repeat} interleaved "
            "runs; **ratio** to `await fn(x)` (the pool rows: to the same pool without "
            "a breaker)",
            lambda backend, fn=fn: closed_lineup(backend, fn, args.calls),  # type: ignore[misc]
            args.calls,
            args.repeat,
            DIRECT,
            CLOSED_PAIRS,
        )
        added_table(
            f"#### The same runs, `{handler}` function: µs added per call", closed, CLOSED_ADDED
        )
        missing("tenacity", "stamina")
        retries = compare(
            f"#### Retry of a call that succeeds the first time, `{handler}` function: "
            f"{args.calls} calls one after the other, µs per call, median (min-max) of "
            f"{args.repeat} interleaved runs; **ratio** to `await fn(x)`",
            lambda backend, fn=fn: retry_lineup(backend, fn, args.calls),  # type: ignore[misc]
            args.calls,
            args.repeat,
            DIRECT,
        )
        added_table(
            f"#### The same runs, `{handler}` function: µs added per call", retries, RETRY_ADDED
        )
        keys.append((handler, overhead, closed, retries))

    opened = compare(
        f"#### Circuit breaker, open: {args.calls} calls refused, each refusal caught, "
        f"µs per call, median (min-max) of {args.repeat} interleaved runs; **ratio** to a "
        "hand-written `if open: raise`",
        lambda backend: open_lineup(backend, no_await, args.calls),
        args.calls,
        args.repeat,
        HAND_OPEN,
    )
    if installed("purgatory"):
        print(
            "\npurgatory raises one `OpenedState` instance on every refusal, so its "
            "traceback grows by a few frames per refusal: its cost per refusal varies "
            "with the length of the run and the garbage collector."
        )

    print()
    for handler, overhead, closed, retries in keys:
        key_ratio(f"`breaker=` / bare pool, `{handler}`", overhead, BREAKER, BARE, target=1.25)
        key_ratio(f"`retry=Retry()` / bare pool, `{handler}`", overhead, RETRY, BARE, target=1.25)
        key_ratio(f"budget / plain Retry, `{handler}`", overhead, BUDGET, RETRY, target=1.10)
        key_ratio(f"`Hedge(10.0)` / bare pool, `{handler}`", overhead, HEDGE, BARE, target=2.0)
        if installed("aiobreaker"):
            key_ratio(
                f"corral breaker / aiobreaker `call_async`, `{handler}`",
                closed,
                BREAKER_MW,
                AIOBREAKER_CALL,
                target=1.0,
            )
        if installed("tenacity"):
            key_ratio(
                f"corral `retry.call` / tenacity `@retry`, `{handler}`",
                retries,
                RETRY_CALL,
                TENACITY_DECO,
                target=1.0,
            )
    if installed("aiobreaker"):
        key_ratio(
            "corral open breaker / aiobreaker open", opened, OPEN_CORRAL, OPEN_AIOBREAKER, 1.0
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
