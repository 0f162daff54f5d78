"""apply_to_all and apply_to_each: order, laziness, early exit, iterables."""

from __future__ import annotations

import gc
import inspect
import itertools
import pydoc
import random
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import corral._helpers
from corral import ApplyToEach, Outcome, Outcomes, Pool, apply_to_all, apply_to_each

pytestmark = pytest.mark.anyio


async def test_apply_to_all_keeps_input_order_under_random_delays() -> None:
    """1,000 items with random delays: outcomes come back in input order, each once."""
    rng = random.Random(1234)
    delays = [rng.random() * 0.002 for _ in range(1000)]

    async def handler(i: int) -> int:
        await anyio.sleep(delays[i])
        return i * i

    outcomes = await apply_to_all(handler, range(1000), workers=50)
    assert [o.index for o in outcomes] == list(range(1000))
    assert [o.item for o in outcomes] == list(range(1000))
    assert [o.result for o in outcomes] == [i * i for i in range(1000)]
    assert all(o.ok and o.attempts == 1 for o in outcomes)


async def test_apply_to_all_errors_are_values() -> None:
    """One failing item is an error outcome; the others are unaffected."""

    async def handler(x: int) -> int:
        if x == 7:
            raise ValueError("seven")
        return x

    outcomes = await apply_to_all(handler, range(10), workers=3)
    assert [o.ok for o in outcomes] == [i != 7 for i in range(10)]
    assert isinstance(outcomes[7].error, ValueError)
    with pytest.raises(ValueError, match="seven"):
        outcomes[7].unwrap()


async def test_apply_to_all_outcomes_have_every_field_whatever_path_made_them() -> None:
    """Over several chunks of items, with failures and with a full queue (so
    that some items go through the blocking submit): every outcome is a real
    Outcome with its item, index, id, result or error, attempts and elapsed."""

    async def handler(x: int) -> int:
        if x % 500 == 0:
            await anyio.sleep(0.01)
        else:
            await anyio.lowlevel.checkpoint()
        if x % 7 == 3:
            raise ValueError(x)
        return -x

    count = 9_000
    outcomes = await apply_to_all(handler, iter(range(count)), workers=20, max_pending=16)
    assert len(outcomes) == count
    for index, outcome in enumerate(outcomes):
        assert type(outcome) is Outcome
        assert (outcome.item, outcome.index, outcome.id, outcome.attempts) == (
            index,
            index,
            index,
            1,
        )
        if index % 7 == 3:
            assert outcome.result is None
            assert isinstance(outcome.error, ValueError)
            assert outcome.error.args == (index,)
        else:
            assert (outcome.result, outcome.error) == (-index, None)
        assert outcome.elapsed >= (0.009 if index % 500 == 0 else 0.0)


async def test_apply_to_all_empty_input() -> None:
    """No items, no outcomes, no hang."""

    async def handler(x: int) -> int:
        return x

    assert await apply_to_all(handler, []) == []


async def test_apply_to_all_accepts_async_iterables_and_streams() -> None:
    """An async generator and an anyio memory stream both work as input."""

    async def agen() -> AsyncIterator[int]:
        for i in range(5):
            await anyio.lowlevel.checkpoint()
            yield i

    async def handler(x: int) -> int:
        return x + 1

    assert [o.result for o in await apply_to_all(handler, agen())] == [1, 2, 3, 4, 5]

    send, receive = anyio.create_memory_object_stream[int](10)
    async with send, receive:
        for i in range(3):
            send.send_nowait(i)
        send.close()
        assert [o.result for o in await apply_to_all(handler, receive)] == [1, 2, 3]


async def test_apply_to_all_pulls_lazily() -> None:
    """While the first items are stuck, only a bounded window of a lazy input was
    taken: workers + max_pending (+1 in hand), not the whole input."""
    pulled = 0
    release = anyio.Event()

    def items() -> Iterator[int]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield i

    async def handler(x: int) -> int:
        await release.wait()
        return x

    async with anyio.create_task_group() as tg:

        async def run() -> None:
            outcomes = await apply_to_all(handler, items(), workers=4, max_pending=6)
            assert len(outcomes) == 10_000

        tg.start_soon(run)
        await anyio.wait_all_tasks_blocked()
        assert pulled <= 4 + 6 + 1
        release.set()
    assert pulled == 10_000


async def test_apply_to_all_runs_sync_handlers_in_threads() -> None:
    """A plain function works as the handler."""
    outcomes = await apply_to_all(lambda x: x * 3, range(20), workers=4)
    assert [o.result for o in outcomes] == [x * 3 for x in range(20)]


async def test_apply_to_all_iterable_error_propagates_after_cleanup() -> None:
    """An exception raised by the input itself comes out of apply_to_all unwrapped."""
    finished = []

    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("input broke")

    async def handler(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        finished.append(x)
        return x

    with pytest.raises(OSError, match="input broke"):
        await apply_to_all(handler, items())


async def test_apply_to_all_fail_fast_raises_the_first_failure() -> None:
    """fail_fast in a helper: the first failure is raised as itself."""

    async def handler(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        if x == 3:
            raise LookupError(x)
        return x

    with pytest.raises(LookupError):
        await apply_to_all(handler, range(100), workers=2, fail_fast=True)


async def test_apply_to_each_completion_order() -> None:
    """Without ordered=True, outcomes arrive as items complete."""
    events = {i: anyio.Event() for i in range(3)}

    async def handler(i: int) -> int:
        await events[i].wait()
        return i

    got: list[int] = []
    async with apply_to_each(handler, range(3), workers=3) as outcomes:
        await anyio.wait_all_tasks_blocked()
        for i in (2, 0, 1):
            events[i].set()
            got.append((await outcomes.__anext__()).item)
        with pytest.raises(StopAsyncIteration):
            await outcomes.__anext__()
    assert got == [2, 0, 1]


async def test_apply_to_each_ordered_gives_input_order() -> None:
    """ordered=True yields in input order whatever the completion order."""
    rng = random.Random(99)
    delays = [rng.random() * 0.002 for _ in range(300)]

    async def handler(i: int) -> int:
        await anyio.sleep(delays[i])
        return i

    async with apply_to_each(handler, range(300), ordered=True, workers=20) as outcomes:
        got = [o.item async for o in outcomes]
    assert got == list(range(300))


async def test_apply_to_each_ordered_reorder_buffer_is_bounded() -> None:
    """A stuck first item stops the input from being pulled beyond the window."""
    pulled = 0
    first = anyio.Event()

    def items() -> Iterator[int]:
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield i

    async def handler(i: int) -> int:
        if i == 0:
            await first.wait()
        return i

    async with apply_to_each(handler, items(), ordered=True, workers=2, max_pending=3) as outcomes:
        await anyio.wait_all_tasks_blocked()
        assert pulled <= 2 + 3 + 1
        first.set()
        got = [o.item async for o in outcomes]
    assert got == list(range(1000))


async def test_apply_to_each_break_from_endless_input_returns_promptly() -> None:
    """break out of an endless generator: the block ends at once, only a bounded
    window was pulled, no task is left running, the rest is reported unfinished."""
    pulled = 0
    running: set[int] = set()

    def endless() -> Iterator[int]:
        nonlocal pulled
        i = 0
        while True:
            pulled += 1
            yield i
            i += 1

    async def handler(i: int) -> int:
        running.add(i)
        try:
            if i >= 20:
                await anyio.sleep_forever()
            await anyio.lowlevel.checkpoint()
            return i
        finally:
            running.discard(i)

    seen: list[Outcome[int, int]] = []
    with anyio.fail_after(10):
        async with apply_to_each(handler, endless(), workers=4, max_pending=4) as outcomes:
            async for outcome in outcomes:
                seen.append(outcome)
                if len(seen) == 20:
                    break
    assert not running
    assert pulled <= len(seen) + 4 + 4 + 4 + 2
    assert {o.item for o in seen}.isdisjoint(outcomes.unfinished)
    assert sorted(o.item for o in seen) == list(range(20))
    assert outcomes.unfinished == list(range(20, 20 + len(outcomes.unfinished)))


async def test_apply_to_each_exception_in_block_stops_everything() -> None:
    """An exception inside the block cancels the work and comes out unwrapped."""
    cancelled: list[int] = []

    async def handler(i: int) -> int:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.append(i)
        return i

    with pytest.raises(ZeroDivisionError):
        async with apply_to_each(handler, range(5), workers=5) as outcomes:
            await anyio.wait_all_tasks_blocked()
            _ = 1 / 0
    assert sorted(cancelled) == [0, 1, 2, 3, 4]
    assert outcomes.unfinished == [0, 1, 2, 3, 4]


async def test_apply_to_each_cancelled_from_outside_leaves_nothing_running() -> None:
    """Cancelling the caller's scope stops the helper's tasks; nothing survives."""
    running = 0

    async def handler(i: int) -> int:
        nonlocal running
        running += 1
        try:
            await anyio.sleep_forever()
        finally:
            running -= 1
        return i

    with anyio.CancelScope() as scope:
        async with apply_to_each(handler, range(100), workers=8) as outcomes:
            await anyio.wait_all_tasks_blocked()
            assert running == 8
            scope.cancel()
            async for _ in outcomes:
                pass
    assert scope.cancelled_caught
    assert running == 0
    assert len(outcomes.unfinished) <= 8 + 16 + 1
    assert outcomes.unfinished == sorted(outcomes.unfinished)


async def test_bare_async_for_over_apply_to_each_explains_itself() -> None:
    """Forgetting `async with` gives a TypeError that shows the right usage."""

    async def handler(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="async with apply_to_each"):
        async for _ in apply_to_each(handler, range(3)):  # type: ignore[attr-defined]
            pass


async def test_await_on_apply_to_each_explains_itself() -> None:
    """Awaiting apply_to_each(...) instead of entering it gives the same TypeError
    as a bare async for, showing the right usage; nothing is left behind that
    warns later (no coroutine never awaited, no pool started)."""
    started: list[int] = []

    async def handler(x: int) -> int:
        started.append(x)
        return x

    with pytest.raises(TypeError, match="async with apply_to_each") as awaited:
        await apply_to_each(handler, range(3))  # type: ignore[misc]
    with pytest.raises(TypeError) as iterated:
        async for _ in apply_to_each(handler, range(3)):  # type: ignore[attr-defined]
            pass
    assert str(awaited.value) == str(iterated.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert caught == []
    await anyio.wait_all_tasks_blocked()
    assert started == []


async def test_apply_to_each_input_error_propagates() -> None:
    """An async input that raises midway: the error comes out of the block."""

    async def items() -> AsyncIterator[int]:
        yield 1
        raise OSError("feed broke")

    async def handler(x: int) -> int:
        return x

    with pytest.raises(OSError, match="feed broke"):
        async with apply_to_each(handler, items()) as outcomes:
            async for _ in outcomes:
                pass


async def test_apply_to_each_on_outcome_sees_every_item() -> None:
    """on_outcome passed to a helper is called for every outcome, as with a Pool."""
    seen: list[Any] = []

    async def handler(x: int) -> int:
        return x

    async with apply_to_each(handler, range(10), on_outcome=seen.append) as outcomes:
        got = [o async for o in outcomes]
    assert sorted(o.item for o in seen) == list(range(10))
    assert sorted(o.item for o in got) == list(range(10))


async def test_apply_to_all_fail_fast_is_reraised_whatever_the_timing() -> None:
    """However the failure interleaves with the feeding (during a submit's
    checkpoint, while waiting for room, after the input ran out), the caller
    gets the handler's error itself, never PoolClosed or a group."""
    for workers in (1, 2, 3, 5, 8):
        for failing in (0, 1, 4, 9, 30, 99):

            async def handler(x: int, failing: int = failing) -> int:
                if x % 3 == 0:
                    await anyio.lowlevel.checkpoint()
                if x == failing:
                    raise LookupError(x)
                return x

            with pytest.raises(LookupError) as info:
                await apply_to_all(handler, range(100), workers=workers, fail_fast=True)
            assert info.value.args == (failing,)


async def test_apply_to_each_gives_its_public_types() -> None:
    """apply_to_each returns an ApplyToEach, whose block gives an Outcomes (the
    names exported for annotations)."""

    async def double(x: int) -> int:
        return 2 * x

    each = apply_to_each(double, [1, 2])
    assert isinstance(each, ApplyToEach)
    async with each as outcomes:
        assert isinstance(outcomes, Outcomes)
        assert sorted([o.result async for o in outcomes]) == [2, 4]


def _keyword_options(function: Any) -> list[tuple[str, Any, Any]]:
    """(name, kind, default) of each keyword-only parameter, in order."""
    return [
        (parameter.name, parameter.kind, parameter.default)
        for parameter in inspect.signature(function).parameters.values()
        if parameter.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]


def test_helpers_take_exactly_the_options_of_pool() -> None:
    """The helpers' keyword parameters are Pool's (names, order, defaults, all
    keyword-only), plus apply_to_each's ordered: an option added to Pool
    without the helpers fails here."""
    pool_options = _keyword_options(Pool.__init__)
    assert pool_options
    assert all(kind is inspect.Parameter.KEYWORD_ONLY for _, kind, _ in pool_options)
    assert _keyword_options(apply_to_all) == pool_options
    ordered, *each_options = _keyword_options(apply_to_each)
    assert ordered == ("ordered", inspect.Parameter.KEYWORD_ONLY, False)
    assert each_options == pool_options


def test_help_shows_the_helpers_options() -> None:
    """help() (and so IDEs and the API reference) shows each helper's real
    keyword options with their defaults, not ``**options``."""
    for helper in (apply_to_all, apply_to_each):
        text = pydoc.render_doc(helper, renderer=pydoc.plaintext)
        assert "**options" not in text
        assert "workers: 'int' = 10" in text
        assert "fail_fast: 'bool' = False" in text
        assert "stats_interval: 'float' = 1.0" in text
    assert "ordered: 'bool' = False" in pydoc.render_doc(apply_to_each, renderer=pydoc.plaintext)


async def test_a_misspelt_option_is_refused_naming_the_helper() -> None:
    """A wrong keyword raises Python's own TypeError naming the helper the
    caller called (not Pool), at the call."""

    async def handler(x: int) -> int:
        return x

    with pytest.raises(
        TypeError, match=r"^apply_to_all\(\) got an unexpected keyword argument 'rate'"
    ):
        await apply_to_all(handler, [1], rate=50)  # type: ignore[call-overload]
    with pytest.raises(
        TypeError, match=r"^apply_to_each\(\) got an unexpected keyword argument 'rate'"
    ):
        async with apply_to_each(handler, [1], rate=50) as outcomes:  # type: ignore[call-overload]
            async for _ in outcomes:
                pass


# -- a generator given as input is closed when corral stops reading it early --


class _Input:
    """An endless input that records when its generator's cleanup has run.

    ``kind`` is an async generator (its ``finally`` awaits, so it completes
    only if the close is shielded from the cancellation that stopped the
    feeding), a sync generator, or an async iterable whose ``__aiter__`` makes
    an async generator (the iterator corral itself made). The generators do
    not await between items, so whenever the feeding waits they are suspended
    at their ``yield``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.closed = False
        # the generator stays referenced, as by a caller's variable: reference
        # counting cannot close it when corral drops it
        self.generator: Any = None

    async def _agen(self) -> AsyncIterator[int]:
        try:
            for i in itertools.count():
                yield i
        finally:
            await anyio.lowlevel.checkpoint()
            self.closed = True

    def _gen(self) -> Iterator[int]:
        try:
            yield from itertools.count()
        finally:
            self.closed = True

    def items(self) -> Any:
        if self.kind == "async generator":
            self.generator = self._agen()
            return self.generator
        if self.kind == "sync generator":
            self.generator = self._gen()
            return self.generator
        outer = self

        class Numbers:
            def __aiter__(self) -> AsyncIterator[int]:
                outer.generator = outer._agen()
                return outer.generator

        return Numbers()


INPUT_KINDS = ["async generator", "sync generator", "async iterable of an async generator"]


async def _first_returns_others_hang(x: int) -> int:
    if x:
        await anyio.sleep_forever()
    return x


async def _first_fails_others_hang(x: int) -> int:
    if x:
        await anyio.sleep_forever()
    raise LookupError(x)


def _raise_lookup_error(outcome: Outcome[int, int]) -> None:
    raise LookupError(outcome.item)


@pytest.mark.parametrize("kind", INPUT_KINDS)
async def test_apply_to_each_break_closes_a_generator_input(kind: str) -> None:
    """break out of apply_to_each: the generator's finally has run when the
    block ends (not later, in a garbage collector finalizer)."""
    source = _Input(kind)
    async with apply_to_each(
        _first_returns_others_hang, source.items(), workers=2, max_pending=2
    ) as outcomes:
        async for _ in outcomes:
            break
    assert source.closed
    assert outcomes.unfinished


@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("stop", ["fail_fast", "on_outcome raises", "the block raises"])
async def test_apply_to_each_error_closes_a_generator_input(kind: str, stop: str) -> None:
    """fail_fast, an on_outcome that raises or the block's own exception: the
    block raises that exception, and the generator's finally has run (also
    when it awaits, under the cancellation that stopped the pool)."""
    source = _Input(kind)
    handler = _first_fails_others_hang if stop == "fail_fast" else _first_returns_others_hang
    options: dict[str, Any] = {"workers": 2, "max_pending": 2}
    if stop == "fail_fast":
        options["fail_fast"] = True
    elif stop == "on_outcome raises":
        options["on_outcome"] = _raise_lookup_error
    with pytest.raises(LookupError):
        async with apply_to_each(handler, source.items(), **options) as outcomes:
            async for outcome in outcomes:
                if stop == "the block raises":
                    raise LookupError(outcome.item)
    assert source.closed


@pytest.mark.parametrize("kind", INPUT_KINDS)
async def test_apply_to_each_cancelled_closes_a_generator_input(kind: str) -> None:
    """Cancelled from outside: the generator's finally has run, awaits
    included, when the block ends."""
    source = _Input(kind)
    with anyio.CancelScope() as scope:
        async with apply_to_each(
            _first_returns_others_hang, source.items(), workers=2, max_pending=2
        ) as outcomes:
            async for _ in outcomes:
                scope.cancel()
    assert scope.cancelled_caught
    assert source.closed


@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("stop", ["fail_fast", "on_outcome raises", "cancelled"])
async def test_apply_to_all_closes_a_generator_input(kind: str, stop: str) -> None:
    """apply_to_all stopped by fail_fast, an on_outcome that raises or a
    cancellation: the generator's finally has run, awaits included, when the
    call ends."""
    source = _Input(kind)
    if stop == "cancelled":
        with anyio.CancelScope() as scope:

            def cancel(outcome: Outcome[int, int]) -> None:
                scope.cancel()

            await apply_to_all(
                _first_returns_others_hang,
                source.items(),
                workers=2,
                max_pending=2,
                on_outcome=cancel,
            )
        assert scope.cancelled_caught
    else:
        with pytest.raises(LookupError):
            if stop == "fail_fast":
                await apply_to_all(
                    _first_fails_others_hang,
                    source.items(),
                    workers=2,
                    max_pending=2,
                    fail_fast=True,
                )
            else:
                await apply_to_all(
                    _first_returns_others_hang,
                    source.items(),
                    workers=2,
                    max_pending=2,
                    on_outcome=_raise_lookup_error,
                )
    assert source.closed


async def test_a_generator_cleanup_that_raises_does_not_replace_the_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A generator whose cleanup raises: the block still raises its own
    exception; the cleanup's error is logged at ERROR on corral.pool."""

    async def items() -> AsyncIterator[int]:
        try:
            for i in itertools.count():
                yield i
        finally:
            raise OSError("cleanup broke")

    with pytest.raises(LookupError, match="the block's"):
        async with apply_to_each(
            _first_returns_others_hang, items(), workers=2, max_pending=2
        ) as outcomes:
            async for _ in outcomes:
                raise LookupError("the block's")
    [record] = [r for r in caplog.records if r.name.startswith("corral.pool")]
    assert record.levelname == "ERROR"
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], OSError)


async def test_a_generator_cleanup_that_hangs_is_cut_off_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A generator whose cleanup never ends cannot hold the block: its cleanup
    is cancelled after the bound, and that is logged at WARNING on corral.pool."""
    monkeypatch.setattr(corral._helpers, "_CLOSE_INPUT_TIMEOUT", 0.05)
    cut_off = False

    async def items() -> AsyncIterator[int]:
        nonlocal cut_off
        try:
            for i in itertools.count():
                yield i
        finally:
            try:
                await anyio.sleep_forever()
            finally:
                cut_off = True

    with anyio.fail_after(10):
        async with apply_to_each(
            _first_returns_others_hang, items(), workers=2, max_pending=2
        ) as outcomes:
            async for _ in outcomes:
                break
    assert cut_off
    [record] = [r for r in caplog.records if r.name.startswith("corral.pool")]
    assert record.levelname == "WARNING"
    assert "cancelled" in record.getMessage()


async def test_a_receive_stream_given_as_input_is_not_closed() -> None:
    """Only generators are closed: a receive stream passed as items is the
    caller's, and stays open after breaking out of apply_to_each."""
    send, receive = anyio.create_memory_object_stream[int](100)
    async with send, receive:
        for i in range(100):
            send.send_nowait(i)
        async with apply_to_each(
            _first_returns_others_hang, receive, workers=2, max_pending=2
        ) as outcomes:
            async for _ in outcomes:
                break
        left = receive.statistics().current_buffer_used
        assert left > 0
        assert receive.receive_nowait() == 100 - left
        send.send_nowait(100)


# ------------------------------------------------------ backpressure_waits


async def test_a_helper_counts_no_backpressure_waits_of_its_own() -> None:
    """backpressure_waits counts a caller's submits that waited for room: the
    helpers, which feed a pool of their own and wait for room before taking
    each next item, report none: that wait is the helper's pacing."""

    async def handler(item: int) -> int:
        await anyio.lowlevel.checkpoint()
        return item

    async def numbers() -> AsyncIterator[int]:
        for i in range(100):
            yield i

    seen: list[corral.PoolStats] = []
    await apply_to_all(handler, range(100), workers=2, max_pending=2, on_stats=seen.append)
    await apply_to_all(handler, numbers(), workers=2, max_pending=2, on_stats=seen.append)
    async with apply_to_each(
        handler, range(100), workers=2, max_pending=2, on_stats=seen.append
    ) as outcomes:
        assert len([o async for o in outcomes]) == 100
    assert [(s.submitted, s.backpressure_waits) for s in seen] == [(100, 0)] * 3


async def test_a_callers_submit_that_waits_for_room_is_still_counted() -> None:
    """A submit of the caller's own that finds the pool full waits and is
    counted in backpressure_waits; one that finds room is not."""
    gate = anyio.Event()

    async def handler(item: int) -> int:
        await gate.wait()
        return item

    seen: list[corral.PoolStats] = []
    async with Pool(handler, workers=1, max_pending=1, on_stats=seen.append) as pool:
        await pool.submit(0)
        await anyio.wait_all_tasks_blocked()  # the worker took it and waits on the gate
        await pool.submit(1)  # queued: the pool is full
        assert pool.stats.backpressure_waits == 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.submit, 2)
            await anyio.wait_all_tasks_blocked()
            assert pool.stats.backpressure_waits == 1
            gate.set()
    assert seen[-1].backpressure_waits == 1
    assert seen[-1].succeeded == 3
