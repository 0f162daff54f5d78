"""A worker process for test_sqlite_processes.py (run as a script).

python sqlite_worker.py produce PATH BACKEND --count N [--pace SECONDS]
    add entries {"n": i} with the key "key-i" for i in range(N), one at a
    time, sleeping ``pace`` seconds after each (so that a test can kill it
    part way); print how many it added
python sqlite_worker.py consume PATH BACKEND --log LOG [--consumer NAME] [--lease ...] ...
    consume the queue with apply_to_each until it is drained; the handler
    sleeps ``--handle`` seconds, then appends the line "n id deliveries ok"
    to LOG (an entry with the field "poison" appends "... failed" and raises
    ValueError("poison n")); print the source's stats as JSON

A line is written with one os.write on a file opened with O_APPEND: once the
handler has returned, its line is in the file, even if the process is killed
the next instant. BACKEND is asyncio, uvloop or trio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import anyio
import attrs

import corral
from corral.sqlite import Delivery, QueueSink, QueueSource


async def produce(options: argparse.Namespace) -> None:
    async with QueueSink(options.path, max_size=50) as sink:
        for i in range(options.count):
            await sink.add({"n": str(i)}, key=f"key-{i}")
            if options.pace:
                await anyio.sleep(options.pace)
    print(sink.stats.flushed)


async def consume(options: argparse.Namespace) -> None:
    log = os.open(options.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:

        async def handle(delivery: Delivery[str]) -> None:
            await anyio.sleep(options.handle)
            n = delivery.fields["n"]
            failed = "poison" in delivery.fields
            line = f"{n} {delivery.id} {delivery.deliveries} {'failed' if failed else 'ok'}\n"
            os.write(log, line.encode())
            if failed:
                raise ValueError(f"poison {n}")

        async with (
            QueueSource(
                options.path,
                consumer=options.consumer,
                max_in_flight=options.max_in_flight,
                lease=options.lease,
                max_deliveries=options.max_deliveries,
                redeliver_after=options.redeliver_after,
                stop_when_drained=True,
                poll=0.02,
            ) as source,
            corral.apply_to_each(
                handle, source, workers=options.workers, on_outcome=source.settle
            ) as outcomes,
        ):
            async for _ in outcomes:
                pass
    finally:
        os.close(log)
    print(json.dumps(attrs.asdict(source.stats)))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sqlite_worker.py")
    parser.add_argument("mode", choices=["produce", "consume"])
    parser.add_argument("path")
    parser.add_argument("backend", choices=["asyncio", "uvloop", "trio"])
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--log")
    parser.add_argument("--consumer")
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--max-in-flight", type=int, default=50)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--handle", type=float, default=0.005)
    parser.add_argument("--max-deliveries", type=int, default=5)
    parser.add_argument("--redeliver-after", type=float)
    return parser.parse_args(argv)


def main() -> None:
    options = parse(sys.argv[1:])
    run: dict[str, Any] = {"backend": options.backend}
    if options.backend == "uvloop":
        run = {"backend": "asyncio", "backend_options": {"use_uvloop": True}}
    anyio.run(produce if options.mode == "produce" else consume, options, **run)


if __name__ == "__main__":
    main()
