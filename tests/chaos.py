"""Many more random-cancellation trials than the test suite runs: ``nox -s chaos``.

Runs the seeded scenarios of ``test_contract_accounting.py``,
``test_batcher_scheduling.py`` and ``test_queue.py`` (a pool, a pool with
retry/timeout/limiters, a pool with priorities, keys, resizes, pauses and job
cancellations, a pool with a circuit breaker, hedges and retries of results
under a budget, a batcher, a batcher with submit_nowait jobs, their
cancellations and weights, a Queue's putters and getters; random sizes,
producers, failures, hangs, and cancellation at a random moment) for
``--cases`` seeds on each backend, and prints how many cases ran and how many
broke an invariant (an item lost, doubled, both finished and unfinished, out
of order, or a task left running).

    python tests/chaos.py [--cases 10000] [--seed 0] [--backend asyncio trio]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import anyio


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from test_batcher_scheduling import trial as batcher_jobs_trial
    from test_contract_accounting import batcher_trial, trial
    from test_queue import chaos_trial as queue_trial

    async def layered(seed: int) -> None:
        await trial(seed, layered=True)

    async def scheduled(seed: int) -> None:
        await trial(seed, scheduled=True)

    async def resilient(seed: int) -> None:
        await trial(seed, resilient=True)

    async def queue(seed: int) -> None:
        await queue_trial(seed, virtual_time=False)

    scenarios: dict[str, Callable[[int], Awaitable[None]]] = {
        "pool": trial,
        "pool+middleware": layered,
        "pool+scheduling": scheduled,
        "pool+resilience": resilient,
        "batcher": batcher_trial,
        "batcher+jobs": batcher_jobs_trial,
        "queue": queue,
    }
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="per backend, all scenarios")
    parser.add_argument("--seed", type=int, default=10_000, help="first seed (the suite uses 0-)")
    parser.add_argument("--backend", nargs="+", default=["asyncio", "uvloop", "trio"])
    args = parser.parse_args(argv)

    total = violations = 0
    for backend in args.backend:
        name, options = ("asyncio", {"use_uvloop": True}) if backend == "uvloop" else (backend, {})
        counts = {label: [0, 0] for label in scenarios}
        first_failures: list[str] = []

        async def run_all(
            counts: dict[str, list[int]] = counts, first_failures: list[str] = first_failures
        ) -> None:
            for case in range(args.cases):
                label = list(scenarios)[case % len(scenarios)]
                seed = args.seed + case
                counts[label][0] += 1
                try:
                    await scenarios[label](seed)
                except Exception:
                    counts[label][1] += 1
                    if len(first_failures) < 3:
                        first_failures.append(f"{label} seed {seed}:\n{traceback.format_exc()}")

        start = time.perf_counter()
        options_: dict[str, Any] = options
        anyio.run(run_all, backend=name, backend_options=options_)
        elapsed = time.perf_counter() - start
        for label, (cases, bad) in counts.items():
            print(f"{backend:<8} {label:<16} cases {cases:>6}  violations {bad}")
            total += cases
            violations += bad
        print(f"{backend:<8} {'all':<16} {elapsed:.0f} s")
        for failure in first_failures:
            print(failure)
    print(f"total: {total} cases, {violations} violations")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
