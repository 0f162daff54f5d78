"""Exporting corral's stats: Prometheus text and OpenTelemetry-style counters.

`on_stats=` hands a frozen stats snapshot to a plain function every
`stats_interval` seconds while a Pool or Batcher runs, and once more at exit.
A snapshot is a handful of integers, cheap to take; nothing is counted per
item on corral's side. This example turns the snapshots into:

- the Prometheus text exposition format, the page a `/metrics` endpoint
  serves, or a `.prom` file for node_exporter's textfile collector;
- calls to OpenTelemetry-style counters (`counter.add(amount, attributes)`,
  the shape of `opentelemetry.metrics.Counter`), fed with the increase since
  the previous snapshot.

Neither library is needed: the exporters below are a few lines each, and an
object with an `add` method stands in for an OpenTelemetry meter's counter.

Run it with `python examples/metrics.py [asyncio|uvloop|trio]` (both by default).
"""

from __future__ import annotations

import argparse
import importlib.util
from collections import defaultdict
from typing import Any

import anyio
import attrs

import corral

# stats fields that only ever grow (counters); the others are gauges
COUNTERS = {
    "submitted",
    "succeeded",
    "failed",
    "retried",
    "backpressure_waits",
    "added",
    "flushes",
    "flushed",
    "deduped",
    "flush_failures",
}


class PrometheusExporter:
    """Keeps the latest snapshot of each named pool or batcher; renders them as
    Prometheus text (`corral_<field>{name="..."} value`)."""

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, Any]] = {}

    def watch(self, name: str) -> Any:
        """An `on_stats` callback for the pool or batcher called `name`."""

        def record(stats: corral.PoolStats | corral.BatcherStats) -> None:
            self.latest[name] = attrs.asdict(stats)

        return record

    def render(self) -> str:
        lines: list[str] = []
        # last_flush_time is on the event loop's clock, not a Unix time: left out
        fields = sorted(
            {field for stats in self.latest.values() for field in stats} - {"last_flush_time"}
        )
        for field in fields:
            counter = field in COUNTERS
            metric = f"corral_{field}_total" if counter else f"corral_{field}"
            lines.append(f"# TYPE {metric} {'counter' if counter else 'gauge'}")
            for name, stats in sorted(self.latest.items()):
                value = stats.get(field)
                if value is not None:  # a pool has no batcher fields and vice versa
                    lines.append(f'{metric}{{name="{name}"}} {value}')
        return "\n".join(lines) + "\n"


class Counter:
    """Stands in for an OpenTelemetry counter: `add(amount, attributes)`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.totals: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)

    def add(self, amount: int, attributes: dict[str, str]) -> None:
        assert amount >= 0, "a counter only goes up"
        self.totals[tuple(sorted(attributes.items()))] += amount


class CounterExporter:
    """Feeds counters with the increase of each stats counter since the last
    snapshot, as OpenTelemetry's synchronous counters expect."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.counters: dict[str, Counter] = {}
        self.previous: dict[str, dict[str, int]] = defaultdict(dict)

    def watch(self, name: str) -> Any:
        def record(stats: corral.PoolStats | corral.BatcherStats) -> None:
            before = self.previous[name]
            for field, value in attrs.asdict(stats).items():
                if field in COUNTERS:
                    counter = self.counters.setdefault(field, Counter(f"{self.prefix}.{field}"))
                    increase = value - before.get(field, 0)
                    if increase:
                        counter.add(increase, {"name": name})
                    before[field] = value

        return record

    def total(self, field: str, name: str) -> int:
        return self.counters[field].totals[(("name", name),)]


async def fetch(n: int) -> int:
    await anyio.sleep(0.002)
    if n % 25 == 0:
        raise ConnectionError(f"record {n}: connection reset")
    return n * n


async def main() -> None:
    prometheus = PrometheusExporter()
    otel = CounterExporter("corral")

    def both(name: str) -> Any:
        first, second = prometheus.watch(name), otel.watch(name)

        def record(stats: Any) -> None:
            first(stats)
            second(stats)

        return record

    async def save(rows: list[int]) -> None:
        await anyio.sleep(0.005)

    async def forward(outcome: corral.Outcome[int, int]) -> None:
        if outcome.result is not None:
            await sink.add(outcome.result)  # waits while the sink is full

    async with corral.Batcher(
        save, max_size=50, name="sink", on_stats=both("sink"), stats_interval=0.05
    ) as sink:
        outcomes = await corral.apply_to_all(
            fetch,
            range(500),
            workers=20,
            name="fetch",
            on_outcome=forward,
            on_stats=both("fetch"),
            stats_interval=0.05,
        )
    # the last snapshot (at exit) is the final count
    print(prometheus.render(), end="")
    ok = sum(o.ok for o in outcomes)
    assert prometheus.latest["fetch"]["succeeded"] == ok == 480
    assert prometheus.latest["sink"]["flushed"] == ok
    assert otel.total("succeeded", "fetch") == ok
    assert otel.total("failed", "fetch") == 20
    assert otel.total("flushed", "sink") == ok
    print(f"OpenTelemetry-style counters: corral.succeeded{{name=fetch}} = {ok}, totals agree")


# A name on the command line -> anyio.run's backend and backend_options.
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}


def backends() -> list[str]:
    """The backends named on the command line, or asyncio and trio (if installed)."""
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument(
        "backend", nargs="*", help="asyncio, uvloop or trio, in turn (default: asyncio, trio)"
    )
    named: list[str] = parser.parse_args().backend
    for name in named:
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r} (choose from asyncio, uvloop, trio)")
    chosen = []
    for name in named or ["asyncio", "trio"]:
        if name != "asyncio" and importlib.util.find_spec(name) is None:
            hint = (
                f"pip install 'corral[{name}]' "
                f"(in a checkout of corral: pip install -e '.[{name}]')"
            )
            if named:  # asked for by name: an error
                parser.error(f"{name} is not installed: {hint}")
            print(f"skipping {name}, which is not installed: {hint}")
        else:
            chosen.append(name)
    return chosen


if __name__ == "__main__":
    for name in backends():
        backend, options = BACKENDS[name]
        print(f"--- {name}")
        anyio.run(main, backend=backend, backend_options=options)
