"""RetryBudget: retries bounded by a share of the first attempts, over a window."""

from __future__ import annotations

import math

import anyio
import attrs

from ._validate import check_number

__all__ = ["RetryBudget", "RetryBudgetStatistics"]

# the window is counted in this many buckets: it slides by a tenth of itself
_BUCKETS = 10
# 0.29 * 100 is 28.999999999999996 in floats: a retry that the ratio allows
# exactly must not be refused by rounding
_ROUNDING = 1e-9


@attrs.frozen
class RetryBudgetStatistics:
    """A snapshot of a :class:`RetryBudget` (counts in its window, except
    ``refused``)."""

    first_attempts: int  #: first attempts deposited in the window
    retries: int  #: retries it allowed in the window
    refused: int  #: retries it refused, in all
    available: int  #: retries it would allow now


@attrs.define(eq=False, repr=False)
class RetryBudget:
    """A bound on retries, shared by every :class:`~corral.Retry` given it.

    Retries may add at most ``ratio`` of the first attempts made in the last
    ``window`` seconds, plus ``min_per_second`` retries per second (so that a
    trickle of calls can still be retried): a retry is allowed when
    ``retries + 1 <= ratio * first_attempts + min_per_second * window``, both
    counted over the window. When it is spent, a failure is final at once,
    and its error says so in a note. ``ratio=0`` and ``min_per_second=0``
    together allow no retries at all.

    Like Finagle's ``RetryBudget``, and for the same reason: when a service is
    down, retries multiply the load on it by ``attempts``; with a budget they
    add at most ``ratio``. One budget may be given to several policies and
    pools, which then share it.

    The window is counted in ten buckets, so it slides in steps of a tenth of
    ``window``; its memory is constant. The methods take the time from their
    caller (:func:`anyio.current_time`); a clock that goes back (the budget
    used again under a new event loop) starts the window afresh. It is meant
    for one event loop at a time (not thread-safe). Bad arguments raise
    ``TypeError`` or ``ValueError`` naming the parameter.

    >>> budget = RetryBudget(ratio=0.2, min_per_second=0.0)
    >>> for _ in range(10):
    ...     budget.deposit(now=0.0)
    >>> [budget.try_withdraw(now=0.0) for _ in range(3)]
    [True, True, False]
    """

    ratio: float = attrs.field(default=0.2, kw_only=True, on_setattr=attrs.setters.frozen)
    min_per_second: float = attrs.field(default=10.0, kw_only=True, on_setattr=attrs.setters.frozen)
    window: float = attrs.field(default=10.0, kw_only=True, on_setattr=attrs.setters.frozen)
    _firsts: list[int] = attrs.field(init=False, factory=lambda: [0] * _BUCKETS)
    _retries: list[int] = attrs.field(init=False, factory=lambda: [0] * _BUCKETS)
    _first_total: int = attrs.field(init=False, default=0)
    _retry_total: int = attrs.field(init=False, default=0)
    _refused: int = attrs.field(init=False, default=0)
    _newest: int | None = attrs.field(init=False, default=None)  # the newest bucket's number
    _width: float = attrs.field(init=False, default=1.0)  # seconds per bucket
    _reserve: float = attrs.field(init=False, default=0.0)  # min_per_second * window

    def __attrs_post_init__(self) -> None:
        check_number("ratio", self.ratio)
        check_number("min_per_second", self.min_per_second)
        check_number("window", self.window, positive=True)
        self._width = self.window / _BUCKETS
        self._reserve = self.min_per_second * self.window

    def __repr__(self) -> str:
        window = "" if self.window == 10.0 else f", window={self.window!r}"
        return f"RetryBudget(ratio={self.ratio!r}, min_per_second={self.min_per_second!r}{window})"

    def deposit(self, now: float) -> None:
        """Count a first attempt made at ``now``."""
        bucket = self._advance(now)
        self._firsts[bucket] += 1
        self._first_total += 1

    def try_withdraw(self, now: float) -> bool:
        """Whether a retry may be made at ``now``; if so, it is counted, and if
        not, it is counted as refused."""
        bucket = self._advance(now)
        if self._retry_total + 1 > self._allowance() + _ROUNDING:
            self._refused += 1
            return False
        self._retries[bucket] += 1
        self._retry_total += 1
        return True

    def _give_back(self) -> None:
        """A retry :meth:`try_withdraw` allowed was not made (cancelled while it
        waited, or its hook raised): uncount it, from the newest bucket that
        holds one."""
        if self._newest is None or not self._retry_total:
            return
        for number in range(self._newest, self._newest - _BUCKETS, -1):
            bucket = number % _BUCKETS
            if self._retries[bucket]:
                self._retries[bucket] -= 1
                self._retry_total -= 1
                return

    def statistics(self, now: float | None = None) -> RetryBudgetStatistics:
        """Where it stands at ``now`` (default: :func:`anyio.current_time`
        inside an event loop, the last time it was used outside one)."""
        if now is None:
            try:
                now = anyio.current_time()
            except RuntimeError:  # no event loop: as of the last use
                now = None
        if now is not None:
            self._advance(now)
        available = math.floor(self._allowance() + _ROUNDING) - self._retry_total
        return RetryBudgetStatistics(
            first_attempts=self._first_total,
            retries=self._retry_total,
            refused=self._refused,
            available=max(0, available),
        )

    def _spent(self) -> str:
        """Why it refuses a retry, for the note on the error that becomes final."""
        return (
            f"the retry budget is spent ({self!r}: {self._retry_total} retries for "
            f"{self._first_total} first attempts in the last {self.window:g} s)"
        )

    def _allowance(self) -> float:
        return self.ratio * self._first_total + self._reserve

    def _advance(self, now: float) -> int:
        """Slide the window to ``now``: empty the buckets it left behind (all
        of them when the clock went back). Returns ``now``'s bucket index."""
        newest = int(now // self._width)
        last = self._newest
        if newest != last:
            if last is None or not 0 < newest - last < _BUCKETS:
                self._clear()
            else:
                for number in range(last + 1, newest + 1):
                    self._empty(number % _BUCKETS)
            self._newest = newest
        return newest % _BUCKETS

    def _empty(self, bucket: int) -> None:
        self._first_total -= self._firsts[bucket]
        self._retry_total -= self._retries[bucket]
        self._firsts[bucket] = self._retries[bucket] = 0

    def _clear(self) -> None:
        self._firsts = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._first_total = self._retry_total = 0
