"""Middleware: order of the chain, user middleware, shared capacity, timeouts."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

import corral._middleware
from corral import (
    Middleware,
    RateLimiter,
    Retry,
    SlidingWindow,
    Timeout,
    TokenBucket,
    apply_to_all,
)

pytestmark = pytest.mark.anyio


class Recorder:
    """User middleware that logs what it sees, around the rest of the chain."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def __call__(self, item: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        self.log.append(f"{self.name}>{item}")
        result = await call_next(item)
        self.log.append(f"{self.name}<{item}")
        return result


async def test_chain_order_user_middleware_outermost_limits_per_attempt() -> None:
    """middleware=[a, b] wraps retry → limiter → rate_limit → timeout → handler:
    a and b see the item once, the limiters and the handler every attempt."""
    log: list[str] = []

    class RateLog:
        async def acquire(self, cost: int = 1) -> None:
            log.append("rate")
            await anyio.lowlevel.checkpoint()

    class CapacityLog:
        async def __aenter__(self) -> None:
            log.append("capacity")

        async def __aexit__(self, *exc: object) -> None:
            log.append("/capacity")

    calls = 0

    async def handler(x: int) -> int:
        nonlocal calls
        calls += 1
        log.append("handler")
        if calls < 3:
            raise ConnectionError
        return x

    [outcome] = await apply_to_all(
        handler,
        [1],
        middleware=[Recorder("a", log), Recorder("b", log)],
        retry=Retry(3, wait_initial=0),
        limiter=CapacityLog(),
        rate_limit=RateLog(),
        timeout=10,
    )
    attempt = ["capacity", "rate", "handler", "/capacity"]
    assert log == ["a>1", "b>1", *attempt * 3, "b<1", "a<1"]
    assert outcome.attempts == 3
    assert outcome.ok


async def test_middleware_can_replace_the_result_and_the_error() -> None:
    """What middleware returns is the result; what it raises is the error."""

    class Doubling:
        async def __call__(self, item: int, call_next: Callable[[int], Awaitable[int]]) -> int:
            return 2 * await call_next(item)

    class Refusing:
        async def __call__(self, item: int, call_next: Callable[[int], Awaitable[int]]) -> int:
            if item < 0:
                raise PermissionError(item)
            return await call_next(item)

    async def identity(x: int) -> int:
        return x

    outcomes = await apply_to_all(identity, [1, -1, 3], middleware=[Refusing(), Doubling()])
    assert [o.result for o in outcomes] == [2, None, 6]
    assert isinstance(outcomes[1].error, PermissionError)
    assert outcomes[1].attempts == 0  # the handler was never called


def test_builtin_middleware_and_limiters_satisfy_the_protocols() -> None:
    """Retry and Timeout are Middleware; the limiters are RateLimiters
    (runtime-checkable protocols)."""
    assert isinstance(Retry(), Middleware)
    assert isinstance(Timeout(1), Middleware)
    assert isinstance(SlidingWindow(1), RateLimiter)
    assert isinstance(TokenBucket(1), RateLimiter)
    assert isinstance(SlidingWindow(1), Middleware)
    assert isinstance(TokenBucket(1), Middleware)
    assert not isinstance(object(), RateLimiter)


async def test_two_pools_share_one_capacity_limiter() -> None:
    """Two pools with 5 workers each and one CapacityLimiter(3): never more than
    3 handlers run at once across both, and 3 do run together."""
    shared = anyio.CapacityLimiter(3)
    running = 0
    peak = 0

    async def handler(x: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.001)
        running -= 1
        return x

    async with anyio.create_task_group() as tg:
        for _ in range(2):
            tg.start_soon(lambda: apply_to_all(handler, range(40), workers=5, limiter=shared))
    assert peak == 3


async def test_timeout_abandons_a_plain_function() -> None:
    """A plain (threaded) handler past its timeout: TimeoutError at once; the
    thread finishes in the background and its result is discarded."""
    release = threading.Event()
    finished = threading.Event()

    def blocking(x: int) -> int:
        release.wait(10)
        finished.set()
        return x

    with anyio.fail_after(5):
        [outcome] = await apply_to_all(blocking, [1], timeout=0.05)
    assert isinstance(outcome.error, TimeoutError)
    assert not finished.is_set()
    release.set()
    await anyio.to_thread.run_sync(finished.wait, 5)


async def test_chain_is_built_once_per_worker_not_per_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Building the chain happens when a worker starts: once per worker, not per
    item (all four start: the handler awaits, so one worker cannot keep up)."""
    built = 0
    real = corral._middleware.build_chain

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal built
        built += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(corral._middleware, "build_chain", counting)

    async def handler(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x

    await apply_to_all(handler, range(500), workers=4, timeout=5)
    assert built == 4


async def test_user_middleware_sees_each_item_once_while_rate_limit_sees_every_attempt() -> None:
    """The contract's example: user middleware once per item, the rate limiter
    once per attempt."""
    seen: dict[int, int] = {}
    acquired = 0

    class Count:
        async def __call__(self, item: int, call_next: Callable[[int], Awaitable[int]]) -> int:
            seen[item] = seen.get(item, 0) + 1
            return await call_next(item)

    class Limiter:
        async def acquire(self, cost: int = 1) -> None:
            nonlocal acquired
            acquired += 1

    calls: dict[int, int] = {}

    async def handler(x: int) -> int:
        calls[x] = calls.get(x, 0) + 1
        if calls[x] <= x:  # item x fails x times
            raise ConnectionError
        return x

    outcomes = await apply_to_all(
        handler,
        range(3),
        middleware=[Count()],
        rate_limit=Limiter(),
        retry=Retry(5, wait_initial=0),
    )
    assert seen == {0: 1, 1: 1, 2: 1}
    assert [o.attempts for o in outcomes] == [1, 2, 3]
    assert acquired == 6


async def test_limiter_as_user_middleware_admits_each_item_once() -> None:
    """In middleware=[...] a limiter is outside retry: one admission per item,
    however many attempts the item needs."""
    limiter = SlidingWindow(5, per=60.0, burst=5)  # one admission per attempt would stall here
    calls: dict[int, int] = {}

    async def handler(x: int) -> int:
        calls[x] = calls.get(x, 0) + 1
        if calls[x] < 3:
            raise ConnectionError
        return x

    with anyio.fail_after(10):
        outcomes = await apply_to_all(
            handler, range(5), middleware=[limiter], retry=Retry(3, wait_initial=0)
        )
    assert all(o.ok and o.attempts == 3 for o in outcomes)
    with pytest.raises(anyio.WouldBlock):
        limiter.acquire_nowait()  # the 5 items used exactly the 5 admissions
