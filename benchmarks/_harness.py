"""What the benchmark scripts share: the backends, interleaved timing, formatting."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio


def backends() -> list[tuple[str, str, dict[str, Any]]]:
    """(label, anyio backend, backend options) for every backend installed."""
    found = [("asyncio", "asyncio", {})]
    try:
        import uvloop  # noqa: F401

        found.append(("uvloop", "asyncio", {"use_uvloop": True}))
    except ImportError:
        pass
    try:
        import trio  # noqa: F401

        found.append(("trio", "trio", {}))
    except ImportError:
        pass
    return found


def measure(
    backend: str,
    options: dict[str, Any],
    contenders: dict[str, Callable[[], Awaitable[int]]],
    count: int,
    repeat: int,
) -> dict[str, list[float]]:
    """µs per item of each contender, run interleaved (A B A B ...) ``repeat``
    times in one event loop; each run must report handling ``count`` items."""
    timings: dict[str, list[float]] = {label: [] for label in contenders}

    async def main() -> None:
        for _ in range(repeat):
            for label, run in contenders.items():
                start = time.perf_counter()
                handled = await run()
                elapsed = time.perf_counter() - start
                assert handled == count, (label, handled, count)
                timings[label].append(elapsed / count * 1e6)

    anyio.run(main, backend=backend, backend_options=options)
    return timings


def fmt(values: list[float]) -> str:
    """median (min-max)"""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def ratio(ours: list[float], base: list[float]) -> str:
    """The median of the per-run ratios (runs are paired: same moment, same noise)."""
    return f"{statistics.median(o / b for o, b in zip(ours, base, strict=True)):.2f}x"
