"""Real OS processes sharing one redis-server: four processes share one
RedisRateLimiter and together never exceed it; three consumers drain 10,000
entries while one of them is killed with SIGKILL, and no entry is lost; poison
entries land in the dead-letter stream after max_deliveries deliveries; three
processes share one RedisCapacityLimiter and never hold more than its slots,
and the slots of one killed with SIGKILL come free after their lease.

The worker processes (redis_worker.py) run on the backend of the test.
"""

from __future__ import annotations

import bisect
import json
import pathlib
import signal
import sys
import tempfile
import time
from typing import Any

import anyio
import coredis
import pytest

from corral.redis import StreamSink
from redis_server import COREDIS_LEAK
from test_redis_limiter import assert_token_bucket

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings(COREDIS_LEAK)]

WORKER = pathlib.Path(__file__).with_name("redis_worker.py")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """These start processes and take seconds: asyncio and trio, not uvloop too."""
    return str(request.param)


async def start(args: list[Any], output: pathlib.Path) -> anyio.abc.Process:
    with output.open("wb") as out:  # the child keeps its own descriptor
        return await anyio.open_process(
            [sys.executable, str(WORKER), *map(str, args)], stdout=out, stderr=out
        )


@pytest.mark.timeout(120)
async def test_four_processes_share_one_limit(
    redis: coredis.Redis[str], redis_port: int, anyio_backend: str
) -> None:
    rate, per, burst, seconds = 20, 1.0, 2, 3.0
    with tempfile.TemporaryDirectory() as folder:
        outputs = [pathlib.Path(folder, f"limit{i}.out") for i in range(4)]
        processes = [
            await start(["limit", redis_port, "shared", rate, per, burst, seconds, anyio_backend],
                        out)
            for out in outputs
        ]  # fmt: skip
        with anyio.fail_after(60):
            codes = [await process.wait() for process in processes]
        texts = [out.read_text() for out in outputs]
    assert codes == [0, 0, 0, 0], texts
    per_process = [json.loads(text) for text in texts]
    assert all(per_process), "every process was admitted"
    times = sorted(t for admitted in per_process for t in admitted)
    assert_token_bucket(times, rate, per, burst)
    # and the limit was used, not just respected: close to rate per second
    span = times[-1] - times[0]
    assert len(times) >= 0.9 * rate * span / per
    most = max(bisect.bisect_left(times, t + per) - i for i, t in enumerate(times))
    print(f"{len(times)} admissions in {span:.2f} s; most in any {per} s window: {most}")


@pytest.mark.timeout(150)
async def test_three_consumers_one_killed_lose_nothing(
    redis: coredis.Redis[str], redis_port: int, anyio_backend: str
) -> None:
    total, poison_every, max_deliveries = 10_000, 2_000, 3
    async with StreamSink(redis, "jobs", max_size=500) as sink:
        for i in range(total):
            fields = {"n": str(i)}
            if i % poison_every == 1:
                fields["poison"] = "1"
            await sink.add(fields)
    ids = [entry.identifier for entry in await redis.xrange("jobs")]
    poison = {ids[i] for i in range(1, total, poison_every)}
    assert len(ids) == total

    with tempfile.TemporaryDirectory() as folder:
        outputs = [pathlib.Path(folder, f"consumer{i}.out") for i in range(3)]
        processes = [
            await start(["consume", redis_port, "jobs", f"c{i}", max_deliveries, anyio_backend],
                        out)
            for i, out in enumerate(outputs)
        ]  # fmt: skip
        with anyio.fail_after(60):  # the killed one must be midway through its work
            # another process's progress, visible only in Redis: poll it
            while await redis.hlen("processed") < 3_000:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        processes[0].send_signal(signal.SIGKILL)
        with anyio.fail_after(90):
            codes = [await process.wait() for process in processes]
        texts = [out.read_text() for out in outputs]
    assert codes == [-signal.SIGKILL, 0, 0], texts
    survivors = [json.loads(text) for text in texts[1:]]
    assert sum(stats["claimed"] for stats in survivors) > 0  # they took over c0's entries

    # every entry is settled: nothing pending in the group, all of it read
    [info] = await redis.xinfo_groups("jobs")
    assert info["pending"] == 0
    assert info["entries-read"] == total
    # every good entry succeeded, and only good ones
    processed = {k: int(v) for k, v in (await redis.hgetall("processed")).items()}
    assert set(processed) == set(ids) - poison
    # at least once: only the killed consumer's unacknowledged work ran twice
    twice = sum(count - 1 for count in processed.values())
    print(f"handled twice: {twice}")
    # (at most its 50 in flight and the acknowledgements it had queued, 100 per
    # XACK, 200 queued: the source's ack Batcher)
    assert twice <= 50 + 100 + 200
    # every poison entry is in the dead-letter stream exactly once, after 3 deliveries
    dead = [entry.field_values for entry in await redis.xrange("jobs:dead")]
    assert sorted(d["corral:id"] for d in dead) == sorted(poison)
    assert {d["corral:deliveries"] for d in dead} <= {"3", "4"}
    for d in dead:
        if d["corral:deliveries"] == "3":  # failed on its third delivery
            assert d["corral:error"] == "ValueError('poison')"
        else:  # its third delivery died with c0, unsettled: buried when claimed
            assert "never settled" in d["corral:error"]


def most_at_once(held: list[tuple[float, float]]) -> int:
    """The most holdings that overlap at any instant (an end before a start
    at the same instant)."""
    events = sorted([(start, 1) for start, _ in held] + [(end, -1) for _, end in held])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@pytest.mark.timeout(120)
async def test_three_processes_share_one_capacity(
    redis: coredis.Redis[str], redis_port: int, anyio_backend: str
) -> None:
    """Three processes, four tasks each, hold slots of one cap of 3: never
    more than 3 at once, measured inside the holdings (a holding is
    measured after admission and before the slot is given back), and every
    process gets its share."""
    total, tasks, rounds, hold = 3, 4, 10, 0.01
    with tempfile.TemporaryDirectory() as folder:
        outputs = [pathlib.Path(folder, f"capacity{i}.out") for i in range(3)]
        processes = [
            await start(["capacity", redis_port, "shared-cap", total, 5.0, tasks, rounds, hold,
                         anyio_backend], out)
            for out in outputs
        ]  # fmt: skip
        with anyio.fail_after(60):
            codes = [await process.wait() for process in processes]
        texts = [out.read_text() for out in outputs]
    assert codes == [0, 0, 0], texts
    per_process = [json.loads(text) for text in texts]
    assert [len(held) for held in per_process] == [tasks * rounds] * 3
    everything = [tuple(h) for held in per_process for h in held]
    assert most_at_once(everything) <= total
    print(f"most at once: {most_at_once(everything)} of {total}")


@pytest.mark.timeout(120)
async def test_a_killed_holders_slots_come_free_after_their_lease(
    redis: coredis.Redis[str], redis_port: int, anyio_backend: str
) -> None:
    """A process holds both slots of a cap and is killed with SIGKILL while
    two other processes wait: they get the slots once the dead process's
    leases end (not before: it renewed them every lease / 3 while alive),
    and never hold more than the cap between them."""
    total, lease = 2, 1.0
    with tempfile.TemporaryDirectory() as folder:
        outputs = [pathlib.Path(folder, f"capacity{i}.out") for i in range(3)]
        hog = await start(
            ["capacity", redis_port, "killed-cap", total, lease, total, 1, "inf", anyio_backend],
            outputs[0],
        )
        with anyio.fail_after(30):  # another process's progress, visible only in Redis
            while await redis.zcard("killed-cap") < total:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        waiters = [
            await start(["capacity", redis_port, "killed-cap", total, lease, 2, 5, 0.01,
                         anyio_backend], out)
            for out in outputs[1:]
        ]  # fmt: skip
        with anyio.fail_after(30):  # both wait in line
            while await redis.zcard("killed-cap:waiting") < 2:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        await anyio.sleep(2 * lease)  # the hog renews its slots meanwhile
        assert await redis.zcard("killed-cap") == total
        hog.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        with anyio.fail_after(60):
            codes = [await process.wait() for process in [hog, *waiters]]
        texts = [out.read_text() for out in outputs]
    assert codes == [-signal.SIGKILL, 0, 0], texts
    held = [tuple(h) for text in texts[1:] for h in json.loads(text)]
    assert len(held) == 2 * 2 * 5
    first = min(start for start, _ in held) - killed_at
    # the last renewal came about lease / 3 before the kill, at most
    assert lease / 2 <= first < lease + 1.0, first
    assert most_at_once(held) <= total
