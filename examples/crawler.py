"""A polite web crawler: a `Pool` whose handler submits the links it finds.

The "web" is a dict in this file (four hosts whose pages link to each other,
with cycles, dead links, a page that always fails, one that fails once and one
that hangs once), served with a simulated latency, so nothing touches the
network. What it shows:

- a `Pool` handler that submits follow-up URLs to its own pool; the `async
  with` block ends when the work runs out (URLs are deduplicated before submit);
- politeness: at most `PER_HOST` requests to any one host in any second, by a
  middleware that keeps one `corral.SlidingWindow` per host;
- `Retry` for transient errors (5xx, timeouts) and a per-attempt `timeout`;
  every attempt is a request, so every attempt passes the host's window.

At the end it checks, from the times the fake servers logged each request,
that no host ever saw more than `PER_HOST` requests in any 1 s window, and
fails loudly if it did.

Run it with `python examples/crawler.py [asyncio|uvloop|trio]` (both by default).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import anyio
from _backends import run_each

import corral

T = TypeVar("T")

PER_HOST = 5  # requests per host ...
PER = 1.0  # ... per this many seconds
START = "https://a.example/"

# url -> the links on that page (relative links are resolved against the page)
PAGES: dict[str, list[str]] = {
    "https://a.example/": ["/about", "/blog", "https://b.example/"],
    "https://a.example/about": ["/"],
    "https://a.example/blog": ["/blog/1", "/blog/2", "/"],
    "https://a.example/blog/1": ["/blog/2", "https://c.example/docs"],
    "https://a.example/blog/2": ["/blog/1", "/missing"],  # a cycle and a dead link
    "https://b.example/": ["/products", "/contact", "https://a.example/"],
    "https://b.example/products": ["/products/1", "/products/2", "/products/3", "/products/4"],
    "https://b.example/products/1": ["/products"],
    "https://b.example/products/2": ["/products/1"],
    "https://b.example/products/3": [],
    "https://b.example/products/4": ["https://d.example/"],
    "https://b.example/contact": ["https://d.example/"],
    "https://c.example/docs": ["/docs/intro", "/docs/api", "/docs/faq"],
    "https://c.example/docs/intro": ["/docs"],
    "https://c.example/docs/api": ["/docs/api/pool", "https://a.example/blog"],
    "https://c.example/docs/api/pool": ["/docs/api"],
    "https://c.example/docs/faq": ["/docs"],
    "https://d.example/": ["/news", "/gone"],
    "https://d.example/news": ["/news/1", "/news/2"],
    "https://d.example/news/1": ["/news", "https://c.example/docs"],
    "https://d.example/news/2": ["/"],
}
BROKEN = {"https://b.example/products/3"}  # always answers 500
FLAKY = {"https://b.example/products/2": 1}  # answers 503 this many times first
SLOW_ONCE = {"https://c.example/docs/faq"}  # hangs on its first request


class HTTPError(Exception):
    def __init__(self, url: str, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.url = url
        self.status = status


def transient(error: Exception) -> bool:
    """Worth another try: a server error or a timed-out attempt (not a 404)."""
    if isinstance(error, HTTPError):
        return error.status >= 500
    return isinstance(error, TimeoutError)


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


class FakeWeb:
    """Serves `PAGES`, logging the time of every request each host receives."""

    def __init__(self, seed: int = 1) -> None:
        self.requests: dict[str, list[float]] = defaultdict(list)
        self._rng = random.Random(seed)
        self._failures_left = dict(FLAKY)
        self._slow = set(SLOW_ONCE)

    async def get(self, url: str) -> list[str]:
        """The links on `url`, after a network-like delay; raises `HTTPError`."""
        self.requests[host_of(url)].append(anyio.current_time())  # the server's log
        await anyio.sleep(self._rng.uniform(0.01, 0.04))
        if url in self._slow:
            self._slow.discard(url)
            await anyio.sleep(60)  # the per-attempt timeout cuts this off
        if url in BROKEN:
            raise HTTPError(url, 500)
        if self._failures_left.get(url, 0) > 0:
            self._failures_left[url] -= 1
            raise HTTPError(url, 503)
        if url not in PAGES:
            raise HTTPError(url, 404)
        return [urljoin(url, link) for link in PAGES[url]]


class Politeness:
    """Middleware: at most `limit` requests to one host in any `per` seconds.

    It keeps one `corral.SlidingWindow` per host, created on the host's first
    URL. It must be the last thing an attempt waits for before the request
    goes out: a wait after the host's admission (for a capacity slot, say)
    could bunch requests admitted a second apart into less than a second.
    That is why it sits after `Retry` in `middleware=[...]` (so that every
    attempt is admitted) and why the pool's `workers` are its only other cap:
    `limiter=` and `rate_limit=` act inside user middleware, and with
    `limiter=anyio.CapacityLimiter(1)` this example fails its own check.
    """

    def __init__(self, limit: int, per: float = 1.0) -> None:
        self.limit = limit
        self.per = per
        self.windows: dict[str, corral.SlidingWindow] = {}

    async def __call__(self, url: str, call_next: Callable[[str], Awaitable[T]]) -> T:
        host = host_of(url)
        window = self.windows.get(host)
        if window is None:
            window = self.windows[host] = corral.SlidingWindow(self.limit, self.per)
        await window.acquire()
        return await call_next(url)


class Crawler:
    def __init__(self, web: FakeWeb, *, workers: int = 8) -> None:
        self.web = web
        self.seen: set[str] = set()
        self.outcomes: list[corral.Outcome[str, int]] = []
        self.pool = corral.Pool(
            self.fetch,
            workers=workers,  # at most this many requests in flight, all hosts together
            middleware=[
                corral.Retry(attempts=3, on=transient, wait_initial=0.05, wait_max=0.2),
                Politeness(PER_HOST, PER),
            ],
            timeout=0.5,  # per attempt
            on_outcome=self.outcomes.append,
        )

    async def fetch(self, url: str) -> int:
        """Fetch one page and submit the links not seen yet; returns how many links."""
        links = await self.web.get(url)
        for link in links:
            if link not in self.seen:
                self.seen.add(link)
                await self.pool.submit(link)  # from a handler: never blocks
        return len(links)

    async def crawl(self, start: str) -> None:
        self.seen.add(start)
        async with self.pool:
            await self.pool.submit(start)
        # leaving the block waited until no page was queued or being fetched


def busiest_window(times: Sequence[float], per: float) -> int:
    """The most requests in any window [t, t + per) of the sorted `times`."""
    most, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= per:
            first += 1
        most = max(most, last - first + 1)
    return most


async def main() -> None:
    web = FakeWeb()
    crawler = Crawler(web)
    started = anyio.current_time()
    await crawler.crawl(START)
    elapsed = anyio.current_time() - started

    stats = crawler.pool.stats
    failed = [o for o in crawler.outcomes if not o.ok]
    print(
        f"crawled {len(crawler.outcomes)} URLs on {len(web.requests)} hosts in {elapsed:.2f} s: "
        f"{stats.succeeded} fetched, {stats.failed} failed, {stats.retried} retries"
    )
    for outcome in sorted(failed, key=lambda o: o.item):
        print(f"  failed {outcome.item} after {outcome.attempts} attempt(s): {outcome.error}")
    worst = 0
    for host, times in sorted(web.requests.items()):
        most = busiest_window(sorted(times), PER)
        worst = max(worst, most)
        print(f"  {host}: {len(times):2} requests, at most {most} in any {PER:g} s window")

    # every URL found was fetched exactly once (retries are attempts, not outcomes)
    assert sorted(o.item for o in crawler.outcomes) == sorted(crawler.seen)
    assert stats.unfinished == 0
    assert stats.succeeded == len(PAGES) - len(BROKEN)
    # a 404 is final at once; the 500 was tried `attempts` times
    assert {o.item: o.attempts for o in failed} == {
        "https://a.example/missing": 1,
        "https://b.example/products/3": 3,
        "https://d.example/gone": 1,
    }
    assert worst <= PER_HOST, f"politeness broken: {worst} requests to one host in {PER} s"
    print(f"politeness held: at most {worst} requests per host in any {PER:g} s window")


if __name__ == "__main__":
    run_each(__doc__.partition("\n")[0], main)
