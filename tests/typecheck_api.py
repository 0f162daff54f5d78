"""Static checks of the public types, run by ``nox -s typing``.

Checked by mypy --strict and by pyright in strict mode; nothing here runs under
pytest. Each ``assert_type`` must hold for both checkers, so a change that loses
an item or result type in the public API fails the typing session. What misuse
the types must reject is in ``typecheck_misuse.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from typing import Any, Literal, assert_type

import anyio

import corral


async def fetch(n: int) -> str:
    return str(n)


def render(n: int) -> str:
    return str(n)


def fetch_later(n: int) -> Awaitable[str]:
    return fetch(n)


async def save(rows: list[int]) -> None:
    pass


async def embed(texts: list[str]) -> list[float]:
    return [float(len(text)) for text in texts]


def insert(rows: list[bytes]) -> None:
    pass


def lengths(rows: list[bytes]) -> list[int]:
    return [len(row) for row in rows]


async def numbers() -> AsyncIterator[int]:
    for n in range(3):
        yield n


def log(outcome: corral.Outcome[int, str]) -> None:
    pass


async def log_async(outcome: corral.Outcome[int, str]) -> None:
    pass


async def check_apply_to_all() -> None:
    # an async handler, a plain one and one that returns an awaitable all give
    # the handler's return type as R
    assert_type(await corral.apply_to_all(fetch, [1, 2]), list[corral.Outcome[int, str]])
    assert_type(await corral.apply_to_all(render, [1, 2]), list[corral.Outcome[int, str]])
    assert_type(await corral.apply_to_all(fetch_later, [1, 2]), list[corral.Outcome[int, str]])
    # any iterable or async iterable of items; the keyword options keep the types
    assert_type(
        await corral.apply_to_all(
            fetch,
            numbers(),
            workers=4,
            max_pending=8,
            retry=corral.Retry(attempts=3, on=(ConnectionError, TimeoutError)),
            rate_limit=corral.TokenBucket(10, per=1.0, burst=2),
            limiter=anyio.CapacityLimiter(2),
            timeout=5.0,
            middleware=[corral.Timeout(1.0)],
            on_outcome=log,
            fail_fast=False,
            name="fetch",
        ),
        list[corral.Outcome[int, str]],
    )
    assert_type(
        await corral.apply_to_all(render, range(3), on_outcome=log_async),
        list[corral.Outcome[int, str]],
    )


async def check_apply_to_each() -> None:
    async with corral.apply_to_each(fetch, [1, 2], ordered=True) as outcomes:
        assert_type(outcomes, corral.Outcomes[int, str])
        async for outcome in outcomes:
            assert_type(outcome, corral.Outcome[int, str])
        assert_type(outcomes.unfinished, list[int])
    async with corral.apply_to_each(render, numbers(), workers=2) as outcomes:
        async for outcome in outcomes:
            assert_type(outcome, corral.Outcome[int, str])
    assert_type(corral.apply_to_each(fetch, [1]), corral.ApplyToEach[int, str])


async def check_pool() -> None:
    async with corral.Pool(fetch, workers=4, on_outcome=log) as pool:
        assert_type(pool, corral.Pool[int, str])
        job = await pool.submit(1)
        assert_type(job, corral.Job[int, str])
        assert_type(await job.wait(), corral.Outcome[int, str])
        assert_type(job.item, int)
        assert_type(job.index, int)
        assert_type(job.id, Hashable)
        assert_type(job.done, bool)
        assert_type(job.outcome, corral.Outcome[int, str] | None)
        assert_type(pool.submit_nowait(2, id="two"), corral.Job[int, str])
        assert_type(pool.submit_nowait(3, priority=-1.5), corral.Job[int, str])
        assert_type(job.cancel(), bool)
        pool.resize(8)
        assert_type(pool.workers, int)
        pool.pause()
        assert_type(pool.paused, bool)
        pool.resume()
        await pool.join()
    assert_type(pool.unfinished, list[int])
    assert_type(pool.stats, corral.PoolStats)
    assert_type(pool.stats.succeeded, int)
    assert_type(pool.stats.cancelled, int)
    keyed = corral.Pool(fetch, key=lambda n: n % 3, per_key=2, cost=lambda n: n + 1)
    assert_type(keyed, corral.Pool[int, str])
    assert_type(pool.name, str | None)
    # a plain handler gives the same types
    async with corral.Pool(render) as plain:
        assert_type(plain, corral.Pool[int, str])
        assert_type(await (await plain.submit(1)).wait(), corral.Outcome[int, str])


def check_outcome(outcome: corral.Outcome[int, str]) -> None:
    assert_type(outcome.unwrap(), str)
    assert_type(outcome.item, int)
    assert_type(outcome.result, str | None)  # None when the item failed
    assert_type(outcome.error, Exception | None)
    assert_type(outcome.ok, bool)
    assert_type(outcome.index, int)
    assert_type(outcome.attempts, int)
    assert_type(outcome.elapsed, float)
    if outcome.result is not None:
        assert_type(outcome.result, str)
    made = corral.Outcome(item=2, index=0, id=0, result="4")
    assert_type(made, corral.Outcome[int, str])


async def check_batcher() -> None:
    async with corral.Batcher(embed, max_size=32, max_wait=None) as batcher:
        assert_type(batcher, corral.Batcher[str, float])
        assert_type(await batcher.submit("text"), float)
        await batcher.add("more")
        batcher.add_nowait("more")
        await batcher.add_many(["a", "b"])
        await batcher.flush()
    assert_type(corral.Batcher(save), corral.Batcher[int, None])
    assert_type(corral.Batcher(insert), corral.Batcher[bytes, None])
    assert_type(corral.Batcher(lengths, concurrency=2), corral.Batcher[bytes, int])
    assert_type(batcher.unflushed, list[str])
    assert_type(batcher.stats, corral.BatcherStats)
    assert_type(batcher.stats.last_flush_time, float | None)
    assert_type(batcher.name, str | None)
    keyed = corral.Batcher(embed, dedupe_key=str.lower)
    assert_type(keyed, corral.Batcher[str, float])


async def check_queue() -> None:
    queue: corral.Queue[int] = corral.Queue(8, name="jobs")
    await queue.put(1)
    assert_type(await queue.get(), int)
    assert_type(queue.get_nowait(), int)
    async for item in queue:
        assert_type(item, int)
    assert_type(queue.statistics(), corral.QueueStatistics)


def check_policies() -> None:
    retry = corral.Retry(3, wait_initial=0.5, deadline=30.0)
    assert_type(retry.attempts, int)
    assert_type(retry.deadline, float | None)
    limiters: list[corral.RateLimiter] = [corral.SlidingWindow(100, per=60.0)]
    assert_type(limiters, list[corral.RateLimiter])
    bucket = corral.TokenBucket(5, per=1.0, burst=2)
    assert_type(bucket.rate, float)
    assert_type(bucket.burst, int)
    window = corral.SlidingWindow(10)
    assert_type(window.limit, int)
    assert_type(window.per, float)
    assert_type(corral.Timeout(1.5).seconds, float)
    assert_type(corral.FlushError("failed", [1, 2]).items, Sequence[Any])
    layers: list[corral.Middleware] = [retry, corral.Timeout(1.0), PerHost()]
    assert_type(layers, list[corral.Middleware])


class PerHost:
    """A user middleware may name its parameters as it likes (the protocol's
    are positional-only)."""

    async def __call__(self, url: str, call_next: Callable[[str], Awaitable[str]]) -> str:
        return await call_next(url)


async def check_redis() -> None:
    import coredis

    from corral.redis import Delivery, RedisRateLimiter, StreamSink, StreamSource

    async def charge(delivery: Delivery[str]) -> int:
        return len(delivery.fields["order"])

    async with coredis.Redis(decode_responses=True) as client:
        limiter: corral.RateLimiter = RedisRateLimiter(client, "api", 10)
        async with StreamSource(client, "orders", "billing", "w1") as source:
            assert_type(source, StreamSource[str])
            assert_type(source.stream, str)
            async with corral.apply_to_each(
                charge, source, rate_limit=limiter, on_outcome=source.settle
            ) as outcomes:
                async for outcome in outcomes:
                    assert_type(outcome, corral.Outcome[Delivery[str], int])
        async with StreamSink(client, "receipts") as sink:
            assert_type(await sink.submit({"order": "1"}), str)
            assert_type(sink.maxlen, int | None)
    async with coredis.Redis() as raw:
        assert_type(StreamSource(raw, "s", "g", "c"), StreamSource[bytes])


async def check_sqlite() -> None:
    from corral.sqlite import Delivery, QueueCounts, QueueSink, QueueSource, QueueStats

    async def charge(delivery: Delivery[str]) -> int:
        return len(delivery.fields["order"])

    async with QueueSink("work.sqlite3") as sink:
        assert_type(await sink.submit({"order": "1"}, key="1"), str)
        assert_type(await sink.counts(), QueueCounts)
    async with QueueSource("work.sqlite3", stop_when_drained=True) as source:
        assert_type(source, QueueSource)
        assert_type(source.stats, QueueStats)
        async with corral.apply_to_each(charge, source, on_outcome=source.settle) as outcomes:
            async for outcome in outcomes:
                assert_type(outcome, corral.Outcome[Delivery[str], int])
        assert_type(await source.prune(older_than=86400.0), int)


async def check_concurrency_limiters() -> None:
    import coredis

    from corral.redis import RedisCapacityLimiter

    async with coredis.Redis(decode_responses=True) as client:
        cap = RedisCapacityLimiter(client, "db", 10)
        outcomes = await corral.apply_to_all(len, ["a", "bb"], limiter=cap)
        assert_type(outcomes, list[corral.Outcome[str, int]])
    adaptive = corral.AdaptiveLimiter(min=1, max=50)
    async with corral.Pool(len, limiter=adaptive) as pool:
        pool.submit_nowait("abc")
    async with corral.Batcher(lambda batch: None, limiter=adaptive) as batcher:
        await batcher.add(1)


async def check_redis_connect() -> None:
    import coredis

    from corral.redis import StreamSource, connect

    async with connect("redis://localhost:6379") as client:
        assert_type(client, coredis.Redis[str])
        assert_type(StreamSource(client, "s", "g", "c"), StreamSource[str])
    async with connect("redis://localhost:6379", decode_responses=True, db=1) as text:
        assert_type(text, coredis.Redis[str])
    async with connect("redis://localhost:6379", decode_responses=False) as raw:
        assert_type(raw, coredis.Redis[bytes])
    async with connect(coredis.Redis(decode_responses=True)) as mine:
        assert_type(mine, coredis.Redis[str])
    async with connect(coredis.RedisCluster("localhost", 7000)) as cluster:
        assert_type(cluster, coredis.RedisCluster[bytes])


async def check_resilience() -> None:
    retry = corral.Retry(3, on_result=lambda r: r is None, budget=corral.RetryBudget())
    assert_type(await retry.call(fetch, 1), str)
    assert_type(await retry.call(render, 1), str)
    decorated = retry(fetch)
    assert_type(await decorated(1), str)
    threaded = retry(render)
    assert_type(await threaded(1), str)
    breaker = corral.CircuitBreaker(min_calls=5)
    assert_type(breaker.state, Literal["closed", "open", "half_open"])
    assert_type(breaker.statistics(), corral.CircuitBreakerStatistics)
    hedge = corral.Hedge("p95", max_extra=2)
    assert_type(hedge.statistics(), corral.HedgeStatistics)
    outcomes = await corral.apply_to_all(fetch, [1, 2], breaker=breaker, hedge=hedge, retry=retry)
    assert_type(outcomes, list[corral.Outcome[int, str]])
    async with corral.TokenBucket(10):
        pass
    try:
        pass
    except corral.CircuitOpen as refused:
        assert_type(refused.retry_after, float)
    except corral.RetryError as gave_up:
        assert_type(gave_up.attempts, int)


def check_otel() -> None:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from corral.otel import CorralInstrumentor

    instrumentor = CorralInstrumentor()
    assert_type(instrumentor, CorralInstrumentor)
    meters: MeterProvider | None = None
    tracers: TracerProvider | None = None
    assert_type(
        instrumentor.instrument(meter_provider=meters, tracer_provider=tracers, trace_items=True),
        None,
    )
    assert_type(instrumentor.is_instrumented_by_opentelemetry, bool)
    assert_type(instrumentor.uninstrument(), None)
