"""The polite crawler of crawler.py, compact, in a trio program.

corral is built on anyio, so it runs unchanged inside code written for trio:
here `trio.run` starts the program, the fake servers wait with `trio.sleep`,
a progress reporter runs in a `trio.open_nursery` next to the pool, and
`trio.fail_after` bounds the whole crawl. The pool's handler submits the
links it finds (deduplicated) to its own pool, a middleware keeps one
`corral.SlidingWindow` per host (at most `PER_HOST` requests per second),
and `Retry` rides out 503s, honouring their `Retry-After`.

Run it with `python examples/crawler_trio.py` (trio only).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

try:
    import trio
except ImportError:
    sys.exit(
        "this example needs trio: pip install 'corral[trio]' "
        "(in a checkout of corral: pip install -e '.[trio]')"
    )

import corral

T = TypeVar("T")

PER_HOST = 4  # requests per host per second
START = "https://docs.example/"
PAGES: dict[str, list[str]] = {
    "https://docs.example/": ["/install", "/tutorial", "https://blog.example/"],
    "https://docs.example/install": ["/", "/tutorial"],
    "https://docs.example/tutorial": ["/tutorial/1", "/tutorial/2", "/tutorial/3"],
    "https://docs.example/tutorial/1": ["/tutorial/2"],
    "https://docs.example/tutorial/2": ["/tutorial/3", "https://code.example/"],
    "https://docs.example/tutorial/3": ["/tutorial", "/tutorial/4"],  # /tutorial/4: 404
    "https://blog.example/": ["/2024", "/2025", "https://docs.example/"],
    "https://blog.example/2024": ["/2024/trio"],
    "https://blog.example/2024/trio": ["https://docs.example/tutorial"],
    "https://blog.example/2025": ["/"],
    "https://code.example/": ["/issues", "/releases"],
    "https://code.example/issues": ["/issues/1"],
    "https://code.example/issues/1": ["/"],
    "https://code.example/releases": [],
}
BUSY = {"https://code.example/issues": 2}  # answers 503 this many times first


class HTTPError(Exception):
    def __init__(self, status: int, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after  # Retry waits at least this long


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


class FakeWeb:
    def __init__(self) -> None:
        self.requests: dict[str, list[float]] = defaultdict(list)  # host -> request times
        self._busy = dict(BUSY)

    async def get(self, url: str) -> list[str]:
        self.requests[host_of(url)].append(trio.current_time())
        await trio.sleep(0.02)
        if self._busy.get(url, 0) > 0:
            self._busy[url] -= 1
            raise HTTPError(503, retry_after=0.1)
        if url not in PAGES:
            raise HTTPError(404)
        return [urljoin(url, link) for link in PAGES[url]]


class Politeness:
    """Middleware: one `corral.SlidingWindow(limit, per)` per host, for every attempt."""

    def __init__(self, limit: int, per: float = 1.0) -> None:
        self.windows: defaultdict[str, corral.SlidingWindow] = defaultdict(
            lambda: corral.SlidingWindow(limit, per)
        )

    async def __call__(self, url: str, call_next: Callable[[str], Awaitable[T]]) -> T:
        await self.windows[host_of(url)].acquire()
        return await call_next(url)


async def report_progress(pool: corral.Pool[str, int]) -> None:
    started = trio.current_time()
    while True:
        await trio.sleep(0.5)
        stats = pool.stats
        print(
            f"  [{trio.current_time() - started:.1f} s] {stats.succeeded} fetched, "
            f"{stats.failed} failed, {stats.queued} queued, {stats.running} running"
        )


def busiest_window(times: list[float], per: float = 1.0) -> int:
    """The most of the sorted `times` in any window [t, t + per)."""
    return max((sum(t <= u < t + per for u in times) for t in times), default=0)


async def main() -> None:
    web = FakeWeb()
    seen = {START}

    async def fetch(url: str) -> int:
        links = await web.get(url)
        for link in links:
            if link not in seen:
                seen.add(link)
                await pool.submit(link)  # follow-up work for the same pool
        return len(links)

    def retryable(error: Exception) -> bool:
        return isinstance(error, HTTPError) and error.status == 503

    pool = corral.Pool(
        fetch,
        workers=6,
        middleware=[
            corral.Retry(attempts=4, on=retryable, wait_initial=0.01),
            Politeness(PER_HOST),
        ],
    )
    with trio.fail_after(10):  # the whole crawl, or TooSlowError
        async with trio.open_nursery() as nursery:
            nursery.start_soon(report_progress, pool)
            async with pool:
                await pool.submit(START)
            nursery.cancel_scope.cancel()  # the crawl is over: stop the reporter

    stats = pool.stats
    print(f"{stats.succeeded} pages fetched, {stats.failed} failed, {stats.retried} retries")
    worst = max(busiest_window(sorted(times)) for times in web.requests.values())
    for host, times in sorted(web.requests.items()):
        print(f"  {host}: {len(times)} requests, at most {busiest_window(sorted(times))} in 1 s")
    assert stats.succeeded == len(PAGES)
    assert stats.failed == 1  # the dead link to /tutorial/4
    assert stats.retried == sum(BUSY.values())
    assert worst <= PER_HOST, f"politeness broken: {worst} requests to one host in 1 s"
    print(f"politeness held: at most {worst} requests per host in any 1 s window")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.partition("\n")[0],
        epilog="It takes no arguments: it is a trio program (crawler.py takes a backend).",
    )
    _, extra = parser.parse_known_args()
    if extra:
        parser.error(
            f"unexpected arguments {' '.join(extra)!r}: this example runs on trio only "
            "and takes none (examples/crawler.py takes asyncio, uvloop or trio)"
        )
    trio.run(main)
