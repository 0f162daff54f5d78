"""AdaptiveRate: a rate limiter that learns the server's limit from throttling.

A :class:`TokenBucket` in quota mode whose rate moves as the AWS SDKs'
"adaptive" retry mode moves it (a CUBIC-style bucket): a throttling error
lowers it to a fraction of what the server was seen to accept, and from there
it grows again along a cubic curve, flat near the rate that was throttled and
steeper beyond, so that it probes for more capacity slowly and comes back
quickly.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from types import TracebackType
from typing import TypeVar

import anyio
import attrs

from ._errors import CircuitOpen
from ._limits import TokenBucket, _slack
from ._retry import ExceptionFilter, check_on, matches, read_retry_after, retry_after_of
from ._validate import check_number

__all__ = ["AdaptiveRate", "AdaptiveRateStatistics"]

T = TypeVar("T")
R = TypeVar("R")

_BETA = 0.9  # a throttle lowers the rate to this share of what the server accepted
_RECOVER = 10.0  # seconds the cubic takes to climb back to the throttled rate
_C = (1 - _BETA) / _RECOVER**3  # the cubic's scale, relative to the throttled rate
_PROBE = 2.0  # beyond the throttled rate the curve takes this many times longer
_UPDATE = 0.05  # seconds between two readings of the curve
_CLUMP = 1.0  # throttles of attempts admitted this soon after a decrease count once
_THROTTLING = frozenset({429, 503})


def status_of(error: Exception) -> object:
    """The HTTP status an error carries, duck-typed: ``error.response.status_code``
    (httpx, requests), ``error.status`` (aiohttp), ``error.status_code``."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None) if response is not None else None
    if status is None:
        status = getattr(error, "status", None)
    if status is None:
        status = getattr(error, "status_code", None)
    return status


@attrs.frozen
class AdaptiveRateStatistics:
    """A snapshot of an :class:`AdaptiveRate`."""

    rate: float  #: admissions per second it paces at now
    min: float
    max: float
    throttles: int  #: throttling errors seen
    decreases: int  #: times they lowered the rate (one per clump)
    paused: bool  #: a Retry-After holds every admission now
    waiting: int  #: tasks in line for admission


class AdaptiveRate(TokenBucket):
    """A ``rate_limit=`` for when the quota is unknown or wrong.

    Starts at ``initial`` admissions per second, paced like a
    :class:`SlidingWindow` (2% under the rate, never more than it in any
    second). When an attempt it admitted
    fails with a throttling error (HTTP 429 or 503, any error carrying a
    Retry-After, or one that ``on`` matches) the rate drops to 90% of what the
    server accepted in the last second (90% of the rate if it accepted
    nothing), then climbs back along a cubic curve: 10 s to return to the
    throttled level, flat near it, then faster beyond it, probing for more.
    Before the first throttle it probes up from ``initial`` the same way. It
    never climbs above twice what the server accepted in the last second (as
    the AWS SDKs cap it), so a limiter that is idle, or that the pool's
    workers keep from its rate, does not grow for nothing. Only answers count
    as accepted: a timeout or a dropped connection teaches it nothing.
    Throttles from attempts admitted before the last decrease, or in the
    second after it (while the server's window drains), are one clump: they
    count once. The rate stays within ``[min, max]``.

    Pools tell it about every attempt it admits; one object can be shared by
    several pools, which then share what it learns (and, like every limiter,
    a Retry-After's pause). Outside a pool, call :meth:`throttled` when the
    server says slow down. :attr:`rate` and :meth:`statistics` say where it is.

    >>> limiter = AdaptiveRate(100, min=5, max=1000)
    """

    def __init__(
        self,
        initial: float,
        *,
        min: float | None = None,
        max: float | None = None,
        on: ExceptionFilter | None = None,
    ) -> None:
        initial = check_number("initial", initial, positive=True)
        low = check_number("min", min, positive=True) if min is not None else initial / 100
        high = (
            check_number("max", max, positive=True, finite=False) if max is not None else math.inf
        )
        if not low <= initial <= high:
            raise ValueError(f"wanted min <= initial <= max, got {low!r}, {initial!r}, {high!r}")
        if on is not None:
            check_on(on)
        super().__init__(initial)
        self.min: float = low
        self.max: float = high
        self.on: ExceptionFilter | None = on
        self._peak = initial  # the rate the curve returns to (the last throttled level)
        self._since: float | None = None  # when the curve started (the first admission)
        self._climb = 0.0  # seconds from the curve's start to its flat point
        self._next_reading = -math.inf
        self._accepted: deque[float] = deque()  # when attempts ended unthrottled, last 1 s
        self._decreased_at = -math.inf
        self._throttles = self._decreases = 0
        # paced as a SlidingWindow is: a server is listening
        self._set_slack(_slack(self.per), initial, margin=_slack(self.per))

    def __repr__(self) -> str:
        return f"AdaptiveRate(rate={self.rate:.6g}, min={self.min:.6g}, max={self.max:.6g})"

    def statistics(self) -> AdaptiveRateStatistics:
        """Where it stands now (a frozen snapshot)."""
        return AdaptiveRateStatistics(
            rate=self.rate,
            min=self.min,
            max=self.max,
            throttles=self._throttles,
            decreases=self._decreases,
            paused=self._paused_until > _now_or_never(),
            waiting=self.waiting,
        )

    def is_throttle(self, error: Exception) -> bool:
        """Whether ``error`` says the server throttled: ``on`` matches it, its
        HTTP status is 429 or 503, or it carries a Retry-After."""
        if self.on is not None and matches(self.on, error):
            return True
        return status_of(error) in _THROTTLING or retry_after_of(error) is not None

    def throttled(self) -> None:
        """The server said slow down to an attempt admitted just now: lower the
        rate (for calls made outside a pool; pools report on their own)."""
        now = anyio.current_time()
        self._throttle(now, now)

    # -- the curve ---------------------------------------------------------

    def _ready_at(self, cost: int, now: float) -> float:
        if now >= self._next_reading:
            self._read_curve(now)
        return super()._ready_at(cost, now)

    def _read_curve(self, now: float) -> None:
        self._next_reading = now + _UPDATE
        if self._since is None:
            self._since = now
        elapsed = now - self._since - self._climb
        scale = _C if elapsed < 0 else _C / _PROBE**3  # probing beyond it: slower
        rate = self._peak * (1 + scale * elapsed**3)
        # never above twice what the server took in the last second (as AWS
        # caps it): an idle or worker-bound limiter does not grow for nothing
        rate = min(rate, max(self.rate, 2 * self._accepted_in_last_second(now)))
        self._set_rate(max(self.min, min(self.max, rate)))

    def _accepted_in_last_second(self, now: float) -> int:
        accepted = self._accepted
        while accepted and accepted[0] <= now - 1.0:
            accepted.popleft()
        return len(accepted)

    def _set_rate(self, rate: float) -> None:
        if rate == self.rate:
            return
        if self._spent:  # carry on from where the schedule stands
            self._anchor += self._spent * self._interval
            self._spent = 0
        self.rate = rate
        self._set_slack(_slack(self.per), rate, margin=_slack(self.per))

    def _throttle(self, admitted_at: float, now: float) -> None:
        self._throttles += 1
        if admitted_at < self._decreased_at + _CLUMP:
            return  # sent before the last decrease had time to show: the same clump
        seen = self._accepted_in_last_second(now) or self.rate  # what the server took
        self._peak = max(self.min, min(self.max, min(seen, self.rate)))
        self._since, self._climb = now, _RECOVER
        self._decreased_at = now
        self._decreases += 1
        self._read_curve(now)

    # -- what the pool's rate-limit layer reports ----------------------------

    async def __call__(self, item: T, call_next: Callable[[T], Awaitable[R]]) -> R:
        """As :class:`Middleware`: admit one unit, run the rest of the chain, and
        learn from how it ended (in ``middleware=[...]`` it sees each item once,
        outside ``retry``: only an item's final error teaches it)."""
        admitted_at = anyio.current_time()
        if not self._admit_at(1, admitted_at):
            await self.acquire()
            admitted_at = anyio.current_time()
        try:
            result = await call_next(item)
        except Exception as error:
            self._ended(admitted_at, error, read_retry_after(error))
            raise
        self._ended(admitted_at, None, None)
        return result

    async def __aenter__(self) -> None:
        """``async with rate:`` acquires one unit, and the limiter learns from
        how the block ends (an ``Exception`` leaving it is the attempt's
        error), as it does in ``middleware=[...]``."""
        await super().__aenter__()
        _entered.set((*_entered.get(), (self, anyio.current_time())))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        admitted_at = _leave(self)
        if exc is None:
            self._ended(admitted_at, None, None)
        elif isinstance(exc, Exception):
            self._ended(admitted_at, exc, read_retry_after(exc))

    def _ended(
        self, admitted_at: float, error: Exception | None, retry_after: float | None
    ) -> None:
        if isinstance(error, CircuitOpen):
            return  # our own breaker refused the call: the server saw nothing
        now = anyio.current_time()
        if error is None or (retry_after is None and not self.is_throttle(error)):
            if error is not None and status_of(error) is None:
                return  # a timeout or a dropped connection: the server took nothing
            accepted = self._accepted
            accepted.append(now)
            while accepted[0] <= now - 1.0:
                accepted.popleft()
            return
        self._throttle(admitted_at, now)
        self._failed(error, retry_after)


# the ``async with rate:`` blocks this task is in: (rate, when admitted), innermost last
_entered: ContextVar[tuple[tuple[AdaptiveRate, float], ...]] = ContextVar(
    "corral_rates_entered", default=()
)


def _leave(rate: AdaptiveRate) -> float:
    """Leave the innermost block of ``rate``: when it was admitted."""
    entered = _entered.get()
    for at in range(len(entered) - 1, -1, -1):
        if entered[at][0] is rate:
            _entered.set(entered[:at] + entered[at + 1 :])
            return entered[at][1]
    return anyio.current_time()  # not entered in this task: as if just now


def _now_or_never() -> float:
    try:
        return anyio.current_time()
    except RuntimeError:  # no event loop: a pause cannot be running
        return math.inf
