"""CircuitBreaker: closed, open, half-open; what counts; a Retry waits for it.

Most tests drive the breaker's layer with a clock of their own, a number the
test moves by hand, so that the window and the cooldown are exact and take no
time on every backend. The tests through pools, batchers and ``statistics()``
read the event loop's clock: exact on trio's MockClock, in (short) real time
on asyncio and uvloop.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import anyio
import attrs
import pytest

import corral
from corral import CircuitBreaker, CircuitBreakerStatistics, CircuitOpen, Retry

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend(timing_anyio_backend: Any) -> Any:
    return timing_anyio_backend


class Down(Exception):
    """The service's failure."""


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Gate:
    """An item the service holds until ``event`` is set, then treats as ``then``."""

    def __init__(self, then: Any = "done") -> None:
        self.event = anyio.Event()
        self.then = then


class Service:
    """Counts its calls. An item that is an exception is raised; a :class:`Gate`
    waits for its event first; anything else is returned. The first
    ``down_for`` calls fail with :class:`Down` whatever the item."""

    def __init__(self, down_for: int = 0) -> None:
        self.calls = 0
        self.down_for = down_for

    async def __call__(self, item: Any) -> Any:
        self.calls += 1
        if self.calls <= self.down_for:
            raise Down(item)
        if isinstance(item, Gate):
            await item.event.wait()
            item = item.then
        if isinstance(item, Exception):
            raise item
        return item


class Rig:
    """A breaker (min_calls=4, window=10, cooldown=30 unless given), a service,
    a hand-moved clock, and ``call``: the breaker's layer around the service."""

    def __init__(self, **options: Any) -> None:
        options = {"min_calls": 4, "window": 10.0, "cooldown": 30.0, **options}
        self.breaker = CircuitBreaker(**options)
        self.service = Service()
        self.clock = Clock()
        self.call = self.breaker._layer(self.service, self.clock)

    def stats(self) -> CircuitBreakerStatistics:
        """The breaker's statistics at the hand-moved clock's time."""
        return self.breaker._statistics_at(self.clock.now)


async def fail(call: Any, times: int) -> None:
    """``times`` calls that fail with Down."""
    for _ in range(times):
        with pytest.raises(Down):
            await call(Down())


async def attempt(call: Any, item: Any) -> None:
    """One call, in a task of its own."""
    await call(item)


async def refused(call: Any) -> CircuitOpen:
    """A call the breaker refuses: its CircuitOpen."""
    with pytest.raises(CircuitOpen) as caught:
        await call("refused")
    return caught.value


def state_of(breaker: CircuitBreaker) -> str:
    """``breaker.state``, read anew (a type checker would keep the last one)."""
    return breaker.state


# -- closed: what counts ---------------------------------------------------------


async def test_it_opens_only_once_min_calls_ended() -> None:
    """Failures below min_calls never open it, however many of them fail; the
    one that makes min_calls opens it, and from then on nothing reaches the
    service."""
    rig = Rig()
    await fail(rig.call, 3)
    assert rig.stats() == CircuitBreakerStatistics(
        state="closed",
        calls=3,
        failures=3,
        failure_rate=1.0,
        opened=0,
        rejected=0,
        retry_after=0.0,
    )
    await fail(rig.call, 1)
    assert rig.stats().state == "open"
    for _ in range(3):
        await refused(rig.call)
    assert rig.service.calls == 4


async def test_it_opens_when_the_share_of_failures_reaches_failure_rate() -> None:
    """With failure_rate=0.5, 1 of 4 and 2 of 5 keep it closed; 3 of 6 opens it."""
    rig = Rig(failure_rate=0.5)
    for _ in range(3):
        assert await rig.call(1) == 1
    await fail(rig.call, 2)
    assert rig.stats().failure_rate == pytest.approx(0.4)
    assert rig.stats().state == "closed"
    await fail(rig.call, 1)
    assert rig.stats().state == "open"
    assert str(await refused(rig.call)).startswith(
        "circuit breaker open: 3 of 6 calls failed in the last 10 s;"
    )


async def test_a_success_that_reaches_min_calls_opens_it_if_the_rate_is_reached() -> None:
    """The rule is checked as every call ends: 3 failures then a success make
    3 of 4, which is above failure_rate=0.5, so that success opens it."""
    rig = Rig()
    await fail(rig.call, 3)
    assert await rig.call("ok") == "ok"
    assert rig.stats().state == "open"
    assert "3 of 4 calls failed" in str(await refused(rig.call))


@pytest.mark.parametrize(
    "on",
    [Down, (Down, KeyError), lambda error: isinstance(error, Down)],
    ids=["type", "tuple", "predicate"],
)
async def test_errors_on_does_not_match_count_as_calls_that_did_not_fail(on: Any) -> None:
    """An error ``on`` does not match is the service answering: it counts as a
    call, not as a failure, and it propagates unchanged."""
    rig = Rig(on=on)
    answer = ValueError("bad request")
    for _ in range(10):
        with pytest.raises(ValueError, match="bad request") as caught:
            await rig.call(answer)
        assert caught.value is answer
    assert (rig.stats().calls, rig.stats().failures) == (10, 0)
    await fail(rig.call, 9)  # 9 of 19
    assert rig.stats().state == "closed"
    await fail(rig.call, 1)  # 10 of 20
    assert rig.stats().state == "open"


async def test_an_on_that_raises_is_logged_and_counts_as_no_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A predicate that raises is a bug of its own: logged at ERROR, and the
    attempt counts as a call that did not fail (its own error propagates)."""

    def broken(error: Exception) -> bool:
        raise RuntimeError("bug")

    rig = Rig(on=broken, min_calls=1)
    await fail(rig.call, 2)
    assert (rig.stats().calls, rig.stats().failures) == (2, 0)
    errors = [r for r in caplog.records if r.name == "corral.breaker"]
    assert [r.levelno for r in errors] == [logging.ERROR] * 2
    assert "not counted as a failure" in errors[0].getMessage()


async def test_old_calls_leave_the_window() -> None:
    """window=10 is counted in buckets of 1 s: a call counts until the bucket
    ten buckets after its own begins (more than 9 s, at most 10 s), so failures
    spread over more than a window never add up."""
    rig = Rig(min_calls=4)
    rig.clock.now = 1000.0
    await fail(rig.call, 2)
    rig.clock.now = 1005.5
    await fail(rig.call, 1)
    rig.clock.now = 1009.9
    assert rig.stats().calls == 3
    rig.clock.now = 1010.0  # the failures at 1000 are out
    assert (rig.stats().calls, rig.stats().failures) == (1, 1)
    await fail(rig.call, 2)  # 3 in the window
    assert rig.stats().state == "closed"
    rig.clock.now = 1015.0  # the one at 1005.5 is out: 2
    await fail(rig.call, 1)
    assert rig.stats().state == "closed"
    await fail(rig.call, 1)  # 4 of 4
    assert rig.stats().state == "open"


async def test_cancelled_calls_are_not_counted() -> None:
    """A cancelled attempt is neither a call nor a failure, and its
    cancellation propagates."""
    rig = Rig(min_calls=1)
    gates = [Gate(then=Down()) for _ in range(5)]
    async with anyio.create_task_group() as group:
        for gate in gates:
            group.start_soon(attempt, rig.call, gate)
        await anyio.wait_all_tasks_blocked()
        group.cancel_scope.cancel()
    assert rig.service.calls == 5
    assert rig.stats() == CircuitBreakerStatistics(
        state="closed",
        calls=0,
        failures=0,
        failure_rate=0.0,
        opened=0,
        rejected=0,
        retry_after=0.0,
    )


# -- open ----------------------------------------------------------------------


async def test_open_refuses_at_once_with_the_time_left_until_it_half_opens() -> None:
    """While open no attempt reaches the service: each fails at once with
    CircuitOpen (a CorralError naming the breaker), whose retry_after is the
    time left of the cooldown, and which says why it opened."""
    rig = Rig()
    await fail(rig.call, 4)
    first = await refused(rig.call)
    assert isinstance(first, corral.CorralError)
    assert first.breaker is rig.breaker
    assert first.retry_after == 30.0
    assert str(first) == (
        "circuit breaker open: 4 of 4 calls failed in the last 10 s; half-opens in 30 s"
    )
    rig.clock.now += 12.5
    later = await refused(rig.call)
    assert later.retry_after == 17.5
    assert str(later).endswith("half-opens in 17.5 s")
    assert rig.service.calls == 4
    assert rig.stats() == CircuitBreakerStatistics(
        state="open",
        calls=0,
        failures=0,
        failure_rate=0.0,
        opened=1,
        rejected=2,
        retry_after=17.5,
    )


async def test_calls_running_when_it_opens_are_not_counted() -> None:
    """A call that started before it opened says nothing about the service
    after the cooldown: it ends as it ends, but only the trial call decides."""
    rig = Rig()
    straggler, trial = Gate(then="late"), Gate(then=Down())
    outcomes: list[Any] = []

    async def run(item: Any) -> None:
        try:
            outcomes.append(await rig.call(item))
        except Down as error:
            outcomes.append(error)

    async with anyio.create_task_group() as group:
        group.start_soon(run, straggler)
        await anyio.wait_all_tasks_blocked()
        await fail(rig.call, 4)
        rig.clock.now += 30.0
        group.start_soon(run, trial)
        await anyio.wait_all_tasks_blocked()
        straggler.event.set()
        await anyio.wait_all_tasks_blocked()
        assert outcomes == ["late"]
        assert rig.stats().state == "half_open"  # still: the trial is running
        await refused(rig.call)
        trial.event.set()
    assert rig.stats().state == "open"


# -- half-open -----------------------------------------------------------------


async def test_half_open_lets_one_trial_through_and_its_success_closes_it() -> None:
    """After the cooldown one attempt goes through; while it runs the others
    are refused with retry_after=0.0; its success closes the breaker with an
    empty window (the trial itself is not counted)."""
    rig = Rig()
    await fail(rig.call, 4)
    rig.clock.now += 30.0
    trial = Gate(then="trial")
    results: list[Any] = []

    async def run_trial() -> None:
        results.append(await rig.call(trial))

    async with anyio.create_task_group() as group:
        group.start_soon(run_trial)
        await anyio.wait_all_tasks_blocked()
        assert rig.stats().state == "half_open"
        for _ in range(3):
            busy = await refused(rig.call)
            assert busy.retry_after == rig.breaker.cooldown / 10  # about when the trial decides
            assert str(busy) == "circuit breaker half-open: its trial call is still running"
        assert rig.service.calls == 5
        trial.event.set()
    assert results == ["trial"]
    assert rig.stats() == CircuitBreakerStatistics(
        state="closed",
        calls=0,
        failures=0,
        failure_rate=0.0,
        opened=1,
        rejected=3,
        retry_after=0.0,
    )
    assert await rig.call(1) == 1
    assert rig.stats().calls == 1


async def test_a_failed_trial_opens_it_again_for_a_full_cooldown() -> None:
    """A trial that fails opens it again, for a whole cooldown from when the
    trial ended; after that another trial goes through."""
    rig = Rig()
    await fail(rig.call, 4)
    rig.clock.now += 31.0
    trial = Gate(then=Down())

    async def run_trial() -> None:
        with pytest.raises(Down):
            await rig.call(trial)

    async with anyio.create_task_group() as group:
        group.start_soon(run_trial)
        await anyio.wait_all_tasks_blocked()
        await refused(rig.call)
        rig.clock.now += 5.0  # the trial takes 5 s
        trial.event.set()
    assert rig.stats().state == "open"
    again = await refused(rig.call)
    assert again.retry_after == 30.0
    assert str(again) == "circuit breaker open: its trial call failed; half-opens in 30 s"
    assert rig.stats().opened == 2
    rig.clock.now += 30.0
    assert await rig.call("back") == "back"
    assert rig.stats().state == "closed"


async def test_a_cancelled_trial_does_not_wedge_it() -> None:
    """A trial that is cancelled is not counted: the breaker stays half-open
    with no trial running, and the next attempt is the trial."""
    rig = Rig()
    await fail(rig.call, 4)
    rig.clock.now += 30.0
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(attempt, rig.call, Gate())
            await anyio.wait_all_tasks_blocked()
            await refused(rig.call)
            scope.cancel()
    assert rig.stats().state == "half_open"
    assert await rig.call("next") == "next"  # the new trial
    assert rig.stats().state == "closed"
    assert rig.service.calls == 6


# -- the event loop's clock ----------------------------------------------------


async def test_state_half_opens_lazily_on_the_loops_clock(exact: bool) -> None:
    """``state`` and ``statistics()`` read the event loop's clock: the breaker
    is open for cooldown seconds, then half-open, with no task of its own."""
    cooldown = 1.0 if exact else 0.05
    breaker, service = CircuitBreaker(min_calls=2, cooldown=cooldown), Service()
    call = breaker._layer(service, anyio.current_time)
    assert state_of(breaker) == "closed"
    await fail(call, 2)
    assert state_of(breaker) == "open"
    left = breaker.statistics().retry_after
    if exact:
        assert left == cooldown
    else:
        assert 0 < left <= cooldown
    await anyio.sleep(cooldown if exact else 2 * cooldown)
    assert state_of(breaker) == "half_open"
    assert breaker.statistics().retry_after == 0.0


async def test_a_clock_that_goes_back_starts_afresh() -> None:
    """On a later event loop the clock may read earlier (trio starts a new one
    each run): the window starts empty, and an open breaker is half-open (the
    time since it opened cannot be known: one trial call finds out)."""
    rig = Rig()
    rig.clock.now = 1000.0
    await fail(rig.call, 3)
    rig.clock.now = 5.0
    await fail(rig.call, 1)
    assert (rig.stats().calls, rig.stats().state) == (1, "closed")
    await fail(rig.call, 3)
    assert rig.stats().state == "open"
    rig.clock.now = 1.0
    assert rig.stats().state == "half_open"
    assert await rig.call("trial") == "trial"
    assert rig.stats().state == "closed"


# -- as middleware, and on the entry points ------------------------------------


async def test_as_middleware_in_apply_to_all() -> None:
    """In ``middleware=[breaker]`` it counts items: once it opens, the items
    after fail with CircuitOpen without a call of the handler."""
    breaker, service = CircuitBreaker(min_calls=4, cooldown=30.0), Service()
    items: list[Any] = [Down() for _ in range(4)] + [1, 2, 3]
    outcomes = await corral.apply_to_all(service, items, workers=1, middleware=[breaker])
    assert [type(o.error) for o in outcomes] == [Down] * 4 + [CircuitOpen] * 3
    assert service.calls == 4
    assert breaker.statistics().rejected == 3


async def test_as_middleware_a_refusal_is_a_checkpoint() -> None:
    """Called as middleware, a refused call still checkpoints (a loop of
    refusals cannot starve the event loop)."""
    breaker, service = CircuitBreaker(min_calls=1), Service()
    with pytest.raises(Down):
        await breaker(Down(), service)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await breaker(1, service)
    assert scope.cancelled_caught
    assert service.calls == 1


async def test_one_breaker_shared_by_two_pools() -> None:
    """Failures of two pools add up in one breaker, and once it opens both
    pools' attempts are refused."""
    breaker, service = CircuitBreaker(min_calls=4, cooldown=30.0), Service()
    first = corral.Pool(service, workers=1, breaker=breaker)
    second = corral.Pool(service, workers=1, breaker=breaker)
    async with first, second:
        for pool in (first, second):
            jobs = [await pool.submit(Down()) for _ in range(2)]
            for job in jobs:
                assert isinstance((await job.wait()).error, Down)
        late = [await pool.submit(1) for pool in (first, second)]
        errors = [(await job.wait()).error for job in late]
    assert all(isinstance(error, CircuitOpen) for error in errors)
    assert service.calls == 4
    statistics = breaker.statistics()
    assert (statistics.opened, statistics.rejected) == (1, 2)


async def test_a_pools_retry_waits_for_the_breaker(exact: bool) -> None:
    """With ``retry=``, an attempt refused by an open breaker waits its
    retry_after (the cooldown), and the next attempt is the trial: the service
    is called three times, not hammered, and the item succeeds."""
    cooldown = 2.0 if exact else 0.05
    breaker, service = CircuitBreaker(min_calls=2, cooldown=cooldown), Service(down_for=2)
    retry = Retry(attempts=6, wait_initial=0.0, wait_jitter=False)
    async with corral.Pool(service, workers=1, breaker=breaker, retry=retry) as pool:
        started = anyio.current_time()
        outcome = await (await pool.submit("x")).wait()
        elapsed = anyio.current_time() - started
    assert outcome.result == "x"
    assert outcome.attempts == 3  # calls of the handler: a refused attempt is none
    assert service.calls == 3
    if exact:
        assert elapsed == cooldown
    else:
        assert elapsed >= 0.9 * cooldown
    statistics = breaker.statistics()
    assert (statistics.state, statistics.opened) == ("closed", 1)


async def test_apply_to_all_with_breaker_and_retry(exact: bool) -> None:
    """apply_to_all's ``breaker=`` with ``retry=``: the item that met the
    outage waits out the cooldown, the others pass once the trial closed it."""
    cooldown = 2.0 if exact else 0.05
    breaker, service = CircuitBreaker(min_calls=2, cooldown=cooldown), Service(down_for=2)
    retry = Retry(attempts=6, wait_initial=0.0, wait_jitter=False)
    outcomes = await corral.apply_to_all(service, range(6), workers=1, breaker=breaker, retry=retry)
    assert [o.result for o in outcomes] == list(range(6))
    assert service.calls == 8
    assert breaker.statistics().opened == 1


async def test_a_refused_attempt_takes_no_rate_limit_token() -> None:
    """The breaker is outside the limiter and the rate limit: the ten refused
    attempts take no token (this bucket of 4 an hour would make a fifth
    admission wait 15 minutes) and go by at once."""
    breaker, service = CircuitBreaker(min_calls=4, cooldown=30.0), Service()
    bucket = corral.TokenBucket(4, per=3600.0, burst=4)
    items: list[Any] = [Down() for _ in range(4)] + list(range(10))
    with anyio.fail_after(5):
        outcomes = await corral.apply_to_all(
            service,
            items,
            workers=1,
            breaker=breaker,
            rate_limit=bucket,
        )
    assert [type(o.error) for o in outcomes] == [Down] * 4 + [CircuitOpen] * 10


async def test_a_batchers_retry_waits_for_the_breaker(exact: bool) -> None:
    """A batcher's flush attempts pass the breaker too: two failed flushes
    open it, the refused attempt waits the cooldown, and the trial flushes."""
    cooldown = 2.0 if exact else 0.05
    breaker, service = CircuitBreaker(min_calls=2, cooldown=cooldown), Service(down_for=2)
    flushed: list[list[int]] = []

    async def flush(batch: list[int]) -> None:
        await service(None)
        flushed.append(batch)

    retry = Retry(attempts=6, wait_initial=0.0, wait_jitter=False)
    async with corral.Batcher(flush, max_size=10, breaker=breaker, retry=retry) as batcher:
        for item in range(5):
            await batcher.add(item)
    assert flushed == [[0, 1, 2, 3, 4]]
    assert service.calls == 3
    assert breaker.statistics().state == "closed"


# -- logging, statistics, arguments --------------------------------------------


async def test_it_logs_opening_at_warning_and_closing_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Opening is a WARNING saying why (failures of calls, window, cooldown),
    half-opening a DEBUG, closing an INFO; each names the breaker."""
    caplog.set_level(logging.DEBUG, logger="corral.breaker")
    rig = Rig(name="payments")
    await fail(rig.call, 4)
    assert str(await refused(rig.call)).startswith("circuit breaker 'payments' open: ")
    rig.clock.now += 30.0
    assert await rig.call("trial") == "trial"
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "corral.breaker"] == [
        (
            logging.WARNING,
            "circuit breaker 'payments' opened: 4 of 4 calls failed in the last 10 s; "
            "refusing calls for 30 s",
        ),
        (logging.DEBUG, "circuit breaker 'payments' half-open: the next call is a trial"),
        (logging.INFO, "circuit breaker 'payments' closed: its trial call did not fail"),
    ]


async def test_statistics_are_a_frozen_snapshot() -> None:
    """``statistics()`` is a value: frozen, and it does not move with the breaker."""
    breaker, service = CircuitBreaker(min_calls=4), Service()
    call = breaker._layer(service, anyio.current_time)
    assert await call(1) == 1
    await fail(call, 1)
    snapshot = breaker.statistics()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        snapshot.calls = 0  # type: ignore[misc]
    await fail(call, 1)
    assert (snapshot.calls, snapshot.failures, snapshot.failure_rate) == (2, 1, 0.5)
    assert breaker.statistics().calls == 3


def test_its_settings_are_read_only() -> None:
    """The parameters read back as given (as floats for the seconds), and
    cannot be set."""
    breaker = CircuitBreaker(failure_rate=0.25, min_calls=5, window=2, cooldown=3, name="db")
    assert (breaker.failure_rate, breaker.min_calls, breaker.window, breaker.cooldown) == (
        0.25,
        5,
        2.0,
        3.0,
    )
    assert (breaker.on, breaker.name) == (Exception, "db")
    assert repr(breaker) == (
        "CircuitBreaker(name='db', failure_rate=0.25, min_calls=5, window=2.0, cooldown=3.0)"
    )
    assert breaker.state == "closed"  # a closed breaker reads no clock
    with pytest.raises(AttributeError):
        breaker.cooldown = 1.0  # type: ignore[misc]


async def _async_predicate(error: Exception) -> bool:
    return True


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"failure_rate": 0}, ValueError, "failure_rate must be > 0"),
        ({"failure_rate": 1.5}, ValueError, r"failure_rate must be in \(0, 1\]"),
        ({"failure_rate": math.nan}, ValueError, "failure_rate"),
        ({"failure_rate": "0.5"}, TypeError, "failure_rate must be a number"),
        ({"min_calls": 0}, ValueError, "min_calls must be >= 1"),
        ({"min_calls": 2.0}, TypeError, "min_calls must be an int"),
        ({"min_calls": True}, TypeError, "min_calls must be an int"),
        ({"window": 0}, ValueError, "window must be > 0"),
        ({"window": math.inf}, ValueError, "window must be finite"),
        ({"window": None}, TypeError, "window must be a number"),
        ({"cooldown": -1}, ValueError, "cooldown must be > 0"),
        ({"cooldown": math.inf}, ValueError, "cooldown must be finite"),
        ({"on": BaseException}, TypeError, "on must be an Exception subclass"),
        ({"on": (Down, KeyboardInterrupt)}, TypeError, "on must be"),
        ({"on": "Down"}, TypeError, "on must be"),
        ({"on": _async_predicate}, TypeError, "on must be a plain predicate"),
        ({"name": 3}, TypeError, "name must be a str or None"),
    ],
)
def test_bad_input_is_refused_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Each argument is checked when the breaker is made, the error naming it."""
    with pytest.raises(error, match=match):
        CircuitBreaker(**options)


def test_its_arguments_are_keyword_only() -> None:
    """``CircuitBreaker(0.5)`` is refused: which number is which must be said."""
    with pytest.raises(TypeError):
        CircuitBreaker(0.5)  # type: ignore[call-arg]
