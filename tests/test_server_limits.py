"""Limits that hold at the server: the pause on Retry-After, reading it from the
HTTP libraries' errors, catching up late wake-ups, and AdaptiveRate."""

from __future__ import annotations

import random
from typing import Any

import anyio
import attrs
import pytest

import corral._limits
from corral import AdaptiveRate, Pool, Retry, SlidingWindow, TokenBucket, apply_to_all
from corral._retry import read_retry_after, retry_after_of

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend(timing_anyio_backend: Any) -> Any:
    return timing_anyio_backend


def tolerance(exact: bool) -> float:
    """How much later than planned a time read in real time may be."""
    return 1e-9 if exact else 0.1


# --- errors as the HTTP libraries raise them (duck-typed, as corral reads them)


class Headers(dict[str, str]):
    """Case-insensitive lookups, as httpx, requests and aiohttp headers do."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        for name, value in self.items():
            if name.lower() == key.lower():
                return value
        return default


@attrs.define
class Response:
    status_code: int
    headers: Headers


class HTTPStatusError(Exception):
    """Shaped like httpx's and requests' errors: ``.response.headers``."""

    def __init__(self, status: int, retry_after: str | None = None) -> None:
        super().__init__(f"HTTP {status}")
        headers = Headers({"Retry-After": retry_after} if retry_after is not None else {})
        self.response = Response(status, headers)


class ClientResponseError(Exception):
    """Shaped like aiohttp's: ``.status`` and ``.headers``."""

    def __init__(self, status: int, retry_after: str | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = Headers({"retry-after": retry_after} if retry_after is not None else {})


def test_retry_after_is_read_from_the_http_libraries_errors() -> None:
    assert retry_after_of(HTTPStatusError(429, "2")) == "2"
    assert retry_after_of(ClientResponseError(503, "1.5")) == "1.5"
    assert retry_after_of(HTTPStatusError(500)) is None
    assert retry_after_of(ValueError("plain")) is None
    assert read_retry_after(HTTPStatusError(429, "2")) == 2.0
    assert read_retry_after(ClientResponseError(429, "soon")) is None  # unreadable: ignored


def test_retry_after_from_a_real_httpx_error() -> None:
    httpx = pytest.importorskip("httpx")
    request = httpx.Request("GET", "http://api.example/items/1")
    response = httpx.Response(429, headers={"Retry-After": "3"}, request=request)
    with pytest.raises(httpx.HTTPStatusError) as caught:
        response.raise_for_status()
    assert read_retry_after(caught.value) == 3.0


def test_retry_after_callable_is_checked() -> None:
    with pytest.raises(TypeError, match="retry_after"):
        Retry(retry_after=3)  # type: ignore[arg-type]

    async def reader(error: Exception) -> object:
        return None

    with pytest.raises(TypeError, match="retry_after"):
        Retry(retry_after=reader)  # type: ignore[arg-type]


async def test_retry_after_callable_says_where_to_read_it(exact: bool) -> None:
    """Retry(retry_after=fn): the wait is at least what fn(error) gives."""
    calls: list[float] = []

    async def handler(item: int) -> int:
        calls.append(anyio.current_time())
        if len(calls) == 1:
            raise RuntimeError("throttled", 0.4)
        return item

    retry = Retry(3, wait_initial=0, retry_after=lambda e: e.args[1] if len(e.args) > 1 else None)
    async with Pool(handler, retry=retry) as pool:
        await pool.submit(1)
    assert len(calls) == 2
    # (uvloop's clock counts whole milliseconds: 0.4 s can read as 0.39999...)
    early = 0.0 if exact else 1e-3
    assert 0.4 - early <= calls[1] - calls[0] < 0.4 + tolerance(exact)


# --- the pause ---------------------------------------------------------------


def limiters() -> list[Any]:
    return [
        pytest.param(lambda: SlidingWindow(1000), id="window"),
        pytest.param(lambda: TokenBucket(1000), id="bucket"),
        pytest.param(lambda: AdaptiveRate(1000), id="adaptive"),
    ]


@pytest.mark.parametrize("make", limiters())
async def test_pause_holds_every_admission_until_it_ends(make: Any, exact: bool) -> None:
    limiter = make()
    await limiter.acquire()
    start = anyio.current_time()
    limiter.pause(0.5)
    limiter.pause(0.1)  # a shorter pause does not cut the longer one
    with pytest.raises(anyio.WouldBlock):
        limiter.acquire_nowait()
    times: list[float] = []

    async def waiter() -> None:
        await limiter.acquire()
        times.append(anyio.current_time() - start)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(waiter)
    assert len(times) == 3
    assert all(0.5 <= t < 0.5 + tolerance(exact) + 0.01 for t in times)


@pytest.mark.parametrize("make", limiters())
async def test_pause_rejects_bad_seconds(make: Any) -> None:
    limiter = make()
    with pytest.raises(ValueError, match="seconds"):
        limiter.pause(-1)
    with pytest.raises(TypeError, match="seconds"):
        limiter.pause("1")


@pytest.mark.parametrize("make", limiters())
@pytest.mark.parametrize("error", [HTTPStatusError, ClientResponseError])
async def test_one_retry_after_slows_every_worker_of_every_pool(
    make: Any, error: type[Exception], exact: bool
) -> None:
    """Item 0 fails once with Retry-After: 0.5. No attempt of any item, in
    either pool sharing the limiter, starts in the next 0.5 s."""
    limiter = make()
    failed_at: list[float] = []
    started: list[float] = []

    async def handler(item: int) -> int:
        now = anyio.current_time()
        if item == 0 and not failed_at:
            failed_at.append(now)
            raise error(429, "0.5")
        started.append(now)
        await anyio.sleep(0.01)
        return item

    retry = Retry(3, wait_initial=0)
    async with (
        Pool(handler, workers=4, rate_limit=limiter, retry=retry) as first,
        Pool(handler, workers=4, rate_limit=limiter) as second,
    ):
        await first.submit(0)
        await anyio.sleep(0.001)  # the failure is in
        for n in range(1, 9):
            await (first if n % 2 else second).submit(n)
    assert len(started) == 9  # item 0's retry and the eight others
    assert min(started) >= failed_at[0] + 0.5
    if exact:
        assert min(started) == pytest.approx(failed_at[0] + 0.5, abs=1e-6)


async def test_a_third_party_limiter_with_pause_is_paused() -> None:
    paused: list[float] = []

    class Limiter:
        async def acquire(self, cost: int = 1) -> None:
            await anyio.lowlevel.checkpoint()

        def pause(self, seconds: float) -> None:
            paused.append(seconds)

    async def handler(item: int) -> int:
        raise HTTPStatusError(429, "7")

    async with Pool(handler, rate_limit=Limiter()) as pool:
        await pool.submit(1)
    assert paused == [7.0]


async def test_a_failure_without_retry_after_does_not_pause(exact: bool) -> None:
    limiter = TokenBucket(1000)

    async def handler(item: int) -> int:
        raise HTTPStatusError(500)

    async with Pool(handler, rate_limit=limiter) as pool:
        await pool.submit(1)
    with anyio.fail_after(0.05):  # not paused: the next one due in 1 ms
        await limiter.acquire()


# --- late wake-ups -------------------------------------------------------------


async def admitted_in(limiter: Any, seconds: float, tasks: int = 20) -> int:
    count = 0

    async def worker() -> None:
        nonlocal count
        while True:
            await limiter.acquire()
            count += 1

    with anyio.move_on_after(seconds):
        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(worker)
    return count


@pytest.mark.parametrize("rate", [50, 300, 2000])
async def test_token_bucket_catches_up_late_wake_ups(
    rate: int, exact: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every wake-up of the waiter at the head is late by up to 2 ms (a busy
    loop): TokenBucket(rate) still admits at least 99% of its rate, where a
    bucket of one token loses the lateness for good."""
    if not exact:
        pytest.skip("lateness is simulated on the virtual clock")
    sleep_until = anyio.sleep_until
    draw = random.Random(rate).uniform

    async def late(deadline: float) -> None:
        await sleep_until(deadline + draw(0.0, 0.002))

    monkeypatch.setattr(corral._limits.anyio, "sleep_until", late)
    admitted = await admitted_in(TokenBucket(rate), 10.0)
    assert admitted >= 0.99 * rate * 10
    assert admitted <= rate * 10 + 1
    one_token = await admitted_in(TokenBucket(rate, burst=1), 10.0)
    if rate >= 300:  # 1 ms late on 3.3 ms or less: a loss the test would see
        assert one_token < 0.99 * rate * 10


# --- AdaptiveRate ----------------------------------------------------------------


def test_adaptive_rate_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="initial"):
        AdaptiveRate(0)
    with pytest.raises(TypeError, match="initial"):
        AdaptiveRate("10")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min <= initial <= max"):
        AdaptiveRate(10, min=20)
    with pytest.raises(ValueError, match="min <= initial <= max"):
        AdaptiveRate(10, max=5)
    with pytest.raises(TypeError, match="on"):
        AdaptiveRate(10, on=42)  # type: ignore[arg-type]
    rate = AdaptiveRate(10, min=1, max=100)
    stats = rate.statistics()
    assert (stats.rate, stats.min, stats.max, stats.throttles, stats.decreases) == (
        10,
        1,
        100,
        0,
        0,
    )
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.rate = 5  # type: ignore[misc]


async def test_adaptive_rate_learns_the_servers_limit(exact: bool) -> None:
    """Started at 200/s against a server that takes 50 in any second and throttles
    the rest (429 without Retry-After): after one clump it paces at 90% of what
    the server took, and 429s stay a small share."""
    if not exact:
        pytest.skip("needs the virtual clock: 20 s of simulated traffic")
    rate = AdaptiveRate(200)
    taken: list[float] = []
    throttled = 0

    async def handler(item: int) -> int:
        nonlocal throttled
        now = anyio.current_time()
        while taken and taken[0] <= now - 1.0:
            taken.pop(0)
        if len(taken) >= 50:
            throttled += 1
            raise HTTPStatusError(429)
        taken.append(now)
        return item

    async with Pool(handler, workers=20, max_pending=20, rate_limit=rate) as pool:
        with anyio.move_on_after(20.0):
            for n in range(10**6):
                await pool.submit(n)
        stats = rate.statistics()
    assert stats.decreases >= 1
    assert 40 <= stats.rate <= 60
    total = pool.stats.succeeded + pool.stats.failed
    assert throttled / total < 0.05
    assert pool.stats.succeeded >= 0.85 * 50 * 20


async def test_adaptive_rate_clump_counts_once_and_climbs_back(exact: bool) -> None:
    if not exact:
        pytest.skip("needs the virtual clock")
    rate = AdaptiveRate(100)
    for _ in range(30):
        await rate.acquire()
    admitted_at = anyio.current_time()
    for _ in range(5):  # five throttles from attempts admitted before the decrease
        rate._ended(admitted_at, HTTPStatusError(429), None)
    stats = rate.statistics()
    assert (stats.throttles, stats.decreases) == (5, 1)
    assert stats.rate == pytest.approx(90.0, rel=1e-3)  # 90% of the rate: nothing was accepted
    await traffic(rate, 5.0)
    assert 90.0 < rate.rate < 100.0
    await traffic(rate, 6.0)
    assert rate.rate >= 100.0  # back at the peak, then probing beyond


async def traffic(rate: AdaptiveRate, seconds: float) -> None:
    """Calls that succeed, as fast as ``rate`` admits them, for ``seconds``."""

    async def call(n: int) -> int:
        return n

    with anyio.move_on_after(seconds):
        async with Pool(call, workers=5, max_pending=5, rate_limit=rate) as pool:
            for n in range(10**6):
                await pool.submit(n)


async def test_adaptive_rate_ignores_other_errors_and_honours_on() -> None:
    rate = AdaptiveRate(100, on=KeyError)
    await rate.acquire()
    now = anyio.current_time()
    rate._ended(now, ValueError("bad input"), None)
    rate._ended(now, HTTPStatusError(404), None)
    assert rate.statistics().decreases == 0
    rate._ended(now, KeyError("throttled, by this API's own convention"), None)
    assert rate.statistics().decreases == 1
    assert rate.is_throttle(ClientResponseError(503))
    assert rate.is_throttle(HTTPStatusError(400, "1"))


async def test_adaptive_rate_throttled_by_hand_and_bounded_by_min() -> None:
    rate = AdaptiveRate(10, min=9.5)
    await rate.acquire()
    rate.throttled()
    assert rate.rate == 9.5
    assert rate.statistics().decreases == 1


async def test_adaptive_rate_probes_up_under_load_and_stops_at_max(exact: bool) -> None:
    if not exact:
        pytest.skip("needs the virtual clock")
    rate = AdaptiveRate(10, max=12)

    async def call(n: int) -> int:
        return n

    with anyio.move_on_after(30.0):
        async with Pool(call, workers=5, max_pending=5, rate_limit=rate) as pool:
            for n in range(10**6):
                await pool.submit(n)
    assert rate.rate == 12


async def test_adaptive_rate_does_not_grow_while_idle(exact: bool) -> None:
    """Idle for 10 minutes, it does not come back at thousands a second."""
    if not exact:
        pytest.skip("needs the virtual clock")
    rate = AdaptiveRate(10)
    await rate.acquire()
    await anyio.sleep(600.0)
    await rate.acquire()
    assert rate.rate == 10


async def test_a_retry_after_too_long_for_any_wait_is_no_pause_for_good() -> None:
    limiter = TokenBucket(1000)

    async def handler(item: int) -> int:
        raise HTTPStatusError(429, "1" + "0" * 400)  # more seconds than a float holds

    async with Pool(handler, rate_limit=limiter) as pool:
        await pool.submit(1)
    with anyio.fail_after(1.0):
        await limiter.acquire()
    with pytest.raises(ValueError, match="seconds"):
        limiter.pause(float("inf"))


async def test_a_reader_that_raises_does_not_replace_the_attempts_error() -> None:
    """Retry(retry_after=fn) runs on every failed attempt; if it raises, the
    attempt's own error is still the item's."""

    async def handler(item: int) -> int:
        raise ValueError("bad input")

    retry = Retry(2, wait_initial=0, on=KeyError, retry_after=lambda e: e.wait)  # type: ignore[attr-defined]
    outcomes = await apply_to_all(handler, [1], rate_limit=TokenBucket(1000), retry=retry)
    assert isinstance(outcomes[0].error, ValueError)


async def test_adaptive_rate_takes_a_retry_after_from_the_users_reader(exact: bool) -> None:
    rate = AdaptiveRate(1000)
    started: list[float] = []

    async def handler(item: int) -> int:
        started.append(anyio.current_time())
        if item == 0 and len(started) == 1:
            raise RuntimeError("slow down", 0.5)
        return item

    retry = Retry(2, wait_initial=0, retry_after=lambda e: e.args[1] if len(e.args) > 1 else None)
    async with Pool(handler, workers=2, rate_limit=rate, retry=retry) as pool:
        await pool.submit(0)
        await anyio.sleep(0.01)
        await pool.submit(1)
    assert rate.statistics().decreases == 1
    assert min(started[1:]) - started[0] >= 0.5


async def test_adaptive_rate_as_user_middleware_learns_from_each_item(exact: bool) -> None:
    """In middleware=[...] it sees each item once and learns from its final error."""
    rate = AdaptiveRate(100)

    async def handler(item: int) -> int:
        if item == 3:
            raise HTTPStatusError(429)
        return item

    outcomes = await apply_to_all(handler, range(6), middleware=[rate])
    assert [o.ok for o in outcomes] == [True, True, True, False, True, True]
    assert rate.statistics().decreases == 1
