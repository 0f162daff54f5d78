"""Retry's on_result, before_sleep and budget; Retry on a single call and as a
decorator; RetryBudget's window."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import re
import threading
from typing import Any

import anyio
import pytest

from corral import Pool, Retry, RetryBudget, RetryError, apply_to_all

pytestmark = pytest.mark.anyio

# uvloop's loop.time() advances in whole milliseconds
CLOCK_GRAIN = 0.002

NOTE = re.compile(
    r"^not retried: the retry budget is spent \(RetryBudget\(ratio=0\.2, min_per_second=0\): "
    r"\d+ retries for \d+ first attempts in the last 10 s\)$"
)


@pytest.fixture
def anyio_backend(timing_anyio_backend: Any) -> Any:
    return timing_anyio_backend


class Busy(Exception):
    pass


def failing(times: int, result: Any = "done") -> Any:
    """An async function failing ``times`` times with Busy, then returning
    ``result``; ``.errors`` holds what it raised, ``.calls`` counts calls."""
    errors: list[Exception] = []

    async def call(*args: Any, **kwargs: Any) -> Any:
        await anyio.lowlevel.checkpoint()
        if len(errors) < times:
            errors.append(Busy(f"call {len(errors) + 1}"))
            raise errors[-1]
        return result

    call.errors = errors  # type: ignore[attr-defined]
    return call


# ------------------------------------------------------------ on_result


async def test_rejected_results_are_retried_then_give_a_retry_error() -> None:
    """A result on_result rejects is retried like an error; when attempts run
    out the item's error is a RetryError carrying the last result and the
    number of calls."""
    results = iter(["wait-1", "wait-2", "wait-3"])

    async def poll(x: int) -> str:
        return next(results)

    retry = Retry(3, wait_initial=0, on_result=lambda r: r.startswith("wait"))
    [outcome] = await apply_to_all(poll, [1], retry=retry)
    assert isinstance(outcome.error, RetryError)
    assert outcome.error.result == "wait-3"
    assert outcome.error.attempts == 3
    assert outcome.attempts == 3
    assert "on_result rejected the result of attempt 3" in str(outcome.error)


async def test_a_result_on_result_accepts_ends_the_retrying() -> None:
    """Rejected once, then accepted: the accepted result is the outcome's."""
    results = iter([None, 42])

    async def poll(x: int) -> int | None:
        return next(results)

    retry = Retry(3, wait_initial=0, on_result=lambda r: r is None)
    [outcome] = await apply_to_all(poll, [1], retry=retry)
    assert outcome.ok
    assert outcome.result == 42
    assert outcome.attempts == 2


async def test_an_on_result_that_raises_gives_its_error_unretried() -> None:
    """The predicate's own exception is the item's error, and no retry is made."""
    calls = 0
    broken = ValueError("predicate broke")

    async def poll(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    def reject(result: int) -> bool:
        raise broken

    [outcome] = await apply_to_all(poll, [1], retry=Retry(3, on_result=reject))
    assert outcome.error is broken
    assert calls == 1


async def test_on_result_gives_up_when_the_deadline_leaves_no_time(exact: bool) -> None:
    """deadline=0.25 with waits 0.1, 0.2: the retry due at 0.3 is not made, and
    the RetryError says 2 attempts."""

    async def poll(x: int) -> str:
        return "pending"

    retry = Retry(10, wait_initial=0.1, wait_jitter=False, deadline=0.25, on_result=lambda r: True)
    [outcome] = await apply_to_all(poll, [1], retry=retry)
    assert isinstance(outcome.error, RetryError)
    assert outcome.error.attempts == 2
    assert outcome.error.result == "pending"
    if exact:
        assert outcome.elapsed == pytest.approx(0.1, abs=1e-9)


async def test_on_result_works_in_middleware() -> None:
    """A Retry in middleware=[...] retries rejected results too."""
    results = iter([None, None, 7])

    async def poll(x: int) -> int | None:
        return next(results)

    retry = Retry(3, wait_initial=0, on_result=lambda r: r is None)
    [outcome] = await apply_to_all(poll, [1], middleware=[retry])
    assert outcome.result == 7
    assert outcome.attempts == 3


# ------------------------------------------------------------ before_sleep


async def test_before_sleep_sees_item_failure_attempt_and_wait() -> None:
    """before_sleep(item, error_or_result, attempt, wait) before each retry:
    the error raised (or the result rejected), the number of the call that
    failed, and the wait about to be slept."""
    seen: list[tuple[Any, ...]] = []
    handler = failing(1, result="retry me")
    results = iter([True, False])

    retry = Retry(
        4,
        wait_initial=0.01,
        wait_jitter=False,
        on_result=lambda r: next(results),
        before_sleep=lambda *args: seen.append(args),
    )
    [outcome] = await apply_to_all(handler, ["a"], retry=retry)
    assert outcome.ok
    assert outcome.attempts == 3
    assert seen == [
        ("a", handler.errors[0], 1, 0.01),
        ("a", "retry me", 2, 0.02),
    ]


async def test_an_async_before_sleep_is_awaited() -> None:
    """An async before_sleep runs to its end before the retry is made."""
    order: list[str] = []

    async def before_sleep(item: Any, error: Any, attempt: int, wait: float) -> None:
        await anyio.lowlevel.checkpoint()
        order.append(f"before_sleep {attempt}")

    async def handler(x: int) -> int:
        order.append(f"call {len(order) // 2 + 1}")
        if len(order) < 5:
            raise Busy
        return x

    retry = Retry(3, wait_initial=0, before_sleep=before_sleep)
    [outcome] = await apply_to_all(handler, [1], retry=retry)
    assert outcome.ok
    assert order == ["call 1", "before_sleep 1", "call 2", "before_sleep 2", "call 3"]


async def test_a_before_sleep_that_raises_ends_the_item_with_its_error() -> None:
    """What before_sleep raises is the item's error, raised from the failure it
    was told about; no retry is made."""
    handler = failing(5)
    stop = RuntimeError("no more")

    def before_sleep(item: Any, error: Any, attempt: int, wait: float) -> None:
        raise stop

    [outcome] = await apply_to_all(handler, [1], retry=Retry(5, before_sleep=before_sleep))
    assert outcome.error is stop
    assert stop.__cause__ is handler.errors[0]
    assert outcome.attempts == 1


# ------------------------------------------------------------ logging


async def test_each_retry_is_logged_at_info_to_the_pools_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A retry in a pool says at INFO, on the pool's logger, which item, which
    attempt failed and how, and how long it waits."""
    caplog.set_level(logging.INFO, logger="corral")
    results = iter([ConnectionError("boom"), None, 1])

    async def handler(x: int) -> int | None:
        result = next(results)
        if isinstance(result, Exception):
            raise result
        return result

    retry = Retry(3, wait_initial=0.01, wait_jitter=False, on_result=lambda r: r is None)
    [outcome] = await apply_to_all(handler, [7], retry=retry)
    assert outcome.ok
    records = [r for r in caplog.records if r.getMessage().startswith("retrying")]
    assert [r.name for r in records] == ["corral.pool", "corral.pool"]
    assert [r.levelno for r in records] == [logging.INFO, logging.INFO]
    assert [r.getMessage() for r in records] == [
        "retrying 7 after attempt 1 of 3 failed with ConnectionError('boom'); waiting 0.01 s",
        "retrying 7 after attempt 2 of 3 returned a result on_result rejects; waiting 0.02 s",
    ]


async def test_a_single_call_logs_to_corral_retry(caplog: pytest.LogCaptureFixture) -> None:
    """retry.call logs its retries at INFO to corral.retry, naming the call."""
    caplog.set_level(logging.INFO, logger="corral.retry")
    handler = failing(1)
    assert await Retry(2, wait_initial=0).call(handler, 5) == "done"
    [record] = caplog.records
    assert record.name == "corral.retry"
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith("retrying functools.partial(")
    assert record.getMessage().endswith(
        ", 5) after attempt 1 of 2 failed with Busy('call 1'); waiting 0 s"
    )


# ------------------------------------------------------------ budget


async def test_a_budget_lets_only_its_ratio_of_failures_be_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ratio=0.2 with no floor and 100 items that always fail: exactly 20 are
    retried; the other 80 fail after one call, their errors saying why in a
    note, and an INFO record says so for each."""
    caplog.set_level(logging.INFO, logger="corral")
    budget = RetryBudget(ratio=0.2, min_per_second=0)
    calls = 0

    async def handler(x: int) -> int:
        nonlocal calls
        calls += 1
        await anyio.lowlevel.checkpoint()
        raise Busy(x)

    retry = Retry(2, wait_initial=0, budget=budget)
    outcomes = await apply_to_all(handler, range(100), retry=retry)
    refused = [o for o in outcomes if o.attempts == 1]
    assert len(refused) == 80
    assert calls == 120
    for outcome in refused:
        assert outcome.error is not None
        [note] = outcome.error.__notes__
        assert NOTE.match(note), note
    retried = [o for o in outcomes if o.attempts == 2]
    assert all(not getattr(o.error, "__notes__", None) for o in retried)
    stats = budget.statistics()
    assert (stats.first_attempts, stats.retries, stats.refused, stats.available) == (
        100,
        20,
        80,
        0,
    )
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert sum(m.endswith(": the retry budget is spent") for m in said) == 80
    assert sum(m.startswith("retrying ") for m in said) == 20


async def test_a_spent_budget_ends_a_rejected_result_with_a_retry_error() -> None:
    """A budget that allows nothing (ratio=0, min_per_second=0) makes the first
    rejected result final: a RetryError after 1 attempt, with the note."""
    budget = RetryBudget(ratio=0, min_per_second=0)

    async def poll(x: int) -> None:
        return None

    retry = Retry(3, on_result=lambda r: r is None, budget=budget)
    [outcome] = await apply_to_all(poll, [1], retry=retry)
    assert isinstance(outcome.error, RetryError)
    assert outcome.error.attempts == 1
    assert outcome.error.__notes__ == [
        "not retried: the retry budget is spent (RetryBudget(ratio=0, min_per_second=0): "
        "0 retries for 1 first attempts in the last 10 s)"
    ]


async def test_a_budget_is_shared_by_the_pools_and_policies_given_it() -> None:
    """Two policies in two pools, one budget: the first pool's first attempts
    pay for the second pool's retries (alone, its budget allows 2 of 5)."""
    budget = RetryBudget(ratio=0.5, min_per_second=0)

    async def steady(x: int) -> int:
        return x

    await apply_to_all(steady, range(10), retry=Retry(2, budget=budget))
    handlers = {x: failing(1) for x in range(5)}

    async def flaky(x: int) -> Any:
        return await handlers[x]()

    outcomes = await apply_to_all(flaky, range(5), retry=Retry(2, wait_initial=0, budget=budget))
    assert [o.attempts for o in outcomes] == [2] * 5
    assert all(o.ok for o in outcomes)
    stats = budget.statistics()
    assert (stats.first_attempts, stats.retries) == (15, 5)

    alone = RetryBudget(ratio=0.5, min_per_second=0)
    handlers = {x: failing(1) for x in range(5)}
    outcomes = await apply_to_all(flaky, range(5), retry=Retry(2, wait_initial=0, budget=alone))
    assert sum(o.ok for o in outcomes) == 2


async def test_min_per_second_allows_retries_without_first_attempts_to_pay() -> None:
    """ratio=0, min_per_second=0.1 over 10 s: one retry in the window, whatever
    the traffic; the next failure is final, its error noted."""
    budget = RetryBudget(ratio=0, min_per_second=0.1)
    handler = failing(2)
    with pytest.raises(Busy) as caught:
        await Retry(3, wait_initial=0, budget=budget).call(handler)
    assert len(handler.errors) == 2
    assert caught.value is handler.errors[1]
    assert caught.value.__notes__ == [
        "not retried: the retry budget is spent (RetryBudget(ratio=0, min_per_second=0.1): "
        "1 retries for 1 first attempts in the last 10 s)"
    ]


async def test_cancellation_is_neither_retried_nor_refused() -> None:
    """An attempt cancelled with its pool is not retried; the budget counts its
    first attempt, and no retry or refusal."""
    budget = RetryBudget(ratio=0.2, min_per_second=0)
    started = anyio.Event()
    calls = 0

    async def handler(x: int) -> int:
        nonlocal calls
        calls += 1
        started.set()
        await anyio.sleep_forever()
        return x

    pool = Pool(handler, retry=Retry(3, wait_initial=0, budget=budget))
    with anyio.CancelScope() as scope:
        async with pool:
            await pool.submit(0)
            await started.wait()
            scope.cancel()
    assert calls == 1
    assert pool.unfinished == [0]
    stats = budget.statistics()
    assert (stats.first_attempts, stats.retries, stats.refused) == (1, 0, 0)


def test_budget_window_slides_and_recovers() -> None:
    """Counts are kept in tenths of the window: what was counted at 0 still
    counts at 9.99 and is gone at 10, so a spent budget allows retries again."""
    budget = RetryBudget(ratio=0.5, min_per_second=0, window=10.0)
    for _ in range(4):
        budget.deposit(0.0)
    assert [budget.try_withdraw(0.5) for _ in range(3)] == [True, True, False]
    assert budget.statistics(9.99).available == 0
    budget.deposit(9.99)
    assert budget.statistics(9.99).first_attempts == 5
    stats = budget.statistics(10.0)
    assert (stats.first_attempts, stats.retries, stats.refused) == (1, 0, 1)
    assert budget.try_withdraw(10.0) is False  # 0.5 of 1 first attempt
    budget.deposit(10.5)
    assert budget.try_withdraw(10.5) is True
    stats = budget.statistics(100.0)  # long after: all expired
    assert (stats.first_attempts, stats.retries, stats.refused) == (0, 0, 2)


def test_budget_min_per_second_is_a_floor_over_the_window() -> None:
    """min_per_second=2 over a 5 s window: 10 retries with no first attempt,
    then ratio's share of first attempts on top."""
    budget = RetryBudget(ratio=0.1, min_per_second=2, window=5.0)
    assert budget.statistics(0.0).available == 10
    assert sum(budget.try_withdraw(0.0) for _ in range(12)) == 10
    for _ in range(20):
        budget.deposit(1.0)
    assert budget.statistics(1.0).available == 2
    assert repr(budget) == "RetryBudget(ratio=0.1, min_per_second=2, window=5.0)"


def test_a_clock_that_goes_back_starts_the_window_afresh() -> None:
    """Used under a new event loop whose clock reads less, the budget forgets
    what it counted (it cannot tell how long ago that was)."""
    budget = RetryBudget(ratio=1.0, min_per_second=0)
    budget.deposit(500.0)
    assert budget.try_withdraw(500.0) is True
    stats = budget.statistics(3.0)
    assert (stats.first_attempts, stats.retries, stats.available) == (0, 0, 0)


def test_ratio_rounding_does_not_refuse_an_allowed_retry() -> None:
    """0.29 of 100 first attempts is 29 retries, though 0.29 * 100 < 29 in floats."""
    budget = RetryBudget(ratio=0.29, min_per_second=0)
    for _ in range(100):
        budget.deposit(0.0)
    assert sum(budget.try_withdraw(0.0) for _ in range(30)) == 29


# ------------------------------------------------------------ a single call


async def test_call_retries_an_async_function_with_args_and_kwargs() -> None:
    """retry.call(fn, *args, **kwargs) passes the arguments to every call and
    returns the first success."""
    seen: list[tuple[Any, ...]] = []

    async def fetch(key: str, *, scale: int) -> str:
        seen.append((key, scale))
        if len(seen) < 3:
            raise Busy
        return key * scale

    assert await Retry(3, wait_initial=0).call(fetch, "ab", scale=2) == "abab"
    assert seen == [("ab", 2)] * 3


async def test_call_gives_the_last_error_when_it_gives_up() -> None:
    """After the last attempt its error propagates as it was raised."""
    handler = failing(5)
    with pytest.raises(Busy) as caught:
        await Retry(2, wait_initial=0).call(handler)
    assert caught.value is handler.errors[-1]
    assert len(handler.errors) == 2


async def test_call_runs_a_plain_function_in_a_thread() -> None:
    """A plain function runs in a worker thread, once per attempt."""
    threads: list[int] = []

    def read(path: str) -> str:
        threads.append(threading.get_ident())
        if len(threads) == 1:
            raise OSError("flaky disk")
        return path.upper()

    assert await Retry(2, wait_initial=0).call(read, "a") == "A"
    assert len(threads) == 2
    assert threading.get_ident() not in threads


async def test_deadline_abandons_a_running_plain_call(exact: bool) -> None:
    """A plain call still running at the deadline is given up on: TimeoutError
    at the deadline, while its thread runs on to its end."""
    release, finished = threading.Event(), threading.Event()

    def blocking(x: int) -> int:
        try:
            release.wait(10)
            return x
        finally:
            finished.set()

    started = anyio.current_time()
    with pytest.raises(TimeoutError, match=r"^Retry deadline=0\.1 s passed"):
        await Retry(3, deadline=0.1).call(blocking, 1)
    elapsed = anyio.current_time() - started
    assert not finished.is_set()
    release.set()
    assert await anyio.to_thread.run_sync(finished.wait, 10)
    if exact:
        assert elapsed == pytest.approx(0.1, abs=1e-9)
    else:
        assert 0.1 - CLOCK_GRAIN <= elapsed < 1


async def test_call_honours_retry_after(exact: bool) -> None:
    """A single call waits a Retry-After as a pool does, past wait_max."""
    times: list[float] = []

    class Throttled(Exception):
        retry_after = 0.3

    async def fetch() -> str:
        times.append(anyio.current_time())
        if len(times) == 1:
            raise Throttled
        return "ok"

    assert await Retry(2, wait_initial=0.001, wait_max=0.01).call(fetch) == "ok"
    gap = times[1] - times[0]
    if exact:
        assert gap == pytest.approx(0.3, abs=1e-9)
    else:
        assert 0.3 - CLOCK_GRAIN <= gap < 0.4


async def test_call_is_not_retried_when_cancelled() -> None:
    """Cancelling a call's task stops it at once: one call, no retry."""
    started = anyio.Event()
    calls = 0

    async def forever() -> None:
        nonlocal calls
        calls += 1
        started.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(Retry(3, wait_initial=0).call, forever)
        await started.wait()
        tg.cancel_scope.cancel()
    assert calls == 1


async def test_call_with_on_result_and_the_hooks_item() -> None:
    """on_result gives up with a RetryError on a single call too; before_sleep
    is given functools.partial(fn, *args, **kwargs) as the item."""
    items: list[Any] = []

    async def poll(job: str, *, page: int) -> str:
        return "pending"

    retry = Retry(
        2,
        wait_initial=0,
        on_result=lambda r: r == "pending",
        before_sleep=lambda *a: items.append(a),
    )
    with pytest.raises(RetryError) as caught:
        await retry.call(poll, "j1", page=3)
    assert (caught.value.result, caught.value.attempts) == ("pending", 2)
    [(item, result, attempt, wait)] = items
    assert isinstance(item, functools.partial)
    assert (item.func, item.args, item.keywords) == (poll, ("j1",), {"page": 3})
    assert (result, attempt, wait) == ("pending", 1, 0.0)


# ------------------------------------------------------------ as a decorator


def test_decorating_keeps_the_name_and_doc_and_makes_an_async_function() -> None:
    """@retry keeps the function's name, doc and signature (functools.wraps),
    and what it gives, for an async or a plain function, is an async function;
    the decorating itself returns the function, not a coroutine."""
    retry = Retry(2)

    async def fetch(key: str) -> str:
        """Fetch a key."""
        return key

    def read(path: str) -> str:
        """Read a file."""
        return path

    for fn in (fetch, read):
        decorated = retry(fn)
        assert not inspect.iscoroutine(decorated)
        assert inspect.iscoroutinefunction(decorated)
        assert decorated.__name__ == fn.__name__
        assert decorated.__doc__ == fn.__doc__
        assert decorated.__wrapped__ is fn  # type: ignore[attr-defined]
        assert inspect.signature(decorated) == inspect.signature(fn)


async def test_a_decorated_plain_function_is_awaited_and_retried() -> None:
    """@retry on a plain function: awaited, run in a thread, retried."""
    threads: list[int] = []

    @Retry(3, wait_initial=0)
    def read(path: str, *, mode: str = "r") -> str:
        threads.append(threading.get_ident())
        if len(threads) < 2:
            raise OSError
        return f"{path}:{mode}"

    assert await read("a", mode="rb") == "a:rb"
    assert len(threads) == 2
    assert threading.get_ident() not in threads


async def test_a_decorated_async_function_gives_up_as_the_policy_says() -> None:
    """@retry on an async function: the policy's attempts and on apply."""
    handler = failing(5)
    fetch = Retry(3, wait_initial=0, on=Busy)(handler)
    with pytest.raises(Busy):
        await fetch(1)
    assert len(handler.errors) == 3


# ------------------------------------------------------------ bad arguments


async def _async_predicate(result: Any) -> bool:
    return True


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Retry(on_result=3), TypeError, "on_result must be a predicate"),
        (lambda: Retry(on_result=_async_predicate), TypeError, "on_result must be a plain"),
        (lambda: Retry(before_sleep="log"), TypeError, "before_sleep must be a function"),
        (lambda: Retry(budget=0.2), TypeError, "budget must be a corral.RetryBudget"),
        (lambda: RetryBudget(ratio=-0.1), ValueError, "ratio must be >= 0"),
        (lambda: RetryBudget(ratio=math.nan), ValueError, "ratio must be >= 0"),
        (lambda: RetryBudget(ratio=math.inf), ValueError, "ratio must be finite"),
        (lambda: RetryBudget(ratio="0.2"), TypeError, "ratio must be a number"),
        (lambda: RetryBudget(min_per_second=-1), ValueError, "min_per_second must be >= 0"),
        (lambda: RetryBudget(min_per_second=None), TypeError, "min_per_second must be a number"),
        (lambda: RetryBudget(window=0), ValueError, "window must be > 0"),
        (lambda: Retry()(42), TypeError, "a Retry decorates a function"),
    ],
)
def test_bad_arguments_name_the_parameter(make: Any, error: type[Exception], match: str) -> None:
    """Each bad argument is refused, naming itself."""
    with pytest.raises(error, match=match):
        make()


async def test_call_refuses_what_is_not_a_function() -> None:
    """retry.call needs a callable: a coroutine object is refused (and closed)."""
    handler = failing(0)
    with pytest.raises(TypeError, match="fn must be a callable, got a coroutine"):
        await Retry().call(handler())


async def test_a_retry_cancelled_during_its_wait_is_given_back_to_the_budget() -> None:
    """The budget counts retries made: one allowed and then cancelled while it
    waited is given back, so cancellation never spends the budget."""
    budget = RetryBudget(ratio=0.0, min_per_second=0.1)  # one retry per 10 s
    waiting = anyio.Event()

    async def failing(x: int) -> int:
        raise ConnectionError("down")

    def note(*args: Any) -> None:
        waiting.set()

    retry = Retry(2, wait_initial=60, wait_jitter=False, budget=budget, before_sleep=note)
    async with anyio.create_task_group() as tg:
        tg.start_soon(retry.call, failing, 1)
        await waiting.wait()
        tg.cancel_scope.cancel()
    statistics = budget.statistics()
    assert (statistics.retries, statistics.available) == (0, 1)
