"""A billing worker: charge the orders of the Redis stream "orders" through a
payment API whose quota every worker shares.

It consumes "orders" in the consumer group "billing" as consumer NAME until
the group has nothing left, writes a receipt per charged order to the stream
"receipts", and prints its counts. Start several at once, each with its own
NAME; they share the work and the quota:
`python examples/distributed/worker.py PORT NAME [asyncio|uvloop|trio]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import uuid
from typing import Any

try:
    import coredis
except ImportError:  # (producer.py and run.py import this file before corral.redis)
    sys.exit(
        "this example needs coredis, the extra corral[redis]: pip install 'corral[redis]' "
        "(in a checkout of corral: pip install -e '.[redis]')"
    )

import anyio

import corral
from corral.redis import Delivery, RedisRateLimiter, StreamSink, StreamSource, connect

RATE, BURST = 1_000, 20  # the payment API's quota: calls per second, all workers together
# Seconds the orders of a worker that died stay pending before another worker
# takes them over. Keep it above the longest handling time (queueing for the
# quota and retries included, well under a second here), or a slow order runs
# twice.
MIN_IDLE = 5.0
# Seconds before an order whose charge failed (after the in-process retries)
# is delivered again, to any worker.
REDELIVER_AFTER = 0.2


async def payment_api(client: coredis.Redis[str], key: str, amount: str) -> str:
    """The payment API, simulated: charge `amount` once per idempotency `key`.

    Like real payment APIs it takes an idempotency key: a request that repeats
    a key returns the charge already made for it and charges nothing. It keeps
    its charges in the hash "charges", key -> charge id, set with HSETNX, which
    sets only a field that is not there yet; and counts calls and replays in
    the hash "payments-api:stats". Returns the charge id.
    """
    await anyio.sleep(0.002)  # the network round trip
    await client.hincrby("payments-api:stats", "calls", 1)
    if random.random() < 0.01:
        raise ConnectionError("payment API: connection reset")  # the request was lost
    if float(amount) <= 0:
        raise ValueError(f"payment API: declined, invalid amount {amount}")
    charge_id = f"ch_{uuid.uuid4().hex[:12]}"
    if not await client.hsetnx("charges", key, charge_id):  # charged before: replay it
        await client.hincrby("payments-api:stats", "replays", 1)
        charge_id = str(await client.hget("charges", key))
    if random.random() < 0.01:
        raise ConnectionError("payment API: connection reset")  # charged; the reply was lost
    return charge_id


async def main(port: int, name: str) -> None:
    async with (
        connect(f"redis://127.0.0.1:{port}") as client,
        StreamSink(client, "receipts") as receipts,
    ):
        # one quota for every worker process: the limit lives in Redis
        quota = RedisRateLimiter(client, "payments-api", rate=RATE, per=1.0, burst=BURST)

        async def charge(delivery: Delivery[str]) -> str:
            # Idempotent by design: the order id is the idempotency key. An order
            # may run twice (delivery is at least once: a worker can die after
            # charging and before its XACK; a retry follows a lost reply), and
            # the API then returns the first charge instead of charging again.
            order, amount = delivery.fields["order"], delivery.fields["amount"]
            charge_id = await payment_api(client, order, amount)
            # submit, not add: the receipt is written before we return, so
            # before the order is acknowledged
            await receipts.submit(
                {"order": order, "charge": charge_id, "amount": amount, "worker": name}
            )
            return charge_id

        source = StreamSource(
            client,
            "orders",
            group="billing",
            consumer=name,
            min_idle=MIN_IDLE,
            redeliver_after=REDELIVER_AFTER,
            max_deliveries=3,  # the 3rd failure goes to "orders:dead"
            dead_letter_on=ValueError,  # a declined order: at once, retrying cannot mend it
            block=0.1,  # wait at most 0.1 s for new orders at a time
            stop_when_drained=True,  # end once no order is left, undelivered or pending
        )
        async with (
            source,
            corral.apply_to_each(
                charge,
                source,
                workers=20,
                retry=corral.Retry(3, on=ConnectionError, wait_initial=0.01),
                rate_limit=quota,  # every call, retries included, takes a slot of the quota
                on_outcome=source.settle,  # ack a success; a failure is delivered again
            ) as outcomes,
        ):
            async for _ in outcomes:
                pass
    s = source.stats
    print(
        f"{name}: delivered {s.delivered} ({s.claimed} reclaimed), acked {s.acked}, "
        f"failed {s.failed}, dead-lettered {s.dead_lettered}"
    )


# A backend's name on the command line -> anyio.run's backend and backend_options.
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}


def backend_options(parser: argparse.ArgumentParser, name: str) -> dict[str, Any]:
    """anyio.run's ``backend`` and ``backend_options`` for the backend ``name``;
    a usage error (status 2) if it is not installed."""
    if name != "asyncio" and importlib.util.find_spec(name) is None:
        parser.error(
            f"{name} is not installed: pip install 'corral[{name}]' "
            f"(in a checkout of corral: pip install -e '.[{name}]')"
        )
    backend, options = BACKENDS[name]
    return {"backend": backend, "backend_options": options}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("port", type=int, help="the redis-server's port")
    parser.add_argument("name", help="this worker's consumer name in the group")
    parser.add_argument("backend", nargs="?", choices=list(BACKENDS), default="asyncio")
    args = parser.parse_args()
    port, name = args.port, args.name
    run_on = backend_options(parser, args.backend)
    interrupted = False
    try:
        anyio.run(main, port, name, **run_on)
    except* KeyboardInterrupt:  # Ctrl-C (in an exception group on trio)
        interrupted = True
    if interrupted:
        print(f"{name}: interrupted; its unsettled orders go to the others after {MIN_IDLE} s")
        sys.exit(130)
