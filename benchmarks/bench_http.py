"""A real rate-limited HTTP API, called by corral and by the libraries it replaces.

``quota_server.py`` runs in its own process on loopback and enforces a quota
of ``--limit`` requests in any sliding second, answering 429 with
``Retry-After: 1`` beyond it. Each contender fetches ``--items`` items through
one ``httpx.AsyncClient`` (aiohttp-free, so the same client on every backend)
with ``--workers`` concurrent workers, retries (429s and connection errors,
up to 20 attempts, Retry-After honoured) and a 10 s per-request timeout, and
stores them in SQLite in batches of up to 200 rows. Every run must store
every item exactly once, or the script stops.

Reported per run: the 429s the server sent, the most requests it saw in any
one second (429s included), accepted requests per second from the first to
the last (as a share of the quota), wall time and the client's CPU time.

Contenders: corral with the quota written as ``SlidingWindow(N, per=1.0)``,
as ``TokenBucket(N)``, as the defaults of earlier versions were
(``SlidingWindow(N, burst=N)``: the whole window at once;
``TokenBucket(N, burst=1)``), and ``AdaptiveRate(2 * N)`` (started at twice
the real limit), on asyncio, asyncio + uvloop and trio; aiometer
(``max_per_second=N``) + tenacity and asyncio + aiolimiter
(``AsyncLimiter(N, 1)``) + tenacity, on asyncio.

Needs the ``bench`` dependency group (httpx, uvicorn, aiometer, aiolimiter,
tenacity); a contender whose library is missing is skipped.

    python benchmarks/bench_http.py [--items 5000] [--workers 50] [--limit 300]
        [--repeat 1] [--only corral aiometer ...] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import backends, installed

import corral

ATTEMPTS = 20
TIMEOUT = 10.0
BATCH = 200

Job = Callable[[str, int, int, int, str], Awaitable[None]]


def retryable(error: BaseException) -> bool:
    """What every contender retries: a 429, a 5xx, a dropped connection."""
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code == 429 or error.response.status_code >= 500
    return isinstance(error, httpx.TransportError)


def client_for(url: str, workers: int) -> httpx.AsyncClient:
    """One client for the run, keeping a connection alive for every worker
    (httpx keeps 20 by default: more workers would open and close one per
    request, which costs more CPU than the rest of the job)."""
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    return httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits)


def store(db: str, rows: list[dict[str, int]]) -> None:
    with sqlite3.connect(db) as connection:
        connection.executemany(
            "INSERT INTO items (id, square) VALUES (?, ?)", [(r["id"], r["square"]) for r in rows]
        )


def retry_after_or_backoff(state: Any) -> float:
    """tenacity's wait: the server's Retry-After if it sent one, else
    exponential backoff with full jitter (what corral's Retry does)."""
    import random

    error = state.outcome.exception()
    if isinstance(error, httpx.HTTPStatusError):
        hint = error.response.headers.get("retry-after")
        if hint is not None:
            return float(hint)
    return random.uniform(0, min(2.0, 0.1 * 2 ** (state.attempt_number - 1)))


def tenacity_retry() -> Any:
    """The peers' retry policy, the same as corral's in this job."""
    import tenacity

    return tenacity.retry(
        stop=tenacity.stop_after_attempt(ATTEMPTS),
        retry=tenacity.retry_if_exception(retryable),
        wait=retry_after_or_backoff,
        reraise=True,
    )


# --- corral ------------------------------------------------------------------


def corral_job(make_limiter: Callable[[int], Any]) -> Job:
    async def job(url: str, items: int, workers: int, limit: int, db: str) -> None:
        async def flush(rows: list[dict[str, int]]) -> None:
            await anyio.to_thread.run_sync(store, db, rows)

        async with (
            client_for(url, workers) as client,
            corral.Batcher(flush, max_size=BATCH, max_wait=0.5) as batcher,
        ):

            async def fetch(n: int) -> None:
                response = await client.get(f"/items/{n}")
                response.raise_for_status()
                await batcher.add(response.json())

            outcomes = await corral.apply_to_all(
                fetch,
                range(items),
                workers=workers,
                retry=corral.Retry(attempts=ATTEMPTS, on=retryable, wait_max=2.0),
                rate_limit=make_limiter(limit),
                timeout=TIMEOUT,
            )
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} items failed, e.g. {failed[0].error!r}")

    return job


# --- peers (asyncio only) ----------------------------------------------------


async def aiometer_job(url: str, items: int, workers: int, limit: int, db: str) -> None:
    import asyncio

    import aiometer

    rows: list[dict[str, int]] = []
    lock = asyncio.Lock()

    async with client_for(url, workers) as client:

        @tenacity_retry()
        async def fetch(n: int) -> None:
            response = await asyncio.wait_for(client.get(f"/items/{n}"), TIMEOUT)
            response.raise_for_status()
            async with lock:
                rows.append(response.json())
                if len(rows) >= BATCH:
                    batch = rows[:]
                    rows.clear()
                    await asyncio.to_thread(store, db, batch)

        await aiometer.run_on_each(fetch, range(items), max_at_once=workers, max_per_second=limit)
        if rows:
            await asyncio.to_thread(store, db, rows)


async def aiolimiter_job(url: str, items: int, workers: int, limit: int, db: str) -> None:
    import asyncio

    from aiolimiter import AsyncLimiter

    rate = AsyncLimiter(limit, 1)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(items):
        queue.put_nowait(n)
    rows: list[dict[str, int]] = []

    async with client_for(url, workers) as client:

        @tenacity_retry()
        async def fetch(n: int) -> dict[str, int]:
            async with rate:
                response = await asyncio.wait_for(client.get(f"/items/{n}"), TIMEOUT)
            response.raise_for_status()
            return response.json()  # type: ignore[no-any-return]

        async def worker() -> None:
            while True:
                try:
                    n = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                rows.append(await fetch(n))
                if len(rows) >= BATCH:
                    batch = rows[:]
                    rows.clear()
                    await asyncio.to_thread(store, db, batch)

        await asyncio.gather(*(worker() for _ in range(workers)))
        if rows:
            await asyncio.to_thread(store, db, rows)


# --- the runs ----------------------------------------------------------------


def start_server(limit: int) -> tuple[subprocess.Popen[str], str]:
    here = Path(__file__).resolve().parent
    server = subprocess.Popen(
        [sys.executable, str(here / "quota_server.py"), "--limit", str(limit)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    if not line.startswith("listening on "):
        server.kill()
        raise RuntimeError(f"the quota server did not start: {line!r}")
    return server, line.split()[-1]


def run_one(
    job: Job, backend: str, options: dict[str, Any], url: str, args: argparse.Namespace
) -> dict[str, float]:
    httpx.post(f"{url}/reset")
    with tempfile.TemporaryDirectory() as folder:
        db = os.path.join(folder, "items.db")
        with sqlite3.connect(db) as connection:
            connection.execute("CREATE TABLE items (id INTEGER, square INTEGER)")
        cpu, wall = time.process_time(), time.perf_counter()
        anyio.run(
            job,
            url,
            args.items,
            args.workers,
            args.limit,
            db,
            backend=backend,
            backend_options=options,
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        with sqlite3.connect(db) as connection:
            rows, distinct = connection.execute(
                "SELECT COUNT(*), COUNT(DISTINCT id) FROM items"
            ).fetchone()
    if rows != args.items or distinct != args.items:
        raise SystemExit(f"stored {rows} rows, {distinct} distinct, of {args.items} items")
    stats = httpx.get(f"{url}/stats").json()
    time.sleep(1.1)  # let the server's window empty before the next run
    return {
        "429s": stats["rejected"],
        "busiest": stats["busiest"],
        "rate": stats["accepted_per_second"] / args.limit,
        "wall": wall,
        "cpu": cpu,
    }


def lineup() -> list[tuple[str, str, str, dict[str, Any], Job]]:
    """(label, backend label, anyio backend, options, job) for every run."""
    limiters: dict[str, Callable[[int], Any]] = {
        "SlidingWindow(N)": lambda n: corral.SlidingWindow(n, per=1.0),
        "TokenBucket(N)": lambda n: corral.TokenBucket(n),
        # the defaults of earlier versions, for comparison
        "SlidingWindow(N, burst=N)": lambda n: corral.SlidingWindow(n, per=1.0, burst=n),
        "TokenBucket(N, burst=1)": lambda n: corral.TokenBucket(n, burst=1),
        "AdaptiveRate(2N)": lambda n: corral.AdaptiveRate(2 * n),
    }
    runs = []
    for name, make in limiters.items():
        for label, backend, options in backends():
            runs.append((f"corral {name}", label, backend, options, corral_job(make)))
    if installed("aiometer") and installed("tenacity"):
        runs.append(("aiometer + tenacity", "asyncio", "asyncio", {}, aiometer_job))
    if installed("aiolimiter") and installed("tenacity"):
        runs.append(("aiolimiter + tenacity", "asyncio", "asyncio", {}, aiolimiter_job))
    return runs


def spread(results: list[dict[str, float]], key: str, fmt: str) -> str:
    """The lowest and highest of ``key`` over the runs ("3" or "1 to 4")."""
    values = sorted(r[key] for r in results)
    low, high = format(values[0], fmt), format(values[-1], fmt)
    return low if low == high else f"{low} to {high}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None, help="labels containing these")
    parser.add_argument("--quick", action="store_true", help="2,000 items")
    args = parser.parse_args()
    if args.quick:
        args.items = 2000
    server, url = start_server(args.limit)
    try:
        print(f"{args.items} items, {args.workers} workers, quota {args.limit} per second\n")
        print("| client | backend | 429s | most in 1 s | admitted / s | wall s | CPU s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, backend_label, backend, options, job in lineup():
            if args.only and not any(word in label for word in args.only):
                continue
            results = [run_one(job, backend, options, url, args) for _ in range(args.repeat)]

            cells = [
                spread(results, key, fmt)
                for key, fmt in [
                    ("429s", ".0f"),
                    ("busiest", ".0f"),
                    ("rate", ".1%"),
                    ("wall", ".1f"),
                    ("cpu", ".1f"),
                ]
            ]
            print(f"| {label} | {backend_label} | {' | '.join(cells)} |", flush=True)
    finally:
        server.terminate()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


if __name__ == "__main__":
    main()
