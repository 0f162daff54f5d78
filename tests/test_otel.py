"""corral.otel: the metrics and spans an instrumented Pool, Batcher and helper
report, read back through the OpenTelemetry SDK's in-memory reader and exporter."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import corral
from corral import _telemetry

pytest.importorskip("opentelemetry.sdk")

import anyio.lowlevel
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from corral.otel import CorralInstrumentor


class Telemetry:
    """An SDK meter and tracer provider, with what they recorded."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.exporter = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.exporter))

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, value) of each data point of metric ``name``: a sum's
        value, or a histogram's (count, sum)."""
        found = []
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        value = getattr(point, "value", None)
                        if value is None:
                            value = (point.count, point.sum)
                        found.append((dict(point.attributes), value))
        return found

    def value(self, name: str, **attributes: str) -> Any:
        """The value of the one point of ``name`` whose attributes include these."""
        wanted = {key.replace("_", "."): value for key, value in attributes.items()}
        matching = [
            value
            for found, value in self.points(name)
            if all(found.get(key) == value for key, value in wanted.items())
        ]
        assert len(matching) == 1, (name, wanted, self.points(name))
        return matching[0]

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    recorded = Telemetry()
    CorralInstrumentor().instrument(
        meter_provider=recorded.meters, tracer_provider=recorded.tracers, trace_items=True
    )
    try:
        yield recorded
    finally:
        CorralInstrumentor().uninstrument()


@pytest.fixture
def metrics_only() -> Iterator[Telemetry]:
    recorded = Telemetry()
    CorralInstrumentor().instrument(meter_provider=recorded.meters)
    try:
        yield recorded
    finally:
        CorralInstrumentor().uninstrument()


async def flaky(x: int) -> int:
    """Fails once for x % 5 == 1, always for x % 5 == 3."""
    await anyio.lowlevel.checkpoint()
    if x % 5 == 3 or (x % 5 == 1 and x not in flaky.seen):  # type: ignore[attr-defined]
        flaky.seen.add(x)  # type: ignore[attr-defined]
        raise ValueError(x)
    return x


@pytest.fixture(autouse=True)
def _fresh_flaky() -> None:
    flaky.seen = set()  # type: ignore[attr-defined]


RETRY = corral.Retry(attempts=2, on=ValueError, wait_initial=0, wait_max=0, wait_jitter=False)


# ------------------------------------------------------------------- metrics


@pytest.mark.anyio
async def test_a_helper_reports_items_by_outcome_retries_and_attempts(
    metrics_only: Telemetry,
) -> None:
    outcomes = await corral.apply_to_all(flaky, range(20), workers=4, retry=RETRY, name="fetch")
    failed = sum(1 for outcome in outcomes if not outcome.ok)
    attempts = sum(outcome.attempts for outcome in outcomes)
    assert (failed, attempts) == (4, 28)  # 4 fail twice; 4 succeed at the second attempt
    pool = {"corral_kind": "pool", "corral_name": "fetch"}
    assert metrics_only.value("corral.items", corral_outcome="ok", **pool) == 16
    assert (
        metrics_only.value("corral.items", corral_outcome="failed", error_type="ValueError", **pool)
        == 4
    )
    assert metrics_only.value("corral.retries", **pool) == 8
    durations = {
        found.get("error.type"): value[0]
        for found, value in metrics_only.points("corral.attempt.duration")
    }
    assert durations == {None: 16, "ValueError": 12}  # every call of the handler


@pytest.mark.anyio
async def test_an_unnamed_pool_and_its_unfinished_items(metrics_only: Telemetry) -> None:
    started = anyio.Event()

    async def stuck(x: int) -> None:
        started.set()
        await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        async with corral.Pool(stuck, workers=2) as pool:
            for item in range(5):
                await pool.submit(item)
            await started.wait()
            scope.cancel()
    assert len(pool.unfinished) == 5
    assert metrics_only.points("corral.items") == [
        ({"corral.kind": "pool", "corral.outcome": "unfinished"}, 5)
    ]


@pytest.mark.anyio
async def test_queued_and_running_are_observed_while_the_pool_runs(
    metrics_only: Telemetry,
) -> None:
    release, three_running = anyio.Event(), anyio.Event()
    running = 0

    async def held(x: int) -> None:
        nonlocal running
        running += 1
        if running == 3:
            three_running.set()
        await release.wait()

    async with corral.Pool(held, workers=3, max_pending=10, name="held") as pool:
        for item in range(8):
            await pool.submit(item)
        await three_running.wait()
        assert metrics_only.value("corral.items.queued", corral_name="held") == 5
        assert metrics_only.value("corral.items.running", corral_name="held") == 3
        release.set()
    # an exited block is no longer observed
    assert metrics_only.points("corral.items.queued") == []
    assert metrics_only.value("corral.items", corral_outcome="ok") == 8


@pytest.mark.anyio
async def test_a_batcher_reports_flushes_batch_sizes_and_items(metrics_only: Telemetry) -> None:
    attempts = 0

    async def save(batch: list[int]) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 2:
            raise OSError("disk hiccup")

    async with corral.Batcher(
        save,
        max_size=4,
        max_wait=None,
        name="rows",
        retry=corral.Retry(attempts=2, on=OSError, wait_initial=0, wait_max=0, wait_jitter=False),
    ) as batcher:
        await batcher.add_many(range(10))
    assert batcher.stats.flushed == 10
    rows = {"corral_kind": "batcher", "corral_name": "rows"}
    assert metrics_only.value("corral.items", corral_outcome="ok", **rows) == 10
    assert (
        metrics_only.value("corral.flushes", corral_outcome="ok", **rows) == batcher.stats.flushes
    )
    count, total = metrics_only.value("corral.batch.size", **rows)
    assert (count, total) == (batcher.stats.flushes, 10)
    assert metrics_only.value("corral.retries", **rows) == 1
    assert metrics_only.value("corral.attempt.duration", error_type="OSError", **rows)[0] == 1


@pytest.mark.anyio
async def test_a_batcher_failed_and_unflushed_items(metrics_only: Telemetry) -> None:
    async def refuse(batch: list[int]) -> None:
        raise PermissionError("read-only")

    async def submit(batcher: corral.Batcher[int, Any], item: int) -> None:
        with pytest.raises(PermissionError):
            await batcher.submit(item)

    batcher = corral.Batcher(
        refuse, max_size=10, max_wait=0.01, max_consecutive_failures=2, name="ro"
    )
    with pytest.raises(corral.FlushError):
        async with batcher, anyio.create_task_group() as tg:
            tg.start_soon(submit, batcher, 1)
            tg.start_soon(submit, batcher, 2)
            tg.start_soon(batcher.add, 3)
    assert (batcher.stats.failed, batcher.unflushed) == (2, [3])
    ro = {"corral_name": "ro"}
    failed = metrics_only.value(
        "corral.items", corral_outcome="failed", error_type="PermissionError", **ro
    )
    assert failed == 2
    assert metrics_only.value("corral.items", corral_outcome="unfinished", **ro) == 1
    assert metrics_only.value("corral.flushes", corral_outcome="failed", **ro) == 2


# --------------------------------------------------------------------- spans


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


@pytest.mark.anyio
async def test_an_item_span_is_a_child_of_its_submitter_with_attempts_under_it(
    telemetry: Telemetry,
) -> None:
    tracer = telemetry.tracers.get_tracer("test")
    inner_parents = []

    async def handle(x: int) -> int:
        with tracer.start_as_current_span("handler work") as span:
            inner_parents.append(span.parent)
        return await flaky(x)

    async with corral.Pool(handle, workers=2, retry=RETRY, name="api") as pool:
        with tracer.start_as_current_span("submitter") as submitter:
            jobs = [await pool.submit(item) for item in range(5)]
    assert [job.outcome.ok for job in jobs if job.outcome] == [True, True, True, False, True]
    spans = telemetry.spans()
    items = by_name(spans, "corral item api")
    attempts = by_name(spans, "corral attempt api")
    assert (len(items), len(attempts)) == (5, 7)  # item 1 twice, item 3 twice
    submitter_id = submitter.get_span_context().span_id
    assert {span.parent.span_id for span in items if span.parent} == {submitter_id}
    assert len({span.context.trace_id for span in spans}) == 1  # one trace
    item_ids = {span.context.span_id for span in items}
    assert {span.parent.span_id for span in attempts if span.parent} == item_ids
    attempt_ids = {span.context.span_id for span in attempts}
    assert {parent.span_id for parent in inner_parents} <= attempt_ids
    for span in items:
        assert span.events[0].name == "started"
        assert span.start_time is not None
        assert span.start_time <= span.events[0].timestamp  # it waited from its submit
    failed = [span for span in items if span.attributes["corral.outcome"] == "failed"]
    assert len(failed) == 1
    assert failed[0].status.status_code == trace.StatusCode.ERROR
    assert failed[0].attributes["error.type"] == "ValueError"
    assert failed[0].attributes["corral.attempts"] == 2


@pytest.mark.anyio
async def test_helpers_items_are_children_of_the_callers_span(telemetry: Telemetry) -> None:
    tracer = telemetry.tracers.get_tracer("test")
    with tracer.start_as_current_span("job") as job:
        await corral.apply_to_all(flaky, [0, 2, 4], workers=2)
    items = by_name(telemetry.spans(), "corral item")
    assert len(items) == 3
    assert {span.parent.span_id for span in items if span.parent} == {
        job.get_span_context().span_id
    }


@pytest.mark.anyio
async def test_a_batcher_traces_each_flush(telemetry: Telemetry) -> None:
    async with corral.Batcher(
        lambda batch: anyio.lowlevel.checkpoint(), max_size=3, name="w"
    ) as batcher:
        await batcher.add_many(range(7))
    flushes = by_name(telemetry.spans(), "corral flush w")
    assert sorted(span.attributes["corral.batch.size"] for span in flushes) == [1, 3, 3]


@pytest.mark.anyio
async def test_an_unfinished_item_span_says_so(telemetry: Telemetry) -> None:
    async def stuck(x: int) -> None:
        await anyio.sleep_forever()

    with anyio.move_on_after(0.05):
        async with corral.Pool(stuck) as pool:
            await pool.submit(1)
    assert pool.unfinished == [1]
    (item,) = by_name(telemetry.spans(), "corral item")
    assert item.attributes["corral.outcome"] == "unfinished"


# ----------------------------------------------------- instrument, uninstrument


@pytest.mark.anyio
async def test_uninstrumented_blocks_report_nothing_and_get_no_probe() -> None:
    recorded = Telemetry()
    instrumentor = CorralInstrumentor()
    instrumentor.instrument(meter_provider=recorded.meters)
    instrumentor.uninstrument()
    assert not instrumentor.is_instrumented_by_opentelemetry
    assert _telemetry.installed() is None
    async with corral.Pool(flaky) as pool:
        await pool.submit(0)
        assert pool._run.probe is None
    await corral.apply_to_all(flaky, range(5))
    async with corral.Batcher(lambda batch: anyio.lowlevel.checkpoint()) as batcher:
        await batcher.add(1)
        assert batcher._run.probe is None
    assert recorded.points("corral.items") == []


@pytest.mark.anyio
async def test_a_block_running_at_uninstrument_reports_until_it_exits(
    metrics_only: Telemetry,
) -> None:
    async with corral.Pool(flaky, name="late") as pool:
        CorralInstrumentor().uninstrument()
        await pool.submit(0)
    assert metrics_only.value("corral.items", corral_name="late") == 1


def test_the_instrumentor_is_one_per_process_and_warns_when_instrumented_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert CorralInstrumentor() is CorralInstrumentor()
    recorded = Telemetry()
    instrumentor = CorralInstrumentor()
    try:
        instrumentor.instrument(meter_provider=recorded.meters)
        assert instrumentor.is_instrumented_by_opentelemetry
        with caplog.at_level(logging.WARNING, logger="corral.otel"):
            instrumentor.instrument(meter_provider=Telemetry().meters)
        assert "already instrumented" in caplog.text
    finally:
        instrumentor.uninstrument()
    instrumentor.uninstrument()  # not instrumented: nothing to do
    assert list(instrumentor.instrumentation_dependencies()) == []


def test_trace_items_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="trace_items"):
        CorralInstrumentor().instrument(trace_items="yes")  # type: ignore[arg-type]
    assert not CorralInstrumentor().is_instrumented_by_opentelemetry


def test_the_auto_instrumentation_finds_the_instrumentor() -> None:
    from importlib.metadata import entry_points

    found = entry_points(group="opentelemetry_instrumentor", name="corral")
    assert [entry.load() for entry in found] == [CorralInstrumentor]


# -------------------------------------------------------------- a /metrics page


@pytest.mark.anyio
async def test_a_prometheus_metrics_page_shows_a_20_item_run() -> None:
    """The metrics through the Prometheus exporter, on a real /metrics page
    served over HTTP and scraped, as Prometheus would."""
    exporter = pytest.importorskip("opentelemetry.exporter.prometheus")
    prometheus_client = pytest.importorskip("prometheus_client")
    import urllib.request

    registry = prometheus_client.CollectorRegistry()
    reader = exporter.PrometheusMetricReader(registry=registry)
    server, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        CorralInstrumentor().instrument(meter_provider=MeterProvider(metric_readers=[reader]))
        await corral.apply_to_all(flaky, range(20), workers=4, retry=RETRY, name="fetch")
        url = f"http://127.0.0.1:{server.server_port}/metrics"

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=10) as page:
                return str(page.read().decode())

        page = await anyio.to_thread.run_sync(scrape)
    finally:
        CorralInstrumentor().uninstrument()
        server.shutdown()
        server.server_close()
        thread.join()
    samples = parse_prometheus(page)

    def sample(metric: str, **labels: str) -> float:
        """The value of the sample with exactly these labels (besides the scope's
        and those the exporter sets empty for a point without them)."""
        (value,) = [
            value
            for name, found, value in samples
            if name == metric
            and {k: v for k, v in found.items() if v and not k.startswith("otel_")} == labels
        ]
        return value

    fetch = {"corral_kind": "pool", "corral_name": "fetch"}
    assert sample("corral_items_total", corral_outcome="ok", **fetch) == 16
    failed = sample("corral_items_total", corral_outcome="failed", error_type="ValueError", **fetch)
    assert failed == 4
    assert sample("corral_retries_total", **fetch) == 8
    assert sample("corral_attempt_duration_seconds_count", **fetch) == 16
    assert sample("corral_attempt_duration_seconds_count", error_type="ValueError", **fetch) == 12


def parse_prometheus(page: str) -> list[tuple[str, dict[str, str], float]]:
    """(metric, labels, value) of each sample of a Prometheus text page."""
    samples = []
    for line in page.splitlines():
        found = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if found is not None and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', found.group(2) or ""))
            samples.append((found.group(1), labels, float(found.group(3))))
    return samples


# ------------------------------------------------------ what a review found


@pytest.mark.anyio
async def test_instrumenting_again_on_the_same_provider_still_observes_the_queue() -> None:
    """A meter keeps the instruments first made under a name: instrumenting
    again with the same provider must find them, not make new ones whose
    callbacks the meter ignores."""
    recorded = Telemetry()
    instrumentor = CorralInstrumentor()
    release = anyio.Event()

    async def held(x: int) -> None:
        await release.wait()

    for _ in range(2):
        instrumentor.instrument(meter_provider=recorded.meters)
        release = anyio.Event()

        async with corral.Pool(held, workers=1, name="again") as pool:
            for item in range(4):
                await pool.submit(item)
            await wait_until(lambda: pool.stats.running == 1)
            assert recorded.value("corral.items.queued", corral_name="again") == 3
            release.set()
        instrumentor.uninstrument()


async def wait_until(condition: Any) -> None:
    """Let the pool's tasks run until ``condition()`` (they need no time)."""
    for _ in range(100):
        if condition():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("never")


@pytest.mark.anyio
async def test_a_batcher_item_taken_back_from_a_cancelled_caller_counts_once(
    metrics_only: Telemetry,
) -> None:
    """A failed flush hands a submit item back; its caller is cancelled
    before it sees the error, so the batcher takes the item back and a later
    flush writes it: one ok, no failure."""
    calls = 0
    caller = anyio.CancelScope()

    async def flaky_save(batch: list[int]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            caller.cancel()  # the caller is cancelled before it sees the error
            raise OSError("once")

    async def submit() -> None:
        with caller:
            await batcher.submit(1)

    async with (
        corral.Batcher(flaky_save, max_size=1, max_wait=None, name="back") as batcher,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(submit)
    assert (batcher.stats.failed, batcher.stats.flushed) == (0, 1)
    assert metrics_only.points("corral.items") == [
        ({"corral.kind": "batcher", "corral.name": "back", "corral.outcome": "ok"}, 1)
    ]


@pytest.mark.anyio
async def test_a_batcher_job_cancelled_while_queued_counts_as_failed(
    metrics_only: Telemetry,
) -> None:
    async with corral.Batcher(lambda batch: anyio.lowlevel.checkpoint(), max_wait=60) as batcher:
        job = batcher.submit_nowait(1)
        batcher.submit_nowait(2)
        assert job.cancel()
    assert metrics_only.value("corral.items", corral_outcome="ok") == 1
    failed = metrics_only.value("corral.items", error_type="JobCancelled")
    assert failed == batcher.stats.cancelled == 1


@pytest.mark.anyio
async def test_a_batcher_counts_retries_per_flush(metrics_only: Telemetry) -> None:
    """A flush that never reaches its attempt (middleware answered it) does
    not hide a later flush's retry."""
    calls = 0

    class Cache:
        async def __call__(self, batch: list[int], call_next: Any) -> None:
            if batch == [0]:
                return  # already written: no attempt
            await call_next(batch)

    async def save(batch: list[int]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("once")

    retry = corral.Retry(attempts=2, on=OSError, wait_initial=0, wait_max=0, wait_jitter=False)
    async with corral.Batcher(
        save, max_size=1, max_wait=None, retry=retry, middleware=[Cache()]
    ) as batcher:
        await batcher.add(0)
        await batcher.flush()
        await batcher.add(1)
    assert metrics_only.value("corral.retries") == 1


@pytest.mark.anyio
async def test_cancelled_jobs_and_unfinished_items_get_spans_and_leave_nothing_behind(
    telemetry: Telemetry,
) -> None:
    """Every submitted item gets one span, however it ends, and the probe
    keeps nothing of them after the block."""
    release, started = anyio.Event(), anyio.Event()
    began: list[int] = []

    async def held(x: int) -> None:
        began.append(x)
        started.set()
        await release.wait()

    with anyio.CancelScope() as scope:
        async with corral.Pool(held, workers=1, name="c") as pool:
            running = await pool.submit(0)
            queued = [await pool.submit(item) for item in range(1, 6)]
            await started.wait()
            probe = pool._run.probe
            assert all(job.cancel() for job in queued[:3])
            assert running.cancel()
            await wait_until(lambda: 4 in began)
            scope.cancel()
    assert len(pool.unfinished) == 2
    items = by_name(telemetry.spans(), "corral item c")
    outcomes = sorted(
        (span.attributes["corral.outcome"], span.attributes.get("error.type")) for span in items
    )
    assert outcomes == [("failed", "JobCancelled")] * 4 + [("unfinished", None)] * 2
    assert probe is not None
    assert (probe._submitted, probe._spans) == ({}, {})  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_a_stray_cancellation_is_a_failed_item_in_spans_and_durations(
    telemetry: Telemetry, backend_name: str
) -> None:
    if backend_name != "asyncio":
        pytest.skip("only asyncio lets user code raise a bare cancellation")
    import asyncio

    async def stray(x: int) -> None:
        raise asyncio.CancelledError

    async with corral.Pool(stray, name="s") as pool:
        await pool.submit(1)
    (item,) = by_name(telemetry.spans(), "corral item s")
    assert item.attributes["corral.outcome"] == "failed"
    assert item.attributes["error.type"] == "RuntimeError"
    assert telemetry.value("corral.attempt.duration", error_type="CancelledError")[0] == 1


@pytest.mark.anyio
async def test_retries_of_unfinished_items_are_counted(metrics_only: Telemetry) -> None:
    retried = anyio.Event()
    calls = 0

    async def fail_then_hang(x: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("once")
        retried.set()
        await anyio.sleep_forever()

    retry = corral.Retry(attempts=2, on=OSError, wait_initial=0, wait_max=0, wait_jitter=False)
    with anyio.CancelScope() as scope:
        async with corral.Pool(fail_then_hang, retry=retry) as pool:
            await pool.submit(1)
            await retried.wait()
            scope.cancel()
    assert pool.stats.retried == 1
    assert metrics_only.value("corral.retries") == 1
    assert metrics_only.value("corral.items", corral_outcome="unfinished") == 1


@pytest.mark.anyio
async def test_a_block_whose_entry_fails_is_not_watched(
    metrics_only: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry that fails before its task group exists leaves no probe
    behind (it would count the block's queue twice on its next entry)."""
    from corral._observe import Observer

    def broken(self: Any, snapshot: Any, label: str) -> None:
        raise RuntimeError("no terminal")

    pool = corral.Pool(flaky, on_stats=lambda stats: None)
    with monkeypatch.context() as patched:
        patched.setattr(Observer, "open", broken)
        with pytest.raises(RuntimeError, match="no terminal"):
            async with pool:
                pass
    instruments = CorralInstrumentor()._installed.instruments  # type: ignore[union-attr]
    assert instruments._probes == set()
