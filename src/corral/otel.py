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
:meth:`~CorralInstrumentor.uninstrument` report nothing; their per-item
path is the uninstrumented one (one test per ``submit`` is left).
"""

from __future__ import annotations

import contextvars
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
    _installed: _Instrumentation | None = None

    def __new__(cls) -> CorralInstrumentor:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    @property
    def is_instrumented_by_opentelemetry(self) -> bool:
        """Whether :meth:`instrument` is in effect."""
        return self._installed is not None

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
        if self._installed is not None:
            _log.warning("Attempting to instrument while already instrumented")
            return
        from . import __version__

        meter = metrics.get_meter(_SCOPE, __version__, meter_provider=meter_provider)
        tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider=tracer_provider)
        self._installed = _Instrumentation(_instruments_of(meter), tracer if trace_items else None)
        _telemetry.install(self._installed)

    def uninstrument(self, **kwargs: Any) -> None:
        """Blocks entered from now on report nothing; those running report
        until they exit."""
        del kwargs
        if self._installed is None:
            return
        _telemetry.install(None)
        self._installed = None


class _Instruments:
    """The instruments of one meter, made once: a meter keeps the instruments
    first made under a name (an observed one keeps its first callbacks), so
    instrumenting again with the same provider must find these."""

    def __init__(self, meter: metrics.Meter) -> None:
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
        self._probes: set[_Probe] = set()  # the running blocks reporting here
        meter.create_observable_up_down_counter(
            "corral.items.queued", [self._observe_queued], "{item}", "Items waiting"
        )
        meter.create_observable_up_down_counter(
            "corral.items.running", [self._observe_running], "{item}", "Items being handled"
        )

    def watch(self, probe: _Probe) -> None:
        with self._lock:
            self._probes.add(probe)

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


_meters_lock = threading.Lock()
_meters: dict[int, tuple[metrics.Meter, _Instruments]] = {}  # by id(meter), kept alive


def _instruments_of(meter: metrics.Meter) -> _Instruments:
    with _meters_lock:
        found = _meters.get(id(meter))
        if found is None:
            found = _meters[id(meter)] = (meter, _Instruments(meter))
        return found[1]


class _Instrumentation:
    """What one :meth:`CorralInstrumentor.instrument` installs in the engine."""

    def __init__(self, instruments: _Instruments, tracer: trace.Tracer | None) -> None:
        self.instruments, self.tracer = instruments, tracer

    def probe(self, block: Any, kind: str, clock: Callable[[], float]) -> _Probe:
        probe = _Probe(self.instruments, self.tracer, block, kind, clock)
        self.instruments.watch(probe)
        return probe


def _attributes(kind: str, name: str | None) -> Attributes:
    return {"corral.kind": kind} if name is None else {"corral.kind": kind, "corral.name": name}


# the attempts of the flush call running in this task (see _Probe.flush)
_flush_attempts: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "corral_flush_attempts", default=None
)


class _Probe:
    """One entry into one block: what the engine calls (see ``_telemetry.Probe``)."""

    def __init__(
        self,
        instruments: _Instruments,
        tracer: trace.Tracer | None,
        block: Any,
        kind: str,
        clock: Callable[[], float],
    ) -> None:
        self._instruments, self._tracer = instruments, tracer
        self._block = weakref.ref(block)
        self.kind, self.name = kind, block.name
        self._clock = clock
        self.traced = tracer is not None
        self._attributes = _attributes(kind, self.name)
        self._ok = {**self._attributes, "corral.outcome": "ok"}
        self._errors: dict[type[BaseException], Attributes] = {}
        self._failures: dict[type[BaseException], Attributes] = {}
        label = f" {self.name}" if self.name else ""
        self._item_name, self._attempt_name = f"corral item{label}", f"corral attempt{label}"
        self._flush_name = f"corral flush{label}"
        # a pool's retries: counted per outcome; those of items left without
        # one at the end (the pool's count, from this entry on, tells)
        self._retried_before = block.stats.retried if kind == "pool" else 0
        self._retries = 0
        # a traced pool's items: their submitter's (context, time) until a worker
        # takes them, then their span until their outcome
        self._submitted: dict[int, tuple[otel_context.Context, int]] = {}
        self._spans: dict[int, trace.Span] = {}

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
            attempts = _flush_attempts.get()
            if attempts is not None:
                attempts[0] += 1
            start = clock()
            try:
                result = await call_next(item)
            except BaseException as error:  # (timed, and re-raised)
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
            size = len(items)
            instruments.batch_size.record(size, attributes)
            attempts = [0]
            token = _flush_attempts.set(attempts)
            try:
                result = await call_next(items)
            except Exception as error:
                instruments.flushes.add(1, self._failure(error))
                raise
            finally:
                _flush_attempts.reset(token)
                if attempts[0] > 1:
                    instruments.retries.add(attempts[0] - 1, attributes)
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

    # ------------------------------------------------------------- outcomes

    def outcome(self, outcome: Outcome[Any, Any]) -> None:
        error = outcome.error
        self._instruments.items.add(1, self._ok if error is None else self._failure(error))
        if outcome.attempts > 1:
            self._retries += outcome.attempts - 1
            self._instruments.retries.add(outcome.attempts - 1, self._attributes)
        if self.traced:
            self._end_span(outcome.index, outcome.attempts, error)

    def failed(self, count: int, error: Exception) -> None:
        if count:
            self._instruments.items.add(count, self._failure(error))

    def ended(self, unfinished: int) -> None:
        if unfinished:
            attributes = {**self._attributes, "corral.outcome": "unfinished"}
            self._instruments.items.add(unfinished, attributes)
        block = self._block()
        if self.kind == "pool" and block is not None:
            # extra calls of items that got no outcome
            left = block.stats.retried - self._retried_before - self._retries
            if left > 0:
                self._retries += left
                self._instruments.retries.add(left, self._attributes)
        for index in list(self._spans) + list(self._submitted):
            self._end_span(index, None, None)
        self._instruments.forget(self)

    # ----------------------------------------------------------------- spans

    def submitted(self, index: int) -> None:
        self._submitted[index] = (otel_context.get_current(), time.time_ns())

    def item(self, call_next: Call, index_of: Callable[[], int]) -> Call:
        """Each item in a span of its own, in which its attempts run; the span
        ends with the item's outcome (:meth:`outcome`), or unfinished (:meth:`ended`)."""
        assert self._tracer is not None
        tracer, name, attributes = self._tracer, self._item_name, self._attributes

        async def traced(item: Any) -> Any:
            index = index_of()
            parent, start = self._submitted.pop(index, (None, None))
            span = tracer.start_span(name, parent, attributes=attributes, start_time=start)
            if start is not None:
                span.add_event("started")  # by a worker: the time before it is the wait
            self._spans[index] = span
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            try:
                return await call_next(item)
            finally:
                otel_context.detach(token)

        return traced

    def _end_span(self, index: int, attempts: int | None, error: Exception | None) -> None:
        """End the span of item ``index`` with its outcome (``attempts`` None:
        unfinished); an item that never started gets one from its submit."""
        span = self._spans.pop(index, None)
        if span is None:
            submitted = self._submitted.pop(index, None)
            if submitted is None or self._tracer is None:
                return  # not traced (a helper's item that never started)
            parent, start = submitted
            span = self._tracer.start_span(
                self._item_name, parent, attributes=self._attributes, start_time=start
            )
        _end_item(span, attempts, error)


def _end_item(span: trace.Span, attempts: int | None, error: Exception | None) -> None:
    """An item's span ends with its outcome (``attempts`` None: it had none)."""
    if attempts is None:
        span.set_attribute("corral.outcome", "unfinished")
        span.end()
        return
    span.set_attribute("corral.attempts", attempts)
    if error is None:
        span.set_attribute("corral.outcome", "ok")
    else:
        span.set_attributes({"corral.outcome": "failed", "error.type": type(error).__qualname__})
        span.record_exception(error)
        span.set_status(trace.StatusCode.ERROR, f"{type(error).__qualname__}: {error}")
    span.end()
