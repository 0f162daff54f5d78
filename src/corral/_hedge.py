"""Hedge: a call that is slow gets a copy; the first copy to succeed wins.

One hedged call is a race, held in a task group opened by the call::

    caller's task:  copy 1 ──────────────────────────────┐
    timer task:     sleep `after` ─► copy 2 ────────┐     │  the first copy to succeed
                         sleep `after` ─► copy 3 ───┤     │  wins; the others are
                                 (up to max_extra)  │     │  cancelled and awaited
                                                    ▼     ▼

The first copy runs in the caller's own task, so that a call that is not
hedged costs only the task group and a timer task that sees the race already
over, or waits on an event that the call sets (no cancellation, no exception:
the cheapest path anyio offers). The race ends when a copy succeeds, or when
every copy started has failed: then the first error is raised, as it is, and
no copy is started any more. The task group's scope is cancelled only to stop
copies still running, so the cancellation it raises in the caller's task is
the group's own and ends at the group.

It is a layer of the chain (see :mod:`corral._middleware`): inside ``retry``
and ``breaker``, outside ``limiter``, ``rate_limit`` and ``timeout``, so each
copy is an attempt of its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import attrs

from ._validate import check_int, check_number

__all__ = ["Hedge", "HedgeStatistics"]

Call = Callable[[Any], Awaitable[Any]]

_WINDOW = 1000  # a percentile is taken over this many latest latencies
_MIN_SAMPLES = 20  # no hedging by percentile before this many latencies are known
_REFRESH = 32  # the percentile is computed again after this many new latencies
_FLOOR = 0.001  # the least ``after`` a percentile gives, in seconds

_PERCENTILE = re.compile(r"p(\d{1,2}(?:\.\d+)?)")


@attrs.frozen
class HedgeStatistics:
    """A snapshot of a :class:`Hedge`."""

    calls: int  #: calls made through the hedge
    hedged: int  #: extra copies started
    extra_wins: int  #: races won by an extra copy
    after: float | None  #: seconds before a copy is started (None: too few latencies yet)


def _check_after(after: object) -> tuple[float | None, float | None]:
    """``(seconds, None)`` for a number, ``(None, percentile)`` for ``"pNN"``."""
    if isinstance(after, str):
        match = _PERCENTILE.fullmatch(after)
        percentile = float(match[1]) if match else 0.0
        if not 0 < percentile < 100:
            raise ValueError(
                f"after must be a number of seconds or a percentile between p0 and "
                f"p100 (exclusive) such as 'p95' or 'p99.9', got {after!r}"
            )
        return None, percentile
    if isinstance(after, bool) or not isinstance(after, (int, float)):
        raise TypeError(
            f"after must be a number of seconds or a percentile such as 'p95', got {after!r}"
        )
    return check_number("after", after, positive=True), None


def _percentile(values: list[float], percentile: float) -> float:
    """The ``percentile`` of ``values``, interpolated between the closest ranks."""
    ordered = sorted(values)
    rank = percentile / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Hedge:
    """Start another copy of a call that has not finished ``after`` seconds in.

    ``hedge=`` of a pool or ``apply_to_all``/``apply_to_each``: when a call of
    the handler has not finished ``after`` seconds after it started, another
    copy of the same item is started, then another every ``after`` seconds,
    up to ``max_extra`` extra copies. The first copy to *succeed* wins: its
    result is the call's, and the other copies are cancelled (and awaited:
    nothing outlives the call).

    - A copy that fails while others run does not end the race. When every
      copy started has failed, the error of the first one that failed is
      raised, unchanged, and no copy is started any more. A first copy that
      fails before ``after`` is raised at once: hedging is for slowness, and
      errors are :class:`Retry`'s business.
    - ``after`` is a positive number of seconds, or a percentile of the
      latencies of recent calls, such as ``"p95"`` or ``"p99.9"``: the time
      from a winning copy's start to its success, over the last 1000 calls,
      computed again every 32 calls, never less than 1 ms. Until 20
      latencies are known, nothing is hedged.
    - Each copy passes the ``limiter``, the ``rate_limit`` and the
      ``timeout``: hedging takes capacity slots and rate-limit tokens, and a
      copy may wait for them. ``Outcome.attempts`` counts every copy.
    - **Only hedge calls that are safe to repeat**: two copies may both have
      their effect. A plain (threaded) handler's cancelled copy cannot be
      interrupted: it is abandoned and runs on in its thread, holding its
      thread and its ``limiter`` token until it ends.
    - Cancelling the call cancels every copy, and the cancellation propagates.
      Copies start in the context of the call (context variables are copied).

    One hedge may be shared by several pools (its statistics and latencies
    are then theirs together). In ``middleware=[...]`` it wraps what comes
    after it (a ``retry`` included); prefer ``hedge=``. :meth:`statistics`
    says what it did.

    >>> Hedge(0.25, max_extra=2).max_extra
    2
    >>> Hedge("p95").after
    'p95'

    :raises ValueError: ``after`` is not a positive, finite number of seconds
        or a percentile ``"pNN"`` strictly between 0 and 100, or
        ``max_extra`` is below 1.
    :raises TypeError: ``after`` is neither a number nor a str, or
        ``max_extra`` is not an int.
    """

    __slots__ = (
        "_after",
        "_calls",
        "_extra_wins",
        "_fresh",
        "_hedged",
        "_latencies",
        "_max_extra",
        "_oldest",
        "_percentile",
        "_seconds",
    )

    def __init__(self, after: float | str, *, max_extra: int = 1) -> None:
        seconds, percentile = _check_after(after)
        self._after: float | str = after if seconds is None else seconds
        self._max_extra = check_int("max_extra", max_extra, minimum=1)
        self._percentile = percentile
        self._seconds = seconds  # what a call waits before a copy (None: not yet known)
        self._latencies: list[float] = []  # a ring of _WINDOW once full
        self._oldest = 0  # the next to be replaced, once the ring is full
        self._fresh = 0  # latencies since the percentile was last computed
        self._calls = self._hedged = self._extra_wins = 0

    def __repr__(self) -> str:
        return f"Hedge({self._after!r}, max_extra={self._max_extra!r})"

    @property
    def after(self) -> float | str:
        """Seconds (a float), or the percentile as given (``"p95"``)."""
        return self._after

    @property
    def max_extra(self) -> int:
        """The most extra copies of one call."""
        return self._max_extra

    def statistics(self) -> HedgeStatistics:
        """What it did so far (a frozen snapshot)."""
        return HedgeStatistics(
            calls=self._calls,
            hedged=self._hedged,
            extra_wins=self._extra_wins,
            after=self._seconds,
        )

    async def __call__(self, item: Any, call_next: Call) -> Any:
        """As middleware: hedge ``call_next(item)``."""
        return await self._race(item, call_next, anyio.current_time)

    def _layer(self, call_next: Call, clock: Callable[[], float]) -> Call:
        """The layer of the chain: ``call_next`` hedged; ``clock`` is the
        event loop's (what :func:`anyio.current_time` reads)."""
        race = self._race

        async def hedged(item: Any) -> Any:
            return await race(item, call_next, clock)

        return hedged

    async def _race(self, item: Any, call_next: Call, clock: Callable[[], float]) -> Any:
        """One hedged call: the first copy in this task, the timer (which starts
        the others) in the race's task group. A cancellation of the group's
        scope (the race ended, copies still ran) ends at the group."""
        self._calls += 1
        started = clock()
        after = self._seconds
        if after is None:  # a percentile, too few latencies yet: a single copy
            result = await call_next(item)
            self._record(clock() - started)
            return result
        race = _Race(self, item, call_next, clock, started, after)
        async with anyio.create_task_group() as tg:
            race.tg = tg
            tg.start_soon(race.timer, name="corral hedge timer")
            try:
                result = await call_next(item)
            except Exception as error:  # noqa: BLE001 - kept, raised if every copy fails
                race.lost(error)
                await race.wait()
            else:
                race.won(result, started, extra=False)
        return race.outcome()

    def _record(self, latency: float) -> None:
        """A winning copy's latency (percentile mode only)."""
        latencies = self._latencies
        if len(latencies) < _WINDOW:
            latencies.append(latency)
        else:
            latencies[self._oldest] = latency
            self._oldest = (self._oldest + 1) % _WINDOW
        self._fresh += 1
        if len(latencies) >= _MIN_SAMPLES and (self._seconds is None or self._fresh >= _REFRESH):
            assert self._percentile is not None
            # never 0: a coarse clock (uvloop's counts milliseconds) reads fast
            # calls as taking no time, and a copy at once would double the load
            self._seconds = max(_FLOOR, _percentile(latencies, self._percentile))
            self._fresh = 0


class _Race:
    """The copies of one hedged call: how many run, and how the race ended.

    Every copy ends in :meth:`won` or :meth:`lost` (a cancelled one in
    neither: only the race's own end or the caller's cancellation cancels
    one). ``running`` counts the copies started that have not ended.
    """

    __slots__ = (
        "after",
        "call_next",
        "clock",
        "done",
        "error",
        "hedge",
        "item",
        "over",
        "result",
        "running",
        "started",
        "succeeded",
        "tg",
    )

    def __init__(
        self,
        hedge: Hedge,
        item: Any,
        call_next: Call,
        clock: Callable[[], float],
        started: float,
        after: float,
    ) -> None:
        self.hedge, self.item, self.call_next, self.clock = hedge, item, call_next, clock
        self.started, self.after = started, after
        self.tg: anyio.abc.TaskGroup | None = None
        self.running = 1  # the first copy runs in the caller's task
        self.over = False
        self.succeeded = False
        self.result: Any = None
        self.error: Exception | None = None
        self.done: anyio.Event | None = None  # made when someone waits for the end

    async def timer(self) -> None:
        """Start a copy every ``after`` seconds (from the call's start) while
        the race is not over, up to ``max_extra``."""
        if self.over:  # the first copy ended before this task ran
            return
        done = self.wait_event()
        at = self.started
        for _ in range(self.hedge.max_extra):
            at += self.after
            with anyio.CancelScope(deadline=at):
                await done.wait()
            if self.over:
                return
            self.running += 1  # counted now: the race waits for it to start
            assert self.tg is not None
            self.tg.start_soon(self.extra, name="corral hedge copy")

    async def extra(self) -> None:
        """An extra copy, in a task of the race's task group. One whose task
        first runs after the race ended calls nothing."""
        if self.over:
            self.running -= 1
            return
        self.hedge._hedged += 1
        started = self.clock()
        try:
            result = await self.call_next(self.item)
        except Exception as error:  # noqa: BLE001 - kept, raised if every copy fails
            self.lost(error)
        else:
            self.won(result, started, extra=True)

    def won(self, result: Any, started: float, *, extra: bool) -> None:
        """A copy started at ``started`` succeeded: the first one wins."""
        self.running -= 1
        if self.over:  # a copy that returned in spite of being cancelled
            return
        self.succeeded, self.result = True, result
        hedge = self.hedge
        if extra:
            hedge._extra_wins += 1
        if hedge._percentile is not None:
            hedge._record(self.clock() - started)
        self._end()

    def lost(self, error: Exception) -> None:
        """A copy failed: the race ends if no other copy runs."""
        self.running -= 1
        if self.error is None:
            self.error = error
        if self.running == 0 and not self.over:
            self._end()

    def _end(self) -> None:
        self.over = True
        if self.done is not None:
            self.done.set()
        if self.running:  # cancel the copies that lost (they are awaited)
            assert self.tg is not None
            self.tg.cancel_scope.cancel()

    def wait_event(self) -> anyio.Event:
        if self.done is None:
            self.done = anyio.Event()
        return self.done

    async def wait(self) -> None:
        """Wait until the race is over (the caller's first copy failed)."""
        if not self.over:
            await self.wait_event().wait()

    def outcome(self) -> Any:
        """The winner's result, or the first error (raised)."""
        if self.succeeded:
            return self.result
        error, self.error = self.error, None  # no cycle: error → frames → race → error
        assert error is not None
        try:
            raise error
        finally:
            del error
