"""RedisRateLimiter against a real redis-server: the TokenBucket bound across
limiter objects, reservations instead of polling, leasing and its bound, the
key's TTL, and a clear error (never a hang) when Redis is unreachable.

Redis's clock is real time, so these run on real clocks on every backend, with
a small allowance for reading the time after ``acquire`` returns.
"""

from __future__ import annotations

import math
import time
from typing import Any

import anyio
import coredis
import pytest

import corral
from corral.redis import RedisRateLimiter, RedisUnavailable
from redis_server import COREDIS_LEAK, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings(COREDIS_LEAK)]

# Admission times are read in the admitted task after ``acquire`` returns; a
# busy machine may read one late (never early), which can make two admissions
# look closer together than they were. Allow that much; and where the test
# does not need burst=1, burst=2 gives a stall of one more interval room.
READING_SLACK = 0.03


def assert_token_bucket(times: list[float], rate: float, per: float, burst: int, extra: int = 0):
    """At most ``burst + rate * t / per (+ extra)`` admissions in any interval of length t."""
    times = sorted(times)
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            span = times[j] - start + READING_SLACK
            allowed = burst + rate * span / per + extra
            assert j - i + 1 <= allowed + 1e-9, (
                f"{j - i + 1} admissions within {times[j] - start:.4f} s, "
                f"bound {allowed:.2f}: {times[i : j + 1]}"
            )


async def admit(limiter: Any, count: int, tasks: int, times: list[float]) -> None:
    async def one_task(share: int) -> None:
        for _ in range(share):
            await limiter.acquire()
            times.append(time.monotonic())

    async with anyio.create_task_group() as tg:
        for k in range(tasks):
            tg.start_soon(one_task, count // tasks + (k < count % tasks))


async def test_burst_then_one_per_interval(redis: coredis.Redis[str]) -> None:
    limiter = RedisRateLimiter(redis, "api", 20, 1.0, burst=3)
    times: list[float] = []
    start = time.monotonic()
    await admit(limiter, 13, 4, times)
    elapsed = time.monotonic() - start
    assert len(times) == 13
    assert_token_bucket(times, 20, 1.0, 3)
    # 3 at once, then 10 more one every 0.05 s: 0.5 s, not much more
    assert 0.5 - READING_SLACK <= elapsed < 0.5 + 0.25
    times.sort()
    assert times[2] - times[0] < 0.025  # the burst came at once (the 4th: 0.05 s later)


async def test_limiters_with_one_key_share_one_limit(redis: coredis.Redis[str]) -> None:
    """Three limiter objects (three processes, as far as Redis can tell) on
    one key share the limit; another key is independent."""
    shared = [RedisRateLimiter(redis, "shared", 20, 0.5, burst=2) for _ in range(3)]
    other = RedisRateLimiter(redis, "other", 20, 0.5, burst=2)
    times: list[float] = []
    other_times: list[float] = []
    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        for limiter in shared:
            tg.start_soon(admit, limiter, 10, 3, times)
        tg.start_soon(admit, other, 10, 3, other_times)
    assert len(times) == 30
    assert_token_bucket(times, 20, 0.5, 2)
    # 30 on one key at 40/s, 2 at once, take 28 intervals; the other key's 10
    # were not delayed by them
    assert max(times) - start >= 28 / 40 - READING_SLACK
    assert max(other_times) - start < 28 / 40


async def test_rate_limit_in_a_pool_and_as_middleware(redis: coredis.Redis[str]) -> None:
    limiter = RedisRateLimiter(redis, "pool", 50, 1.0, burst=2)
    seen: list[float] = []

    async def handler(item: int) -> int:
        seen.append(time.monotonic())
        return item

    outcomes = await corral.apply_to_all(handler, range(10), workers=10, rate_limit=limiter)
    assert [o.result for o in outcomes] == list(range(10))
    assert_token_bucket(seen, 50, 1.0, 2)
    assert max(seen) - min(seen) >= 8 / 50 - READING_SLACK

    seen.clear()
    as_middleware = RedisRateLimiter(redis, "middleware", 50, 1.0, burst=2)
    outcomes = await corral.apply_to_all(handler, range(10), workers=10, middleware=[as_middleware])
    assert all(o.ok for o in outcomes)
    assert_token_bucket(seen, 50, 1.0, 2)


async def test_cost_takes_that_many_tokens(redis: coredis.Redis[str]) -> None:
    limiter = RedisRateLimiter(redis, "cost", 20, 1.0, burst=4)
    start = time.monotonic()
    await limiter.acquire(4)  # the whole burst at once
    await limiter.acquire(2)  # two more tokens: 2 intervals later
    assert time.monotonic() - start >= 2 / 20 - READING_SLACK
    with pytest.raises(ValueError, match="cost must be <= burst"):
        await limiter.acquire(5)
    with pytest.raises(ValueError, match="cost must be >= 1"):
        await limiter.acquire(0)
    with pytest.raises(TypeError, match="cost must be an int"):
        await limiter.acquire(1.5)  # type: ignore[arg-type]


async def test_one_round_trip_per_admission_and_no_polling(redis: coredis.Redis[str]) -> None:
    """Waiting callers sleep until their reserved slot: one script call each."""
    limiter = RedisRateLimiter(redis, "calls", 100, 1.0)
    await redis.config_resetstat()
    await admit(limiter, 20, 20, [])  # 19 of them wait
    stats = await redis.info("commandstats")
    calls = sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
    assert calls == 20


async def test_leasing_cuts_round_trips_within_its_bound(redis: coredis.Redis[str]) -> None:
    """lease=5: a fifth of the round trips; two 'processes' leasing stay within
    burst + rate * t / per + P * (lease - 1)."""
    leased = [RedisRateLimiter(redis, "leased", 50, 1.0, burst=5, lease=5) for _ in range(2)]
    await redis.config_resetstat()
    times: list[float] = []
    async with anyio.create_task_group() as tg:
        for limiter in leased:
            tg.start_soon(admit, limiter, 20, 4, times)
    stats = await redis.info("commandstats")
    calls = sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
    assert len(times) == 40
    assert calls == 8  # 40 tokens, 5 per round trip
    assert_token_bucket(times, 50, 1.0, 5, extra=2 * (5 - 1))


async def test_leased_tokens_expire_after_per(redis: coredis.Redis[str]) -> None:
    limiter = RedisRateLimiter(redis, "expire", 1000, 0.1, burst=3, lease=3)
    await limiter.acquire()  # leases 3, keeps 2
    await redis.config_resetstat()
    await limiter.acquire()  # from the lease: no round trip
    stats = await redis.info("commandstats")
    assert not {"cmdstat_evalsha", "cmdstat_eval"} & set(stats)
    await anyio.sleep(0.15)  # the lease (valid for per = 0.1 s) runs out
    await limiter.acquire()
    stats = await redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1


async def test_idle_limits_leave_no_key(redis: coredis.Redis[str]) -> None:
    limiter = RedisRateLimiter(redis, "ttl", 100, 1.0, burst=2)
    await limiter.acquire()
    ttl = await redis.pttl("ttl")
    assert 0 < ttl <= 11  # expires once the bucket has refilled: one interval (10 ms) + 1
    await anyio.sleep(ttl / 1000 + 0.05)  # Redis's own expiry, not another task
    assert not await redis.exists(["ttl"])


async def test_cancelled_waiter_never_causes_an_excess(redis: coredis.Redis[str]) -> None:
    """A caller cancelled while it sleeps for its slot spends the slot: the
    callers after it keep their places, and the bound still holds."""
    limiter = RedisRateLimiter(redis, "cancel", 20, 1.0)
    times: list[float] = []
    await limiter.acquire()
    times.append(time.monotonic())
    with anyio.move_on_after(0.01):
        await limiter.acquire()  # reserved the slot 50 ms ahead, then cancelled
    await limiter.acquire()
    times.append(time.monotonic())
    assert_token_bucket(times, 20, 1.0, 1)
    assert times[1] - times[0] >= 2 / 20 - READING_SLACK  # the cancelled slot went unused


async def test_refused_connection_is_a_clear_error_at_once(coredis_leaks: None) -> None:
    """A refused connection is a RedisUnavailable naming the key, at once
    (well within the limiter's timeout)."""
    async with coredis.Redis(port=free_port()) as client:
        limiter = RedisRateLimiter(client, "down", 10, timeout=5.0)
        start = time.monotonic()
        with pytest.raises(RedisUnavailable, match=r"key='down'.*unreachable"):
            await limiter.acquire()
        assert time.monotonic() - start < 2.0


async def test_silent_server_times_out_instead_of_hanging(coredis_leaks: None) -> None:
    """A server that accepts the connection and never answers."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, _never_answer)
            async with coredis.Redis(port=port) as client:
                limiter = RedisRateLimiter(client, "silent", 10, timeout=0.3)
                start = time.monotonic()
                with pytest.raises(RedisUnavailable, match=r"did not answer within 0\.3 s"):
                    await limiter.acquire()
                assert time.monotonic() - start < 2.0
            tg.cancel_scope.cancel()


async def _never_answer(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        await anyio.sleep_forever()


async def test_bad_arguments_name_the_parameter(redis: coredis.Redis[str]) -> None:
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"key": ""}, ValueError, "key"),
        ({"key": 3}, TypeError, "key"),
        ({"rate": 0}, ValueError, "rate"),
        ({"rate": math.inf}, ValueError, "rate"),
        ({"per": -1}, ValueError, "per"),
        ({"burst": 0}, ValueError, "burst"),
        ({"lease": 0}, ValueError, "lease"),
        ({"lease": 2}, ValueError, "lease must be <= burst"),
        ({"timeout": 0}, ValueError, "timeout"),
    ]
    for change, error, name in cases:
        options: dict[str, Any] = {"key": "k", "rate": 10, **change}
        with pytest.raises(error, match=name):
            RedisRateLimiter(redis, **options)
    with pytest.raises(TypeError, match="client"):
        RedisRateLimiter("localhost", "k", 10)  # type: ignore[arg-type]


async def test_is_a_rate_limiter(redis: coredis.Redis[str]) -> None:
    limiter = RedisRateLimiter(redis, "proto", 10, burst=2, lease=2)
    assert isinstance(limiter, corral.RateLimiter)
    assert isinstance(limiter, corral.Middleware)
    assert repr(limiter) == "RedisRateLimiter(key='proto', rate=10.0, per=1.0, burst=2, lease=2)"


class Throttled(Exception):
    def __init__(self, retry_after: str) -> None:
        super().__init__("429")
        self.response = type("Response", (), {"headers": {"Retry-After": retry_after}})()


@pytest.mark.parametrize("burst", [1, 5])
async def test_pause_holds_every_process_sharing_the_key(
    redis: coredis.Redis[str], burst: int
) -> None:
    """A Retry-After seen by one pool pauses the limit in Redis: another
    limiter object on the same key (another process) admits nothing until
    the pause ends; another key is not paused."""
    first = RedisRateLimiter(redis, "paused", 1000, burst=burst)
    second = RedisRateLimiter(redis, "paused", 1000, burst=burst)
    other = RedisRateLimiter(redis, "not-paused", 1000, burst=burst)

    async def handler(item: int) -> int:
        raise Throttled("0.3")

    async with corral.Pool(handler, rate_limit=first) as pool:
        await pool.submit(1)
    start = time.monotonic()
    await other.acquire()
    assert time.monotonic() - start < 0.1
    await second.acquire()
    assert 0.3 - 0.1 <= time.monotonic() - start < 0.3 + 0.25
    with pytest.raises(ValueError, match="seconds"):
        await first.pause(-1)


async def test_redis_limiter_as_middleware_pauses_on_retry_after(redis: coredis.Redis[str]) -> None:
    limiter = RedisRateLimiter(redis, "middleware-paused", 1000)

    async def handler(item: int) -> int:
        raise Throttled("0.3")

    async with corral.Pool(handler, middleware=[limiter]) as pool:
        await pool.submit(1)
    start = time.monotonic()
    await limiter.acquire()
    assert 0.3 - 0.1 <= time.monotonic() - start < 0.3 + 0.25
