"""Rate limiters: SlidingWindow (exact count per window) and TokenBucket (GCRA).

Both serve waiters strictly first come, first served, and keep one timer: only
the waiter at the head of the line sleeps (until the moment it can be
admitted); the others wait on an event until they reach the head. Nothing is
held while sleeping, and a waiter that is cancelled leaves the line having
consumed nothing. An admission happens when ``acquire`` returns in the
admitted task, at the time read just before it returns.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from anyio.lowlevel import checkpoint

from ._validate import check_int, check_number

__all__ = ["SlidingWindow", "TokenBucket"]

T = TypeVar("T")
R = TypeVar("R")

_TICK = 0.001  # how long to wait again when a timer fired before its deadline


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
        if not self._waiters and self._ready_at(cost, now) <= now:
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
                ready_at = self._ready_at(cost, now)
                if ready_at <= now:
                    break
                if woke_early:
                    # A coarse clock (uvloop's moves in whole milliseconds) or a
                    # timer that fires a hair early: wait a tick instead of
                    # spinning until the clock catches up.
                    ready_at = max(ready_at, now + _TICK)
                await anyio.sleep_until(ready_at)
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
        return await call_next(item)

    @property
    def waiting(self) -> int:
        """How many tasks are in line for admission (the one sleeping at the
        head of the line included)."""
        return len(self._waiters)


class SlidingWindow(_FairLimiter):
    """Never more than ``limit`` admissions in any window of ``per`` seconds.

    Exact: for any two admissions less than ``per`` seconds apart, they and
    everything admitted between them number at most ``limit``. A fresh
    limiter admits ``limit`` at once, then the next one exactly ``per``
    seconds after the first, and so on: the first second of
    ``SlidingWindow(10, 1.0)`` under load is a burst of 10 at t=0, then
    nothing until t=1.0. ``acquire(cost=k)`` counts as ``k`` admissions at
    the same instant.

    Use it with :meth:`acquire` (first come, first served; a ``cost`` of at
    most ``limit``), :meth:`acquire_nowait` and :attr:`waiting`, or as a
    :class:`~corral.Middleware`: as ``rate_limit=`` it sees every attempt, in
    ``middleware=[...]`` each item once.

    >>> limiter = SlidingWindow(100, per=60.0)  # 100 calls a minute, exactly
    """

    def __init__(self, limit: int, per: float = 1.0) -> None:
        super().__init__()
        self.limit: int = check_int("limit", limit, minimum=1)
        self.per: float = check_number("per", per, positive=True)
        self._capacity = limit
        self._expiries: deque[tuple[float, int]] = deque()  # (admitted + per, cost)
        self._in_window = 0

    def __repr__(self) -> str:
        return f"SlidingWindow(limit={self.limit}, per={self.per})"

    def _ready_at(self, cost: int, now: float) -> float:
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
        expiry = now + self.per
        while expiry - now < self.per:  # rounded down: never let it expire early
            expiry = math.nextafter(expiry, math.inf)
        self._expiries.append((expiry, cost))
        self._in_window += cost


class TokenBucket(_FairLimiter):
    """A smooth limiter: at most ``burst + rate * t / per`` admissions in any
    interval of length ``t``.

    Tokens refill continuously at ``rate`` per ``per`` seconds up to
    ``burst``; the bucket starts full. ``TokenBucket(10, 1.0)`` (burst 1)
    admits one call every 0.1 s; ``TokenBucket(10, 1.0, burst=5)`` admits 5
    at once, then one every 0.1 s. Implemented as GCRA: one timestamp, O(1)
    per call, no refill task.

    Use it with :meth:`acquire` (first come, first served; a ``cost`` of at
    most ``burst``), :meth:`acquire_nowait` and :attr:`waiting`, or as a
    :class:`~corral.Middleware`: as ``rate_limit=`` it sees every attempt, in
    ``middleware=[...]`` each item once.

    >>> limiter = TokenBucket(5, per=1.0, burst=2)
    """

    def __init__(self, rate: float, per: float = 1.0, *, burst: int = 1) -> None:
        super().__init__()
        self.rate: float = check_number("rate", rate, positive=True)
        self.per: float = check_number("per", per, positive=True)
        self.burst: int = check_int("burst", burst, minimum=1)
        self._capacity = burst
        self._interval = self.per / self.rate  # seconds per token
        if not math.isfinite(self._interval * self.burst):
            raise ValueError(f"rate must be larger for per={per!r}, got {rate!r}")
        # The schedule is anchor + n * interval: one multiplication per reading,
        # so rounding never accumulates over a long busy run (a sum would drift).
        # The anchor moves to `now` whenever the bucket has refilled completely.
        self._anchor = -math.inf
        self._spent = 0  # tokens admitted since the anchor

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate}, per={self.per}, burst={self.burst})"

    def _idle(self, now: float) -> bool:
        """The theoretical arrival time is not ahead of ``now``: a full bucket."""
        return self._anchor + self._spent * self._interval <= now

    def _ready_at(self, cost: int, now: float) -> float:
        if self._idle(now):
            return now  # cost <= burst: a full bucket admits it at once
        ahead = self._spent + cost - self.burst  # tokens beyond the burst
        if ahead <= 0:
            return self._anchor  # due at or before the anchor, a past admission
        # rounded up, so that no admission comes before its exact time
        return math.nextafter(self._anchor + ahead * self._interval, math.inf)

    def _admit(self, cost: int, now: float) -> None:
        if self._idle(now):
            self._anchor, self._spent = now, cost
        else:
            self._spent += cost
