"""Exporting corral's metrics to Prometheus: with OpenTelemetry, and with on_stats.

Two ways side by side, on the same job (a pool fetching records, its results
written in batches):

- OpenTelemetry: `corral.otel.CorralInstrumentor().instrument(...)` once, and
  every pool and batcher reports `corral.items`, `corral.retries`,
  `corral.flushes`, `corral.attempt.duration`, `corral.batch.size` and the
  items queued and running. Here the SDK's Prometheus exporter serves them on
  a real `/metrics` page (prometheus_client's HTTP server on a free local
  port), which the example then scrapes as Prometheus would. It needs
  `opentelemetry-sdk` and `opentelemetry-exporter-prometheus` (and the extra
  `corral[otel]`); without them this part is skipped, saying so.
- `on_stats=`: a plain function gets a frozen stats snapshot every
  `stats_interval` seconds and once more at exit, rendered here as Prometheus
  text by a few lines of code (no library needed): the page a `/metrics`
  endpoint serves, or a `.prom` file for node_exporter's textfile collector.

Run it with `python examples/metrics.py [asyncio|uvloop|trio]` (asyncio and
trio by default).
"""

from __future__ import annotations

import argparse
import re
import urllib.request
from typing import Any

import anyio
import attrs
from _backends import add_argument, chosen, run_on

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


def serve_metrics() -> tuple[str, Any] | None:
    """Instrument corral with OpenTelemetry's Prometheus exporter and serve the
    page on a free local port: the page's URL and the server, or None (and
    why, printed) without the libraries."""
    try:
        import prometheus_client
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider

        from corral.otel import CorralInstrumentor
    except ImportError as missing:
        print(
            f"skipping OpenTelemetry ({missing.name} is not installed): pip install "
            "'corral[otel]' opentelemetry-sdk opentelemetry-exporter-prometheus"
        )
        return None
    registry = prometheus_client.CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    CorralInstrumentor().instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    server, _ = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    return f"http://127.0.0.1:{server.server_port}/metrics", server


def scrape(url: str) -> dict[str, float]:
    """corral's samples on the page, as `metric{labels}` -> value (without the
    labels OpenTelemetry adds to every sample, and the empty ones)."""
    with urllib.request.urlopen(url, timeout=10) as page:
        text = page.read().decode()
    samples = {}
    for line in text.splitlines():
        found = re.fullmatch(r"(corral_\w+)\{(.*)\} (\S+)", line)
        if found is None:
            continue
        labels = ",".join(
            f'{key}="{value}"'
            for key, value in re.findall(r'(\w+)="([^"]*)"', found.group(2))
            if value and not key.startswith("otel_")
        )
        samples[f"{found.group(1)}{{{labels}}}"] = float(found.group(3))
    return samples


async def fetch(n: int) -> int:
    await anyio.sleep(0.002)
    if n % 25 == 0:
        raise ConnectionError(f"record {n}: connection reset")
    return n * n


async def main(backend: str, metrics_page: str | None) -> None:
    prometheus = PrometheusExporter()
    fetch_name, sink_name = f"fetch-{backend}", f"sink-{backend}"

    async def save(rows: list[int]) -> None:
        await anyio.sleep(0.005)

    async def forward(outcome: corral.Outcome[int, int]) -> None:
        if outcome.result is not None:
            await sink.add(outcome.result)  # waits while the sink is full

    async with corral.Batcher(
        save,
        max_size=50,
        name=sink_name,
        on_stats=prometheus.watch(sink_name),
        stats_interval=0.05,
    ) as sink:
        outcomes = await corral.apply_to_all(
            fetch,
            range(500),
            workers=20,
            name=fetch_name,
            on_outcome=forward,
            on_stats=prometheus.watch(fetch_name),
            stats_interval=0.05,
        )
    ok = sum(o.ok for o in outcomes)
    # on_stats: the last snapshot (at exit) is the final count
    print(prometheus.render(), end="")
    assert prometheus.latest[fetch_name]["succeeded"] == ok == 480
    assert prometheus.latest[sink_name]["flushed"] == ok
    if metrics_page is None:
        return
    # OpenTelemetry: the same totals, scraped from the /metrics page
    page = await anyio.to_thread.run_sync(scrape, metrics_page)
    for sample, value in sorted(page.items()):
        if backend in sample and not sample.startswith("corral_attempt_duration_seconds_bucket"):
            print(f"{sample} {value:g}")
    fetch_labels = f'corral_kind="pool",corral_name="{fetch_name}"'
    sink_labels = f'corral_kind="batcher",corral_name="{sink_name}"'
    assert page[f'corral_items_total{{{fetch_labels},corral_outcome="ok"}}'] == ok
    failed = f'{fetch_labels},corral_outcome="failed",error_type="ConnectionError"'
    assert page[f"corral_items_total{{{failed}}}"] == 20
    assert page[f'corral_items_total{{{sink_labels},corral_outcome="ok"}}'] == ok
    print(f"{metrics_page}: the same totals as on_stats")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    add_argument(parser)
    names = chosen(parser, parser.parse_args().backend)
    served = serve_metrics()
    for name in names:
        run_on(name, main, name, served and served[0])
    if served is not None:
        served[1].shutdown()
