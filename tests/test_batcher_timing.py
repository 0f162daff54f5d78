"""Batcher timing: the age timer, failure backoff, last_flush_time.

Exact on trio's MockClock; on asyncio and uvloop in real time with tolerances.
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import anyio
import pytest

from corral import Batcher, Retry

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend(timing_anyio_backend: Any) -> Any:
    return timing_anyio_backend


def tolerance(exact: bool) -> float:
    """How late a real-time flush may run: loop latency, and uvloop's 1 ms clock."""
    return 0.0 if exact else 0.05


def flat(batches: list[list[Any]]) -> list[Any]:
    return [item for batch in batches for item in batch]


def late_by(value: float, expected: float, exact: bool) -> bool:
    """``value`` is ``expected`` (floating-point sums aside), or later by at most
    the tolerance."""
    return expected - 1e-9 <= value <= expected + tolerance(exact) + 1e-9


class TimedSink:
    def __init__(self, fail: int = 0, error: Exception | None = None) -> None:
        self.fail = fail
        self.error = error
        self.calls: list[tuple[float, list[Any]]] = []

    async def __call__(self, batch: list[Any]) -> None:
        self.calls.append((anyio.current_time(), list(batch)))
        if self.fail:
            self.fail -= 1
            raise self.error or ConnectionError("sink down")


async def test_regression_max_wait_counts_from_the_oldest_item_not_the_last(
    exact: bool,
) -> None:
    """Items keep arriving every 0.15 s; each batch still goes out max_wait after
    its oldest item was added (a timer restarted per item would never fire)."""
    sink = TimedSink()
    added: dict[int, float] = {}
    async with Batcher(sink, max_size=100, max_wait=0.5) as batcher:
        for i in range(6):
            added[i] = anyio.current_time()
            await batcher.add(i)
            await anyio.sleep(0.15)
        await anyio.sleep(0.5)
    assert flat([batch for _, batch in sink.calls]) == list(range(6))
    assert len(sink.calls) == 2
    for when, batch in sink.calls:
        assert late_by(when - added[batch[0]], 0.5, exact)
    if exact:
        assert [batch for _, batch in sink.calls] == [[0, 1, 2, 3], [4, 5]]
    assert len(sink.calls[0][1]) > 1


async def test_an_item_added_to_an_idle_batcher_waits_exactly_max_wait(exact: bool) -> None:
    sink = TimedSink()
    async with Batcher(sink, max_size=10, max_wait=0.25) as batcher:
        await anyio.sleep(0.3)  # idle first: no stale timer
        added = anyio.current_time()
        await batcher.add("x")
        await anyio.sleep(0.5)
        assert len(sink.calls) == 1
        assert late_by(sink.calls[0][0] - added, 0.25, exact)
        assert batcher.stats.last_flush_time == pytest.approx(sink.calls[0][0], abs=0.002)


async def test_failed_flushes_back_off_growing_and_reset_on_success(exact: bool) -> None:
    sink = TimedSink(fail=3)
    policy = Retry(attempts=1, wait_initial=0.1, wait_max=60, wait_jitter=False)
    async with Batcher(sink, max_size=10, max_wait=None, retry=policy) as batcher:
        await batcher.add("a")
        await anyio.sleep(1.0)
        assert len(sink.calls) == 4
        sink.fail = 1
        await batcher.add("b")
        await anyio.sleep(0.5)
    times = [when for when, _ in sink.calls]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times[:4])]
    assert [batch for _, batch in sink.calls] == [["a"]] * 4 + [["b"]] * 2
    for gap, expected in zip(gaps, [0.1, 0.2, 0.4], strict=True):
        assert late_by(gap, expected, exact)
    # success reset the count: the next failure waits 0.1 s again
    assert late_by(times[5] - times[4], 0.1, exact)
    assert batcher.stats.flush_failures == 4


async def test_failure_backoff_honours_retry_after(exact: bool) -> None:
    class TooMany(Exception):
        retry_after = 0.3

    sink = TimedSink(fail=1, error=TooMany())
    async with Batcher(sink, max_size=10, max_wait=None) as batcher:
        await batcher.add("a")
        await anyio.sleep(0.5)
    (first, _), (second, _) = sink.calls
    assert late_by(second - first, 0.3, exact)


async def test_default_failure_backoff_is_never_a_hot_loop() -> None:
    """Without retry=, a sink that is down is tried a few times, not thousands:
    0.1 s doubling, each wait at least half its step."""
    sink = TimedSink(fail=10**9)
    with anyio.move_on_after(1.6):
        async with Batcher(sink, max_size=10, max_wait=None) as batcher:
            await batcher.add("a")
            await anyio.sleep_forever()
    times = [when for when, _ in sink.calls]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # steps 0.1, 0.2, 0.4, 0.8, 1.6: each wait in the upper half of its step, so
    # by 1.6 s five or six calls (four if a real-time loop lags)
    assert 4 <= len(times) <= 6
    for number, gap in enumerate(gaps, start=1):
        assert gap >= 0.1 * 2 ** (number - 1) / 2 - 0.002
    assert batcher.unflushed == ["a"]


@pytest.mark.parametrize(
    "retry_after",
    ["0.3", b"0.3", timedelta(milliseconds=300)],
    ids=["str", "bytes", "timedelta"],
)
async def test_failure_backoff_reads_retry_after_like_retry(
    retry_after: object, exact: bool
) -> None:
    """The backoff after a failed flush honours a Retry-After header's seconds
    copied as text (str or bytes) or a timedelta, as Retry does."""

    class TooMany(Exception):
        pass

    error = TooMany()
    error.retry_after = retry_after  # type: ignore[attr-defined]
    sink = TimedSink(fail=1, error=error)
    async with Batcher(sink, max_size=10, max_wait=None) as batcher:
        await batcher.add("a")
        await anyio.wait_all_tasks_blocked()
        assert len(sink.calls) == 1  # failed; the retry waits for the backoff
    (first, _), (second, batch) = sink.calls
    assert batch == ["a"]
    assert late_by(second - first, 0.3, exact)


async def test_flush_timeout_says_which_limit_fired() -> None:
    """A flush cut off by timeout=0.05 gives its submit callers a TimeoutError
    naming the limit; a TimeoutError the flush raises itself reaches them as it is."""
    own = TimeoutError("the database's own timeout")

    async def flush(batch: list[str]) -> list[str]:
        if "mine" in batch:
            raise own
        await anyio.sleep(10)
        return batch

    async with Batcher(flush, max_size=1, max_wait=None, timeout=0.05) as batcher:
        with pytest.raises(TimeoutError, match=r"^attempt timed out after timeout=0\.05 s$"):
            await batcher.submit("slow")
        with pytest.raises(TimeoutError) as caught:
            await batcher.submit("mine")
        assert caught.value is own
