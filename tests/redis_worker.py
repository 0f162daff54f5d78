"""A worker process for test_redis_processes.py (run as a script).

python redis_worker.py limit PORT KEY RATE PER BURST SECONDS BACKEND
    acquire from 5 tasks for SECONDS; print the admission times
    (time.monotonic, the same clock in every process) as JSON
python redis_worker.py consume PORT STREAM CONSUMER MAX_DELIVERIES BACKEND
    consume the stream in group "workers" until it is drained: count each
    success in the hash "processed" (field: entry ID); an entry whose
    field "poison" is set fails every time; print the source's stats
python redis_worker.py capacity PORT KEY TOTAL LEASE TASKS ROUNDS HOLD BACKEND
    TASKS tasks each hold a slot of a RedisCapacityLimiter ROUNDS times, for
    HOLD seconds (inf: for ever); print the (start, end) of every holding
    (time.monotonic) as JSON
"""

from __future__ import annotations

import json
import sys
import time

import anyio
import attrs
import coredis

import corral
from corral.redis import Delivery, RedisCapacityLimiter, RedisRateLimiter, StreamSource


async def limit(port: int, key: str, rate: float, per: float, burst: int, seconds: float) -> None:
    times: list[float] = []
    async with coredis.Redis(port=port) as client:
        limiter = RedisRateLimiter(client, key, rate, per, burst=burst)
        deadline = time.monotonic() + seconds

        async def admit() -> None:
            while time.monotonic() < deadline:
                await limiter.acquire()
                times.append(time.monotonic())

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(admit)
    print(json.dumps(times))


async def consume(port: int, stream: str, consumer: str, max_deliveries: int) -> None:
    async with coredis.Redis(port=port, decode_responses=True) as client:

        async def handle(delivery: Delivery[str]) -> None:
            await anyio.sleep(0.001)  # some I/O
            if delivery.fields.get("poison"):
                raise ValueError("poison")
            await client.hincrby("processed", delivery.id, 1)

        async with (
            StreamSource(
                client,
                stream,
                "workers",
                consumer,
                max_in_flight=50,
                min_idle=1.0,
                max_deliveries=max_deliveries,
                block=0.05,
                stop_when_drained=True,
            ) as source,  # fmt: skip
            corral.apply_to_each(handle, source, workers=20, on_outcome=source.settle) as outcomes,
        ):
            async for _ in outcomes:
                pass
    print(json.dumps(attrs.asdict(source.stats)))


async def capacity(
    port: int, key: str, total: int, lease: float, tasks: int, rounds: int, hold: float
) -> None:
    held: list[tuple[float, float]] = []
    async with coredis.Redis(port=port) as client:
        limiter = RedisCapacityLimiter(client, key, total, lease=lease)

        async def holder() -> None:
            for _ in range(rounds):
                async with limiter:
                    start = time.monotonic()
                    await anyio.sleep(hold)
                    held.append((start, time.monotonic()))

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(holder)
    print(json.dumps(held))


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    backend = args[-1]
    if mode == "limit":
        port, key, rate, per, burst, seconds = args[:-1]
        anyio.run(limit, int(port), key, float(rate), float(per), int(burst), float(seconds),
                  backend=backend)  # fmt: skip
    elif mode == "capacity":
        port, key, total, lease, tasks, rounds, hold = args[:-1]
        anyio.run(capacity, int(port), key, int(total), float(lease), int(tasks), int(rounds),
                  float(hold), backend=backend)  # fmt: skip
    else:
        port, stream, consumer, max_deliveries = args[:-1]
        anyio.run(consume, int(port), stream, consumer, int(max_deliveries), backend=backend)


if __name__ == "__main__":
    main()
