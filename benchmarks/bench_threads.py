"""Plain (threaded) handlers: corral's cost per item next to hand-written anyio code.

A plain handler runs in a worker thread. Every call is a hop to a thread and
back, so what is measured is the engine around that hop:

* hand-written anyio pool: ``bench_apply.py``'s pool with an async handler that
  awaits ``anyio.to_thread.run_sync(fn, x, limiter=...)`` (the baseline);
* hand-written, with ``anyio.fail_after`` per call: the same, each call under a
  deadline, as one writes a per-call timeout by hand (its timed-out threads
  would not be accounted for; none time out here);
* corral ``apply_to_all``: the worker runs the thread itself;
* corral ``apply_to_all`` with ``timeout=``: each call goes to a runner task
  that holds its thread slot until the thread ends, so that threads a timeout
  abandons stay bounded (``2 * workers``) and keep their ``limiter`` token.

    python benchmarks/bench_threads.py [--items 5000] [--workers 10 100] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio
import anyio.to_thread
from _harness import Contender, compare, key_ratio  # the script's own folder is on sys.path
from bench_apply import hand_written

import corral

BASELINE = "hand-written anyio pool"
HAND_TIMEOUT = "hand-written, `fail_after` per call"


def plain(x: int) -> int:
    return x + 1


def lineup(workers: int, items: int) -> dict[str, Contender]:
    limiter = anyio.CapacityLimiter(workers)

    async def in_thread(x: int) -> int:
        return await anyio.to_thread.run_sync(plain, x, limiter=limiter)

    async def in_thread_with_deadline(x: int) -> int:
        with anyio.fail_after(60):
            return await anyio.to_thread.run_sync(plain, x, limiter=limiter)

    async def corral_apply(**options: Any) -> int:
        return len(await corral.apply_to_all(plain, range(items), workers=workers, **options))

    return {
        BASELINE: lambda: hand_written(in_thread, items, workers),
        HAND_TIMEOUT: lambda: hand_written(in_thread_with_deadline, items, workers),
        "corral apply_to_all": lambda: corral_apply(),
        "corral apply_to_all, `timeout=`": lambda: corral_apply(timeout=60),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2k items, 10 workers, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.items, args.workers, args.repeat = 2000, [10], 3
    for workers in args.workers:
        results = compare(
            f"#### plain handler in a thread, {workers} workers: µs per item, median "
            f"(min-max) of {args.repeat} interleaved runs of {args.items} items; "
            "**ratio** to the hand-written anyio pool (or its `fail_after` twin)",
            lambda _label, workers=workers: lineup(workers, args.items),
            args.items,
            args.repeat,
            BASELINE,
            {"corral apply_to_all, `timeout=`": HAND_TIMEOUT},
        )
        key_ratio(
            f"corral apply_to_all / hand-written, plain handler, {workers} workers",
            results,
            "corral apply_to_all",
            BASELINE,
        )
        key_ratio(
            f"corral apply_to_all with timeout= / hand-written with fail_after, {workers} workers",
            results,
            "corral apply_to_all, `timeout=`",
            HAND_TIMEOUT,
            target=1.5,
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
