"""CircuitBreaker: stop calling a service that keeps failing, and find out when it is back.

The states and what moves it from one to another::

    closed     ─ min_calls or more ended in the window and the ─►  open
                 share of failures reached failure_rate            (the window emptied)
    open       ─ cooldown passed (seen by the next attempt, ─────►  half_open
                 or by reading state)
    half_open  ─ the trial call did not fail ────────────────────►  closed (an empty window)
    half_open  ─ the trial call failed ──────────────────────────►  open (a full cooldown)
    half_open  ─ the trial call was cancelled ───────────────────►  half_open (the next
                                                                    attempt is the trial)

What counts: an attempt that ends with an exception ``on`` matches is a
failure; one that returns, or that raises an exception ``on`` does not match
(the service answered), is a call that did not fail. A cancelled attempt
(any BaseException that is not an Exception) is not counted at all. Attempts
that started before the breaker last changed state are not counted either:
the calls still running when it opened say nothing about the service after
the cooldown, and a trial call alone decides whether it closes.

Closed, the breaker counts the attempts that ended in the last ``window``
seconds in ten buckets of ``window / 10`` seconds each: an attempt counts for
more than 0.9 and at most 1 ``window`` after it ended. Counting a success
costs a clock read and a few integer updates, and the memory is the same for
any rate of calls.

It is a layer of the chain (see :mod:`corral._middleware`): inside ``retry``
and outside ``hedge``, ``limiter``, ``rate_limit`` and ``timeout``, so that a
refused attempt takes no capacity slot and no rate-limit token, a hedged
attempt counts once, and a ``Retry`` sees the :class:`~corral.CircuitOpen`
and waits its ``retry_after`` (the time left until the breaker half-opens).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
import attrs
from anyio.lowlevel import checkpoint

from ._errors import CircuitOpen
from ._retry import ExceptionFilter, check_on, matches
from ._validate import check_int, check_number, check_optional_str

__all__ = ["CircuitBreaker", "CircuitBreakerStatistics", "CircuitState"]

Call = Callable[[Any], Awaitable[Any]]

CircuitState = Literal["closed", "open", "half_open"]

# the states, always assigned from these, so that a state is tested by identity
_CLOSED: CircuitState = "closed"
_OPEN: CircuitState = "open"
_HALF_OPEN: CircuitState = "half_open"

_BUCKETS = 10  # the window is counted in this many buckets
_EARLY = 1e-6  # seconds: an attempt this close to the half-open time counts as at it

_log = logging.getLogger("corral.breaker")


@attrs.frozen
class CircuitBreakerStatistics:
    """A snapshot of a :class:`CircuitBreaker`."""

    state: CircuitState
    calls: int  #: attempts that ended in the window (0 unless closed)
    failures: int  #: of those, the failures
    failure_rate: float  #: failures / calls (0.0 with no calls)
    opened: int  #: times it opened (a failed trial call included)
    rejected: int  #: attempts refused with CircuitOpen
    retry_after: float  #: seconds until it half-opens (0.0 unless open)


class _Window:
    """The attempts that ended in the last ``_BUCKETS`` buckets, per bucket (at
    the bucket's number modulo ``_BUCKETS``) and in total. ``index`` is the
    number of the newest bucket, ``slot`` its place, ``[start, end)`` its
    time: an attempt that ends in it is counted without any arithmetic."""

    __slots__ = ("calls", "end", "failed", "failures", "index", "slot", "start", "total")

    def __init__(self) -> None:
        self.calls = [0] * _BUCKETS
        self.failures = [0] * _BUCKETS
        self.total = self.failed = 0
        self.index = self.slot = 0
        self.start = self.end = 0.0  # no bucket yet: the first end moves to one

    def move_to(self, index: int, per_second: float) -> None:
        """Make bucket ``index`` (of ``1 / per_second`` seconds) the newest:
        the buckets that fall out of the window are emptied, and all of them
        when ``index`` is older than the newest (the clock went back: a new
        event loop)."""
        gap = index - self.index
        if gap >= _BUCKETS or gap < 0:
            self.clear()
        else:
            calls, failures = self.calls, self.failures
            for bucket in range(self.index + 1, index + 1):
                slot = bucket % _BUCKETS
                self.total -= calls[slot]
                self.failed -= failures[slot]
                calls[slot] = failures[slot] = 0
        self.index, self.slot = index, index % _BUCKETS
        self.start, self.end = index / per_second, (index + 1) / per_second

    def clear(self) -> None:
        self.calls[:] = self.failures[:] = [0] * _BUCKETS
        self.total = self.failed = 0


class CircuitBreaker:
    """Refuse attempts at once while a service keeps failing.

    ``breaker=`` of a pool, ``apply_to_all``/``apply_to_each`` or a batcher
    (it sees every attempt, or every flush attempt). One breaker may be
    shared by several pools and batchers that call the same service, from one
    event loop at a time.

    - **Closed**: attempts pass and are counted over the last ``window``
      seconds. When at least ``min_calls`` ended in it and the share of
      failures (exceptions ``on`` matches: an exception type, a tuple of them
      or a predicate, as in :class:`Retry`) reaches ``failure_rate``, it
      opens. Exceptions ``on`` does not match count as calls that did not
      fail; cancelled attempts are not counted. An ``on`` that raises is
      logged and the attempt counts as not failed.
    - **Open**: for ``cooldown`` seconds every attempt fails at once, without
      a call, with :class:`CircuitOpen`, whose ``retry_after`` is the time left
      until it half-opens: a :class:`Retry` (which retries any ``Exception``
      by default) waits that long before its next attempt.
    - **Half-open**: the next attempt is a trial call; until it ends, the
      others fail at once with ``CircuitOpen`` (``retry_after`` a tenth of
      ``cooldown``: about when the trial will have decided). If the
      trial call does not fail, the breaker closes with an empty window; if it
      fails, it opens again for a full ``cooldown``; if it is cancelled, the
      next attempt is the trial. A trial that never ends keeps it half-open:
      give the pool a ``timeout=``.

    The window is emptied when it opens. It opens with a WARNING, half-opens
    with a DEBUG and closes with an INFO record on the ``corral.breaker``
    logger, each naming the breaker if ``name`` is given. :attr:`state` and
    :meth:`statistics` say where it stands.

    If the breaker is used on a later event loop whose clock reads earlier
    (trio starts a new clock for each run), the window starts empty and an
    open breaker is half-open: how long ago it opened cannot be known, and
    one trial call finds out.

    In ``middleware=[...]`` it wraps what comes after it, ``retry`` included:
    it then counts items, not attempts. Prefer ``breaker=``.

    >>> breaker = CircuitBreaker(failure_rate=0.5, min_calls=10, cooldown=15.0)
    >>> breaker.cooldown
    15.0

    :raises ValueError: an argument is out of range: ``failure_rate`` must be
        in (0, 1], ``min_calls`` at least 1, ``window`` and ``cooldown``
        positive, finite numbers of seconds.
    :raises TypeError: an argument is not of its type (a number, an int, an
        exception filter, a str).
    """

    def __init__(
        self,
        *,
        failure_rate: float = 0.5,
        min_calls: int = 20,
        window: float = 10.0,
        cooldown: float = 30.0,
        on: ExceptionFilter = Exception,
        name: str | None = None,
    ) -> None:
        rate = check_number("failure_rate", failure_rate, positive=True)
        if rate > 1:
            raise ValueError(f"failure_rate must be in (0, 1], got {failure_rate!r}")
        self._failure_rate = rate
        self._min_calls = check_int("min_calls", min_calls, minimum=1)
        self._window_seconds = check_number("window", window, positive=True)
        self._cooldown = check_number("cooldown", cooldown, positive=True)
        check_on(on)
        self._on: ExceptionFilter = on
        self._name = check_optional_str("name", name)
        self._label = "circuit breaker" if name is None else f"circuit breaker {name!r}"
        self._per_second = _BUCKETS / self._window_seconds  # buckets per second
        self._window = _Window()
        self._state: CircuitState = _CLOSED
        # changes whenever the state does: an attempt counts only if it is
        # the same when it ends as when it started
        self._generation = 0
        self._trial = False  # half-open: the trial call is running
        self._opened_at = 0.0
        self._half_opens_at = 0.0
        self._why = ""  # why it opened, for CircuitOpen's message
        self._opened = 0
        self._rejected = 0

    def __repr__(self) -> str:
        name = "" if self._name is None else f"name={self._name!r}, "
        return (
            f"CircuitBreaker({name}failure_rate={self.failure_rate!r}, "
            f"min_calls={self.min_calls!r}, window={self.window!r}, cooldown={self.cooldown!r})"
        )

    @property
    def failure_rate(self) -> float:
        """The share of failures that opens it."""
        return self._failure_rate

    @property
    def min_calls(self) -> int:
        """The fewest attempts in the window for it to open."""
        return self._min_calls

    @property
    def window(self) -> float:
        """Seconds over which attempts are counted."""
        return self._window_seconds

    @property
    def cooldown(self) -> float:
        """Seconds it stays open before a trial call."""
        return self._cooldown

    @property
    def on(self) -> ExceptionFilter:
        """What makes a failed attempt a failure."""
        return self._on

    @property
    def name(self) -> str | None:
        """The name in its log records and errors."""
        return self._name

    @property
    def state(self) -> CircuitState:
        """``"closed"``, ``"open"`` or ``"half_open"``, now. An open breaker
        half-opens when this is read after its cooldown (it reads the event
        loop's clock then, so it needs a running loop)."""
        if self._state is _OPEN:
            self._poll(anyio.current_time())
        return self._state

    def statistics(self) -> CircuitBreakerStatistics:
        """Where it stands now (a frozen snapshot); reads the event loop's clock."""
        return self._statistics_at(anyio.current_time())

    def _statistics_at(self, now: float) -> CircuitBreakerStatistics:
        self._poll(now)
        state, window = self._state, self._window
        if state is _CLOSED:
            window.move_to(int(now * self._per_second), self._per_second)  # expire
        calls, failures = window.total, window.failed
        return CircuitBreakerStatistics(
            state=state,
            calls=calls,
            failures=failures,
            failure_rate=failures / calls if calls else 0.0,
            opened=self._opened,
            rejected=self._rejected,
            retry_after=min(self._cooldown, max(0.0, self._half_opens_at - now))
            if state is _OPEN
            else 0.0,
        )

    # -- the layer -------------------------------------------------------------

    def _layer(self, call_next: Call, clock: Callable[[], float]) -> Call:
        """The chain's breaker layer around ``call_next``; ``clock`` is the
        event loop's (what :func:`anyio.current_time` reads)."""
        ended, not_closed, check, window = self._ended, self._not_closed, self._check, self._window

        async def guarded(item: Any) -> Any:
            if self._state is not _CLOSED:
                return await not_closed(item, call_next, clock, False)
            generation = self._generation
            try:
                result = await call_next(item)
            except Exception as error:
                ended(generation, error, clock())
                raise
            # _ended(generation, None, now), inlined for a success in the newest bucket:
            # about 180 -> 77 ns per attempt, 3-5% of a pooled item with a checkpoint
            now = clock()
            if generation == self._generation and window.start <= now < window.end:
                window.calls[window.slot] += 1
                window.total += 1
                if window.failed:
                    check(now)
            else:
                ended(generation, None, now)
            return result

        return guarded

    async def __call__(self, item: Any, call_next: Call) -> Any:
        """As middleware: the same as ``breaker=``, around what comes after it
        in the chain. A refused call is a checkpoint."""
        if self._state is not _CLOSED:
            return await self._not_closed(item, call_next, anyio.current_time, True)
        generation = self._generation
        try:
            result = await call_next(item)
        except Exception as error:
            self._ended(generation, error, anyio.current_time())
            raise
        self._ended(generation, None, anyio.current_time())
        return result

    async def _not_closed(
        self, item: Any, call_next: Call, clock: Callable[[], float], checkpoint_refused: bool
    ) -> Any:
        """An attempt while open or half-open: refused, or the trial call."""
        now = clock()
        generation = self._admit(now)
        if generation is None:
            refusal = self._refusal(now)
            if checkpoint_refused:
                await checkpoint()
            raise refusal
        try:
            result = await call_next(item)
        except Exception as error:
            self._trial_ended(generation, error, clock())
            raise
        except BaseException:
            if generation == self._generation:  # cancelled: the next attempt is the trial
                self._trial = False
            raise
        self._trial_ended(generation, None, clock())
        return result

    # -- the state -------------------------------------------------------------

    def _ended(self, generation: int, error: Exception | None, now: float) -> None:
        """Count an attempt that ended at ``now`` (with ``error``), started in
        ``generation``; open if the window says so. (Its success path is
        inlined in :meth:`_layer`.)"""
        if generation != self._generation:
            return  # it started before the breaker last changed state
        window = self._window
        if not window.start <= now < window.end:
            window.move_to(int(now * self._per_second), self._per_second)
        slot = window.slot
        window.calls[slot] += 1
        window.total += 1
        if error is not None and self._is_failure(error):
            window.failures[slot] += 1
            window.failed += 1
        if window.failed:
            self._check(now)

    def _check(self, now: float) -> None:
        """Open if at least ``min_calls`` ended in the window and the share of
        failures reaches ``failure_rate``."""
        window = self._window
        failed, calls = window.failed, window.total
        if calls >= self._min_calls and failed / calls >= self._failure_rate:
            window_seconds = _seconds(self._window_seconds)
            self._open(now, f"{failed} of {calls} calls failed in the last {window_seconds} s")

    def _is_failure(self, error: Exception) -> bool:
        try:
            return matches(self._on, error)
        except Exception:  # noqa: BLE001 - a user bug, logged: the attempt still ends
            _log.exception("%s: on=%r raised: not counted as a failure", self._label, self._on)
            return False

    def _poll(self, now: float) -> None:
        """Half-open if it is open and its cooldown has passed (or the clock
        went back to before it opened: a new event loop)."""
        # _EARLY: a sleep of exactly retry_after may wake a hair before the
        # deadline (float rounding of the loop's clock, uvloop's above all)
        if self._state is _OPEN and not self._opened_at <= now < self._half_opens_at - _EARLY:
            self._half_open(clock_went_back=now < self._opened_at)

    def _admit(self, now: float) -> int | None:
        """While open or half-open: the generation of the trial call, if this
        attempt is it, else None (refused)."""
        self._poll(now)
        if self._state is _OPEN or self._trial:
            return None
        self._trial = True
        return self._generation

    def _refusal(self, now: float) -> CircuitOpen:
        self._rejected += 1
        if self._state is _OPEN:
            retry_after = min(self._cooldown, max(0.0, self._half_opens_at - now))
            message = f"{self._label} open: {self._why}; half-opens in {_seconds(retry_after)} s"
        else:
            retry_after = self._cooldown / 10  # about when the trial may have decided
            message = f"{self._label} half-open: its trial call is still running"
        return CircuitOpen(message, retry_after=retry_after, breaker=self)

    def _trial_ended(self, generation: int, error: Exception | None, now: float) -> None:
        if generation != self._generation:
            return  # pragma: no cover - only a trial call changes a half-open state
        if error is not None and self._is_failure(error):
            self._open(now, "its trial call failed")
        else:
            self._close()

    def _open(self, now: float, why: str) -> None:
        self._state = _OPEN
        self._generation += 1
        self._trial = False
        self._opened_at, self._half_opens_at = now, now + self._cooldown
        self._why = why
        self._opened += 1
        self._window.clear()
        _log.warning(
            "%s opened: %s; refusing calls for %s s", self._label, why, _seconds(self._cooldown)
        )

    def _half_open(self, *, clock_went_back: bool) -> None:
        self._state = _HALF_OPEN
        self._generation += 1
        self._trial = False
        _log.debug(
            "%s half-open%s: the next call is a trial",
            self._label,
            " (the clock went back: a new event loop)" if clock_went_back else "",
        )

    def _close(self) -> None:
        self._state = _CLOSED
        self._generation += 1
        self._trial = False
        self._window.clear()
        _log.info("%s closed: its trial call did not fail", self._label)


def _seconds(seconds: float) -> str:
    """Seconds for a message: three significant digits, whole seconds from 1000."""
    return f"{seconds:.3g}" if seconds < 999.5 else f"{seconds:.0f}"
