"""The Redis adapters (``corral.redis``) against the hand-written Redis calls they
replace, on a redis-server that this script starts on a free loopback port.

1. Limiter round trip: µs per ``await RedisRateLimiter(...).acquire()`` with a
   limit that never binds (1e8 per second, ``burst=100``), from one task and
   from 50 concurrent tasks sharing one client, exact (``lease=1``) and leasing
   (``lease=100``); against one raw ``await client.ping()`` (the cheapest round
   trip there is) and the limiter's own Lua script called directly, the same
   number of times in the same run; on every installed backend (asyncio,
   asyncio + uvloop, trio).
2. Stream consumers: entries per second through ``StreamSource`` feeding
   ``apply_to_each`` (100 workers, ``on_outcome=source.settle``) in 1, 2 and 4
   consumer processes of one group, with a handler that awaits
   ``anyio.sleep(0)`` (pure overhead) and one that sleeps 1 ms (simulated I/O);
   against a hand-written single-process consumer (``XREADGROUP COUNT 100``,
   the batch handled in a task group, one ``XACK`` per batch). Each run fills
   a fresh stream (pipelined ``XADD``), starts the consumer processes and lets
   them connect; the clock runs from "go" to the last consumer done, its
   acknowledgements written. That includes, for every consumer, the one read
   that blocks 50 ms and finds the stream drained. Every run then checks that
   the group read and acknowledged every entry exactly once (``XINFO GROUPS``:
   0 pending, entries-read = entries) and stops the script if not. The
   consumers run on asyncio (``--stream-backend`` to change).

Needs coredis (the ``bench`` group) and redis-server on PATH; without the
binary the script says so and exits 0.

    python benchmarks/bench_redis.py [--acquires 2000] [--entries 20000] [--repeat 5]
        [--handler sleep0 sleep-1ms] [--stream-backend asyncio] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from _harness import backends, fmt, key_ratio, ratio  # the script's own folder is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_server import RedisMissing, redis_server

try:
    import coredis
except ImportError:  # pragma: no cover - depends on the environment
    coredis = None

TASKS = 50  # concurrent callers of the limiter
NO_LIMIT = 1e8  # per second: never binds (the most a RedisRateLimiter takes is 1e9)
LEASE = 100
WORKERS = 100  # apply_to_each workers per consumer process
BATCH = 100  # the hand-written consumer's XREADGROUP COUNT
BLOCK = 0.05  # seconds an empty read blocks, for both consumers
GROUP = "g"
PROCESSES = (1, 2, 4)

# ------------------------------------------------------------ limiter round trip

PING = "raw `client.ping()`"
SCRIPT = "raw call of the limiter's Lua script"
EXACT = "corral `RedisRateLimiter.acquire()`"
LEASED = f"corral `RedisRateLimiter.acquire()`, lease={LEASE}"

#: One run: the connected client and how many calls to make; returns the calls made.
Run = Callable[[Any, int], Awaitable[int]]


async def spread(call: Callable[[], Awaitable[Any]], count: int, tasks: int) -> int:
    """``count`` awaits of ``call``: in turn from one task, or shared by ``tasks`` tasks."""

    async def loop(times: int) -> None:
        for _ in range(times):
            await call()

    if tasks == 1:
        await loop(count)
    else:
        async with anyio.create_task_group() as tg:
            for index in range(tasks):
                tg.start_soon(loop, count // tasks + (index < count % tasks))
    return count


def limiter_runs(tasks: int) -> dict[str, Run]:
    from corral.redis import RedisRateLimiter
    from corral.redis._limiter import _GCRA  # the very script the limiter runs

    def limiter(client: Any, lease: int) -> Any:
        key = f"bench:limit:{uuid.uuid4().hex}"  # fresh: no lease or state carried over
        return RedisRateLimiter(client, key, NO_LIMIT, 1.0, burst=LEASE, lease=lease)

    async def ping(client: Any, count: int) -> int:
        return await spread(client.ping, count, tasks)

    async def script(client: Any, count: int) -> int:
        gcra = client.register_script(_GCRA)
        keys, args = [f"bench:limit:{uuid.uuid4().hex}"], [repr(1e6 / NO_LIMIT), LEASE, 1]
        return await spread(lambda: gcra(keys=keys, args=args), count, tasks)

    async def exact(client: Any, count: int) -> int:
        return await spread(limiter(client, 1).acquire, count, tasks)

    async def leased(client: Any, count: int) -> int:
        return await spread(limiter(client, LEASE).acquire, count, tasks)

    suffix = "1 task" if tasks == 1 else f"{tasks} tasks"
    return {
        f"{PING}, {suffix}": ping,
        f"{SCRIPT}, {suffix}": script,
        f"{EXACT}, {suffix}": exact,
        f"{LEASED}, {suffix}": leased,
    }


def measure_limiters(
    port: int, backend: str, options: dict[str, Any], count: int, repeat: int
) -> dict[str, list[float]]:
    """µs per call of each run, interleaved (A B A B ...) ``repeat`` times on one
    client in one event loop (as ``_harness.measure``, with the client set up
    outside the timing)."""
    runs = {**limiter_runs(1), **limiter_runs(TASKS)}
    timings: dict[str, list[float]] = {label: [] for label in runs}

    async def main() -> None:
        async with coredis.Redis(port=port, decode_responses=True) as client:
            for run in runs.values():  # warm up: connections, the script cache
                await run(client, TASKS)
            for _ in range(repeat):
                for label, run in runs.items():
                    start = time.perf_counter()
                    done = await run(client, count)
                    elapsed = time.perf_counter() - start
                    assert done == count, (label, done, count)
                    timings[label].append(elapsed / count * 1e6)

    anyio.run(main, backend=backend, backend_options=options)
    return timings


def limiter_table(port: int, count: int, repeat: int) -> dict[str, dict[str, list[float]]]:
    results = {
        label: measure_limiters(port, backend, options, count, repeat)
        for label, backend, options in backends()
    }
    columns = list(results)
    print(
        f"\n#### Limiter round trip, a limit that never binds: µs per call, median (min-max) "
        f"of {repeat} interleaved runs of {count} calls; **ratio** to one raw `PING` round "
        "trip made the same way (1 task, or 50 concurrent tasks on one client)\n"
    )
    print("| contender | " + " | ".join(columns) + " |")
    print("| --- | " + " | ".join("---:" for _ in columns) + " |")
    for name in results[columns[0]]:
        base = f"{PING}, {name.rsplit(', ', 1)[1]}"
        cells = []
        for column in columns:
            timings = results[column]
            cell = fmt(timings[name])
            if name != base:
                cell += f" **{ratio(timings[name], timings[base])}**"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")
    sys.stdout.flush()
    return results


# ------------------------------------------------------------- stream consumers


async def sleep0(_: object) -> None:
    await anyio.sleep(0)  # noqa: ASYNC115 - the benchmark is of sleep(0), as users write it


async def sleep1ms(_: object) -> None:
    await anyio.sleep(0.001)


HANDLERS: dict[str, Callable[[object], Awaitable[None]]] = {
    "sleep0": sleep0,
    "sleep-1ms": sleep1ms,
}
HANDLER_TITLES = {"sleep0": "`anyio.sleep(0)` handler", "sleep-1ms": "1 ms `anyio.sleep` handler"}


async def consume_with_corral(
    client: Any, stream: str, consumer: str, handler: Callable[[object], Awaitable[None]]
) -> Callable[[], Awaitable[int]]:
    """Enter the source now (it joins the group); return the run, which leaves it."""
    import corral
    from corral.redis import StreamSource

    source = StreamSource(
        client, stream, GROUP, consumer, stop_when_drained=True, block=BLOCK, min_idle=30
    )
    await source.__aenter__()

    async def run() -> int:
        try:
            async with corral.apply_to_each(
                handler, source, workers=WORKERS, on_outcome=source.settle
            ) as outcomes:
                async for _ in outcomes:
                    pass
        finally:
            await source.__aexit__(None, None, None)
        stats = source.stats
        if stats.failed or stats.claimed or stats.dead_lettered:
            raise AssertionError(f"{consumer}: {stats}")
        return stats.acked

    return run


async def consume_by_hand(
    client: Any, stream: str, consumer: str, handler: Callable[[object], Awaitable[None]]
) -> int:
    """What one writes by hand: read a batch, handle it concurrently, ack it;
    stop at the first read that finds nothing (one consumer: it is drained)."""
    handled = 0
    while True:
        reply = await client.xreadgroup(
            GROUP, consumer, {stream: ">"}, count=BATCH, block=round(BLOCK * 1000)
        )
        if not reply:
            return handled
        ids = []
        async with anyio.create_task_group() as tg:
            for entries in reply.values():
                for entry in entries:
                    tg.start_soon(handler, entry)
                    ids.append(entry.identifier)
        handled += await client.xack(stream, GROUP, ids)


def worker(port: int, stream: str, consumer: str, kind: str, handler: str, backend: str) -> int:
    """One consumer process: connect, say "ready", wait for "go", consume until
    the group is drained, say "done <entries acknowledged>"."""
    fn = HANDLERS[handler]
    label = {label: (name, options) for label, name, options in backends()}
    name, options = label[backend]

    async def main() -> None:
        async with coredis.Redis(port=port, decode_responses=True) as client:
            await client.ping()
            if kind == "corral":
                run = await consume_with_corral(client, stream, consumer, fn)
            else:
                run = lambda: consume_by_hand(client, stream, consumer, fn)  # noqa: E731
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.readline)
            acked = await run()
            print(f"done {acked}", flush=True)

    anyio.run(main, backend=name, backend_options=options)
    return 0


async def fill(port: int, stream: str, entries: int) -> None:
    """A fresh stream of ``entries`` entries and its group, in pipelined XADDs."""
    async with coredis.Redis(port=port, decode_responses=True) as client:
        for start in range(0, entries, 1000):
            async with client.pipeline(transaction=False) as pipe:
                for index in range(start, min(start + 1000, entries)):
                    pipe.xadd(stream, {"n": str(index), "payload": "x" * 32})
        await client.xgroup_create(stream, GROUP, "0")


async def check_and_drop(port: int, stream: str, entries: int) -> str | None:
    """What is wrong with the group after a run (None: every entry read and
    acknowledged); then delete the stream."""
    async with coredis.Redis(port=port, decode_responses=True) as client:
        groups = await client.xinfo_groups(stream)
        await client.delete([stream, f"{stream}:dead"])
    info = next((g for g in groups if g["name"] == GROUP), None)
    if info is None:
        return "the group is gone"
    if info.get("pending") != 0 or info.get("entries-read") != entries or info.get("lag") != 0:
        return (
            f"pending={info.get('pending')} entries-read={info.get('entries-read')} "
            f"lag={info.get('lag')}, expected 0, {entries}, 0"
        )
    return None


def consume_run(
    port: int, entries: int, processes: int, kind: str, handler: str, backend: str
) -> float:
    """Seconds for ``processes`` consumer processes to drain a fresh stream."""
    stream = f"bench:stream:{uuid.uuid4().hex}"
    anyio.run(fill, port, stream, entries)
    command = [sys.executable, __file__, "--worker", kind, "--port", str(port),
               "--stream", stream, "--handler", handler, "--backend", backend]  # fmt: skip
    children = [
        subprocess.Popen(
            [*command, "--consumer", f"c{index}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for index in range(processes)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a {kind} consumer did not start: {line!r}")
        start = time.perf_counter()
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        lines = []
        for child in children:
            assert child.stdout is not None
            lines.append(child.stdout.readline())
        elapsed = time.perf_counter() - start
        for child in children:
            if child.wait(timeout=60) != 0:
                raise RuntimeError(f"a {kind} consumer failed with exit code {child.returncode}")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    acked = sum(int(line.split()[1]) for line in lines if line.startswith("done "))
    problem = anyio.run(check_and_drop, port, stream, entries)
    if problem or acked != entries:
        raise SystemExit(
            f"FAILED: {processes} {kind} consumer(s), {handler}: acknowledged {acked} of "
            f"{entries} entries; group: {problem or 'fine'}"
        )
    return elapsed


HAND = f"hand-written `XREADGROUP COUNT {BATCH}` + task group + `XACK`, 1 process"


def corral_row(processes: int) -> str:
    plural = "process" if processes == 1 else "processes"
    return f"corral `StreamSource` + `apply_to_each`, {processes} {plural}"


def stream_table(
    port: int, entries: int, repeat: int, handlers: list[str], backend: str
) -> dict[str, dict[str, list[float]]]:
    """Measure, print, and return µs per entry by handler, then row."""
    contenders = {HAND: ("hand", 1), **{corral_row(k): ("corral", k) for k in PROCESSES}}
    results: dict[str, dict[str, list[float]]] = {}
    for handler in handlers:
        timings: dict[str, list[float]] = {row: [] for row in contenders}
        for _ in range(repeat):
            for row, (kind, processes) in contenders.items():
                elapsed = consume_run(port, entries, processes, kind, handler, backend)
                timings[row].append(elapsed / entries * 1e6)
        results[handler] = timings
    print(
        f"\n#### Stream consumers, one group, {entries} entries, {WORKERS} workers per "
        f"process, {backend}: entries/s, median (min-max) of {repeat} interleaved runs; "
        f"**ratio** of the time per entry to the hand-written consumer's (below 1: faster). "
        f"This machine has {os.cpu_count()} logical cores, shared by redis-server, the "
        "consumer processes and this script\n"
    )
    print("| consumer | " + " | ".join(HANDLER_TITLES[h] for h in handlers) + " |")
    print("| --- | " + " | ".join("---:" for _ in handlers) + " |")
    for row in contenders:
        cells = []
        for handler in handlers:
            rates = [1e6 / us for us in results[handler][row]]
            cell = f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"
            if row != HAND:
                cell += f" **{ratio(results[handler][row], results[handler][HAND])}**"
            cells.append(cell)
        print(f"| {row} | " + " | ".join(cells) + " |")
    sys.stdout.flush()
    return results


def server_version() -> str:
    try:
        found = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "(version unknown)"
    return next((word[2:] for word in found if word.startswith("v=")), "(version unknown)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acquires", type=int, default=2000, help="limiter calls per run")
    parser.add_argument("--entries", type=int, default=20_000, help="stream entries per run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--handler", nargs="+", choices=sorted(HANDLERS), default=["sleep0", "sleep-1ms"]
    )
    parser.add_argument(
        "--stream-backend",
        choices=[label for label, _, _ in backends()],
        default="asyncio",
        help="the backend the consumer processes run on",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="500 limiter calls, 4000 entries, 3 repeats, sleep0 handler only",
    )
    # the consumer processes that this script starts run it with these
    for option in ("--worker", "--port", "--stream", "--consumer", "--backend"):
        parser.add_argument(option, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if coredis is None:
        print("coredis is not installed (the `bench` group installs it): nothing measured")
        return 0
    if args.worker:
        return worker(
            int(args.port), args.stream, args.consumer, args.worker, args.handler[0], args.backend
        )
    if args.quick:
        args.acquires, args.entries, args.repeat = 500, 4000, 3
        args.handler = ["sleep0"]

    try:
        server = redis_server()
        port = server.__enter__()
    except RedisMissing as missing:
        print(f"{missing}: the Redis benchmarks were not run")
        return 0
    try:
        print(f"\nredis-server {server_version()} on 127.0.0.1:{port}, no persistence")
        limits = limiter_table(port, args.acquires, args.repeat)
        streams = stream_table(port, args.entries, args.repeat, args.handler, args.stream_backend)
    finally:
        server.__exit__(None, None, None)

    print()
    for tasks in ("1 task", f"{TASKS} tasks"):
        exact, ping, script = f"{EXACT}, {tasks}", f"{PING}, {tasks}", f"{SCRIPT}, {tasks}"
        key_ratio(f"`acquire()` / `PING`, {tasks}", limits, exact, ping, target=1.5)
        key_ratio(f"`acquire()` / its Lua script called directly, {tasks}", limits, exact, script)
    for handler in args.handler:
        key_ratio(
            f"StreamSource, 1 process / hand-written consumer, `{handler}`",
            {args.stream_backend: streams[handler]},
            corral_row(1),
            HAND,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
