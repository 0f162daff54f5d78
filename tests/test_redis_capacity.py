"""RedisCapacityLimiter against a real redis-server, on every backend: never
more than ``total`` holders across limiter objects (processes, as far as
Redis can tell), first come first served across them, leases renewed while a
slot is held and expiring when its holder stops renewing, cancellation that
leaves nothing behind, and a clear error (never a hang) when Redis is
unreachable. The SIGKILL of a real process is in test_redis_processes.py.

Redis's clock is real time, so these run in real time on every backend.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import anyio
import anyio.abc
import coredis
import pytest

import corral
from corral.redis import RedisCapacityLimiter, RedisCapacityStatistics, RedisUnavailable
from redis_server import COREDIS_LEAK, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings(COREDIS_LEAK)]


class Gauge:
    """How many run at once, and the most that ever did."""

    def __init__(self) -> None:
        self.now = self.most = 0

    def enter(self) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    def leave(self) -> None:
        self.now -= 1


async def wait_until_waiting(limiter: RedisCapacityLimiter, count: int) -> None:
    """Until ``count`` callers wait in Redis's line: another task's progress,
    visible only in Redis, so poll it."""
    with anyio.fail_after(5):
        while (await limiter.statistics()).waiting < count:  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def test_never_more_than_total_across_limiter_objects(redis: coredis.Redis[str]) -> None:
    """Three limiter objects on one key (three processes, as far as Redis can
    tell), 30 tasks: never more than total at once, and total is reached."""
    limiters = [RedisCapacityLimiter(redis, "cap", 3) for _ in range(3)]
    gauge = Gauge()
    rng = random.Random(3)
    admitted = 0

    async def task(limiter: RedisCapacityLimiter) -> None:
        nonlocal admitted
        for _ in range(4):
            async with limiter:
                gauge.enter()
                admitted += 1
                await anyio.sleep(rng.random() / 200)
                gauge.leave()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for k in range(30):
                tg.start_soon(task, limiters[k % 3])
    assert admitted == 120
    assert gauge.most == 3
    assert await limiters[0].statistics() == RedisCapacityStatistics(
        total=3, holders=0, waiting=0, held_here=0, waiting_here=0
    )


async def test_as_the_limiter_of_a_pool_a_batcher_and_the_helpers(
    redis: coredis.Redis[str],
) -> None:
    """A slot per attempt wherever corral takes ``limiter=``; a handler's
    error comes out as itself (not in a group) and is retried."""
    limiter = RedisCapacityLimiter(redis, "pool", 2)
    gauge = Gauge()
    failed_once: set[int] = set()

    async def handler(item: int) -> int:
        gauge.enter()
        try:
            await anyio.sleep(0.002)
            if item % 5 == 0 and item not in failed_once:
                failed_once.add(item)
                raise ConnectionError(f"flaky {item}")
            if item == 13:
                raise KeyError(item)
            return item * 2
        finally:
            gauge.leave()

    outcomes = await corral.apply_to_all(
        handler, range(20), workers=8, limiter=limiter, retry=corral.Retry(2, on=ConnectionError)
    )
    assert gauge.most == 2
    assert [o.result for o in outcomes if o.ok] == [i * 2 for i in range(20) if i != 13]
    [bad] = [o for o in outcomes if not o.ok]
    assert isinstance(bad.error, KeyError)
    assert sum(o.attempts for o in outcomes) == 24  # 0, 5, 10 and 15 twice

    async with corral.apply_to_each(handler, [1, 2, 3], workers=3, limiter=limiter) as each:
        seen = [o.result async for o in each]
    assert sorted(seen) == [2, 4, 6]

    flushes = Gauge()

    async def flush(batch: list[int]) -> None:
        flushes.enter()
        await anyio.sleep(0.005)
        flushes.leave()

    async with corral.Batcher(
        flush, max_size=2, max_wait=None, concurrency=4, limiter=limiter
    ) as batcher:
        for i in range(20):
            await batcher.add(i)
    assert flushes.most <= 2
    assert (await limiter.statistics()).holders == 0

    def plain(item: int) -> int:  # a threaded handler holds a slot for its attempt
        return item

    outcomes = await corral.apply_to_all(plain, range(5), workers=5, limiter=limiter)
    assert [o.result for o in outcomes] == list(range(5))

    running = anyio.Event()

    async def forever(item: int) -> None:
        running.set()
        await anyio.sleep_forever()

    with anyio.CancelScope() as scope:  # attempts cancelled while they hold their slots
        async with corral.Pool(forever, workers=4, limiter=limiter) as pool:
            for i in range(4):
                await pool.submit(i)
            await running.wait()
            scope.cancel()
    assert (await limiter.statistics()).holders == 0


async def test_first_come_first_served_across_processes(redis: coredis.Redis[str]) -> None:
    """While the only slot is held, four callers arrive on two limiter
    objects, one after the other: they are admitted in the order they came."""
    first, second = (RedisCapacityLimiter(redis, "fifo", 1) for _ in range(2))
    order: list[str] = []
    release = anyio.Event()

    async def holder(task_status: anyio.abc.TaskStatus[None]) -> None:
        async with first:
            task_status.started()
            await release.wait()

    async def waiter(limiter: RedisCapacityLimiter, name: str) -> None:
        async with limiter:
            order.append(name)
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        await tg.start(holder)
        for count, (limiter, name) in enumerate(
            [(second, "a"), (first, "b"), (second, "c"), (first, "d")], start=1
        ):
            tg.start_soon(waiter, limiter, name)
            await wait_until_waiting(limiter, count)
        release.set()
    assert order == ["a", "b", "c", "d"]


async def test_a_cancelled_waiter_leaves_no_ticket(redis: coredis.Redis[str]) -> None:
    """A caller cancelled while it waits leaves the line at once; the holder
    keeps its slot, and the next caller is not held up by a dead ticket."""
    limiter = RedisCapacityLimiter(redis, "cancel", 1)
    async with limiter, anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def waiter() -> None:
            with scope:
                async with limiter:
                    raise AssertionError("admitted while the slot is held")

        tg.start_soon(waiter)
        await wait_until_waiting(limiter, 1)
        scope.cancel()
    stats = await limiter.statistics()
    assert (stats.holders, stats.waiting, stats.waiting_here) == (0, 0, 0)
    assert await redis.zcard("cancel:waiting") == 0
    with anyio.fail_after(1):  # not held up by the ticket's second of patience
        async with limiter:
            pass


async def test_a_cancelled_enter_holds_nothing(redis: coredis.Redis[str]) -> None:
    """Cancelled at a random moment of ``__aenter__`` (before, during or after
    its round trip) or of the block, a caller holds nothing afterwards."""
    limiter = RedisCapacityLimiter(redis, "random-cancel", 1)
    rng = random.Random(5)
    for _ in range(40):
        with anyio.move_on_after(rng.uniform(0, 0.002)):
            async with limiter:
                await anyio.sleep_forever()
        assert await redis.zcard("random-cancel") == 0
        assert await redis.zcard("random-cancel:waiting") == 0
    with anyio.fail_after(1):
        async with limiter:
            assert (await limiter.statistics()).holders == 1


async def test_a_slot_held_longer_than_its_lease_is_renewed(redis: coredis.Redis[str]) -> None:
    """Held for three leases, in ``async with`` and in a pool's attempt: no
    other caller gets the slot before it is given back."""
    holding = RedisCapacityLimiter(redis, "renewed", 1, lease=0.3)
    other = RedisCapacityLimiter(redis, "renewed", 1, lease=0.3)
    released_at = 0.0
    held = anyio.Event()

    async def hold() -> None:
        nonlocal released_at
        async with holding:
            held.set()
            await anyio.sleep(0.9)
            released_at = time.monotonic()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await held.wait()
        async with other:
            admitted_at = time.monotonic()
    assert admitted_at >= released_at > 0

    started = anyio.Event()

    async def slow(item: int) -> float:
        started.set()
        await anyio.sleep(0.9)
        return time.monotonic()

    async with anyio.create_task_group() as tg:
        ended: list[float] = []

        async def pool() -> None:
            ended.extend(o.result for o in await corral.apply_to_all(slow, [1], limiter=holding))

        tg.start_soon(pool)
        await started.wait()
        async with other:
            admitted_at = time.monotonic()
    assert admitted_at >= ended[0]


async def test_a_slot_whose_holder_stopped_renewing_comes_free(redis: coredis.Redis[str]) -> None:
    """A holder that died (here: a slot put in Redis by hand, its lease ending
    0.3 s from now by the server's clock) blocks the cap until its lease ends,
    not longer."""
    limiter = RedisCapacityLimiter(redis, "dead-holder", 1, lease=5.0)
    await redis.eval(  # by the server's clock (coredis's TIME reply loses the microseconds)
        "local t = redis.call('TIME') "
        "redis.call('ZADD', KEYS[1], string.format('%d', t[1] * 1000000 + t[2] + 300000), 'dead')",
        keys=["dead-holder"],
    )
    start = time.monotonic()
    with anyio.fail_after(3):
        async with limiter:
            waited = time.monotonic() - start
    assert 0.2 <= waited < 0.3 + 0.5


async def test_keys_expire_once_unused(redis: coredis.Redis[str]) -> None:
    """Every key the cap leaves behind has a TTL: an unused cap leaves nothing."""
    limiter = RedisCapacityLimiter(redis, "ttl", 2, lease=0.5)
    async with limiter:
        assert 0 < await redis.pttl("ttl") <= 501
    for key in ("ttl", "ttl:waiting", "ttl:deadlines"):
        ttl = await redis.pttl(key)
        assert ttl == -2 or 0 < ttl <= 1001, (key, ttl)  # gone, or going within a second


async def test_one_slot_per_task_through_async_with(redis: coredis.Redis[str]) -> None:
    limiter = RedisCapacityLimiter(redis, "nested", 2)
    async with limiter:
        with pytest.raises(RuntimeError, match="already holds a slot"):
            async with limiter:
                pass
        assert (await limiter.statistics()).held_here == 1
    with pytest.raises(KeyError, match="as itself"):
        async with limiter:
            raise KeyError("as itself")
    assert (await limiter.statistics()).holders == 0


async def test_a_handler_using_its_pools_limiter_is_an_error_not_a_hang(
    redis: coredis.Redis[str],
) -> None:
    """A handler that enters the limiter its own pool holds a slot of would
    wait for a second slot while holding one (with total=1, forever): it gets
    RuntimeError instead, as anyio.CapacityLimiter gives."""
    limiter = RedisCapacityLimiter(redis, "reentered", 1)

    async def handler(item: int) -> int:
        async with limiter:
            return item

    with anyio.fail_after(10):
        outcomes = await corral.apply_to_all(handler, range(2), workers=2, limiter=limiter)
    assert all(isinstance(outcome.error, RuntimeError) for outcome in outcomes)
    assert (await limiter.statistics()).holders == 0


async def test_an_abandoned_thread_keeps_its_slot_until_it_ends(
    redis: coredis.Redis[str],
) -> None:
    """A plain handler's thread that a timeout abandons still holds its slot
    while it runs, so threads running at once never exceed total (the next
    attempt gets the slot when the thread ends); once the pool has ended,
    every slot is back."""
    limiter = RedisCapacityLimiter(redis, "threads", 1)
    lock, gauge = threading.Lock(), Gauge()

    def handler(item: int) -> int:
        with lock:
            gauge.enter()
        time.sleep(0.2)  # a slow call that the timeout gives up on
        with lock:
            gauge.leave()
        return item

    with anyio.fail_after(20):
        outcomes = await corral.apply_to_all(
            handler, range(3), workers=3, limiter=limiter, timeout=0.02
        )
    assert [type(outcome.error) for outcome in outcomes] == [TimeoutError] * 3
    assert gauge.most == 1
    with anyio.fail_after(10):
        async with limiter:
            assert (await limiter.statistics()).holders == 1
    assert (await limiter.statistics()).holders == 0


async def test_refused_connection_is_a_clear_error_at_once(coredis_leaks: None) -> None:
    """Every waiter of a process gets a RedisUnavailable naming the key, at
    once (not one timeout after another)."""
    async with coredis.Redis(port=free_port()) as client:
        limiter = RedisCapacityLimiter(client, "down", 1, timeout=5.0)
        errors: list[BaseException] = []

        async def waiter() -> None:
            try:
                async with limiter:
                    pass
            except RedisUnavailable as error:
                errors.append(error)

        start = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(waiter)
        assert time.monotonic() - start < 2.0
        assert len(errors) == 10
        assert all("key='down'" in str(e) and "unreachable" in str(e) for e in errors)
        with pytest.raises(RedisUnavailable, match="unreachable"):
            await limiter.statistics()


async def test_silent_server_times_out_instead_of_hanging(coredis_leaks: None) -> None:
    """A server that accepts the connection and never answers: every waiter
    fails within the timeout (and another while it gives its place back)."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, _never_answer)
            async with coredis.Redis(port=port) as client:
                limiter = RedisCapacityLimiter(client, "silent", 1, timeout=0.3)
                failures: list[str] = []

                async def waiter() -> None:
                    with pytest.raises(RedisUnavailable, match=r"did not answer within 0\.3 s"):
                        async with limiter:
                            pass
                    failures.append("ok")

                start = time.monotonic()
                async with anyio.create_task_group() as waiters:
                    for _ in range(5):
                        waiters.start_soon(waiter)
                assert time.monotonic() - start < 2.0
                assert len(failures) == 5
            tg.cancel_scope.cancel()


async def _never_answer(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        await anyio.sleep_forever()


async def test_bad_arguments_name_the_parameter(redis: coredis.Redis[str]) -> None:
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"key": ""}, ValueError, "key"),
        ({"key": 3}, TypeError, "key"),
        ({"total": 0}, ValueError, "total"),
        ({"total": 1.5}, TypeError, "total"),
        ({"lease": 0}, ValueError, "lease"),
        ({"lease": float("nan")}, ValueError, "lease"),
        ({"timeout": 0}, ValueError, "timeout"),
    ]
    for change, error, name in cases:
        options: dict[str, Any] = {"key": "k", "total": 2, **change}
        with pytest.raises(error, match=name):
            RedisCapacityLimiter(redis, **options)
    with pytest.raises(TypeError, match="client"):
        RedisCapacityLimiter("localhost", "k", 2)  # type: ignore[arg-type]


async def test_repr(redis: coredis.Redis[str]) -> None:
    limiter = RedisCapacityLimiter(redis, "api", 8, lease=10)
    assert repr(limiter) == "RedisCapacityLimiter(key='api', total=8, lease=10.0)"
