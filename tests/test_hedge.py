"""Hedge: a slow call gets copies, the first success wins, the rest are cancelled.

On trio the clock is a MockClock (times exact, sleeps take no time); asyncio
and uvloop run the same races in real time, with a unit of 50 ms and a
tolerance.
"""

from __future__ import annotations

import contextvars
import math
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from corral import Hedge, HedgeStatistics, Pool, Retry, apply_to_all
from corral._hedge import _Race

pytestmark = pytest.mark.anyio

FOREVER = math.inf


@pytest.fixture
def anyio_backend(timing_anyio_backend: Any) -> Any:
    return timing_anyio_backend


@pytest.fixture
def unit(exact: bool) -> float:
    """The time unit of a race: 1 s on the MockClock, 200 ms in real time (a
    shared machine stalls a timer by tens of milliseconds at times, and
    `near` allows 0.6 unit)."""
    return 1.0 if exact else 0.2


@pytest.fixture
def near(exact: bool, unit: float) -> Callable[[float, float], bool]:
    """``near(measured, expected)``: equal on the MockClock; in real time not
    early (but for a millisecond clock's rounding) and at most 0.6 unit late."""

    def check(measured: float, expected: float) -> bool:
        if exact:
            return measured == pytest.approx(expected)
        return expected - 0.002 <= measured <= expected + 0.6 * unit

    return check


class Boom(Exception):
    """A copy's failure."""


class Copies:
    """A handler whose n-th call (copy n) follows ``plan[n]``: ``(seconds,
    error)``, sleep ``seconds`` (forever if ``FOREVER``) then raise ``error``,
    or return ``"<item> by copy n"`` if it is None. It records when each copy
    started (from its creation) and which were cancelled."""

    def __init__(self, *plan: tuple[float, BaseException | None]) -> None:
        self.plan = plan
        self.t0 = anyio.current_time()
        self.starts: list[float] = []
        self.cancelled: list[int] = []
        self.ended: list[int] = []
        self._started = [anyio.Event() for _ in plan]
        self._ended = [anyio.Event() for _ in plan]

    async def __call__(self, item: Any) -> Any:
        n = len(self.starts)
        assert n < len(self.plan), f"copy {n} was not planned"
        self.starts.append(anyio.current_time() - self.t0)
        self._started[n].set()
        seconds, error = self.plan[n]
        try:
            if seconds == FOREVER:
                await anyio.sleep_forever()
            else:
                await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(n)
            raise
        finally:
            self.ended.append(n)
            self._ended[n].set()
        if error is not None:
            raise error
        return f"{item} by copy {n}"

    async def started(self, n: int) -> None:
        """Wait until copy ``n`` has started."""
        await self._started[n].wait()

    async def finished(self, n: int) -> None:
        """Wait until copy ``n`` has ended."""
        await self._ended[n].wait()


def layer(hedge: Hedge, handler: Any) -> Any:
    """The hedge as the engine's chain calls it."""
    return hedge._layer(handler, anyio.current_time)


# -- the race ------------------------------------------------------------------


async def test_a_fast_call_is_not_hedged(unit: float) -> None:
    """A call that ends before ``after`` is one call of the handler, and the
    hedge's timer does not hold the call up."""
    hedge = Hedge(10 * unit)
    copies = Copies((0, None))
    start = anyio.current_time()
    assert await layer(hedge, copies)("x") == "x by copy 0"
    assert anyio.current_time() - start < unit
    assert len(copies.starts) == 1
    assert hedge.statistics() == HedgeStatistics(calls=1, hedged=0, extra_wins=0, after=10 * unit)


async def test_a_handler_that_never_suspends_is_not_hedged() -> None:
    """A handler that returns (or raises) without a checkpoint ends the race
    before the timer task even runs: one call, its result or its error."""
    hedge = Hedge(0.001)
    calls = 0

    async def instant(item: int) -> int:
        nonlocal calls
        calls += 1
        if item < 0:
            raise Boom(item)
        return item

    call = layer(hedge, instant)
    assert [await call(i) for i in range(5)] == list(range(5))
    with pytest.raises(Boom):
        await call(-1)
    assert calls == 6
    assert hedge.statistics().hedged == 0


async def test_a_slow_first_copy_gets_a_second_that_wins(
    unit: float, near: Callable[[float, float], bool]
) -> None:
    """The first copy still running at ``after`` gets a second; the second
    succeeds first and wins, and the first is cancelled before the call returns."""
    hedge = Hedge(unit)
    copies = Copies((FOREVER, None), (0.5 * unit, None))
    result = await layer(hedge, copies)("x")
    assert result == "x by copy 1"
    assert near(copies.starts[1], unit)
    assert copies.cancelled == [0]
    assert sorted(copies.ended) == [0, 1]  # nothing outlives the call
    assert near(anyio.current_time() - copies.t0, 1.5 * unit)
    assert hedge.statistics() == HedgeStatistics(calls=1, hedged=1, extra_wins=1, after=unit)


async def test_the_first_copy_may_still_win_after_the_second_started(
    unit: float, near: Callable[[float, float], bool]
) -> None:
    """A first copy that succeeds after the second started wins; the second is
    cancelled."""
    hedge = Hedge(unit)
    copies = Copies((2 * unit, None), (FOREVER, None))
    assert await layer(hedge, copies)("x") == "x by copy 0"
    assert near(copies.starts[1], unit)
    assert copies.cancelled == [1]
    assert near(anyio.current_time() - copies.t0, 2 * unit)
    assert hedge.statistics() == HedgeStatistics(calls=1, hedged=1, extra_wins=0, after=unit)


async def test_max_extra_starts_a_copy_every_after_seconds(
    unit: float, near: Callable[[float, float], bool]
) -> None:
    """With max_extra=2, copies start at after and 2 * after, and no more: the
    first copy, ending at 3.5 * after, wins over the two still running."""
    hedge = Hedge(unit, max_extra=2)
    copies = Copies((3.5 * unit, None), (FOREVER, None), (FOREVER, None))
    assert await layer(hedge, copies)("x") == "x by copy 0"
    assert len(copies.starts) == 3
    assert near(copies.starts[1], unit)
    assert near(copies.starts[2], 2 * unit)
    assert sorted(copies.cancelled) == [1, 2]
    assert hedge.statistics().hedged == 2


@pytest.mark.parametrize(
    ("plan", "winner"),
    [
        # the first copy fails after the second started: the second wins
        (((1.5, Boom("first")), (1.0, None)), "x by copy 1"),
        # the second copy fails at once: the first wins
        (((2.0, None), (0.0, Boom("second"))), "x by copy 0"),
    ],
    ids=["first-fails", "second-fails"],
)
async def test_a_copy_that_fails_while_another_runs_does_not_end_the_race(
    unit: float, plan: Any, winner: str
) -> None:
    """A failure is not the end while another copy runs: the other's success
    is the call's result."""
    hedge = Hedge(unit)
    copies = Copies(*((seconds * unit, error) for seconds, error in plan))
    assert await layer(hedge, copies)("x") == winner
    assert copies.cancelled == []


async def test_when_every_copy_fails_the_first_error_is_raised(
    unit: float, near: Callable[[float, float], bool]
) -> None:
    """When all copies started have failed, the first error is raised as it
    is (not in a group), at once: no copy is started any more, even though
    max_extra allows one more at 2 * after."""
    hedge = Hedge(unit, max_extra=2)
    first, second = Boom("first"), Boom("second")
    copies = Copies((1.5 * unit, first), (0.8 * unit, second), (0, None))
    with pytest.raises(Boom) as raised:
        await layer(hedge, copies)("x")
    assert raised.value is first
    assert len(copies.starts) == 2
    assert near(anyio.current_time() - copies.t0, 1.8 * unit)
    assert hedge.statistics().hedged == 1


async def test_a_first_copy_failing_before_after_is_raised_at_once(
    unit: float, near: Callable[[float, float], bool]
) -> None:
    """Hedging is for slowness: a first copy that fails before ``after`` is
    raised at once and nothing else is started."""
    hedge = Hedge(unit)
    error = Boom("fast")
    copies = Copies((0.3 * unit, error), (0, None))
    with pytest.raises(Boom) as raised:
        await layer(hedge, copies)("x")
    assert raised.value is error
    assert near(anyio.current_time() - copies.t0, 0.3 * unit)
    assert len(copies.starts) == 1
    assert hedge.statistics().hedged == 0


@pytest.mark.parametrize("first_failed", [False, True], ids=["running", "failed"])
async def test_cancelling_the_call_cancels_every_copy(unit: float, first_failed: bool) -> None:
    """A cancellation from outside cancels every copy still running (whether
    the first copy still runs or has failed already) and propagates, as the
    backend's own cancellation, not in a group."""
    hedge = Hedge(unit)
    plan = (1.5 * unit, Boom("first")) if first_failed else (FOREVER, None)
    copies = Copies(plan, (FOREVER, None))
    caught: list[BaseException] = []

    async def cancel_soon(scope: anyio.CancelScope) -> None:
        await copies.started(1)
        if first_failed:
            await copies.finished(0)
        scope.cancel()

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            tg.start_soon(cancel_soon, scope)
            try:
                await layer(hedge, copies)("x")
            except BaseException as error:
                caught.append(error)
                raise
    assert scope.cancelled_caught
    assert [type(error) for error in caught] == [anyio.get_cancelled_exc_class()]
    assert sorted(copies.cancelled) == ([1] if first_failed else [0, 1])


async def test_copies_start_in_the_context_of_the_call(unit: float) -> None:
    """An extra copy sees the caller's context variables, as the first does."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[str] = []
    copies = Copies((FOREVER, None), (0, None))

    async def handler(item: str) -> Any:
        seen.append(var.get())
        return await copies(item)

    var.set("caller's")
    await layer(Hedge(unit), handler)("x")
    assert seen == ["caller's", "caller's"]


# -- after as a percentile -------------------------------------------------------


async def test_a_percentile_hedges_at_that_percentile_once_20_latencies_are_known(
    unit: float, near: Callable[[float, float], bool], exact: bool
) -> None:
    """``after="p95"``: the first 19 calls are not hedged (``after`` is None);
    the 20th latency sets it to the 95th percentile of the 20 (latencies of
    1..20 steps: 19.05 steps), and a slow call then gets its copy that long
    after it started."""
    hedge = Hedge("p95")
    step = unit / 5

    async def sleep_for(steps: int) -> int:
        await anyio.sleep(steps * step)
        return steps

    call = layer(hedge, sleep_for)
    async with anyio.create_task_group() as tg:
        for steps in range(2, 21):
            tg.start_soon(call, steps)
    assert hedge.statistics() == HedgeStatistics(calls=19, hedged=0, extra_wins=0, after=None)
    await call(1)
    after = hedge.statistics().after
    assert after is not None
    assert near(after, 19.05 * step)

    copies = Copies((FOREVER, None), (0, None))
    assert await layer(hedge, copies)("x") == "x by copy 1"
    assert near(copies.starts[1], after)
    if not exact:  # the latencies were measured in real time
        assert copies.starts[1] >= 19.05 * step - 0.002


async def test_the_percentile_follows_the_last_1000_latencies_every_32_calls() -> None:
    """The percentile is computed again every 32 latencies, over the last 1000
    (told by a clock the handler moves on, so the latencies are exact)."""
    hedge = Hedge("p50")
    moved = 0.0

    def clock() -> float:
        return anyio.current_time() + moved

    async def takes(seconds: float) -> float:
        nonlocal moved
        moved += seconds  # no checkpoint: the race is over before its timer runs
        return seconds

    call = hedge._layer(takes, clock)

    def after() -> float | None:
        return hedge.statistics().after

    for seconds in range(1, 21):
        await call(float(seconds))
    assert after() == pytest.approx(10.5, abs=1e-3)
    for _ in range(31):
        await call(100.0)
    assert after() == pytest.approx(10.5, abs=1e-3)  # 31 new: not computed again
    await call(100.0)
    assert after() == pytest.approx(100.0, abs=1e-3)  # median of 20 small, 32 of 100
    for _ in range(2000):
        await call(1.0)
    assert after() == pytest.approx(1.0, abs=1e-3)  # the 100s are gone
    assert hedge.statistics().hedged == 0


# -- in a pool -----------------------------------------------------------------


async def test_as_middleware_each_copy_is_an_attempt(unit: float) -> None:
    """``middleware=[Hedge(...)]``: the second copy's result is the item's, and
    ``Outcome.attempts`` counts both calls of the handler."""
    copies = Copies((FOREVER, None), (0, None))
    [outcome] = await apply_to_all(copies, ["x"], middleware=[Hedge(unit)])
    assert outcome.result == "x by copy 1"
    assert outcome.attempts == 2
    assert copies.cancelled == [0]


async def test_hedge_option_of_apply_to_all_counts_every_copy(unit: float) -> None:
    """``hedge=``: an item whose first copy is slow gets the second copy's
    result; ``Outcome.attempts`` counts both."""
    copies = Copies((FOREVER, None), (0, None))
    hedge = Hedge(unit)
    [outcome] = await apply_to_all(copies, ["x"], hedge=hedge)
    assert outcome.result == "x by copy 1"
    assert outcome.attempts == 2
    assert hedge.statistics().extra_wins == 1


async def test_hedge_option_of_a_pool_counts_every_copy(unit: float) -> None:
    """``Pool(hedge=)``: three copies of a slow item (max_extra=2), the third
    wins; ``Outcome.attempts`` is 3."""
    copies = Copies((FOREVER, None), (FOREVER, None), (0, None))
    async with Pool(copies, workers=1, hedge=Hedge(unit, max_extra=2)) as pool:
        job = await pool.submit("x")
        outcome = await job.wait()
    assert outcome.result == "x by copy 2"
    assert outcome.attempts == 3
    assert sorted(copies.cancelled) == [0, 1]


async def test_a_retry_runs_a_new_race_when_every_copy_failed(unit: float) -> None:
    """``retry=`` wraps the hedge: a race whose two copies failed is retried as
    a new race, whose first copy succeeds; ``Outcome.attempts`` counts all 3."""
    copies = Copies((1.5 * unit, Boom("first")), (0.8 * unit, Boom("second")), (0, None))
    hedge = Hedge(unit)
    [outcome] = await apply_to_all(
        copies, ["x"], hedge=hedge, retry=Retry(attempts=2, wait_initial=0)
    )
    assert outcome.result == "x by copy 2"
    assert outcome.attempts == 3
    assert hedge.statistics() == HedgeStatistics(calls=2, hedged=1, extra_wins=0, after=unit)


async def test_each_copy_has_its_own_timeout(
    unit: float, near: Callable[[float, float], bool]
) -> None:
    """``timeout=`` bounds each copy from its own start: the first times out at
    2.5 units, the second (started at 1) succeeds at 3, after the first's
    deadline and within its own."""
    copies = Copies((FOREVER, None), (2 * unit, None))
    [outcome] = await apply_to_all(copies, ["x"], hedge=Hedge(unit), timeout=2.5 * unit)
    assert outcome.result == "x by copy 1"
    assert outcome.attempts == 2
    assert copies.cancelled == [0]
    assert near(anyio.current_time() - copies.t0, 3 * unit)


async def test_each_copy_passes_the_limiter(
    unit: float, near: Callable[[float, float], bool]
) -> None:
    """``limiter=CapacityLimiter(2)``: the third copy, due at 2 units, waits for
    a token until the second copy fails at 2.5, then wins; no token is left held."""
    limiter = anyio.CapacityLimiter(2)
    copies = Copies((FOREVER, None), (1.5 * unit, Boom("second")), (0.5 * unit, None))
    hedge = Hedge(unit, max_extra=2)
    [outcome] = await apply_to_all(copies, ["x"], hedge=hedge, limiter=limiter)
    assert outcome.result == "x by copy 2"
    assert outcome.attempts == 3
    assert near(copies.starts[2], 2.5 * unit)
    assert copies.cancelled == [0]
    assert limiter.borrowed_tokens == 0


async def test_a_plain_handlers_losing_copy_is_abandoned_in_its_thread(unit: float) -> None:
    """A plain handler's first copy cannot be interrupted: the second copy
    wins, the first runs on in its thread, abandoned, its result dropped."""
    release = threading.Event()
    calls: list[str] = []
    lock = threading.Lock()

    def blocking(item: str) -> str:
        with lock:
            n = len(calls)
            calls.append(item)
        if n == 0:
            release.wait(10)
        return f"{item} by copy {n}"

    try:
        [outcome] = await apply_to_all(blocking, ["x"], middleware=[Hedge(unit)])
    finally:
        release.set()
    assert outcome.result == "x by copy 1"
    assert outcome.attempts == 2


# -- the object ----------------------------------------------------------------


def test_statistics_and_properties() -> None:
    """A number is kept as seconds, a percentile as given; ``after`` in the
    statistics is the seconds a call waits (None until a percentile is known)."""
    hedge = Hedge(2, max_extra=3)
    assert (hedge.after, hedge.max_extra) == (2.0, 3)
    assert hedge.statistics() == HedgeStatistics(calls=0, hedged=0, extra_wins=0, after=2.0)
    assert repr(hedge) == "Hedge(2.0, max_extra=3)"
    percentile = Hedge("p99.9")
    assert (percentile.after, percentile.max_extra) == ("p99.9", 1)
    assert percentile.statistics().after is None
    with pytest.raises(AttributeError):
        hedge.after = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"after": None}, TypeError, "after must be a number of seconds or a percentile"),
        ({"after": True}, TypeError, "after must be"),
        ({"after": [1]}, TypeError, "after must be"),
        ({"after": 0}, ValueError, "after must be > 0"),
        ({"after": -1.0}, ValueError, "after must be > 0"),
        ({"after": math.nan}, ValueError, "after must be > 0"),
        ({"after": math.inf}, ValueError, "after must be finite"),
        ({"after": "p0"}, ValueError, "after must be"),
        ({"after": "p100"}, ValueError, "'p100'"),
        ({"after": "95"}, ValueError, "such as 'p95'"),
        ({"after": "p95%"}, ValueError, "after must be"),
        ({"after": "p"}, ValueError, "after must be"),
        ({"after": 1, "max_extra": 0}, ValueError, "max_extra must be >= 1"),
        ({"after": 1, "max_extra": 1.5}, TypeError, "max_extra must be an int"),
        ({"after": 1, "max_extra": True}, TypeError, "max_extra must be an int"),
    ],
)
def test_bad_arguments_are_refused_naming_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    """``after`` must be a positive, finite number or ``"pNN"`` strictly
    between 0 and 100; ``max_extra`` an int >= 1."""
    with pytest.raises(error, match=message.replace("(", r"\(")):
        Hedge(**kwargs)


async def test_a_percentile_after_is_never_below_a_millisecond() -> None:
    """Calls that take no time by the clock (a virtual clock, or uvloop's whole
    milliseconds) give a percentile of 0; ``after`` stays at 1 ms, so a call
    that awaits is not doubled at once."""

    async def instant(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x

    hedge = Hedge("p50")
    await apply_to_all(instant, range(40), hedge=hedge, workers=1)
    after = hedge.statistics().after
    assert after is not None
    assert 0.001 <= after < 0.01
    assert hedge.statistics().hedged == 0


async def test_a_copy_whose_task_starts_after_the_race_ended_calls_nothing() -> None:
    """The timer schedules a copy; if the first copy wins before that copy's
    task runs, the copy never calls the handler, and neither attempts nor
    ``hedged`` count it."""
    calls: list[int] = []

    async def handler(x: int) -> int:
        calls.append(x)
        return x

    hedge = Hedge(1.0)
    race = _Race(hedge, 7, handler, anyio.current_time, anyio.current_time(), 1.0)
    async with anyio.create_task_group() as tg:
        race.tg = tg
        race.running += 1  # as the timer counts a copy it schedules
        tg.start_soon(race.extra)
        race.won(7, anyio.current_time(), extra=False)  # the first copy wins meanwhile
    assert calls == []
    assert hedge.statistics().hedged == 0
    assert race.running == 0
