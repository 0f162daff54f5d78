"""Dynamic batching for model inference with `Batcher.submit`.

A fake model takes about the same time for one input as for 32 (a fixed cost
per call plus a small cost per input) and runs one call at a time, like a
model on one accelerator. Many concurrent requests each `await
batcher.submit(x)` and get their own result back. With `max_wait=None`
(natural batching) a batch goes to the model as soon as the model is free,
holding whatever arrived meanwhile: batches grow under load and no request
waits for a timer.

The same traffic is then served one model call per request, for comparison.
Every request's result is checked in both runs.

Run it with `python examples/inference.py [asyncio|uvloop|trio]` (both by default).
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable, Sequence

import anyio
from _backends import run_each

import corral

REQUESTS = 256
MAX_BATCH = 32
FIXED_COST = 0.005  # seconds per model call ...
PER_ITEM_COST = 0.0002  # ... plus this much per input in the batch


def expected(x: int) -> int:
    return x * x + 1


class FakeModel:
    """Scores a batch of inputs, one call at a time."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self._device = anyio.Lock()  # one accelerator: calls queue up for it

    async def __call__(self, inputs: Sequence[int]) -> list[int]:
        async with self._device:
            self.batch_sizes.append(len(inputs))
            await anyio.sleep(FIXED_COST + PER_ITEM_COST * len(inputs))
            return [expected(x) for x in inputs]


async def serve(infer: Callable[[int], Awaitable[int]]) -> tuple[dict[int, int], list[float]]:
    """Send `REQUESTS` requests in bursts of 16, each one awaiting its own result.

    Returns each request's result and each request's latency.
    """
    results: dict[int, int] = {}
    latencies: list[float] = []

    async def request(x: int) -> None:
        sent = anyio.current_time()
        results[x] = await infer(x)
        latencies.append(anyio.current_time() - sent)

    async with anyio.create_task_group() as tg:
        for x in range(REQUESTS):
            tg.start_soon(request, x)
            if x % 16 == 15:
                await anyio.sleep(0.004)  # the next burst of traffic
    return results, latencies


def report(label: str, elapsed: float, latencies: list[float]) -> None:
    print(
        f"{label:<11} {elapsed:5.2f} s for {len(latencies)} requests, latency mean "
        f"{statistics.mean(latencies) * 1000:4.0f} ms, max {max(latencies) * 1000:4.0f} ms"
    )


async def main() -> None:
    # batched: every request submits to one Batcher in front of the model
    model = FakeModel()
    started = anyio.current_time()
    async with corral.Batcher(model, max_size=MAX_BATCH, max_wait=None) as batcher:
        results, latencies = await serve(batcher.submit)
    batched = anyio.current_time() - started
    stats = batcher.stats
    print(
        f"{REQUESTS} requests -> {stats.flushes} model calls, mean batch "
        f"{stats.flushed / stats.flushes:.1f}, largest {max(model.batch_sizes)}"
    )
    report("batched:", batched, latencies)
    assert results == {x: expected(x) for x in range(REQUESTS)}, "a request got a wrong result"
    assert max(model.batch_sizes) <= MAX_BATCH
    assert stats.flushes == len(model.batch_sizes) < REQUESTS / 4

    # one by one: the same traffic, one model call per request
    alone = FakeModel()

    async def infer_alone(x: int) -> int:
        (result,) = await alone([x])
        return result

    started = anyio.current_time()
    results_alone, latencies_alone = await serve(infer_alone)
    one_by_one = anyio.current_time() - started
    report("one by one:", one_by_one, latencies_alone)
    assert results_alone == {x: expected(x) for x in range(REQUESTS)}
    assert len(alone.batch_sizes) == REQUESTS

    speedup = one_by_one / batched
    print(f"speed-up {speedup:.1f}x; every request got its own, correct result")
    assert speedup > 2, f"batching should pay off here, got {speedup:.1f}x"


if __name__ == "__main__":
    run_each(__doc__.partition("\n")[0], main)
