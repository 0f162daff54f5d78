"""Static checks of the public types, run by ``nox -s typing`` (mypy --strict).

Nothing here runs under pytest: each ``assert_type`` is checked by mypy, so a
change that loses an item or result type in the public API fails the typing
session.
"""

from __future__ import annotations

from typing import assert_type

import corral


async def fetch(n: int) -> str:
    return str(n)


async def save(rows: list[int]) -> None:
    pass


async def embed(texts: list[str]) -> list[float]:
    return [float(len(text)) for text in texts]


def insert(rows: list[bytes]) -> None:
    pass


async def _pool_and_helpers() -> None:
    outcomes = await corral.apply_to_all(fetch, [1, 2])
    assert_type(outcomes, list[corral.Outcome[int, str]])
    async with corral.Pool(fetch) as pool:
        job = await pool.submit(1)
        assert_type(await job.wait(), corral.Outcome[int, str])


async def _batcher() -> None:
    async with corral.Batcher(embed, max_size=32, max_wait=None) as batcher:
        assert_type(batcher, corral.Batcher[str, float])
        assert_type(await batcher.submit("text"), float)
    assert_type(corral.Batcher(save), corral.Batcher[int, None])
    assert_type(corral.Batcher(insert), corral.Batcher[bytes, None])
    assert_type(batcher.unflushed, list[str])
    assert_type(batcher.stats, corral.BatcherStats)


async def _redis() -> None:
    import coredis

    from corral.redis import Delivery, RedisRateLimiter, StreamSink, StreamSource

    async def charge(delivery: Delivery[str]) -> int:
        return len(delivery.fields["order"])

    async with coredis.Redis(decode_responses=True) as client:
        limiter: corral.RateLimiter = RedisRateLimiter(client, "api", 10)
        async with StreamSource(client, "orders", "billing", "w1") as source:
            assert_type(source, StreamSource[str])
            async with corral.apply_to_each(
                charge, source, rate_limit=limiter, on_outcome=source.settle
            ) as outcomes:
                async for outcome in outcomes:
                    assert_type(outcome, corral.Outcome[Delivery[str], int])
        async with StreamSink(client, "receipts") as sink:
            assert_type(await sink.submit({"order": "1"}), str)
    async with coredis.Redis() as raw:
        assert_type(StreamSource(raw, "s", "g", "c"), StreamSource[bytes])
