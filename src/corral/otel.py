"""OpenTelemetry metrics (and, optionally, traces) of every Pool, Batcher and helper.

Install the extra (``pip install 'corral[otel]'``: ``opentelemetry-api`` only;
the application brings the SDK and its exporters) and instrument once, as
with any ``opentelemetry-instrumentation-*`` package::

    from corral.otel import CorralInstrumentor

    CorralInstrumentor().instrument()  # the global providers, or:
    CorralInstrumentor().instrument(meter_provider=provider, tracer_provider=tracers,
                                    trace_items=True)

Every block entered afterwards reports (instruments of the meter ``corral``;
the table in the docs' Observability page has each one's unit and attributes):
``corral.items`` (a counter of items by ``corral.outcome``: ``ok``, ``failed``
with ``error.type``, ``unfinished``), ``corral.retries``, ``corral.flushes``,
the histograms ``corral.attempt.duration`` (seconds) and
``corral.batch.size``, and the observed up-down counters
``corral.items.queued`` and ``corral.items.running``.

Each carries ``corral.kind`` (``pool`` or ``batcher``) and, for a named block,
``corral.name``. With ``trace_items=True`` every item of a pool gets a span
(``corral item``) that starts when it was submitted, as a child of the
submitter's span, with an event when a worker takes it and a child span per
attempt; a batcher gets a span per flush. The handler runs in its item's span,
so its own spans (an HTTP call) are children of the attempt.

Blocks entered before :meth:`~CorralInstrumentor.instrument` or after
:meth:`~CorralInstrumentor.uninstrument` report nothing and pay nothing.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable
from typing import Any

from ._extras import install_hint

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
except ImportError:  # pragma: no cover - the test environment has the extra
    raise ModuleNotFoundError(
        f"corral.otel needs opentelemetry-api: {install_hint('otel')}"
    ) from None

from . import _telemetry
from ._outcome import Outcome
from ._telemetry import Call

__all__ = ["CorralInstrumentor"]

_SCOPE = "corral"
_log = logging.getLogger("corral.otel")
# seconds: from a fast in-memory call to a slow remote one (as HTTP's semantic
# conventions advise for request durations)
_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

Attributes = dict[str, str]


class CorralInstrumentor:
    """Instruments corral for OpenTelemetry, as the ``opentelemetry-instrumentation-*``
    packages do: one instance per process (``CorralInstrumentor()`` always
    returns it), :meth:`instrument` and :meth:`uninstrument`.
    """

    _instance: CorralInstrumentor | None = None
    _instruments: _Instruments | None = None

    def __new__(cls) -> CorralInstrumentor:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    @property
    def is_instrumented_by_opentelemetry(self) -> bool:
        """Whether :meth:`instrument` is in effect."""
        return self._instruments is not None

    def instrumentation_dependencies(self) -> Collection[str]:
        """What must be installed besides corral itself: nothing."""
        return ()

    def instrument(
        self,
        *,
        meter_provider: metrics.MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        trace_items: bool = False,
        **kwargs: Any,
    ) -> None:
        """Report every Pool, Batcher and helper entered from now on.

        :param meter_provider: where the metrics go (default: the global one).
        :param tracer_provider: where the spans go (default: the global one).
        :param trace_items: a span per item of a pool and per flush of a
            batcher (off by default: a span per item is many spans).

        Instrumenting again while instrumented does nothing (a warning is
        logged), as with every OpenTelemetry instrumentor.
        """
        del kwargs  # what the auto-instrumentation passes to every instrumentor
        if not isinstance(trace_items, bool):
            raise TypeError(f"trace_items must be True or False, got {trace_items!r}")
        if self._instruments is not None:
            _log.warning("Attempting to instrument while already instrumented")
            return
        from . import __version__

        meter = metrics.get_meter(_SCOPE, __version__, meter_provider=meter_provider)
        tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider=tracer_provider)
        self._instruments = _Instruments(meter, tracer if trace_items else None)
        _telemetry.install(self._instruments)

    def uninstrument(self, **kwargs: Any) -> None:
        """Blocks entered from now on report nothing; those running report
        until they exit."""
        del kwargs
        if self._instruments is None:
            return
        _telemetry.install(None)
        self._instruments = None


class _Instruments:
    """The instruments of one :meth:`CorralInstrumentor.instrument`, and the
    blocks they watch (for the observed gauges)."""

    def __init__(self, meter: metrics.Meter, tracer: trace.Tracer | None) -> None:
        self.tracer = tracer
        self.items = meter.create_counter(
            "corral.items", "{item}", "Items that got an outcome, or none, by outcome"
        )
        self.retries = meter.create_counter(
            "corral.retries", "{attempt}", "Attempts after an item's or a flush's first"
        )
        self.flushes = meter.create_counter(
            "corral.flushes", "{flush}", "A batcher's flushes (after retries), by outcome"
        )
        self.duration = meter.create_histogram(
            "corral.attempt.duration",
            "s",
            "Duration of each call of a handler or a flush (its timeout included)",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.batch_size = meter.create_histogram(
            "corral.batch.size",
            "{item}",
            "Items per flush of a batcher",
            explicit_bucket_boundaries_advisory=_SIZE_BUCKETS,
        )
        self._lock = threading.Lock()  # exporters observe from their own threads
        self._probes: set[_Probe] = set()
        meter.create_observable_up_down_counter(
            "corral.items.queued", [self._observe_queued], "{item}", "Items waiting"
        )
        meter.create_observable_up_down_counter(
            "corral.items.running", [self._observe_running], "{item}", "Items being handled"
        )

    def probe(self, block: Any, kind: str, clock: Callable[[], float]) -> _Probe:
        probe = _Probe(self, block, kind, clock)
        with self._lock:
            self._probes.add(probe)
        return probe

    def forget(self, probe: _Probe) -> None:
        with self._lock:
            self._probes.discard(probe)

    def _observe_queued(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return self._observe(0)

    def _observe_running(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return self._observe(1)

    def _observe(self, which: int) -> list[metrics.Observation]:
        """Queued (0) or running (1) items, summed over the blocks of one name."""
        with self._lock:
            probes = list(self._probes)
        totals: dict[tuple[str, str | None], int] = {}
        for probe in probes:
            counts = probe.load()
            if counts is not None:
                key = (probe.kind, probe.name)
                totals[key] = totals.get(key, 0) + counts[which]
        return [
            metrics.Observation(value, _attributes(kind, name))
            for (kind, name), value in totals.items()
        ]


def _attributes(kind: str, name: str | None) -> Attributes:
    return {"corral.kind": kind} if name is None else {"corral.kind": kind, "corral.name": name}


class _Probe:
    """One entry into one block: what the engine calls (see ``_telemetry.Probe``)."""

    def __init__(
        self, instruments: _Instruments, block: Any, kind: str, clock: Callable[[], float]
    ) -> None:
        self._instruments = instruments
        self._block = weakref.ref(block)
        self.kind, self.name = kind, block.name
        self._clock = clock
        self._tracer = instruments.tracer
        self.traced = self._tracer is not None
        self._attributes = _attributes(kind, self.name)
        self._ok = {**self._attributes, "corral.outcome": "ok"}
        self._errors: dict[type[BaseException], Attributes] = {}
        self._failures: dict[type[BaseException], Attributes] = {}
        label = f" {self.name}" if self.name else ""
        self._item_name, self._attempt_name = f"corral item{label}", f"corral attempt{label}"
        self._flush_name = f"corral flush{label}"
        # a batcher's retries: attempts beyond one per flush call
        self._calls = self._attempts = self._retries = 0

    # ------------------------------------------------------------ attributes

    def _error(self, error: BaseException) -> Attributes:
        """The block's attributes and ``error.type``."""
        cls = type(error)
        attributes = self._errors.get(cls)
        if attributes is None:
            attributes = self._errors[cls] = {**self._attributes, "error.type": cls.__qualname__}
        return attributes

    def _failure(self, error: BaseException) -> Attributes:
        """``_error`` with ``corral.outcome`` failed."""
        cls = type(error)
        attributes = self._failures.get(cls)
        if attributes is None:
            attributes = {**self._error(error), "corral.outcome": "failed"}
            self._failures[cls] = attributes
        return attributes

    # ---------------------------------------------------------------- gauges

    def load(self) -> tuple[int, int] | None:
        """(queued, running) now, or None once the block is gone."""
        block = self._block()
        if block is None:
            return None
        stats = block.stats
        running = stats.running if self.kind == "pool" else stats.flushing
        return max(stats.queued, 0), max(running, 0)

    # ---------------------------------------------------------------- layers

    def attempt(self, call_next: Call) -> Call:
        record, clock = self._instruments.duration.record, self._clock
        attributes = self._attributes

        async def timed(item: Any) -> Any:
            self._attempts += 1
            start = clock()
            try:
                result = await call_next(item)
            except Exception as error:
                record(clock() - start, self._error(error))
                raise
            record(clock() - start, attributes)
            return result

        if self._tracer is None:
            return timed
        tracer, name = self._tracer, self._attempt_name

        async def traced(item: Any) -> Any:
            with tracer.start_as_current_span(name, attributes=attributes):
                return await timed(item)

        return traced

    def flush(self, call_next: Call) -> Call:
        instruments = self._instruments
        attributes = self._attributes

        async def flushed(items: list[Any]) -> Any:
            self._calls += 1
            size = len(items)
            instruments.batch_size.record(size, attributes)
            try:
                result = await call_next(items)
            except Exception as error:
                instruments.flushes.add(1, self._failure(error))
                raise
            finally:
                self._count_retries()
            instruments.flushes.add(1, self._ok)
            instruments.items.add(size, self._ok)
            return result

        if self._tracer is None:
            return flushed
        tracer, name = self._tracer, self._flush_name

        async def traced(items: list[Any]) -> Any:
            span_attributes: dict[str, str | int] = {**attributes, "corral.batch.size": len(items)}
            with tracer.start_as_current_span(name, attributes=span_attributes):
                return await flushed(items)

        return traced

    def _count_retries(self) -> None:
        retries = self._attempts - self._calls  # each call's first attempt is no retry
        if retries > self._retries:
            self._instruments.retries.add(retries - self._retries, self._attributes)
            self._retries = retries

    # ------------------------------------------------------------- outcomes

    def outcome(self, outcome: Outcome[Any, Any]) -> None:
        items = self._instruments.items
        error = outcome.error
        items.add(1, self._ok if error is None else self._failure(error))
        if outcome.attempts > 1:
            self._instruments.retries.add(outcome.attempts - 1, self._attributes)

    def failed(self, count: int, error: Exception) -> None:
        if count:
            self._instruments.items.add(count, self._failure(error))

    def ended(self, unfinished: int) -> None:
        if unfinished:
            attributes = {**self._attributes, "corral.outcome": "unfinished"}
            self._instruments.items.add(unfinished, attributes)
        self._instruments.forget(self)

    # ----------------------------------------------------------------- spans

    def submitted(self) -> object:
        return otel_context.get_current(), time.time_ns()

    def item(
        self, call_next: Call, submitter: Callable[[], object | None], attempts: list[float]
    ) -> Call:
        """Each item in a span of its own, in which its attempts run."""
        assert self._tracer is not None
        tracer, name, attributes = self._tracer, self._item_name, self._attributes

        async def traced(item: Any) -> Any:
            carried = submitter()
            parent, start = carried if isinstance(carried, tuple) else (None, None)
            span = tracer.start_span(name, parent, attributes=attributes, start_time=start)
            if start is not None:
                span.add_event("started")  # by a worker: the time before it is the wait
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            try:
                result = await call_next(item)
            except Exception as error:
                _end_item(span, int(attempts[0]), error)
                raise
            except BaseException:
                _end_item(span, int(attempts[0]), None, "unfinished")
                raise
            finally:
                otel_context.detach(token)
            _end_item(span, int(attempts[0]), None)
            return result

        return traced


def _end_item(
    span: trace.Span, attempts: int, error: Exception | None, outcome: str = "ok"
) -> None:
    """An item's span ends with how its calls ended."""
    span.set_attribute("corral.attempts", attempts)
    if error is not None:
        outcome = "failed"
        span.set_attribute("error.type", type(error).__qualname__)
        span.record_exception(error)
        span.set_status(trace.StatusCode.ERROR, f"{type(error).__qualname__}: {error}")
    span.set_attribute("corral.outcome", outcome)
    span.end()
