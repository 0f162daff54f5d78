"""Put N orders (2,000 by default) on the Redis stream "orders".

Each entry has the fields `order` (its id) and `amount`. One order in 250 has
the amount "-1", which the payment API always declines: those end up in the
dead-letter stream "orders:dead".

Run it against a redis-server of your own:
`python examples/distributed/producer.py PORT [N] [asyncio|uvloop|trio]`.
"""

from __future__ import annotations

import argparse

import anyio
from worker import BACKENDS, backend_options  # (this folder is on sys.path)

from corral.redis import StreamSink, connect


def amount(n: int) -> str:
    if n % 250 == 125:
        return "-1"  # a bad order: declined on every attempt
    return f"{1 + n * 7919 % 20_000 / 100:.2f}"


async def main(port: int, count: int) -> None:
    async with (
        connect(f"redis://127.0.0.1:{port}") as client,
        StreamSink(client, "orders", max_size=500) as orders,  # pipelined XADDs
    ):
        for n in range(1, count + 1):
            await orders.add({"order": f"order-{n:05d}", "amount": amount(n)})
    print(f"producer: {count:,} orders added to 'orders' ({orders.stats.flushes} round trips)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("port", type=int, help="the redis-server's port")
    parser.add_argument("count", nargs="?", type=int, default=2_000, help="default: 2,000")
    parser.add_argument("backend", nargs="?", choices=list(BACKENDS), default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.port, args.count, **backend_options(parser, args.backend))
