"""Rate limiters: SlidingWindow (exact count per window) and TokenBucket (GCRA).

Both serve waiters strictly first come, first served, and keep one timer: only
the waiter at the head of the line sleeps (until the moment it can be
admitted); the others wait on an event until they reach the head. Nothing is
held while sleeping, and a waiter that is cancelled leaves the line having
consumed nothing. An admission happens when ``acquire`` returns in the
admitted task, at the time read just before it returns.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

import anyio
from anyio.lowlevel import checkpoint

from ._errors import CircuitOpen
from ._retry import read_retry_after
from ._validate import check_int, check_number

__all__ = ["SlidingWindow", "TokenBucket"]

T = TypeVar("T")
R = TypeVar("R")

_log = logging.getLogger("corral.limits")

_TICK = 0.001  # how long to wait again when a timer fired before its deadline


def log_pause(seconds: float) -> None:
    """Say that a limiter pauses for a server's Retry-After (at WARNING from a
    minute up: every worker sharing it stands still that long)."""
    level = logging.WARNING if seconds >= 60 else logging.DEBUG
    _log.log(level, "a Retry-After pauses the rate limiter for %.3g s", seconds)


def check_cost(cost: int, capacity: int, limiter: object, named: str = "") -> None:
    """Refuse a ``cost`` that is not a positive int, or more than ``limiter``
    can ever admit at once (``capacity``, the parameter ``named`` if given)."""
    if cost != 1:  # the common case needs no checking
        check_int("cost", cost, minimum=1)
        if cost > capacity:
            most = f"{named} ({capacity})" if named else str(capacity)
            raise ValueError(
                f"cost must be <= {most} for {limiter!r}, got {cost!r}: it could never be admitted"
            )


class _Waiter:
    __slots__ = ("cost", "event")

    def __init__(self, cost: int) -> None:
        self.cost = cost
        self.event: anyio.Event | None = None  # made only if it has to wait in line


class _FairLimiter:
    """The waiting line; subclasses say when ``cost`` fits and record admissions."""

    _capacity: int

    def __init__(self) -> None:
        self._waiters: deque[_Waiter] = deque()
        self._paused_until = -math.inf  # nothing is admitted before this time

    def pause(self, seconds: float) -> None:
        """Admit nothing for ``seconds`` from now, as a server's ``Retry-After``
        asks: every waiter, in every pool that shares this limiter, waits.

        A pause that already lasts longer stays. Pools call it for you when an
        attempt fails with an error that carries a Retry-After. Not a
        checkpoint; needs a running event loop (it reads its clock).

        :raises ValueError: ``seconds`` is negative, NaN or infinite.
        :raises TypeError: ``seconds`` is not a number.
        """
        seconds = check_number("seconds", seconds)
        self._pause_until(anyio.current_time() + seconds)

    def _pause_until(self, until: float) -> None:
        if until > self._paused_until:
            self._paused_until = until

    def _failed(self, error: Exception, retry_after: float | None) -> None:
        """An attempt this limiter admitted failed with ``error``, whose
        Retry-After (seconds, if it had one) was ``retry_after``."""
        if isinstance(error, CircuitOpen):
            return  # our own breaker refused the call: the server said nothing
        if retry_after and math.isfinite(retry_after):  # never a pause for good
            log_pause(retry_after)
            self._pause_until(anyio.current_time() + retry_after)

    def _ready_at(self, cost: int, now: float) -> float:
        """The earliest time at which ``cost`` could be admitted (<= now: at once)."""
        raise NotImplementedError

    def _admit(self, cost: int, now: float) -> None:
        raise NotImplementedError

    def acquire_nowait(self, cost: int = 1) -> None:
        """Admit ``cost`` units now if that needs no waiting, else raise.

        Never waits and is not a checkpoint. Nobody may be waiting: while a
        task is in line it raises (first come, first served).

        :raises anyio.WouldBlock: admission would have to wait; nothing consumed.
        :raises ValueError: ``cost`` is below 1, or more than the limiter can
            ever admit at once.
        :raises TypeError: ``cost`` is not an int.
        """
        self._check_cost(cost)
        if not self._admit_at(cost, anyio.current_time()):
            raise anyio.WouldBlock

    def _admit_at(self, cost: int, now: float) -> bool:
        """Admit ``cost`` units at ``now`` (read with the clock
        :func:`anyio.current_time` reads) if nobody waits and they fit: True if
        admitted. The middleware calls it with the clock it holds, sparing a
        clock lookup and an exception per attempt."""
        if not self._waiters and self._paused_until <= now and self._ready_at(cost, now) <= now:
            self._admit(cost, now)
            return True
        return False

    def _check_cost(self, cost: int) -> None:
        check_cost(cost, self._capacity, self)

    async def acquire(self, cost: int = 1) -> None:
        """Wait for admission of ``cost`` units, first come, first served.

        The caller takes its place in line when it calls, before its first
        checkpoint, so callers are admitted in the order they called. Always a
        checkpoint. Cancel-safe: if it raises, nothing was consumed and the
        place in line is given up; if it returns, the admission happened.

        :raises ValueError: ``cost`` is below 1, or more than the limiter can
            ever admit at once (raised at once, before any waiting).
        :raises TypeError: ``cost`` is not an int.
        """
        self._check_cost(cost)
        waiters = self._waiters
        waiter = _Waiter(cost)
        waiters.append(waiter)
        try:
            if waiters[0] is waiter:
                await checkpoint()
            else:
                waiter.event = anyio.Event()
                await waiter.event.wait()  # set when we reach the head of the line
            woke_early = False
            while True:  # the head of the line is the limiter's only timer
                now = anyio.current_time()
                ready_at = max(self._ready_at(cost, now), self._paused_until)
                if ready_at <= now:
                    break
                if woke_early:
                    # A coarse clock (uvloop's moves in whole milliseconds) or a
                    # timer that fires a hair early: wait a tick instead of
                    # spinning until the clock catches up.
                    ready_at = max(ready_at, now + _TICK)
                # a hair late: sleep_until adds the time left to a clock
                # reading, and the rounding could wake it a hair early
                await anyio.sleep_until(ready_at + abs(ready_at) * 4e-16 + 1e-12)
                woke_early = True
        except BaseException:
            was_head = waiters[0] is waiter
            waiters.remove(waiter)
            if was_head:
                self._wake_head()
            raise
        waiters.popleft()
        self._admit(cost, now)
        self._wake_head()

    def _wake_head(self) -> None:
        # Whoever is now first joined behind someone, so it made an event.
        if self._waiters:
            event = self._waiters[0].event
            assert event is not None
            event.set()

    async def __call__(self, item: T, call_next: Callable[[T], Awaitable[R]]) -> R:
        """As :class:`Middleware`: admit one unit, then run the rest of the chain.

        In ``middleware=[...]`` a limiter sees each item once (outside
        ``retry``); as ``rate_limit=`` it sees every attempt.
        """
        try:
            self.acquire_nowait()
        except anyio.WouldBlock:
            await self.acquire()
        try:
            return await call_next(item)
        except Exception as error:
            self._failed(error, read_retry_after(error))
            raise

    async def __aenter__(self) -> None:
        """``async with limiter:`` acquires one unit (as :meth:`acquire`, so
        it waits its turn and is cancel-safe) and releases nothing on exit: a
        rate is spent, not held. An ``Exception`` leaving the block that
        carries a Retry-After pauses the limiter, as in a pool.

        >>> import anyio, corral
        >>> async def main():
        ...     bucket = corral.TokenBucket(10)
        ...     async with bucket:
        ...         return "admitted"
        >>> anyio.run(main)
        'admitted'
        """
        await self.acquire()  # cancel-safe: a cancelled entry consumed nothing

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, Exception):
            self._failed(exc, read_retry_after(exc))

    @property
    def waiting(self) -> int:
        """How many tasks are in line for admission (the one sleeping at the
        head of the line included)."""
        return len(self._waiters)


def _slack(per: float) -> float:
    """The slack of a limiter spelled as a quota: late wake-ups up to this many
    seconds behind are caught up, and the same time is added to each period,
    so that no ``per`` seconds hold more than the quota however late the
    admissions came, and a request delivered up to this much later than its
    neighbour still fits the server's window. 1% of ``per``, at most 10 ms:
    measured against a real server on loopback, 5 ms of slack still drew a
    429 now and then, 10 ms none."""
    return min(0.01, per / 100)


class SlidingWindow(_FairLimiter):
    """Never more than ``limit`` admissions in any window of ``per`` seconds,
    spread evenly over the window.

    Exact: for any two admissions less than ``per`` seconds apart, they and
    everything admitted between them number at most ``limit``. Under load the
    admissions are paced, one every ``(per + 2 * slack) / limit`` seconds,
    where ``slack`` is 1% of ``per`` but at most 10 ms: a wake-up that came up
    to one slack late is caught up, and requests that reach the server up to
    another slack later than their neighbours still find room in the server's
    own window. So ``SlidingWindow(300, per=1.0)`` admits one call every
    3.4 ms, 98% of the quota, and never bursts: a burst admitted at once
    reaches the server spread out by the client and the network, and part of
    it lands in the server's next window (measured: dozens of 429s in 5,000
    calls, where pacing has none). Each 429 costs more than 2%: its
    ``Retry-After`` pauses every worker.

    ``burst=k`` admits up to ``k`` at once instead, pacing at ``limit`` per
    ``per``: ``burst=limit`` is the unpaced window, ``limit`` at once and then
    each one ``per`` seconds after the one it replaces. ``acquire(cost=k)``
    counts as ``k`` admissions at the same instant.

    Use it with :meth:`acquire` (first come, first served; a ``cost`` of at
    most ``limit``), :meth:`acquire_nowait`, :meth:`pause` and
    :attr:`waiting`, or as a :class:`~corral.Middleware`: as ``rate_limit=``
    it sees every attempt, in ``middleware=[...]`` each item once.

    >>> limiter = SlidingWindow(100, per=60.0)  # 100 calls a minute, exactly
    """

    def __init__(self, limit: int, per: float = 1.0, *, burst: int | None = None) -> None:
        super().__init__()
        self.limit: int = check_int("limit", limit, minimum=1)
        self.per: float = check_number("per", per, positive=True)
        if burst is not None:
            check_int("burst", burst, minimum=1)
            if burst > limit:
                raise ValueError(f"burst must be <= limit ({limit}), got {burst!r}")
        self.burst: int | None = burst
        self._capacity = limit
        self._pace = TokenBucket(limit, per, burst=burst if burst is not None else limit)
        if burst is None:  # a margin as large again: the server's window may be busier
            self._pace._set_slack(_slack(self.per), limit, margin=_slack(self.per))
        self._expiries: deque[tuple[float, int]] = deque()  # (admitted + per, cost)
        self._in_window = 0

    def __repr__(self) -> str:
        burst = "" if self.burst is None else f", burst={self.burst}"
        return f"SlidingWindow(limit={self.limit}, per={self.per}{burst})"

    def _ready_at(self, cost: int, now: float) -> float:
        return max(self._window_ready_at(cost, now), self._pace._ready_at(cost, now))

    def _window_ready_at(self, cost: int, now: float) -> float:
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            self._in_window -= expiries.popleft()[1]
        excess = self._in_window + cost - self.limit
        if excess <= 0:
            return now
        for expiry, units in expiries:  # wait until enough of the oldest expire
            excess -= units
            if excess <= 0:
                return expiry
        raise AssertionError("unreachable: cost <= limit")  # pragma: no cover

    def _admit(self, cost: int, now: float) -> None:
        self._pace._admit(cost, now)
        expiry = now + self.per
        while expiry - now < self.per:  # rounded down: never let it expire early
            expiry = math.nextafter(expiry, math.inf)
        self._expiries.append((expiry, cost))
        self._in_window += cost


class TokenBucket(_FairLimiter):
    """A smooth limiter: ``rate`` admissions per ``per`` seconds, evenly spaced.

    With ``burst=k``: at most ``k + rate * t / per`` admissions in any
    interval of length ``t``. Tokens refill continuously at ``rate`` per
    ``per`` seconds up to ``burst``; the bucket starts full.
    ``TokenBucket(10, 1.0, burst=5)`` admits 5 at once, then one every 0.1 s.

    Without ``burst`` (the default) it reads ``rate`` per ``per`` as a quota,
    like :class:`SlidingWindow`: never more than ``rate`` admissions in any
    ``per`` seconds, paced one every ``(per + slack) / rate`` seconds, where
    ``slack`` is 1% of ``per`` but at most 10 ms, one budget shared by two
    uses: a wake-up that came late is caught up instead of being lost for
    good (with one token, every late wake-up costs the time it was late: 12%
    of the rate on a busy loop; now only a wake-up later than the slack
    loses its lateness),
    and what a catch-up leaves of it lets a request reach the server that
    much later than its neighbour and still fit the server's window (a
    :class:`SlidingWindow` keeps a second slack for that).
    ``TokenBucket(300)`` admits one call every 3.37 ms under load, 99% of 300
    a second while no wake-up is more than 10 ms late. ``.burst`` then
    says how many a catch-up can admit at once (1 + slack / spacing, rounded
    down), and ``burst + rate * t / per`` holds; for a rate that is not a
    whole number, "never more than ``rate``" means its next whole number.

    A quota admits ``acquire(cost=k)`` for any ``k`` up to ``rate`` (a batch
    of that many rows): when the schedule reaches now, and the schedule then
    moves ``k`` spacings ahead, so the long-run rate holds whatever the costs.
    Any ``per`` seconds then hold at most ``rate`` plus the cost of one
    admission (with costs that vary; a :class:`SlidingWindow` is exact).
    ``TokenBucket(100)`` admits a cost of 50 at once and the next one 0.505 s
    later. With ``burst=k`` a cost is at most ``k``.

    Implemented as GCRA: one timestamp, O(1) per call, no refill task. Use it
    with :meth:`acquire` (first come, first served; a ``cost`` of at most
    ``burst``, or ``rate`` as a quota), :meth:`acquire_nowait`, :meth:`pause`
    and :attr:`waiting`, or as a :class:`~corral.Middleware`: as
    ``rate_limit=`` it sees every attempt, in ``middleware=[...]`` each item
    once.

    >>> limiter = TokenBucket(5, per=1.0, burst=2)
    """

    def __init__(self, rate: float, per: float = 1.0, *, burst: int | None = None) -> None:
        super().__init__()
        self.rate: float = check_number("rate", rate, positive=True)
        self.per: float = check_number("per", per, positive=True)
        if burst is not None:
            check_int("burst", burst, minimum=1)
        self._interval = self.per / self.rate  # seconds per token
        if not math.isfinite(self._interval * (burst or 1)):
            raise ValueError(f"rate must be larger for per={per!r}, got {rate!r}")
        # The schedule is anchor + n * interval: one multiplication per reading,
        # so rounding never accumulates over a long busy run (a sum would drift).
        # The anchor moves to `now` whenever the bucket has refilled completely.
        self._anchor = -math.inf
        self._spent = 0  # tokens admitted since the anchor
        self._quota = burst is None
        self.burst: int = 1
        self._capacity = 0
        if burst is None:
            self._set_slack(_slack(self.per), self.rate)
        else:
            self._set_burst(burst)

    def _set_burst(self, burst: int) -> None:
        self.burst = self._capacity = burst
        self._early = burst - 1  # how many intervals ahead of its time a token may go
        self._behind = 0.0  # how many seconds late the schedule may be and still hold

    def _set_slack(self, slack: float, rate: float, margin: float = 0.0) -> None:
        """Pace ``rate`` per ``per`` as a quota, catching up ``slack`` seconds of
        lateness, ``margin`` more seconds to spare in every period (see the
        classes' docstrings)."""
        self._interval = (self.per + slack + margin) / rate
        self._early = 0
        self._behind = slack
        self.burst = 1 + math.floor(slack / self._interval)
        # a cost of up to the rate (a batch of that many rows); it never
        # shrinks when an AdaptiveRate's rate goes down
        self._capacity = max(self._capacity, self.burst, math.floor(rate))

    def __repr__(self) -> str:
        burst = "" if self._quota else f", burst={self.burst}"
        return f"TokenBucket(rate={self.rate}, per={self.per}{burst})"

    def _idle(self, now: float) -> bool:
        """The schedule fell behind ``now`` by more than it catches up: it
        starts again from ``now`` (for a bucket with a burst: it is full)."""
        return self._anchor + self._spent * self._interval + self._behind <= now

    def _ready_at(self, cost: int, now: float) -> float:
        if self._idle(now):
            return now  # a full bucket admits any cost it takes at once
        # intervals beyond the tolerance: a cost is due when its last token is,
        # within the burst; beyond it (as a quota: all but its first token) it
        # is due when the schedule reaches now, and _admit then moves the
        # schedule the whole cost ahead. Were the rest due first, a quota's
        # wait would outlast _behind, and the bucket would restart from its
        # admission as if idle: every large cost would be paid twice.
        ahead = self._spent - self._early
        if cost != 1:
            ahead += min(cost - 1, self._early)
        if ahead <= 0:
            return self._anchor  # due at or before the anchor, a past admission
        # rounded up, so that no admission comes before its exact time
        return math.nextafter(self._anchor + ahead * self._interval, math.inf)

    def _admit(self, cost: int, now: float) -> None:
        if self._idle(now):
            # A schedule that fell more than the slack behind restarts from now,
            # losing that lateness: restarting it one slack back would lose
            # less, but the catch-up would spend the slack that delivery jitter
            # needs (measured: 2-9 429s per 2,500 calls where there were none).
            self._anchor, self._spent = now, cost
        else:
            self._spent += cost
