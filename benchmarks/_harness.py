"""What the benchmark scripts share: the backends, interleaved timing, the tables.

Run on its own, it prints a description of the machine and of the installed
contenders, for the head of a results file:

    python benchmarks/_harness.py
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio

#: A contender: one run over the whole input, returning how many items it handled.
Contender = Callable[[], Awaitable[int]]

#: What a table lists for one backend: label -> contender, or the reason it
#: cannot run there (e.g. "asyncio only").
Lineup = Mapping[str, "Contender | str"]

PEERS = [
    "anyio",
    "trio",
    "uvloop",
    "aiometer",
    "aqute",
    "beque",
    "flushq",
    "async-batcher",
    "aiolimiter",
    "ace-concurrency",
    "adaptive-concurrency",
    "aioadaptive",
    "persist-queue",
    "purgatory",
    "aiobreaker",
    "tenacity",
    "stamina",
]


def installed(module: str) -> bool:
    """Whether ``module`` (a peer) can be imported here."""
    try:
        __import__(module)
    except ImportError:
        return False
    return True


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
    contenders: Mapping[str, Contender],
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


def compare(
    title: str,
    lineup: Callable[[str], Lineup],
    count: int,
    repeat: int,
    baseline: str,
    pairs: Mapping[str, str] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Measure ``lineup(backend_label)`` on every backend and print a Markdown
    table: one row per contender, one column per backend, each cell the median
    µs per item (min-max) and the ratio to the row's baseline.

    ``baseline`` names the row the others are compared with; ``pairs`` maps
    rows to another baseline row of their own. Returns the timings by backend.
    """
    results: dict[str, dict[str, list[float]]] = {}
    reasons: dict[str, dict[str, str]] = {}
    labels: list[str] = []
    for label, backend, options in backends():
        entries = lineup(label)
        for name in entries:
            if name not in labels:
                labels.append(name)
        runnable = {name: run for name, run in entries.items() if not isinstance(run, str)}
        reasons[label] = {name: why for name, why in entries.items() if isinstance(why, str)}
        results[label] = measure(backend, options, runnable, count, repeat)

    def base_of(name: str) -> str:
        return (pairs or {}).get(name, baseline)

    columns = list(results)
    print(f"\n{title}\n")
    print("| contender | " + " | ".join(columns) + " |")
    print("| --- | " + " | ".join("---:" for _ in columns) + " |")
    for name in labels:
        cells = []
        for column in columns:
            timings = results[column]
            if name not in timings:
                cells.append(reasons[column].get(name, "n/a"))
                continue
            cell = fmt(timings[name])
            base = base_of(name)
            if base != name and base in timings:
                cell += f" **{ratio(timings[name], timings[base])}**"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")
    sys.stdout.flush()
    return results


def key_ratio(
    label: str,
    results: Mapping[str, Mapping[str, list[float]]],
    row: str,
    base: str,
    target: float = 1.10,
) -> None:
    """Print one key ratio on every backend, marking where it is above ``target``
    (the regression guard that ``--quick`` runs end with)."""
    cells = []
    over = []
    for backend, timings in results.items():
        if row in timings and base in timings:
            value = statistics.median(
                o / b for o, b in zip(timings[row], timings[base], strict=True)
            )
            cells.append(f"{backend} {value:.2f}x")
            if value > target:
                over.append(backend)
    verdict = f"above {target:.2f}x on {', '.join(over)}" if over else f"<= {target:.2f}x"
    print(f"- key ratio, {label}: {'  '.join(cells)}  ({verdict})")
    sys.stdout.flush()


def describe() -> str:
    """The machine, the interpreter and the versions of every contender."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for name in ["corral", *PEERS]:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return "\n".join(
        [
            f"- CPU: {cpu}, {os.cpu_count()} logical cores, {platform.system()} "
            f"{platform.release()}",
            f"- Python {platform.python_version()} ({platform.python_implementation()})",
            f"- corral commit {commit}",
            "- " + ", ".join(versions),
        ]
    )


if __name__ == "__main__":
    print(describe())
