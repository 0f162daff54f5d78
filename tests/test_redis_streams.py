"""StreamSource and StreamSink against a real redis-server, on every backend:
acknowledgement after success only, redelivery of failures, reclaim from dead
consumers, the dead-letter stream, backpressure that reaches Redis, and the
sink's batched writes. Multi-process runs are in test_redis_processes.py.
"""

from __future__ import annotations

import random
import time
from typing import Any

import anyio
import anyio.lowlevel
import coredis
import pytest

import corral
from corral.redis import Delivery, RedisUnavailable, StreamSink, StreamSource
from redis_server import COREDIS_LEAK, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings(COREDIS_LEAK)]


async def fill(client: coredis.Redis[Any], stream: str, count: int, **extra: str) -> list[str]:
    async with StreamSink(client, stream) as sink:
        return [await sink.submit({"n": str(i), **extra}) for i in range(count)]


async def group_info(client: coredis.Redis[Any], stream: str, group: str) -> dict[str, Any]:
    for info in await client.xinfo_groups(stream):
        if info["name"] == group:
            return dict(info)
    raise AssertionError(f"no group {group!r}")


async def drain(source: StreamSource[Any], handler: Any, **options: Any) -> list[corral.Outcome]:
    outcomes = []
    async with corral.apply_to_each(handler, source, on_outcome=source.settle, **options) as each:
        async for outcome in each:
            outcomes.append(outcome)
    return outcomes


def source(client: coredis.Redis[Any], consumer: str = "c1", **options: Any) -> StreamSource[Any]:
    defaults: dict[str, Any] = {"block": 0.05, "stop_when_drained": True}
    return StreamSource(client, "jobs", "workers", consumer, **{**defaults, **options})


@pytest.mark.untraced  # a delivery is claimed again after min_idle=0.05 s
async def test_successes_are_acked_and_failures_dead_lettered(redis: coredis.Redis[str]) -> None:
    ids = await fill(redis, "jobs", 200)
    handled: list[str] = []

    async def handler(delivery: Delivery[str]) -> int:
        if delivery.fields["n"] == "13":
            raise ValueError("poison")
        handled.append(delivery.id)
        return int(delivery.fields["n"])

    async with source(redis, min_idle=0.05, max_deliveries=3) as src:
        outcomes = await drain(src, handler, workers=8)
    poison = ids[13]
    assert sorted(handled) == sorted(i for i in ids if i != poison)  # each once
    assert [o.deliveries for o in [o.item for o in outcomes if not o.ok]] == [1, 2, 3]
    info = await group_info(redis, "jobs", "workers")
    assert info["pending"] == 0
    assert info["entries-read"] == 200
    [dead] = await redis.xrange("jobs:dead")
    assert dead.field_values == {
        "n": "13",
        "corral:stream": "jobs",
        "corral:id": poison,
        "corral:group": "workers",
        "corral:consumer": "c1",
        "corral:deliveries": "3",
        "corral:error": "ValueError('poison')",
    }
    assert src.stats == corral.redis.StreamStats(
        delivered=202, claimed=2, acked=199, failed=2, dead_lettered=1, in_flight=0
    )


@pytest.mark.untraced  # a delivery is claimed again after min_idle=0.05 s
async def test_a_failure_is_redelivered_and_can_succeed(redis: coredis.Redis[str]) -> None:
    await fill(redis, "jobs", 5)
    calls: list[tuple[str, int]] = []

    async def flaky(delivery: Delivery[str]) -> None:
        calls.append((delivery.fields["n"], delivery.deliveries))
        if delivery.fields["n"] == "2" and delivery.deliveries == 1:
            raise ConnectionError("upstream hiccup")

    async with source(redis, min_idle=0.05) as src:
        await drain(src, flaky)
    assert sorted(calls) == [("0", 1), ("1", 1), ("2", 1), ("2", 2), ("3", 1), ("4", 1)]
    assert await redis.xlen("jobs:dead") == 0
    assert (await group_info(redis, "jobs", "workers"))["pending"] == 0


async def test_retry_policy_runs_within_one_delivery(redis: coredis.Redis[str]) -> None:
    await fill(redis, "jobs", 3)
    attempts: list[int] = []

    async def flaky(delivery: Delivery[str]) -> None:
        attempts.append(delivery.deliveries)
        if len(attempts) % 2:
            raise ConnectionError("try again")

    retry = corral.Retry(2, wait_initial=0)
    async with source(redis) as src:
        outcomes = await drain(src, flaky, workers=1, retry=retry)
    assert all(o.ok and o.attempts == 2 for o in outcomes)
    assert attempts == [1] * 6  # six calls, all in the first delivery
    assert src.stats.acked == 3


async def test_entries_of_a_dead_consumer_are_claimed(redis: coredis.Redis[str]) -> None:
    ids = await fill(redis, "jobs", 30)
    await redis.xgroup_create("jobs", "workers", "0")
    # a consumer reads ten entries and dies before acknowledging them
    await redis.xreadgroup("workers", "dead", {"jobs": ">"}, count=10)
    seen: dict[str, int] = {}

    async def handler(delivery: Delivery[str]) -> None:
        seen[delivery.id] = delivery.deliveries

    async with source(redis, min_idle=0.2) as src:
        await drain(src, handler)
    assert sorted(seen) == sorted(ids)
    assert [seen[i] for i in ids[:10]] == [2] * 10  # claimed: a second delivery
    assert [seen[i] for i in ids[10:]] == [1] * 20
    assert src.stats.claimed == 10
    assert (await group_info(redis, "jobs", "workers"))["pending"] == 0


@pytest.mark.untraced  # a delivery is claimed again after min_idle=0.05 s
async def test_an_entry_that_kills_its_consumers_is_dead_lettered_on_claim(
    redis: coredis.Redis[str],
) -> None:
    """Delivered max_deliveries times and never settled (each consumer died):
    the next claim dead-letters it without handing it out again."""
    ids = await fill(redis, "jobs", 3)
    await redis.xgroup_create("jobs", "workers", "0")
    await redis.xreadgroup("workers", "dead", {"jobs": ">"}, count=1)
    for _ in range(2):  # two more consumers took it over and died too
        await redis.xclaim("jobs", "workers", "dead", 0, [ids[0]])
    seen: list[str] = []

    async def handler(delivery: Delivery[str]) -> None:
        seen.append(delivery.id)

    async with source(redis, min_idle=0.05, max_deliveries=3) as src:
        await drain(src, handler)
    assert seen == ids[1:]
    [dead] = await redis.xrange("jobs:dead")
    assert dead.field_values["corral:id"] == ids[0]
    assert dead.field_values["corral:deliveries"] == "4"
    assert "never settled" in dead.field_values["corral:error"]
    assert src.stats.dead_lettered == 1


async def test_backpressure_reaches_redis(redis: coredis.Redis[str]) -> None:
    """With max_in_flight=5 and slow handlers, only 5 entries leave Redis."""
    await fill(redis, "jobs", 50)
    started = 0
    five_started = anyio.Event()
    release = anyio.Event()

    async def slow(delivery: Delivery[str]) -> None:
        nonlocal started
        started += 1
        if started == 5:
            five_started.set()
        await release.wait()

    async with source(redis, max_in_flight=5) as src, anyio.create_task_group() as tg:
        tg.start_soon(lambda: drain(src, slow, workers=20))
        await five_started.wait()
        await anyio.wait_all_tasks_blocked()
        assert (await group_info(redis, "jobs", "workers"))["entries-read"] == 5
        assert src.stats.in_flight == 5
        release.set()
    assert src.stats.acked == 50


async def test_a_pool_fed_by_hand(redis: coredis.Redis[str]) -> None:
    ids = await fill(redis, "jobs", 40)
    handled: list[str] = []

    async def handler(delivery: Delivery[str]) -> None:
        handled.append(delivery.id)

    async with (
        source(redis) as src,
        corral.Pool(handler, workers=4, on_outcome=src.settle) as pool,
    ):
        async for delivery in src:
            await pool.submit(delivery)
    assert sorted(handled) == sorted(ids)
    assert (await group_info(redis, "jobs", "workers"))["pending"] == 0


async def test_stop_ends_iteration_and_settled_entries_are_acked(
    redis: coredis.Redis[str],
) -> None:
    await fill(redis, "jobs", 100)
    async with source(redis, stop_when_drained=False, max_in_flight=10) as src:

        async def handler(delivery: Delivery[str]) -> None:
            if delivery.fields["n"] == "20":
                src.stop()

        with anyio.fail_after(10):
            outcomes = await drain(src, handler, workers=2)
    assert all(o.ok for o in outcomes)
    info = await group_info(redis, "jobs", "workers")
    assert src.stats.acked == len(outcomes) >= 21
    # read but never handed out: still pending, for a claim after min_idle
    assert info["pending"] == info["entries-read"] - len(outcomes)


@pytest.mark.untraced  # a delivery is claimed again after min_idle=0.05 s
async def test_cancellation_loses_nothing(redis: coredis.Redis[str]) -> None:
    """A consumer cancelled midway: whatever it did not finish is delivered
    again to the next one (at least once), and nothing is lost."""
    ids = await fill(redis, "jobs", 60)
    handled: list[str] = []
    ten_done = anyio.Event()

    async def handler(delivery: Delivery[str]) -> None:
        await anyio.lowlevel.checkpoint()
        handled.append(delivery.id)
        if len(handled) == 10:
            ten_done.set()

    with anyio.CancelScope() as scope:
        async with source(redis, max_in_flight=8) as src, anyio.create_task_group() as tg:
            tg.start_soon(lambda: drain(src, handler, workers=4))
            await ten_done.wait()
            scope.cancel()
    assert 10 <= len(handled) < 60
    async with StreamSource(
        redis, "jobs", "workers", "c2", min_idle=0.05, block=0.05, stop_when_drained=True
    ) as second:
        await drain(second, handler)
    assert set(handled) == set(ids)
    assert (await group_info(redis, "jobs", "workers"))["pending"] == 0


async def test_group_start_and_existing_group(redis: coredis.Redis[str]) -> None:
    await fill(redis, "jobs", 5)
    seen: list[str] = []

    async def handler(delivery: Delivery[str]) -> None:
        seen.append(delivery.fields["n"])

    async with source(redis, group_start="$", stop_when_drained=False) as src:
        await fill(redis, "jobs", 2, late="yes")
        async with corral.apply_to_each(handler, src, on_outcome=src.settle) as each:
            async for _ in each:
                if len(seen) == 2:
                    src.stop()
    assert seen == ["0", "1"]  # only the entries added after the group was made
    async with source(redis) as again:  # the group exists: joined, not recreated
        await drain(again, handler)
    assert seen == ["0", "1"]


async def test_bytes_client(redis_port: int, coredis_leaks: None) -> None:
    async with coredis.Redis(port=redis_port) as client:
        await client.delete(["raw"])
        await client.xadd("raw", {b"k": b"\xff\x00"})
        got: list[Any] = []

        async def handler(delivery: Delivery[bytes]) -> None:
            got.append(dict(delivery.fields))

        async with StreamSource(client, "raw", "g", "c", block=0.05, stop_when_drained=True) as src:
            await drain(src, handler)
        assert got == [{b"k": b"\xff\x00"}]
        assert isinstance(src.stats.acked, int)
        assert src.stats.acked == 1


async def test_settle_refuses_what_it_did_not_hand_out(redis: coredis.Redis[str]) -> None:
    await fill(redis, "jobs", 1)
    src = source(redis)
    with pytest.raises(corral.PoolClosed, match="not running"):
        await src.__anext__()
    async with src:
        delivery = await src.__anext__()
        outcome = (await corral.apply_to_all(lambda d: None, [delivery]))[0]
        await src.settle(outcome)
        with pytest.raises(ValueError, match="already settled"):
            await src.settle(outcome)
        [other] = await corral.apply_to_all(lambda x: x, ["not a delivery"])
        with pytest.raises(TypeError, match="Outcome of a Delivery"):
            await src.settle(other)  # type: ignore[arg-type]
    with pytest.raises(corral.PoolClosed, match="settle outcomes inside its block"):
        await src.settle(outcome)


async def test_unreachable_redis_is_a_clear_error(coredis_leaks: None) -> None:
    """A refused connection is a RedisUnavailable naming the adapter, not a
    hang or coredis's own error, for the source and for the sink."""
    async with coredis.Redis(port=free_port()) as client:
        with pytest.raises(RedisUnavailable, match=r"StreamSource.*unreachable"):
            async with StreamSource(client, "s", "g", "c"):
                pass
        with pytest.raises(RedisUnavailable, match=r"StreamSink.*unreachable"):
            async with StreamSink(client, "s") as sink:
                await sink.submit({"a": "b"})


async def test_bad_arguments_name_the_parameter(redis: coredis.Redis[str]) -> None:
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"stream": ""}, ValueError, "stream"),
        ({"group": 1}, TypeError, "group"),
        ({"consumer": None}, TypeError, "consumer"),
        ({"max_in_flight": 0}, ValueError, "max_in_flight"),
        ({"max_deliveries": 0}, ValueError, "max_deliveries"),
        ({"dead_letter": "s"}, ValueError, "dead_letter must differ"),
        ({"min_idle": 0}, ValueError, "min_idle"),
        ({"block": -1}, ValueError, "block"),
        ({"group_start": ""}, ValueError, "group_start"),
        ({"stop_when_drained": 1}, TypeError, "stop_when_drained"),
        ({"timeout": 0}, ValueError, "timeout"),
    ]
    for change, error, name in cases:
        options: dict[str, Any] = {"stream": "s", "group": "g", "consumer": "c", **change}
        with pytest.raises(error, match=name):
            StreamSource(redis, **options)
    with pytest.raises(TypeError, match="client"):
        StreamSource(None, "s", "g", "c")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="maxlen"):
        StreamSink(redis, "s", maxlen=0)
    with pytest.raises(ValueError, match="max_size"):
        StreamSink(redis, "s", max_size=0)
    async with StreamSink(redis, "s") as sink:
        with pytest.raises(TypeError, match="fields"):
            await sink.add(["a", "b"])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="fields"):
            sink.add_nowait({})


async def test_sink_writes_in_order_in_batches(redis: coredis.Redis[str]) -> None:
    async with StreamSink(redis, "out", max_size=50) as sink:
        for i in range(500):
            await sink.add({"i": str(i)})
        first = await sink.submit({"i": "last"})
    entries = await redis.xrange("out")
    assert [e.field_values["i"] for e in entries] == [*map(str, range(500)), "last"]
    assert entries[-1].identifier == first
    stats = sink.stats
    assert stats.flushed == 501
    assert stats.flushes <= 501 / 2  # batched: far fewer round trips than entries
    assert sink.unflushed == []


async def test_sink_trims_to_maxlen(redis: coredis.Redis[str]) -> None:
    async with StreamSink(redis, "capped", maxlen=100) as sink:
        for i in range(2000):
            await sink.add({"i": str(i)})
    length = await redis.xlen("capped")
    assert 100 <= length < 2000  # MAXLEN ~: trimmed in whole nodes, never below maxlen


async def test_one_task_iterates_at_a_time(redis: coredis.Redis[str]) -> None:
    async with source(redis, stop_when_drained=False) as src, anyio.create_task_group() as tg:
        tg.start_soon(drain, src, print)  # waits in XREADGROUP on an empty stream
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(anyio.BusyResourceError, match="reading from"):
            await src.__anext__()
        src.stop()


async def test_dead_letter_on_and_redeliver_after(redis: coredis.Redis[str]) -> None:
    """An error retrying cannot mend goes to the dead-letter stream at once; a
    transient one is delivered again after redeliver_after, not min_idle."""
    ids = await fill(redis, "jobs", 10)
    calls: list[tuple[str, int]] = []

    async def handler(delivery: Delivery[str]) -> None:
        calls.append((delivery.fields["n"], delivery.deliveries))
        if delivery.fields["n"] == "3":
            raise KeyError("no such customer")  # permanent
        if delivery.fields["n"] == "5" and delivery.deliveries == 1:
            raise ConnectionError("transient")

    async with source(redis, min_idle=30.0, redeliver_after=0.05, dead_letter_on=KeyError) as src:
        with anyio.fail_after(10):  # min_idle would be 30 s
            await drain(src, handler)
    assert sorted(calls) == sorted([(str(i), 1) for i in range(10)] + [("5", 2)])
    [dead] = await redis.xrange("jobs:dead")
    assert dead.field_values["corral:id"] == ids[3]
    assert dead.field_values["corral:deliveries"] == "1"
    assert src.stats.dead_lettered == 1
    assert src.stats.failed == 1
    assert (await group_info(redis, "jobs", "workers"))["pending"] == 0
    with pytest.raises(ValueError, match="redeliver_after must be <= min_idle"):
        source(redis, min_idle=1.0, redeliver_after=2.0)
    with pytest.raises(TypeError, match="dead_letter_on must be"):
        source(redis, dead_letter_on="KeyError")


async def test_random_cancellation_loses_nothing(redis: coredis.Redis[str]) -> None:
    """Cancel a consumer at a random moment, 12 times over one stream (each
    time a new consumer picks up where it left off, claiming what the last
    one held): at the end every entry has succeeded at least once and
    nothing is pending."""
    rng = random.Random(7)
    ids = await fill(redis, "jobs", 300)
    handled: set[str] = set()

    async def handler(delivery: Delivery[str]) -> None:
        if rng.random() < 0.5:
            await anyio.sleep(rng.random() / 1000)
        if rng.random() < 0.05:
            raise ConnectionError("flaky")
        handled.add(delivery.id)

    for round_ in range(12):
        with anyio.move_on_after(rng.uniform(0.001, 0.05)):
            async with StreamSource(
                redis, "jobs", "workers", f"c{round_}", max_in_flight=rng.randint(1, 20),
                min_idle=0.01, block=0.01, stop_when_drained=True,
            ) as src:  # fmt: skip
                await drain(src, handler, workers=rng.randint(1, 8))
    async with StreamSource(
        redis, "jobs", "workers", "last", min_idle=0.01, block=0.01, stop_when_drained=True
    ) as last:
        await drain(last, handler)
    info = await group_info(redis, "jobs", "workers")
    assert info["pending"] == 0
    # an entry whose every delivery so far was cancelled before it was settled
    # goes to the dead-letter stream once delivered more than 5 times
    dead = {entry.field_values["corral:id"] for entry in await redis.xrange("jobs:dead")}
    assert handled | dead == set(ids)


async def test_cancellation_still_acknowledges_settled_successes(
    redis: coredis.Redis[str],
) -> None:
    """Successes settled before the block was cancelled are acknowledged on
    the way out (shielded), so they do not run again."""
    await fill(redis, "jobs", 50)
    settled: list[str] = []

    async def handler(delivery: Delivery[str]) -> None:
        pass

    with anyio.CancelScope() as scope:
        async with source(redis, max_in_flight=50) as src:

            async def settle(outcome: corral.Outcome[Delivery[str], None]) -> None:
                await src.settle(outcome)
                settled.append(outcome.item.id)
                if len(settled) == 20:
                    scope.cancel()  # with acknowledgements still queued

            async with corral.apply_to_each(handler, src, on_outcome=settle) as each:
                async for _ in each:
                    pass
    pending = {p.identifier for p in await redis.xpending("jobs", "workers", "-", "+", 100)}
    assert len(settled) >= 20
    assert pending  # some were handed out, or read, and not settled
    assert not pending & set(settled)


async def test_entries_read_but_not_handed_out_are_given_back(redis: coredis.Redis[str]) -> None:
    """Stopping with entries read ahead hands them back with their delivery
    count as it was and claimable at once: stopping three times does not
    dead-letter entries no handler ever saw."""
    await fill(redis, "jobs", 10)
    for round_ in range(3):
        async with source(redis, stop_when_drained=False, max_deliveries=2, min_idle=60.0) as src:
            delivery = await src.__anext__()  # the other entries wait in its buffer
            [outcome] = await corral.apply_to_all(lambda d: None, [delivery])
            await src.settle(outcome)
            src.stop()
        assert delivery.deliveries == 1, f"round {round_}"
    assert await redis.xlen("jobs:dead") == 0
    pending = await redis.xpending("jobs", "workers", "-", "+", 100)
    assert len(pending) == 7
    assert {p.delivered for p in pending} == {0}  # given back: their delivery undone


async def test_an_idle_entry_behind_many_busy_ones_is_claimed_at_once(
    redis: coredis.Redis[str],
) -> None:
    """XAUTOCLAIM scans 10 pending entries per unit of COUNT: with room for
    one delivery, an idle entry behind 300 busy ones must still be found
    without waiting for further claim rounds."""
    ids = await fill(redis, "jobs", 301)
    await redis.xgroup_create("jobs", "workers", "0")
    await redis.xreadgroup("workers", "busy", {"jobs": ">"}, count=300)
    await redis.xreadgroup("workers", "dead", {"jobs": ">"}, count=1)
    await redis.xclaim("jobs", "workers", "dead", 0, [ids[-1]], idle=120_000, justid=True)
    async with source(redis, stop_when_drained=False, min_idle=60.0, max_in_flight=1) as src:
        with anyio.fail_after(5):  # the next claim round would be 30 s away
            delivery = await src.__anext__()
    assert delivery.id == ids[-1]


@pytest.mark.untraced  # a delivery is claimed again after min_idle=0.05 s
async def test_entries_deleted_while_pending_are_dead_lettered(redis: coredis.Redis[str]) -> None:
    ids = await fill(redis, "jobs", 5)
    await redis.xgroup_create("jobs", "workers", "0")
    await redis.xreadgroup("workers", "dead", {"jobs": ">"}, count=5)
    await redis.xdel("jobs", [ids[1], ids[3]])
    seen: list[str] = []

    async def handler(delivery: Delivery[str]) -> None:
        seen.append(delivery.id)

    async with source(redis, min_idle=0.05) as src:
        await drain(src, handler)
    assert sorted(seen) == [ids[0], ids[2], ids[4]]
    dead = {e.field_values["corral:id"]: e.field_values for e in await redis.xrange("jobs:dead")}
    assert sorted(dead) == [ids[1], ids[3]]
    assert {d["corral:error"] for d in dead.values()} == {"deleted from the stream while pending"}
    assert (await group_info(redis, "jobs", "workers"))["pending"] == 0


async def test_settling_a_failure_survives_a_redis_outage(redis: coredis.Redis[str]) -> None:
    """If Redis cannot be reached to dead-letter a failure or hurry its
    redelivery, the failure stays pending (claimed after min_idle) and the
    pool goes on."""
    await fill(redis, "jobs", 4)

    async def handler(delivery: Delivery[str]) -> None:
        raise ValueError(delivery.fields["n"])

    def unreachable(**_: Any) -> Any:
        async def fail() -> None:
            raise coredis.exceptions.ConnectionError("connection reset")

        return fail()

    async with source(redis, stop_when_drained=False, redeliver_after=0.0, min_idle=60.0) as src:
        src._settle_failure_script = unreachable  # type: ignore[assignment]
        src._release_script = unreachable  # type: ignore[assignment]
        async with corral.apply_to_each(handler, src, on_outcome=src.settle) as each:
            async for outcome in each:
                assert not outcome.ok
                if outcome.item.fields["n"] == "1":
                    src.dead_letter_on = ValueError  # the other path fails as well
                if src.stats.failed == 4:
                    src.stop()
    assert src.stats.failed == 4
    assert len(await redis.xpending("jobs", "workers", "-", "+", 10)) == 4


class AcksFail:
    """A client whose XACK fails as if Redis were unreachable (the first
    ``times`` calls; by default all of them); all else passes."""

    def __init__(self, client: coredis.Redis[str], times: int = 1_000_000) -> None:
        self._client = client
        self.times = times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def xack(self, *args: Any) -> int:
        if self.times:
            self.times -= 1
            raise coredis.exceptions.ConnectionError("connection reset")
        return int(await self._client.xack(*args))


async def test_an_ack_outage_at_exit_does_not_replace_the_blocks_exception(
    redis: coredis.Redis[str],
) -> None:
    """If the acknowledgements cannot be sent when the block leaves with an
    exception, that exception comes out (not a FlushError about the acks), and
    the unacknowledged successes stay pending, to run again: at least once."""
    await fill(redis, "jobs", 3)

    async def handler(delivery: Delivery[str]) -> str:
        return delivery.fields["n"]

    done = 0
    with pytest.raises(KeyError, match="the block's own"):
        async with source(redis, stop_when_drained=False) as src:
            src._client = AcksFail(redis)  # type: ignore[assignment]
            async with corral.apply_to_each(handler, src, on_outcome=src.settle) as each:
                async for outcome in each:
                    assert outcome.ok
                    done += 1
                    if done == 3:
                        raise KeyError("the block's own")
    assert len(await redis.xpending("jobs", "workers", "-", "+", 10)) == 3


async def test_an_ack_outage_at_a_clean_exit_is_reported(redis: coredis.Redis[str]) -> None:
    """After a clean block, acknowledgements that could not be sent are an
    error (RedisUnavailable saying how many), not silence; the entries stay
    pending."""
    await fill(redis, "jobs", 2)

    async def handler(delivery: Delivery[str]) -> str:
        return delivery.fields["n"]

    with pytest.raises(RedisUnavailable, match="2 successful entries could not be acknowledged"):
        async with source(redis, stop_when_drained=False) as src:
            src._client = AcksFail(redis)  # type: ignore[assignment]
            async with corral.apply_to_each(handler, src, on_outcome=src.settle) as each:
                async for outcome in each:
                    assert outcome.ok
                    if src.stats.delivered == 2:
                        src.stop()
    assert len(await redis.xpending("jobs", "workers", "-", "+", 10)) == 2


async def test_every_step_of_the_iteration_is_a_checkpoint(redis: coredis.Redis[str]) -> None:
    """A step that has a delivery at hand is still a checkpoint: inside a
    cancelled scope it raises and takes nothing; the delivery comes next time."""
    await fill(redis, "jobs", 3)
    async with source(redis) as src:
        first = await src.__anext__()  # one read fetched all three
        with anyio.CancelScope() as scope:
            scope.cancel()
            await src.__anext__()
        assert scope.cancelled_caught
        assert src.stats.delivered == 1
        second = await src.__anext__()
        assert (first.fields["n"], second.fields["n"]) == ("0", "1")
        src.stop()


async def test_acks_that_go_through_on_the_last_try_are_not_reported(
    redis: coredis.Redis[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the acknowledgements fail as the block ends but the source's last,
    shielded try sends them, nothing is pending and no error is raised."""
    import corral.redis._streams

    # acknowledgements wait for the exit (not 10 ms), where the first XACK fails
    monkeypatch.setattr(corral.redis._streams, "_ACK_WAIT", 60.0)
    await fill(redis, "jobs", 2)

    async def handler(delivery: Delivery[str]) -> str:
        return delivery.fields["n"]

    async with source(redis, stop_when_drained=False) as src:
        client = src._client = AcksFail(redis, times=1)  # type: ignore[assignment]
        async with corral.apply_to_each(handler, src, on_outcome=src.settle) as each:
            async for outcome in each:
                assert outcome.ok
                if src.stats.delivered == 2:
                    src.stop()
    assert client.times == 0  # the first XACK did fail
    assert len(await redis.xpending("jobs", "workers", "-", "+", 10)) == 0


async def test_the_end_of_the_iteration_is_a_checkpoint(redis: coredis.Redis[str]) -> None:
    """After stop(), the step that ends the iteration is a checkpoint too: in a
    cancelled scope it raises the cancellation."""
    async with source(redis) as src:
        src.stop()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await src.__anext__()
        assert scope.cancelled_caught
        with pytest.raises(StopAsyncIteration):
            await src.__anext__()


@pytest.mark.untraced  # real-time expiry: min_idle=0.2 s against a 0.6 s handler
async def test_a_long_handler_keeps_its_entry_while_its_consumer_lives(
    redis: coredis.Redis[str],
) -> None:
    """A handler that runs three times min_idle, with a second consumer of the
    group claiming all along: the claim is renewed, so the entry is handled
    once, on its first delivery, and the other consumer never gets it."""
    ids = await fill(redis, "jobs", 1)
    handled: list[tuple[str, str, int]] = []

    def handler(consumer: str) -> Any:
        async def handle(delivery: Delivery[str]) -> None:
            handled.append((consumer, delivery.id, delivery.deliveries))
            await anyio.sleep(0.6)

        return handle

    sources = [source(redis, consumer=name, min_idle=0.2) for name in ("c1", "c2")]
    with anyio.fail_after(10):
        async with sources[0] as first, sources[1] as second, anyio.create_task_group() as tg:
            tg.start_soon(drain, first, handler("c1"))
            tg.start_soon(drain, second, handler("c2"))
    [(_, entry_id, deliveries)] = handled
    assert (entry_id, deliveries) == (ids[0], 1)
    assert first.stats.claimed == second.stats.claimed == 0
    assert first.stats.acked + second.stats.acked == 1
    assert not await redis.xpending("jobs", "workers", "-", "+", 10)


@pytest.mark.untraced  # real-time expiry: min_idle=0.3 s
async def test_the_entries_of_a_consumer_that_left_are_claimed_after_min_idle(
    redis: coredis.Redis[str],
) -> None:
    """A consumer whose block ended without settling what it handed out stops
    renewing: the next consumer claims that entry once it has been idle
    min_idle, not before, as its second delivery."""
    ids = await fill(redis, "jobs", 3)
    async with source(redis, consumer="gone", stop_when_drained=False, min_idle=0.3) as gone:
        abandoned = await gone.__anext__()  # handed out, never settled
        await anyio.sleep(0.45)  # longer than min_idle: renewed meanwhile (every 0.1 s)
        [pending] = await redis.xpending("jobs", "workers", abandoned.id, abandoned.id, 1)
        idle, seen_at = pending.idle / 1000, time.monotonic()
        assert idle < 0.3
        gone.stop()
    seen: dict[str, tuple[int, float]] = {}

    async def handler(delivery: Delivery[str]) -> None:
        seen[delivery.id] = (delivery.deliveries, time.monotonic() - seen_at)

    async with source(redis, consumer="next", min_idle=0.3) as nxt:
        with anyio.fail_after(10):
            await drain(nxt, handler)
    assert sorted(seen) == ids
    deliveries, after = seen[abandoned.id]
    assert deliveries == 2
    # claimed once idle min_idle, not before (its last renewal: idle before the exit)
    assert 0.3 - idle - 0.02 <= after < 0.3 + 1.0
    # the two read ahead were handed back at the exit, claimable at once, their
    # delivery undone: claimed too, as first deliveries
    assert nxt.stats.claimed == 3
    assert [seen[i][0] for i in ids if i != abandoned.id] == [1, 1]


@pytest.mark.untraced  # real-time expiry: min_idle=0.2 s
async def test_a_consumer_that_cannot_renew_loses_its_entry_and_goes_on(
    redis: coredis.Redis[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Renewal is what keeps an entry: a consumer whose renewals fail (Redis
    out of its reach) logs a WARNING, goes on, and another consumer claims
    its entry after min_idle."""
    ids = await fill(redis, "jobs", 1)

    def unreachable(**_: Any) -> Any:
        async def fail() -> None:
            raise coredis.exceptions.ConnectionError("connection reset")

        return fail()

    with anyio.fail_after(10):
        async with source(redis, consumer="cut-off", stop_when_drained=False, min_idle=0.2) as cut:
            cut._renew_script = unreachable  # type: ignore[assignment]
            mine = await cut.__anext__()
            async with source(redis, consumer="other", min_idle=0.2) as other:
                claimed = await other.__anext__()
                [outcome] = await corral.apply_to_all(lambda d: None, [claimed])
                await other.settle(outcome)
            # the first one is still running and settles too (at least once)
            [outcome] = await corral.apply_to_all(lambda d: None, [mine])
            await cut.settle(outcome)
            cut.stop()
    assert (mine.id, mine.deliveries) == (ids[0], 1)
    assert (claimed.id, claimed.deliveries) == (ids[0], 2)
    warnings = [r for r in caplog.records if r.name == "corral.redis" and r.levelname == "WARNING"]
    assert warnings
    assert "could not renew its claims" in warnings[0].getMessage()
    assert (await group_info(redis, "jobs", "workers"))["pending"] == 0


@pytest.mark.untraced  # a delivery is claimed again after min_idle=0.05 s
async def test_delete_acked_leaves_a_drained_stream_empty(redis: coredis.Redis[str]) -> None:
    """With delete_acked, successes and dead-lettered entries (on failure, and
    on claim) leave the stream in the step that acknowledges them."""
    ids = await fill(redis, "jobs", 50)
    await redis.xgroup_create("jobs", "workers", "0")
    await redis.xreadgroup("workers", "dead", {"jobs": ">"}, count=1)  # ids[0]: never settled
    await redis.xclaim("jobs", "workers", "dead", 0, [ids[0]])  # ... delivered twice

    async def handler(delivery: Delivery[str]) -> None:
        if delivery.fields["n"] == "7":
            raise ValueError("poison")

    async with source(redis, min_idle=0.05, max_deliveries=2, delete_acked=True) as src:
        await drain(src, handler, workers=4)
    assert await redis.xlen("jobs") == 0
    dead = {e.field_values["corral:id"]: e.field_values for e in await redis.xrange("jobs:dead")}
    assert sorted(dead) == [ids[0], ids[7]]
    assert dead[ids[0]]["n"] == "0"  # the copy has the fields, taken before the deletion
    assert src.stats.acked == 48
    assert src.stats.dead_lettered == 2
    assert (await group_info(redis, "jobs", "workers"))["pending"] == 0


async def test_sink_trims_what_a_group_acknowledged(redis: coredis.Redis[str]) -> None:
    """trim_acked_by: each batch trims the entries below the group's oldest
    pending entry and its last delivered one; pending and undelivered entries
    stay, and without the group nothing is trimmed."""
    async with StreamSink(redis, "jobs", trim_acked_by="workers") as sink:
        ids = [await sink.submit({"n": str(i)}) for i in range(20)]
        assert await redis.xlen("jobs") == 20  # no such group yet: nothing trimmed
        await redis.xgroup_create("jobs", "workers", "0")
        ids.append(await sink.submit({"n": "20"}))
        assert await redis.xlen("jobs") == 21  # nothing delivered yet: nothing trimmed
        await redis.xreadgroup("workers", "c", {"jobs": ">"}, count=10)
        await redis.xack("jobs", "workers", [ids[0], ids[1], ids[3], ids[4]])
        ids.append(await sink.submit({"n": "21"}))
        # ids[2] is the oldest pending: only ids[0] and ids[1] go
        assert [e.identifier for e in await redis.xrange("jobs")] == ids[2:]
        await redis.xack("jobs", "workers", [ids[2], *ids[5:10]])
        await redis.script_flush()  # the script is loaded again, and trims all the same
        ids.append(await sink.submit({"n": "22"}))
        # all ten delivered are acknowledged: the undelivered ones stay
        assert [e.identifier for e in await redis.xrange("jobs")] == ids[10:]
    assert sink.stats.flushed == 23


async def test_sink_trimming_spares_what_another_group_still_needs(
    redis: coredis.Redis[str],
) -> None:
    """With two groups on the stream, trimming by one never drops an entry
    the other still has pending or has not been handed yet."""
    await redis.xgroup_create("jobs", "a", "0", mkstream=True)
    await redis.xgroup_create("jobs", "b", "0", mkstream=True)
    ids = [await redis.xadd("jobs", {"n": str(i)}) for i in range(6)]
    await redis.xreadgroup("a", "a1", {"jobs": ">"}, count=6)
    await redis.xack("jobs", "a", ids)  # a is done with everything
    await redis.xreadgroup("b", "b1", {"jobs": ">"}, count=4)
    await redis.xack("jobs", "b", ids[1:4])  # b: ids[0] pending, ids[4:] not delivered
    async with StreamSink(redis, "jobs", trim_acked_by="a") as sink:
        new = await sink.submit({"n": "6"})
    assert [e.identifier for e in await redis.xrange("jobs")] == [*ids, new]
    await redis.xack("jobs", "b", [ids[0]])
    async with StreamSink(redis, "jobs", trim_acked_by="a") as sink:
        newer = await sink.submit({"n": "7"})
    # b is done with ids[:4]; ids[4:] and what follows are still to be delivered to it
    assert [e.identifier for e in await redis.xrange("jobs")] == [*ids[4:], new, newer]


async def test_sink_trimming_keeps_writes_at_one_round_trip(redis: coredis.Redis[str]) -> None:
    """The trim goes in the batch's pipeline: a batch is still one round trip
    (EVALSHA, no SCRIPT EXISTS), and a trim that fails does not fail (nor
    repeat) the batch."""
    await redis.xgroup_create("out", "readers", "$", mkstream=True)
    async with StreamSink(redis, "out", trim_acked_by="readers") as sink:
        await sink.submit({"warm": "up"})  # loads the script
        await redis.config_resetstat()
        for i in range(5):
            await sink.submit({"i": str(i)})
        stats = await redis.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 5
        assert "cmdstat_script|exists" not in stats
        await redis.delete(["out"])
        await redis.set("out", "not a stream")  # XADD fails: the batch fails as before
        with pytest.raises(coredis.exceptions.ResponseError):
            await sink.submit({"i": "x"})
    await redis.delete(["out"])


async def test_bad_trim_and_delete_arguments_name_the_parameter(redis: coredis.Redis[str]) -> None:
    with pytest.raises(ValueError, match="trim_acked_by"):
        StreamSink(redis, "s", trim_acked_by="")
    with pytest.raises(TypeError, match="trim_acked_by"):
        StreamSink(redis, "s", trim_acked_by=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="delete_acked"):
        StreamSource(redis, "s", "g", "c", delete_acked=1)  # type: ignore[arg-type]
