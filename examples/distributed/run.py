"""Charge orders through a rate-limited payment API from several worker processes.

Puts the orders on a Redis stream (producer.py), runs worker processes
(worker.py) that share the stream and the API's quota until every order is
settled, then checks that each one was: charged once with a receipt, or
declined and dead-lettered, and none left pending.

    python examples/distributed/run.py [--port PORT] [--workers 3] [--orders 2000]
                                       [--backend asyncio|uvloop|trio]

Without --port it starts a throwaway redis-server (no persistence) and stops
it at the end; with --port it uses that server's database 0, which must not
hold the keys of an earlier run (`redis-cli -p PORT flushdb`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import anyio
from worker import BACKENDS, RATE, backend_options  # (this folder is on sys.path)

from corral.redis import connect

HERE = pathlib.Path(__file__).parent
KEYS = ["orders", "orders:dead", "receipts", "charges", "payments-api", "payments-api:stats"]


@contextlib.contextmanager
def redis_server() -> Iterator[int]:
    """Run redis-server on a free loopback port, without persistence; yield the port."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("install redis-server (Debian: apt-get install -y redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="corral-example-") as workdir:
        server = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while True:  # until it accepts connections
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        sys.exit(f"redis-server did not start on port {port}")
                    time.sleep(0.02)
            yield port
        finally:
            server.terminate()
            server.wait()


async def leftovers(port: int) -> list[str]:
    async with connect(f"redis://127.0.0.1:{port}") as client:
        return [key for key in KEYS if await client.exists([key])]


async def tally(port: int) -> dict[str, Any]:
    """Everything the summary needs, read from Redis."""
    async with connect(f"redis://127.0.0.1:{port}") as client:
        orders = [entry.field_values["order"] for entry in await client.xrange("orders")]
        receipts = await client.xrange("receipts")  # the entries, with their IDs
        dead = [entry.field_values for entry in await client.xrange("orders:dead")]
        [group] = await client.xinfo_groups("orders")  # the group "billing"
        stats = await client.hgetall("payments-api:stats")
        return {
            "orders": orders,
            "receipts": receipts,
            "dead": dead,
            "pending": int(group["pending"]),
            "charged": await client.hlen("charges"),
            "calls": int(stats.get("calls", 0)),
            "replays": int(stats.get("replays", 0)),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, help="use this redis-server (default: start one)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes")
    parser.add_argument("--orders", type=int, default=2_000)
    parser.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="asyncio",
        help="for the producer and the workers (default: asyncio)",
    )
    args = parser.parse_args()
    backend_options(parser, args.backend)  # installed?
    with contextlib.ExitStack() as stack:
        port = args.port or stack.enter_context(redis_server())
        return run(port, args.workers, args.orders, args.backend)


def run(port: int, workers: int, count: int, backend: str) -> int:
    try:
        socket.create_connection(("localhost", port), timeout=5).close()
    except OSError as error:
        print(f"no redis-server on port {port}: {error}")
        return 1
    if leftover := anyio.run(leftovers, port):
        print(f"port {port} holds keys of an earlier run: {', '.join(leftover)}")
        print(f"flush them (redis-cli -p {port} flushdb) or leave out --port")
        return 1
    started = time.monotonic()
    producer = [sys.executable, HERE / "producer.py", str(port), str(count), backend]
    subprocess.run(producer, check=True)
    produced = time.monotonic()

    names = [f"worker-{i}" for i in range(1, workers + 1)]
    processes = [
        subprocess.Popen(
            [sys.executable, HERE / "worker.py", str(port), name, backend],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]  # they run at once; each prints a line of counts when the stream is drained
    try:
        reports = [process.communicate()[0] for process in processes]
    finally:
        for process in processes:  # interrupted (Ctrl-C): stop them too
            if process.poll() is None:
                process.kill()
    finished = time.monotonic()
    print("".join(reports), end="")
    codes = [process.returncode for process in processes]
    if any(codes):
        print(f"a worker failed: exit codes {codes}")
        return 1

    t = anyio.run(tally, port)
    receipts = {entry.field_values["order"] for entry in t["receipts"]}
    dead = {fields["order"] for fields in t["dead"]}
    per_worker = collections.Counter(entry.field_values["worker"] for entry in t["receipts"])
    errors = collections.Counter(fields["corral:error"] for fields in t["dead"])
    # a stream entry's ID begins with the Redis server's clock (ms) when it was added
    stamps = [int(entry.identifier.split("-")[0]) for entry in t["receipts"]]
    span = (stamps[-1] - stamps[0]) / 1000 if stamps else 0.0

    by_worker = ", ".join(f"{name} {per_worker[name]:,}" for name in names)
    why = "; ".join(f"{n} x {error}" for error, n in errors.items()) or "none"
    print()
    print(f"orders:        {len(t['orders']):,}")
    repeated = len(t["receipts"]) - len(receipts)  # an order delivered twice: same charge
    again = f", {repeated} for orders delivered twice" if repeated else ""
    print(f"receipts:      {len(t['receipts']):,}  ({by_worker}{again})")
    print(f"dead-lettered: {len(t['dead']):,}  ({why})")
    print(f"charged:       {t['charged']:,}  (each order once: {t['replays']} retries after a "
          "lost reply got the first charge back)")  # fmt: skip
    print(f"API calls:     {t['calls']:,}  (quota {RATE:,}/s for all workers; receipts "
          f"written at {len(stamps) / max(span, 0.001):,.0f}/s)")  # fmt: skip
    print(f"elapsed:       {finished - started:.1f} s  (producer {produced - started:.1f} s, "
          f"workers {finished - produced:.1f} s)")  # fmt: skip

    settled = (
        receipts | dead == set(t["orders"])
        and not receipts & dead
        and len(t["orders"]) == count
        and t["charged"] == len(receipts)
        and t["pending"] == 0
    )
    line = (
        f"{len(receipts)} receipts + {len(dead)} dead-lettered = {len(receipts | dead)} orders; "
        f"pending {t['pending']}"
    )
    if not settled:
        print(f"NOT every order settled: {line} (of {count} orders; {t['charged']} charged)")
        return 1
    print(f"every order settled: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
