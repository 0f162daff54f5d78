"""Adaptive concurrency: ``corral.AdaptiveLimiter`` against fixed limits and the peers,
on a simulated service whose concurrency the client does not know.

The service (``adaptive_service.py``) serves ``--capacity`` C requests at once,
each in ``--service-time`` S seconds, in four shapes: ``queue`` (up to C more
wait in line, the rest are refused with ``Overloaded``), ``reject`` (no
line), ``smooth`` (nothing refused, latency ``S * max(1, n / C)`` for ``n``
in service) and ``noisy`` (as ``queue``, service times log-normal with mean
S). The client is ``corral.apply_to_all`` over an endless input with
``--workers`` workers (10 C by default, far more than C) and
``Retry(on=Overloaded, wait_initial=S, wait_max=10 S)``; what bounds its
concurrency is the contender:

- ``anyio.CapacityLimiter(k)`` as ``limiter=``, for k around C (``--fixed``,
  multiples of C);
- no limiter at all (every worker calls);
- an oracle: a ``CapacityLimiter`` kept at C, set anew whenever C changes;
- ``AdaptiveLimiter(on=Overloaded, algorithm=...)``, its other options the
  defaults (it starts at 10), for ``vegas`` and ``gradient2``;
- on asyncio, the peers that are installed: ``ace-concurrency``
  (``ACEAsyncioManager``: AIMD on the host's CPU, memory and loop lag, not on
  the service's answers), ``adaptive-concurrency`` (``arun_adaptive``, one
  item per batch; it dispatches the next item at once and never retries) and
  ``aioadaptive`` (``AdaptiveClient``: Vegas on the round-trip time of
  successes), each started at 10 with at most ``--workers`` and, but for
  adaptive-concurrency, the same retry loop and backoff as corral's.

A fixed limit runs for one phase of ``--seconds`` T from a cold start. An
adaptive contender, and the oracle, run three: T at C, T at C/2 (C halves),
T at C again (it doubles). Each phase is measured over its second half,
after convergence: goodput (successes per second), the share of attempts
refused (refusals / (refusals + successes), by when they ended), and the
latency of successful attempts against the bare service time (median over
median, and mean over mean: S but for ``noisy``). The first phase's goodput is given as a share of
the best fixed limit's in the same repeat, the later phases' as a share of
the oracle's in the same phase and repeat.

Converging: the limit (``limiter.limit``, the peers' own limit, or for
adaptive-concurrency its batches in flight) is sampled every ``--sample``
seconds and smoothed by a running median over 1 s (a probe of the baseline,
which halves the limit for one window, is not a departure); its settled
value is the median of the last third of a phase, and the time to converge
is when the smoothed limit enters ``±25%`` of it for good, from the start of
the phase. The goals (the last lines, per backend, the worst over shapes and
phases): goodput at least 0.9, at most 2% refused, median latency at most 2
S, converged within T / 2 (where the measurement starts).

On trio the run uses ``trio.testing.MockClock(autojump_threshold=0)``: time
is virtual, so the figures are exact and a run takes only the CPU it needs.
asyncio and uvloop run in real time, so each contender runs alone in a
process of its own, ``--jobs`` at a time (their event loops do not share a
thread, and a few per cent of a core each leave the machine's cores mostly
idle). Figures are medians of ``--repeat`` runs, each seeded by its repeat;
the peers, asyncio only, run ``--peer-repeat`` times, ``--peer-jobs`` at a
time (ace-concurrency reads the host's CPU load).

    python benchmarks/bench_adaptive.py [--capacity 20] [--service-time 0.02]
        [--seconds 4] [--repeat 3] [--jobs 12] [--no-peers] [--quick]
        [--save FILE] [--load FILE]
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import pickle
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import anyio
from _harness import backends, installed  # the script's folder is on sys.path
from adaptive_service import SHAPES, Overloaded, Service

import corral

ALGORITHMS = ("vegas", "gradient2")
FIXED = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
DASH = "\u2013"  # an empty cell
BAND = 0.25  # converged: within ±25% of the settled value
SMOOTHING = 1.0  # seconds of samples in the running median the band is checked on
ORACLE = "corral, CapacityLimiter kept at C (oracle)"
PEERS = {
    "ace-concurrency": "ace",
    "adaptive-concurrency": "adaptive_concurrency",
    "aioadaptive": "aioadaptive",
}


@dataclass(frozen=True)
class Setup:
    """What every run shares."""

    capacity: int
    service_time: float
    seconds: float
    workers: int
    sample: float


@dataclass(frozen=True)
class Contender:
    label: str
    kind: str  # "fixed", "none", "oracle", "adaptive", or a peer's name
    value: Any = None  # k for "fixed", the algorithm for "adaptive"

    @property
    def adaptive(self) -> bool:
        return self.kind not in ("fixed", "none")


@dataclass(frozen=True)
class Job:
    setup: Setup
    contender: Contender
    shape: str
    backend: str
    options: dict[str, Any]
    seed: int

    @property
    def capacities(self) -> list[int]:
        """The service's capacity in each phase."""
        c = self.setup.capacity
        return [c, max(1, c // 2), c] if self.contender.adaptive else [c]


@dataclass
class Record:
    """What one run saw, times relative to its start."""

    successes: list[tuple[float, float, float]]  # (end, latency, bare)
    refusals: list[float]
    samples: list[tuple[float, float]]  # (time, limit)
    ran: float  # seconds the client ran (less than planned: it stopped early)
    counters: dict[str, Any] = field(default_factory=dict)


# --- the clients ------------------------------------------------------------------


def corral_retry(setup: Setup) -> corral.Retry:
    return corral.Retry(
        attempts=10**9,
        on=Overloaded,
        wait_initial=setup.service_time,
        wait_max=10 * setup.service_time,
    )


def corral_client(service: Service, setup: Setup, limiter: Any) -> Callable[[], Awaitable[None]]:
    async def call(item: int) -> None:
        await service.call()

    async def run() -> None:
        await corral.apply_to_all(
            call, range(10**12), workers=setup.workers, limiter=limiter, retry=corral_retry(setup)
        )

    return run


async def retrying_workers(attempt: Callable[[], Awaitable[None]], setup: Setup) -> None:
    """``setup.workers`` tasks each calling ``attempt`` for ever, waiting as
    corral's Retry waits after each ``Overloaded`` (the slot is not held then)."""
    retry = corral_retry(setup)

    async def worker() -> None:
        failures = 0
        while True:
            try:
                await attempt()
            except Overloaded as error:
                failures += 1
                await anyio.sleep(retry.wait_before(failures, error))
            else:
                failures = 0

    async with anyio.create_task_group() as group:
        for _ in range(setup.workers):
            group.start_soon(worker)


def ace_client(
    service: Service, setup: Setup
) -> tuple[Callable[[], Awaitable[None]], Callable[[], float]]:
    from ace import AIMDConfig
    from ace.core.logger import ACELogger
    from ace.integrations.asyncio_integration import ACEAsyncioManager

    config = AIMDConfig(min_limit=1, max_limit=setup.workers, initial_limit=10)
    manager = ACEAsyncioManager(config, logger=ACELogger("ace", logging.WARNING))

    async def attempt() -> None:
        async with await manager.semaphore.acquire():
            await service.call()

    async def run() -> None:
        async with manager:
            await retrying_workers(attempt, setup)

    return run, lambda: manager.semaphore.get_stats()["limit"]


def adaptive_concurrency_client(
    service: Service, setup: Setup
) -> tuple[Callable[[], Awaitable[None]], Callable[[], float]]:
    from adaptive_concurrency import AdaptiveConfig, arun_adaptive

    config = AdaptiveConfig(
        batch_size=1,
        workers=10,
        max_workers=setup.workers,
        max_batch_size=1,
        max_consecutive_failures=10**9,
    )
    in_flight = 0
    # it takes a list and never retries: enough items for every attempt it can make
    items = [0] * int(200 * setup.capacity / setup.service_time * 3 * setup.seconds)

    async def process_batch(batch: list[int]) -> tuple[bool, int, str]:
        nonlocal in_flight
        in_flight += 1
        try:
            await service.call()
        except Overloaded as error:
            return False, 0, str(error)
        finally:
            in_flight -= 1
        return True, 1, ""

    async def run() -> None:
        await arun_adaptive(items, process_batch, config)

    return run, lambda: in_flight


def aioadaptive_client(
    service: Service, setup: Setup
) -> tuple[Callable[[], Awaitable[None]], Callable[[], float]]:
    from aioadaptive import AdaptiveClient, AdaptiveClientConfig
    from aioadaptive.limiter import VegasLimiter

    vegas = VegasLimiter(limit=10, limit_max=setup.workers)
    client = AdaptiveClient(AdaptiveClientConfig(algorithm=vegas))

    async def attempt() -> None:
        async with client.use():
            await service.call()

    async def run() -> None:
        await retrying_workers(attempt, setup)

    return run, lambda: vegas.limit


PEER_CLIENTS = {
    "ace-concurrency": ace_client,
    "adaptive-concurrency": adaptive_concurrency_client,
    "aioadaptive": aioadaptive_client,
}


@dataclass
class Client:
    run: Callable[[], Awaitable[None]]  # the client, for ever
    probe: Callable[[], float]  # its limit now
    limiter: Any = None  # an AdaptiveLimiter, for its statistics
    follow: Callable[[int], None] | None = None  # told the service's new capacity


def make_client(contender: Contender, service: Service, setup: Setup) -> Client:
    if contender.kind == "fixed":
        fixed = anyio.CapacityLimiter(contender.value)
        return Client(corral_client(service, setup, fixed), lambda: contender.value)
    if contender.kind == "oracle":
        oracle = anyio.CapacityLimiter(service.capacity)

        def follow(capacity: int) -> None:
            oracle.total_tokens = capacity

        return Client(
            corral_client(service, setup, oracle), lambda: oracle.total_tokens, follow=follow
        )
    if contender.kind == "none":
        run = corral_client(service, setup, None)
        return Client(run, lambda: service.busy + service.waiting)
    if contender.kind == "adaptive":
        limiter = corral.AdaptiveLimiter(on=Overloaded, algorithm=contender.value)
        return Client(corral_client(service, setup, limiter), lambda: limiter.limit, limiter)
    run, probe = PEER_CLIENTS[contender.kind](service, setup)
    return Client(run, probe)


# --- one run, in a process of its own ------------------------------------------------


async def run_contender(job: Job) -> Record:
    setup = job.setup
    capacities = job.capacities
    service = Service(capacities[0], setup.service_time, shape=job.shape, seed=job.seed)
    client = make_client(job.contender, service, setup)
    samples: list[tuple[float, float]] = []
    start = anyio.current_time()
    total = setup.seconds * len(capacities)
    stopped = total

    async def sample() -> None:
        while True:
            samples.append((anyio.current_time() - start, client.probe()))
            await anyio.sleep(setup.sample)

    async def change_capacity() -> None:
        for phase, capacity in enumerate(capacities[1:], 1):
            await anyio.sleep_until(start + phase * setup.seconds)
            service.set_capacity(capacity)
            if client.follow is not None:
                client.follow(capacity)

    async def run_client() -> None:
        nonlocal stopped
        await client.run()
        stopped = anyio.current_time() - start  # it stopped by itself

    with anyio.move_on_after(total):
        async with anyio.create_task_group() as group:
            group.start_soon(sample)
            group.start_soon(change_capacity)
            group.start_soon(run_client)
    counters: dict[str, Any] = {}
    if client.limiter is not None:
        snapshot = client.limiter.statistics()
        counters = {
            name: getattr(snapshot, name, None)
            for name in ("limit", "drops", "decreases", "latency", "baseline")
        }
    return Record(
        successes=[(end - start, latency, bare) for end, latency, bare in service.successes],
        refusals=[at - start for at in service.refusals],
        samples=samples,
        ran=stopped,
        counters=counters,
    )


def run_job(job: Job) -> Record:
    """The entry point of a job's process."""
    options = dict(job.options)
    if job.backend == "trio":
        from trio.testing import MockClock

        options["clock"] = MockClock(autojump_threshold=0)
    random.seed(job.seed)  # Retry's jitter
    return anyio.run(run_contender, job, backend=job.backend, backend_options=options)


def run_jobs(jobs: Sequence[Job], parallel: int) -> list[Record]:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=parallel, mp_context=context) as pool:
        return list(pool.map(run_job, jobs))


# --- reading a run -------------------------------------------------------------------


@dataclass
class Phase:
    """One phase of one run, measured over its second half."""

    goodput: float  # successes per second
    refused: float  # share of attempts
    latency: float  # median latency / median bare service time
    mean_latency: float  # mean latency / mean bare service time
    converge: float | None  # seconds from the phase's start; None: never settled
    settled: float  # the settled limit


def smoothed(values: list[float], width: int) -> list[float]:
    """A centred running median over ``width`` samples."""
    half = width // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def phase_of(record: Record, index: int, setup: Setup) -> Phase:
    begin = index * setup.seconds
    end = begin + setup.seconds
    middle = begin + setup.seconds / 2
    done = [s for s in record.successes if middle <= s[0] < end]
    refused = sum(1 for at in record.refusals if middle <= at < end)
    if done:
        latency = statistics.median(s[1] for s in done) / statistics.median(s[2] for s in done)
        mean_latency = sum(s[1] for s in done) / sum(s[2] for s in done)
    else:
        latency = mean_latency = math.inf
    inside = [(at - begin, value) for at, value in record.samples if begin <= at < end]
    width = max(1, round(SMOOTHING / setup.sample))
    samples = smoothed([value for _, value in inside], width)
    settled = statistics.median(samples[len(samples) * 2 // 3 :]) if samples else math.nan
    converge = None
    for i in range(len(samples)):
        if all(abs(v - settled) <= BAND * settled for v in samples[i:]):
            converge = inside[i][0]
            break
    attempts = len(done) + refused
    return Phase(
        goodput=len(done) / (end - middle),
        refused=refused / attempts if attempts else 0.0,
        latency=latency,
        mean_latency=mean_latency,
        converge=converge,
        settled=settled,
    )


@dataclass
class Results:
    """Every run's phases, by (backend, shape, contender label), one list per repeat."""

    setup: Setup
    repeat: int
    phases: dict[tuple[str, str, str], list[list[Phase]]] = field(default_factory=dict)
    records: dict[tuple[str, str, str], list[Record]] = field(default_factory=dict)
    reasons: dict[tuple[str, str], str] = field(default_factory=dict)  # (backend, label)

    def add(self, backend: str, job: Job, record: Record) -> None:
        key = (backend, job.shape, job.contender.label)
        count = len(job.capacities)
        if record.ran < self.setup.seconds * count - 1e-6:
            print(
                f"warning: {job.contender.label} on {backend} ({job.shape}) stopped "
                f"after {record.ran:.1f} s",
                file=sys.stderr,
            )
        self.phases.setdefault(key, []).append(
            [phase_of(record, i, self.setup) for i in range(count)]
        )
        self.records.setdefault(key, []).append(record)

    def oracle(self, backend: str, shape: str, repeat: int, index: int) -> float:
        """The goodput of the limit kept at C, in this phase of this repeat
        (the service's capacity if it did not run)."""
        runs = self.phases.get((backend, shape, ORACLE))
        if runs is None:
            capacities = [self.setup.capacity, max(1, self.setup.capacity // 2)]
            return capacities[index % 2] / self.setup.service_time
        return runs[repeat][index].goodput

    def best_fixed(self, backend: str, shape: str, repeat: int) -> tuple[float, str]:
        """The best fixed limit's goodput in this repeat, and its label."""
        best = (0.0, "")
        for (b, s, label), runs in self.phases.items():
            if (
                b == backend
                and s == shape
                and label.startswith("corral CapacityLimiter")
                and runs[repeat][0].goodput > best[0]
            ):
                best = (runs[repeat][0].goodput, label)
        return best


# --- the tables ------------------------------------------------------------------------


def median_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return statistics.median(present)


def cell(values: list[float | None], fmt: str, missing: str = "never") -> str:
    """The median of the repeats; if some never settled, how many."""
    value = median_or_none(values)
    nones = sum(1 for v in values if v is None)
    if value is None or nones * 2 > len(values):
        return missing
    if math.isinf(value):
        return "no success"
    text = format(value, fmt)
    return text + (f" ({nones} never)" if nones else "")


def joined(parts: list[str]) -> str:
    return " / ".join(parts)


def steady_table(results: Results, shape: str, labels: list[str], columns: list[str]) -> None:
    setup = results.setup
    print(
        f"\n#### `{shape}`: from a cold start, C = {setup.capacity}, S = "
        f"{setup.service_time * 1000:g} ms, {setup.workers} workers, second half of "
        f"{setup.seconds:g} s; median of the repeats ({joined(columns)})\n"
    )
    print(
        "| contender | goodput ÷ best fixed | refused | latency ÷ S, median | mean | "
        "converged after (s) | settled limit ÷ C |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label in labels:
        row: list[list[str]] = [[], [], [], [], [], []]
        for backend in columns:
            runs = results.phases.get((backend, shape, label))
            if runs is None:
                for parts in row:
                    parts.append(DASH)
                continue
            ratios = []
            for repeat, phases in enumerate(runs):
                best, _ = results.best_fixed(backend, shape, repeat)
                ratios.append(phases[0].goodput / best if best else math.nan)
            first = [phases[0] for phases in runs]
            row[0].append(cell(list(ratios), ".2f"))
            row[1].append(cell([p.refused * 100 for p in first], ".1f") + "%")
            row[2].append(cell([p.latency for p in first], ".2f"))
            row[3].append(cell([p.mean_latency for p in first], ".2f"))
            adaptive = label.startswith("corral AdaptiveLimiter") or label in PEERS
            row[4].append(cell([p.converge for p in first], ".1f") if adaptive else DASH)
            row[5].append(
                cell([p.settled / setup.capacity for p in first], ".2f") if adaptive else DASH
            )
        print(f"| {label} | " + " | ".join(joined(parts) for parts in row) + " |")
    bests = []
    for backend in columns:
        per_repeat = [results.best_fixed(backend, shape, r) for r in range(results.repeat)]
        found = [(g, label) for g, label in per_repeat if label]
        if not found:
            bests.append(DASH)
            continue
        capacity = setup.capacity / setup.service_time
        share = statistics.median(g / capacity for g, _ in found)
        label = statistics.mode(label for _, label in found).removeprefix("corral CapacityLimiter")
        bests.append(f"k = {label.strip('()')}: {share:.2f}")
    print(f"| best fixed: its k, goodput ÷ capacity | {joined(bests)} | | | | | |")


def change_table(results: Results, shape: str, labels: list[str], columns: list[str]) -> None:
    setup = results.setup
    half = max(1, setup.capacity // 2)
    print(
        f"\n#### `{shape}`: C = {setup.capacity} → {half} at {setup.seconds:g} s → "
        f"{setup.capacity} at {2 * setup.seconds:g} s; each phase's second half; goodput ÷ "
        f"the oracle's (a CapacityLimiter kept at C) in the same phase; median of the repeats "
        f"({joined(columns)})\n"
    )
    print(
        "| contender | phase | converged after (s) | settled limit ÷ C | goodput ÷ oracle "
        "| refused | latency ÷ S, median | mean |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label in labels:
        for index, name in ((1, f"C halves to {half}"), (2, f"C doubles to {setup.capacity}")):
            capacity = half if index == 1 else setup.capacity
            row: list[list[str]] = [[], [], [], [], [], []]
            for backend in columns:
                runs = results.phases.get((backend, shape, label))
                if runs is None:
                    for parts in row:
                        parts.append(DASH)
                    continue
                phases = [p[index] for p in runs]
                row[0].append(cell([p.converge for p in phases], ".1f"))
                row[1].append(cell([p.settled / capacity for p in phases], ".2f"))
                if label == ORACLE:
                    full = capacity / setup.service_time
                    row[2].append(cell([p.goodput / full for p in phases], ".2f"))
                else:
                    ratios = [
                        p.goodput / results.oracle(backend, shape, repeat, index)
                        for repeat, p in enumerate(phases)
                    ]
                    row[2].append(cell(list(ratios), ".2f"))
                row[3].append(cell([p.refused * 100 for p in phases], ".1f") + "%")
                row[4].append(cell([p.latency for p in phases], ".2f"))
                row[5].append(cell([p.mean_latency for p in phases], ".2f"))
            shown = f"{label}, its goodput ÷ C / S" if label == ORACLE else label
            print(f"| {shown} | {name} | " + " | ".join(joined(parts) for parts in row) + " |")


def bar(value: float, unit: float, width: int = 30) -> str:
    """A row of blocks, one per ``unit``."""
    blocks = round(value / unit)
    return "█" * min(blocks, width) + ("…" if blocks > width else "")


def limit_table(results: Results, shape: str, labels: list[str], backend: str) -> None:
    setup = results.setup
    every = 0.5
    print(
        f"\n#### `{shape}` on {backend}: the limit over time, first repeat (a block "
        f"is {setup.capacity / 10:g}; C drops to {max(1, setup.capacity // 2)} at "
        f"{setup.seconds:g} s and comes back at {2 * setup.seconds:g} s)\n"
    )
    present = [label for label in labels if (backend, shape, label) in results.records]
    print("| t (s) | C | " + " | ".join(present) + " |")
    print("| ---: | ---: | " + " | ".join("---" for _ in present) + " |")
    steps = round(3 * setup.seconds / every)
    for step in range(steps + 1):
        at = step * every
        capacity = (
            setup.capacity
            if at < setup.seconds or at >= 2 * setup.seconds
            else max(1, setup.capacity // 2)
        )
        cells = []
        for label in present:
            samples = results.records[(backend, shape, label)][0].samples
            before = [v for t, v in samples if t <= at + 1e-9]
            value = before[-1] if before else math.nan
            cells.append(f"{value:g} {bar(value, setup.capacity / 10)}")
        print(f"| {at:.1f} | {capacity} | " + " | ".join(cells) + " |")


def counters_table(
    results: Results, shapes: list[str], labels: list[str], columns: list[str]
) -> None:
    print(
        "\n#### Over the whole run (three phases, slow start and changes included), first "
        f"repeat: the limiter's own counters at the end, and the attempts refused "
        f"({joined(columns)})\n"
    )
    print("| shape | contender | limit at the end | drops | decreases | refused |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in shapes:
        for label in labels:
            parts: list[list[str]] = [[], [], [], []]
            for backend in columns:
                records = results.records.get((backend, shape, label))
                counters = records[0].counters if records else {}
                for i, name in enumerate(("limit", "drops", "decreases")):
                    value = counters.get(name)
                    parts[i].append(DASH if value is None else f"{value:g}")
                if records:
                    refused = len(records[0].refusals)
                    attempts = refused + len(records[0].successes)
                    parts[3].append(f"{refused / attempts * 100:.1f}%" if attempts else DASH)
                else:
                    parts[3].append(DASH)
            print(f"| {shape} | {label} | " + " | ".join(joined(p) for p in parts) + " |")


def figures_of(results: Results, backend: str, shape: str, label: str) -> list[dict[str, float]]:
    """Per phase, the medians over the repeats of what the goals are about:
    goodput (the first phase's ÷ the best fixed limit's, the later phases' ÷
    the oracle's), refused share, median latency ÷ S, time to converge (inf:
    never)."""
    runs = results.phases[(backend, shape, label)]
    out = []
    for index in range(len(runs[0])):
        if index == 0:
            ratios = []
            for repeat, phases in enumerate(runs):
                best, _ = results.best_fixed(backend, shape, repeat)
                ratios.append(phases[0].goodput / best if best else math.nan)
        else:
            ratios = [
                phases[index].goodput / results.oracle(backend, shape, repeat, index)
                for repeat, phases in enumerate(runs)
            ]
        converges = [phases[index].converge for phases in runs]
        settled = sum(1 for c in converges if c is not None) * 2 >= len(converges)
        converge = median_or_none(converges) if settled else None  # as the tables say
        out.append(
            {
                "goodput": statistics.median(ratios),
                "refused": statistics.median(phases[index].refused for phases in runs),
                "latency": statistics.median(phases[index].latency for phases in runs),
                "converge": math.inf if converge is None else converge,
            }
        )
    return out


GOALS = {  # checked at the precision the tables print
    "goodput": lambda value, setup: round(value, 2) >= 0.9,
    "refused": lambda value, setup: round(value, 3) <= 0.02,
    "latency": lambda value, setup: round(value, 2) <= 2.0,
    "converge": lambda value, setup: round(value, 1) <= setup.seconds / 2,
}
PHASES = ("cold start", "C halved", "C doubled")


def goals(results: Results, shapes: list[str], labels: list[str], columns: list[str]) -> None:
    """One line per adaptive contender: the worst figure over the shapes and
    phases on each backend, and where a goal was missed."""
    setup = results.setup
    print()
    for label in labels:
        cells = []
        missed: dict[str, dict[str, list[str]]] = {}  # goal -> shape and phase -> backends
        for backend in columns:
            worst: dict[str, float] = {}
            for shape in shapes:
                if (backend, shape, label) not in results.phases:
                    continue
                for index, figures in enumerate(figures_of(results, backend, shape, label)):
                    for name, value in figures.items():
                        if name not in worst or (
                            value < worst[name] if name == "goodput" else value > worst[name]
                        ):
                            worst[name] = value
                        if not GOALS[name](value, setup):
                            where = f"{shape} {PHASES[index]}"
                            missed.setdefault(name, {}).setdefault(where, []).append(backend)
            if not worst:
                continue
            cells.append(
                f"{backend} {worst['goodput']:.2f} / {worst['refused'] * 100:.1f}% / "
                + ("no success" if math.isinf(worst["latency"]) else f"{worst['latency']:.2f}x")
                + " / "
                + ("never" if math.isinf(worst["converge"]) else f"{worst['converge']:.1f} s")
            )
        if not cells:
            continue
        verdict = "all goals met"
        if missed:
            verdict = "missed: " + "; ".join(
                f"{name} in "
                + ", ".join(
                    where + ("" if len(on) == len(columns) else f" ({', '.join(on)})")
                    for where, on in places.items()
                )
                for name, places in missed.items()
            )
        print(
            f"- key ratio, {label}, worst over the shapes and phases (goodput ÷ best fixed or "
            f"oracle / refused / median latency ÷ S / slowest (re)convergence): "
            f"{'  '.join(cells)}  ({verdict})"
        )
    sys.stdout.flush()


# --- the run -----------------------------------------------------------------------------


def lineup(args: argparse.Namespace, backend_label: str) -> list[tuple[str, Contender | str]]:
    """The contenders on this backend, in table order; a reason instead of a
    contender where one cannot run there."""
    c = args.capacity
    entries: list[tuple[str, Contender | str]] = []
    for multiple in args.fixed:
        k = max(1, round(multiple * c))
        entries.append(
            (f"corral CapacityLimiter({k})", Contender(f"corral CapacityLimiter({k})", "fixed", k))
        )
    entries.append(("corral, no limiter", Contender("corral, no limiter", "none")))
    entries.append((ORACLE, Contender(ORACLE, "oracle")))
    for algorithm in args.algorithms:
        label = f"corral AdaptiveLimiter({algorithm})"
        if hasattr(corral, "AdaptiveLimiter"):
            entries.append((label, Contender(label, "adaptive", algorithm)))
        else:
            entries.append((label, "not in this corral"))
    if args.peers:
        for peer, module in PEERS.items():
            if backend_label != "asyncio":
                entries.append((peer, "asyncio only"))
            elif not installed(module):
                entries.append((peer, "not installed"))
            else:
                entries.append((peer, Contender(peer, peer)))
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=20, help="C, the service's concurrency")
    parser.add_argument("--service-time", type=float, default=0.02, help="S, in seconds")
    parser.add_argument("--seconds", type=float, default=4.0, help="T, one phase")
    parser.add_argument("--workers", type=int, help="the client's workers (default 10 C)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sample", type=float, default=0.1, help="seconds between samples")
    parser.add_argument("--jobs", type=int, default=12, help="processes at once in real time")
    parser.add_argument("--peer-repeat", type=int, default=1, help="runs of each peer")
    parser.add_argument("--peer-jobs", type=int, default=6, help="peer processes at once")
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--fixed", nargs="+", type=float, default=list(FIXED), help="k / C")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    parser.add_argument("--backends", nargs="+", help="asyncio, uvloop, trio (default: all)")
    parser.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument(
        "--quick", action="store_true", help="3 s phases, queue and reject, 1 repeat"
    )
    parser.add_argument("--save", help="also write every run's records to this file")
    parser.add_argument("--load", help="print the tables of a run saved with --save")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.repeat, args.shapes, args.fixed = 3.0, 1, ["queue", "reject"], [1.0]
    if args.load:
        with open(args.load, "rb") as file:
            saved = pickle.load(file)
    else:
        saved = run_all(args)
        if args.save:
            with open(args.save, "wb") as file:
                pickle.dump(saved, file)
    report(**saved)
    return 0


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every run on every backend; what :func:`report` prints."""
    setup = Setup(
        capacity=args.capacity,
        service_time=args.service_time,
        seconds=args.seconds,
        workers=args.workers or 10 * args.capacity,
        sample=args.sample,
    )
    results = Results(setup, args.repeat)
    columns = []
    labels: list[str] = []
    for backend_label, backend, options in backends():
        if args.backends and backend_label not in args.backends:
            continue
        columns.append(backend_label)
        contenders = []
        for label, entry in lineup(args, backend_label):
            if label not in labels:
                labels.append(label)
            if isinstance(entry, str):
                results.reasons[(backend_label, label)] = entry
            else:
                contenders.append(entry)
        ours = [c for c in contenders if c.kind not in PEERS]
        peers = [c for c in contenders if c not in ours]
        parallel = (os.cpu_count() or 1) if backend == "trio" else args.jobs
        batches = [(ours, args.repeat, parallel), (peers, args.peer_repeat, args.peer_jobs)]
        for chosen, repeats, at_once in batches:
            if not chosen:
                continue
            jobs = [
                Job(setup, contender, shape, backend, options, seed=repeat)
                for repeat in range(repeats)
                for shape in args.shapes
                for contender in chosen
            ]
            started = time.perf_counter()
            for job, record in zip(jobs, run_jobs(jobs, at_once), strict=True):
                results.add(backend_label, job, record)
            print(
                f"{backend_label}: {len(jobs)} runs in {time.perf_counter() - started:.0f} s",
                file=sys.stderr,
            )
    return {
        "results": results,
        "columns": columns,
        "labels": labels,
        "shapes": args.shapes,
        "peer_repeat": args.peer_repeat,
    }


def report(
    results: Results, columns: list[str], labels: list[str], shapes: list[str], peer_repeat: int
) -> None:
    """Print every table and the goals."""
    setup = results.setup
    print(
        f"\n### Adaptive concurrency: C = {setup.capacity}, S = {setup.service_time * 1000:g} ms, "
        f"{setup.workers} workers, {results.repeat} repeats ({peer_repeat} for the peers; "
        "asyncio and uvloop in real time, trio on a MockClock)"
    )
    not_run: dict[tuple[str, str], list[str]] = {}
    for (backend_label, label), why in results.reasons.items():
        not_run.setdefault((label, why), []).append(backend_label)
    if not_run:
        print(
            "\nNot run: "
            + "; ".join(
                f"{label} on {', '.join(where)} ({why})" for (label, why), where in not_run.items()
            )
        )
    adaptive = [
        label for label in labels if label.startswith("corral AdaptiveLimiter") or label in PEERS
    ]
    for shape in shapes:
        steady_table(results, shape, [label for label in labels if label != ORACLE], columns)
    for shape in shapes:
        change_table(results, shape, [ORACLE, *adaptive], columns)
    plot_backend = "trio" if "trio" in columns else columns[0]
    corral_adaptive = [label for label in adaptive if label.startswith("corral")]
    for shape in shapes:
        shown = adaptive if plot_backend == "asyncio" else corral_adaptive
        limit_table(results, shape, shown, plot_backend)
    counters_table(results, shapes, adaptive, columns)
    goals(results, shapes, adaptive, columns)


if __name__ == "__main__":
    sys.exit(main())
