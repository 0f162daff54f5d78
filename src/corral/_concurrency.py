"""AdaptiveLimiter: a concurrency limit that finds the service's capacity.

A capacity limiter (like :class:`anyio.CapacityLimiter`) whose number of
slots moves with what the attempts it admits see. It learns in windows: a
window gathers the latencies of the attempts that end in it and, once it
holds enough of them and lasted one mean latency, the algorithm moves the
limit from the window's mean latency and a baseline (the latency of the
service when nothing queues). Drops (attempts that failed with an overload
error) lower the limit at once, multiplicatively, and once per generation:
drops of attempts that started before the last decrease are the same overload
seen late.

Now and then the limiter probes its baseline: it halves its limit for one
window, so that whatever queued at the service drains, and takes that window's
latency as the new baseline. A slow start, or a service that became slower or
faster for good, does not stay in the baseline.
"""

from __future__ import annotations

import builtins
import logging
import math
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal, NamedTuple, TypeVar

import anyio
import attrs
from anyio.lowlevel import cancel_shielded_checkpoint, checkpoint_if_cancelled

from ._retry import ExceptionFilter, check_on, matches
from ._slots import Slots
from ._threads import Holds, holds_of_attempt
from ._validate import check_int

__all__ = ["AdaptiveLimiter", "AdaptiveLimiterStatistics", "limit_of"]

T = TypeVar("T")
R = TypeVar("R")
Call = Callable[[Any], Awaitable[Any]]
Algorithm = Literal["vegas", "gradient2"]


class Latency(NamedTuple):
    """A window's latency: its mean, and its mean less two standard errors
    (the true mean is surely above)."""

    mean: float
    low: float


_log = logging.getLogger("corral.limits")

_BACKOFF = 0.9  # a drop multiplies the limit by this (AIMD's decrease)
_MIN_SAMPLES = 8  # a window closes after at least this many latencies ...
_WINDOW_SHARE = 0.5  # ... and at least this share of the limit
_INITIAL = 10  # the limit to start from, unless given (within min and max)
_MOST = 10**9  # the largest limit that can be asked for
_PROBE_EVERY = 100  # windows between two probes of the baseline latency
_FIRST_PROBE = 8  # the first probe comes after this many windows
_PROBE_SAMPLES = 32  # a probe's window holds at least this many latencies
_CALM = 8  # vegas grows fast only this many windows after the last drop
_LONG_WINDOWS = 20  # gradient2: the long-term latency averages this many windows
_TOLERANCE = 1.5  # gradient2: latency this many times the long-term one is fine
_SMOOTHING = 0.2  # gradient2: a window moves the limit this share of the way


@attrs.frozen
class AdaptiveLimiterStatistics:
    """A snapshot of an :class:`AdaptiveLimiter`."""

    limit: int  #: slots now
    min: int
    max: int
    in_flight: int  #: attempts holding a slot
    waiting: int  #: tasks in line for a slot
    drops: int  #: attempts that failed with an ``on`` error
    decreases: int  #: times drops lowered the limit
    latency: float | None  #: mean latency of the last window's successes, seconds
    baseline: float | None  #: the latency when nothing queues, as last measured
    algorithm: str


def _vegas(limit: float, latency: Latency, baseline: float, busy: bool, calm: bool) -> float:
    """TCP Vegas, as Netflix's concurrency-limits has it: estimate how many
    attempts wait at the service (``limit * (1 - baseline / latency)``) and keep
    that between 3 and 6 times ``log10(limit)`` (at most 15% and 30% of the
    limit). It lowers the limit only when the latency is above that with
    confidence (its mean less two standard errors), so that a noisy service
    time does not pull it down."""
    step = max(1.0, math.log10(limit))
    # the bounds on how many wait, at most 15% and 30% of the limit (a service
    # that takes 4 at once is not asked to queue 6 more)
    low, high = min(3 * step, 0.15 * limit), min(6 * step, 0.3 * limit)
    surely_queued = _queued(limit, latency.low, baseline)
    if surely_queued > high:  # too many wait: give back half of the excess
        return limit - max(step, (surely_queued - high) / 2)
    queued = _queued(limit, latency.mean, baseline)
    if not busy:
        return limit
    if queued <= low / 3:
        return limit + min(limit, 6 * step if calm else step)  # at most double
    if queued < low:
        return limit + min(limit, step)
    return limit


def _queued(limit: float, latency: float, baseline: float) -> float:
    """How many of ``limit`` attempts wait, if the service takes ``baseline``
    of their ``latency`` (none when the latency is not above it: a clock too
    coarse for a fast service reads both as 0)."""
    return limit * (1 - baseline / latency) if latency > baseline else 0.0


class _Gradient2:
    """Netflix's Gradient2: the limit follows the ratio of the long-term latency
    (an average over about ``_LONG_WINDOWS`` windows) to the last window's,
    tolerating ``_TOLERANCE`` times the long-term, plus ``sqrt(limit)`` of
    room for queueing; smoothed."""

    __slots__ = ("long",)

    def __init__(self) -> None:
        self.long: float | None = None

    def __call__(
        self, limit: float, measured: Latency, baseline: float, busy: bool, calm: bool
    ) -> float:
        latency = measured.mean
        long = self.long = self._average(latency)
        if long > 2 * latency:  # back from a long overload: let it follow faster
            long = self.long = long * 0.95
        if not busy:
            return limit
        gradient = max(0.5, min(1.0, _TOLERANCE * long / latency)) if latency > 0 else 1.0
        target = limit * gradient + math.sqrt(limit)
        return limit * (1 - _SMOOTHING) + target * _SMOOTHING

    def _average(self, latency: float) -> float:
        if self.long is None:
            return latency
        return self.long + (latency - self.long) * 2 / (_LONG_WINDOWS + 1)

    def rebase(self, baseline: float) -> None:
        self.long = baseline


class AdaptiveLimiter:
    """A ``limiter=`` whose limit finds the service's capacity by itself.

    Holds a slot per attempt, like :class:`anyio.CapacityLimiter` (so no slot
    is held during a retry's backoff), and can be shared by several pools. It
    measures every attempt's latency and moves its limit between ``min`` and
    ``max``, from ``initial`` (10 unless given, within them):

    - ``algorithm="vegas"`` (the default): it estimates how many attempts wait
      at the service from the latency against its baseline, and keeps a few
      waiting (between 3 and 6 times ``log10(limit)``, at most 30% of the
      limit): enough to keep the service busy, few enough that latency stays
      near the baseline. ``"gradient2"``: the limit follows the ratio of the
      long-term latency to the recent one, tolerating 1.5 times it (latency
      runs higher).
    - A *drop* (an attempt that fails with an error ``on`` matches: exception
      types or a predicate, as in :class:`Retry`; by default a
      :class:`TimeoutError`, which is what ``timeout=`` raises) multiplies the
      limit by 0.9, once per generation: drops of attempts that started
      before that decrease do not lower it again, so a burst of correlated
      errors costs one step. Each round of retries that fails again lowers
      it again; once attempts succeed, it doubles per window back to half
      the limit it had before the first of those drops.
    - It does not grow while fewer than half its slots are in use (it is not
      the bottleneck then), and every 100 windows it halves its limit for one
      window to measure the service's latency unloaded again.

    Other errors and cancelled attempts teach it nothing; neither does an
    attempt for which ``on`` raised (logged). :attr:`limit` and
    :meth:`statistics` say where it is; a change of the limit is logged at
    DEBUG on the ``corral.limits`` logger. Outside a pool, ``async with
    limiter:`` holds a slot for the block and learns from how it ends.

    >>> limiter = AdaptiveLimiter(10, min=2, max=200, on=(TimeoutError, ConnectionError))
    >>> limiter.limit
    10
    """

    def __init__(
        self,
        initial: int | None = None,
        *,
        min: int = 1,
        max: int = 1000,
        on: ExceptionFilter = (TimeoutError,),
        algorithm: Algorithm = "vegas",
    ) -> None:
        low, high = _check_limit("min", min), _check_limit("max", max)
        if low > high:
            raise ValueError(f"min must be at most max, got min={low!r}, max={high!r}")
        if initial is None:
            initial = builtins.max(low, builtins.min(high, _INITIAL))
        initial = _check_limit("initial", initial)
        if not low <= initial <= high:
            raise ValueError(
                f"initial must be within min and max, got {initial!r} (min={low!r}, max={high!r})"
            )
        check_on(on)
        if algorithm not in ("vegas", "gradient2"):
            raise ValueError(f"algorithm must be 'vegas' or 'gradient2', got {algorithm!r}")
        self._min, self._max, self._on, self._algorithm = low, high, on, algorithm
        self._update: Callable[[float, Latency, float, bool, bool], float] = (
            _vegas if algorithm == "vegas" else _Gradient2()
        )
        self._slots = Slots(initial)
        self._estimate = float(initial)
        self._learning = _Learning()
        self._starts: dict[int, tuple[float, int]] = {}  # ``async with`` blocks, per task

    def __repr__(self) -> str:
        return (
            f"AdaptiveLimiter(limit={self.limit}, min={self.min}, max={self.max}, "
            f"algorithm={self.algorithm!r})"
        )

    @property
    def limit(self) -> int:
        """How many attempts may hold a slot at once, now."""
        return self._slots.capacity

    @property
    def min(self) -> int:
        """The lowest the limit goes."""
        return self._min

    @property
    def max(self) -> int:
        """The highest the limit goes."""
        return self._max

    @property
    def on(self) -> ExceptionFilter:
        """What makes a failed attempt a drop."""
        return self._on

    @property
    def algorithm(self) -> Algorithm:
        """``"vegas"`` or ``"gradient2"``."""
        return self._algorithm

    def statistics(self) -> AdaptiveLimiterStatistics:
        """Where it stands now (a frozen snapshot)."""
        slots, learning = self._slots, self._learning
        return AdaptiveLimiterStatistics(
            limit=slots.capacity,
            min=self.min,
            max=self.max,
            in_flight=slots.used,
            waiting=len(slots.waiters),
            drops=learning.drops,
            decreases=learning.decreases,
            latency=learning.latency,
            baseline=learning.baseline,
            algorithm=self.algorithm,
        )

    # -- holding a slot ------------------------------------------------------

    async def __aenter__(self) -> None:
        """Wait for a slot (first come, first served) and hold it for the block.

        :raises RuntimeError: this task holds a slot of it already from an
            ``async with`` (as :class:`anyio.CapacityLimiter` does: waiting
            would deadlock once the limit comes down to 1). A pool's attempt
            is not recorded so: a handler must not enter its own pool's
            limiter.
        """
        task = anyio.get_current_task().id
        if task in self._starts:
            raise RuntimeError("this task already holds a slot of this AdaptiveLimiter")
        await checkpoint_if_cancelled()
        if self._slots.take_nowait():
            try:
                await cancel_shielded_checkpoint()
            except BaseException:  # pragma: no cover - a shielded checkpoint
                self._slots.release()
                raise
        else:
            await self._slots.take()
        self._starts[task] = (anyio.current_time(), self._learning.generation)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Give the slot back, learning from how the block ended."""
        started, generation = self._starts.pop(anyio.get_current_task().id)
        try:
            if exc is None or isinstance(exc, Exception):
                now = anyio.current_time()
                self._learn(started, generation, exc, now, self._slots.used)
        finally:
            self._slots.release()

    def _layer(self, call_next: Call, clock: Callable[[], float], threaded: bool) -> Call:
        """The pool's limiter layer: a slot per attempt, and what it taught."""
        if threaded:
            return self._layer_for_thread(call_next, clock)
        slots, learn, learning = self._slots, self._learn, self._learning
        take_nowait, take, release = slots.take_nowait, slots.take, slots.release

        async def adaptive_limited(item: Any) -> Any:
            if not take_nowait():
                await take()
            started, generation = clock(), learning.generation
            try:
                result = await call_next(item)
            except Exception as error:
                try:
                    learn(started, generation, error, clock(), slots.used)
                finally:
                    release()
                raise
            except BaseException:
                release()
                raise
            try:
                learn(started, generation, None, clock(), slots.used)
            finally:
                release()
            return result

        return adaptive_limited

    def _layer_for_thread(self, call_next: Call, clock: Callable[[], float]) -> Call:
        """As :meth:`_layer`, the slot held until the attempt's thread ends (a
        timeout may leave it running), as a capacity limiter's token is."""
        slots, learn, learning = self._slots, self._learn, self._learning

        def in_flight(holds: Holds) -> int:
            # the thread may have ended and given this attempt's slot back
            return slots.used + (not holds.releases)

        async def adaptive_limited_thread(item: Any) -> Any:
            if not slots.take_nowait():
                await slots.take()
            started, generation = clock(), learning.generation
            holds = Holds()
            holds.releases.append(slots.release)
            token = holds_of_attempt.set(holds)
            try:
                result = await call_next(item)
            except Exception as error:
                learn(started, generation, error, clock(), in_flight(holds))
                raise
            else:
                learn(started, generation, None, clock(), in_flight(holds))
                return result
            finally:
                holds_of_attempt.reset(token)
                if not holds.taken:
                    holds.release()

        return adaptive_limited_thread

    # -- learning --------------------------------------------------------------

    def _learn(
        self,
        started: float,
        generation: int,
        error: BaseException | None,
        now: float,
        in_flight: int,
    ) -> None:
        """An attempt that held a slot since ``started`` ended (with ``error``),
        ``in_flight`` counting it; ``generation``: the limiter's when it started."""
        learning = self._learning
        if now < learning.last:
            self._restart(now)  # another event loop's clock: start a window on it
        learning.last = now
        if error is not None:
            if self._is_drop(error):
                learning.drops += 1
                if generation == learning.generation:  # not one of the same overload
                    self._drop(now, started)
            return
        window = learning.window
        if generation != learning.generation or now < window.opened:
            return  # it started before a drop, or ended while a probe drains
        latency = now - started
        window.count += 1
        window.total += latency
        window.squares += latency * latency
        if in_flight > window.busiest:
            window.busiest = in_flight
        if window.count >= window.needed and now >= window.closes_at:
            self._close_window(now)

    def _is_drop(self, error: BaseException) -> bool:
        if not isinstance(error, Exception):
            return False
        try:
            return matches(self.on, error)
        except Exception:  # noqa: BLE001 - a user bug, logged: the attempt still ends
            _log.exception("AdaptiveLimiter's on=%r raised: not a drop", self.on)
            return False

    def _drop(self, now: float, started: float) -> None:
        learning = self._learning
        learning.generation += 1
        estimate = self._estimate
        if learning.probing and started < learning.probed_at:
            estimate = learning.saved  # the load before the probe said so
        if learning.calm > 0:  # the first of a run of drops (a window closed since)
            learning.recover_to = estimate / 2
        learning.ceiling = estimate
        learning.starting = False
        learning.calm = 0
        learning.probing = False
        limit = self.limit
        self._set(estimate * _BACKOFF, "a drop")
        learning.decreases += self.limit < limit
        learning.high = self._estimate
        learning.open(now, self._estimate)

    def _restart(self, now: float) -> None:
        learning = self._learning
        if learning.probing:
            learning.probing = False
            self._set(learning.saved, "a new clock")
        learning.open(now, self._estimate)

    def _close_window(self, now: float) -> None:
        learning = self._learning
        measured = learning.window.measured()
        learning.latency = measured.mean
        if learning.probing:
            learning.probing = False
            self._rebase(measured.mean)
            self._set(learning.saved, "probed")
        else:
            if learning.baseline is None:
                self._rebase(measured.mean)
            estimate = self._clamp(self._next_estimate(measured))
            learning.windows += 1
            learning.calm += 1
            if estimate < learning.high / 2 or learning.windows % _PROBE_EVERY == _FIRST_PROBE:
                self._probe(now, estimate)
                return
            self._set(estimate, "latency")
        learning.open(now, self._estimate)

    def _probe(self, now: float, estimate: float) -> None:
        """Halve the limit for a window, to measure the latency unloaded: the
        window opens once what queued at the higher limit had time to end."""
        learning = self._learning
        learning.probing, learning.saved, learning.probed_at = True, estimate, now
        self._set(estimate / 2, "probing the baseline")
        learning.open(now, self._estimate, delay=learning.latency or 0.0)
        learning.window.needed = builtins.max(learning.window.needed, _PROBE_SAMPLES)

    def _next_estimate(self, measured: Latency) -> float:
        """What the window that ``measured`` makes of the limit."""
        learning, estimate = self._learning, self._estimate
        baseline = learning.baseline
        assert baseline is not None
        busiest = learning.window.busiest
        busy = 2 * busiest >= estimate  # not while half its slots are idle
        if learning.starting and estimate >= self.max:
            learning.starting = False
        fast = learning.starting or estimate < learning.recover_to
        if fast and busy and measured.mean <= baseline * 1.1:
            # slow start (from the start, or back from many drops in a row up
            # to half the limit before them): double until latency moves,
            # never beyond what is used
            most = 2 * busiest if learning.starting else learning.recover_to
            return builtins.min(2 * estimate, most)
        learning.starting = False
        learning.recover_to = 0.0
        new = self._update(estimate, measured, baseline, busy, learning.calm >= _CALM)
        near = abs(estimate - learning.ceiling) <= 0.1 * learning.ceiling * (1 + 1e-9)
        if new > estimate and near:
            new = estimate + (new - estimate) / 8  # near the last drop: carefully
        if new >= estimate:
            learning.high = new  # where a run of lowerings for latency starts
        return new

    def _rebase(self, latency: float) -> None:
        self._learning.baseline = latency
        if isinstance(self._update, _Gradient2):
            self._update.rebase(latency)

    def _clamp(self, estimate: float) -> float:
        return builtins.max(self.min, builtins.min(self.max, estimate))

    def _set(self, estimate: float, why: str) -> None:
        estimate = self._estimate = self._clamp(estimate)
        slots = self._slots
        limit = int(estimate)
        if limit == slots.capacity:
            return
        learning = self._learning
        _log.debug(
            "adaptive limit %d -> %d (%s; latency %s s, baseline %s s)",
            slots.capacity,
            limit,
            why,
            _seconds(learning.latency),
            _seconds(learning.baseline),
        )
        slots.resize(limit)


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.3g}"


def _check_limit(name: str, value: object) -> int:
    value = check_int(name, value, minimum=1)
    if value > _MOST:
        raise ValueError(f"{name} must be at most {_MOST}, got {value!r}")
    return value


def limit_of(limiter: object) -> int | None:
    """An :class:`AdaptiveLimiter`'s limit now; None for another limiter."""
    return limiter.limit if isinstance(limiter, AdaptiveLimiter) else None


class _Window:
    """The latencies of the attempts that end in one window."""

    __slots__ = ("busiest", "closes_at", "count", "needed", "opened", "squares", "total")

    def __init__(self, opened: float, closes_at: float, needed: int) -> None:
        self.opened = opened  # latencies of attempts ending from then on count
        self.closes_at = closes_at  # it lasts until then at least
        self.needed = needed  # and holds at least this many latencies
        self.count = 0
        self.total = self.squares = 0.0  # their sum, and of their squares
        self.busiest = 0  # the most slots in use when one of them ended

    def measured(self) -> Latency:
        """Its latency."""
        mean = self.total / self.count
        spread = max(0.0, self.squares / self.count - mean * mean)
        return Latency(mean, mean - 2 * math.sqrt(spread / self.count))


class _Learning:
    """What an :class:`AdaptiveLimiter` has seen: the open window, the
    baseline, its drops."""

    __slots__ = (
        "baseline",
        "calm",
        "ceiling",
        "decreases",
        "drops",
        "generation",
        "high",
        "last",
        "latency",
        "probed_at",
        "probing",
        "recover_to",
        "saved",
        "starting",
        "window",
        "windows",
    )

    def __init__(self) -> None:
        self.window = _Window(-math.inf, -math.inf, _MIN_SAMPLES)
        self.windows = 0  # windows closed
        self.latency: float | None = None  # the last window's mean
        self.baseline: float | None = None
        self.starting = True  # slow start: the limit doubles per window
        self.probing = False  # this window measures the baseline at half the limit
        self.saved = 0.0  # the limit to go back to after the probe
        self.probed_at = -math.inf  # when the probe began
        self.high = 0.0  # the limit before windows in a row lowered it for latency
        self.calm = _CALM  # windows since the last drop
        self.recover_to = 0.0  # after drops, slow start again up to this limit
        self.ceiling = 0.0  # the limit when the last drop came
        self.generation = 0  # drops decided: attempts started since are news
        self.last = -math.inf  # the clock when an attempt last ended
        self.drops = self.decreases = 0

    def open(self, now: float, estimate: float, delay: float = 0.0) -> None:
        """Open the next window, ``delay`` seconds from ``now``."""
        opened = now + delay
        # a window lasts a mean latency; two while the limit doubles, so that
        # the attempts the last doubling let in are in it
        doubling = self.starting or estimate < self.recover_to
        closes_at = opened + (self.latency or 0.0) * (2 if doubling else 1)
        needed = max(_MIN_SAMPLES, math.ceil(estimate * _WINDOW_SHARE))
        self.window = _Window(opened, closes_at, needed)
