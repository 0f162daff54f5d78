"""apply_to_all and apply_to_each: a Pool fed from an iterable.

Both pull lazily: an item is taken from ``items`` only when the pool has room
for it, so at most ``workers + max_pending`` items are in the pool, plus the
one being handed over, whatever the length of the input. ``apply_to_each``
counts the outcomes its consumer has not taken yet against the same bound.

When feeding stops before the input is exhausted, a generator the helper was
reading is closed before the helper's call or block ends (``_close_input``);
any other iterator is left to its owner.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Iterator,
    Sequence,
    Sized,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar, overload

import anyio
from anyio.lowlevel import checkpoint

from ._breaker import CircuitBreaker
from ._errors import PoolClosed
from ._hedge import Hedge
from ._middleware import Middleware, RateLimiter, Timeout
from ._observe import ProgressBar
from ._outcome import Outcome
from ._pool import Pool, PoolStats, _Collected
from ._retry import Retry
from ._validate import check_bool

__all__ = ["ApplyToEach", "Outcomes", "apply_to_all", "apply_to_each"]

T = TypeVar("T")
R = TypeVar("R")


def _check_items(items: object) -> None:
    if not isinstance(items, (Iterable, AsyncIterable)):
        raise TypeError(f"items must be an iterable or an async iterable, got {items!r}")


def _count_for_progress(pool: Pool[Any, Any], items: object) -> None:
    """A progress bar's total: the input's length, when it has one. An async
    iterable's items come over time (a :class:`~corral.Queue`'s ``len`` is what
    is queued now), so its length is not taken as the total."""
    if isinstance(items, AsyncIterable) or not pool._observer.wants_total:
        return
    if isinstance(items, Sized):
        try:
            pool._observer.total = len(items)
        except (TypeError, OverflowError):  # a length beyond what len() can say
            pool._observer.total = None


# How long corral lets a generator it took as input run its cleanup (its
# ``finally`` blocks, after ``aclose()``) when it stops reading it early, so
# that a generator can close what it opened (a connection, a file, a cursor)
# before the block ends, while a cleanup that hangs delays the block's exit, or
# a cancellation, by this much at most. Past it, the cleanup is cancelled.
_CLOSE_INPUT_TIMEOUT = 5.0


async def _feed(
    pool: Pool[T, R],
    items: Iterable[T] | AsyncIterable[T],
    after_submit: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Submit every item of ``items`` to ``pool``.

    Fills the queue without yielding while it has room and waits (a
    checkpoint) only when it is full, so the workers run in batches. An item
    taken from ``items`` whose submit is interrupted is recorded as unfinished.
    A plain iterable with no ``after_submit`` (``apply_to_all``) is taken by
    ``Pool._fill``, one call per refill rather than one per item.

    If feeding stops before the input is exhausted (an exception, a
    cancellation), a generator that corral took as its iterator is closed
    before this returns (see :func:`_close_input`); other iterators are the
    caller's and are left alone.
    """
    iterator: Iterator[T] | AsyncIterator[T]
    if isinstance(items, AsyncIterable):
        iterator = aiter(items)
        feeding = _feed_async(pool, iterator, after_submit)
    else:
        iterator = iter(items)
        feeding = _feed_sync(pool, iterator, after_submit)
    try:
        await feeding
    except BaseException:
        await _close_input(pool, iterator)
        raise


async def _feed_async(
    pool: Pool[T, Any],
    iterator: AsyncIterator[T],
    after_submit: Callable[[], Awaitable[None]] | None,
) -> None:
    submit_if_room = pool._submit_if_room
    take = iterator.__anext__
    while True:
        try:
            item = await take()
        except StopAsyncIteration:
            return
        if not submit_if_room(item):
            await _submit_or_orphan(pool, item)
        if after_submit is not None:
            await after_submit()


async def _feed_sync(
    pool: Pool[T, Any],
    iterator: Iterator[T],
    after_submit: Callable[[], Awaitable[None]] | None,
) -> None:
    if after_submit is None:
        while not pool._fill(iterator):  # no room: submit the next item, waiting
            for item in iterator:
                await _submit_or_orphan(pool, item)
                break
            else:
                return
    else:
        submit_if_room = pool._submit_if_room
        for item in iterator:
            if not submit_if_room(item):
                await _submit_or_orphan(pool, item)
            await after_submit()


async def _close_input(pool: Pool[Any, Any], iterator: Iterator[Any] | AsyncIterator[Any]) -> None:
    """Close ``iterator`` if it is a generator that feeding left suspended.

    An async generator gets ``aclose()`` in a shielded scope bounded by
    ``_CLOSE_INPUT_TIMEOUT`` (its ``finally`` may await, also under
    cancellation; past the bound it is cancelled, logged at WARNING); a sync
    generator gets ``close()``. What their cleanup raises is logged at ERROR
    and does not replace the exception feeding stopped with. A generator that
    already finished (it raised, or was closed) is not affected. Any other
    iterator (a receive stream, a list iterator) is left as it is.
    """
    if inspect.isasyncgen(iterator):
        deadline = anyio.current_time() + _CLOSE_INPUT_TIMEOUT
        with anyio.CancelScope(shield=True, deadline=deadline) as scope:
            try:
                await iterator.aclose()
            except Exception:  # noqa: BLE001 - logged; the exception in flight goes on
                pool._log.exception("closing the input, an async generator, raised")
        if scope.cancelled_caught:
            pool._log.warning(
                "the input, an async generator, did not finish closing within %g "
                "seconds; its cleanup was cancelled",
                _CLOSE_INPUT_TIMEOUT,
            )
    elif inspect.isgenerator(iterator):
        try:
            iterator.close()
        except Exception:  # noqa: BLE001 - logged; the exception in flight goes on
            pool._log.exception("closing the input, a generator, raised")


async def _submit_or_orphan(pool: Pool[T, Any], item: T) -> None:
    """Submit ``item``, waiting for room (not counted in ``backpressure_waits``:
    it is the helper's own pacing, no caller's wait)."""
    try:
        await pool._submit_paced(item)
    except BaseException:
        pool._run.orphans.append(item)
        raise


@overload
async def apply_to_all(
    handler: Callable[[T], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    *,
    workers: int = 10,
    max_pending: int | None = None,
    retry: Retry | None = None,
    rate_limit: RateLimiter | None = None,
    limiter: AbstractAsyncContextManager[object] | None = None,
    breaker: CircuitBreaker | None = None,
    hedge: Hedge | None = None,
    timeout: float | Timeout | None = None,  # noqa: ASYNC109 - per-attempt, the contract's name
    middleware: Sequence[Middleware] = (),
    on_outcome: Callable[[Outcome[T, R]], Any] | None = None,
    fail_fast: bool = False,
    name: str | None = None,
    progress: bool | ProgressBar = False,
    on_stats: Callable[[PoolStats], object] | None = None,
    stats_interval: float = 1.0,
    key: Callable[[T], Hashable] | None = None,
    per_key: int = 1,
    cost: Callable[[T], int] | None = None,
) -> list[Outcome[T, R]]: ...
@overload
async def apply_to_all(
    handler: Callable[[T], R],
    items: Iterable[T] | AsyncIterable[T],
    *,
    workers: int = 10,
    max_pending: int | None = None,
    retry: Retry | None = None,
    rate_limit: RateLimiter | None = None,
    limiter: AbstractAsyncContextManager[object] | None = None,
    breaker: CircuitBreaker | None = None,
    hedge: Hedge | None = None,
    timeout: float | Timeout | None = None,  # noqa: ASYNC109 - per-attempt, the contract's name
    middleware: Sequence[Middleware] = (),
    on_outcome: Callable[[Outcome[T, R]], Any] | None = None,
    fail_fast: bool = False,
    name: str | None = None,
    progress: bool | ProgressBar = False,
    on_stats: Callable[[PoolStats], object] | None = None,
    stats_interval: float = 1.0,
    key: Callable[[T], Hashable] | None = None,
    per_key: int = 1,
    cost: Callable[[T], int] | None = None,
) -> list[Outcome[T, R]]: ...
async def apply_to_all(
    handler: Callable[[T], Any],
    items: Iterable[T] | AsyncIterable[T],
    *,
    workers: int = 10,
    max_pending: int | None = None,
    retry: Retry | None = None,
    rate_limit: RateLimiter | None = None,
    limiter: AbstractAsyncContextManager[object] | None = None,
    breaker: CircuitBreaker | None = None,
    hedge: Hedge | None = None,
    timeout: float | Timeout | None = None,  # noqa: ASYNC109 - per-attempt, the contract's name
    middleware: Sequence[Middleware] = (),
    on_outcome: Callable[[Outcome[T, Any]], Any] | None = None,
    fail_fast: bool = False,
    name: str | None = None,
    progress: bool | ProgressBar = False,
    on_stats: Callable[[PoolStats], object] | None = None,
    stats_interval: float = 1.0,
    key: Callable[[T], Hashable] | None = None,
    per_key: int = 1,
    cost: Callable[[T], int] | None = None,
) -> list[Outcome[T, Any]]:
    """Run ``handler`` on every item and return the outcomes in input order.

    Waits until every item has its outcome (like leaving a :class:`Pool`'s
    block); always a checkpoint, unless its arguments are refused. Errors are
    values (``Outcome.error``); the call raises only for ``fail_fast`` (the
    first failure), an error raised by ``items`` itself or by ``on_outcome``
    or ``on_stats``, or cancellation, in each case after every task stopped,
    unwrapped. Cancelling it cancels the handlers still running and drops the
    outcomes gathered so far: to keep partial results, use
    :func:`apply_to_each` or a :class:`Pool`. Takes the keyword options of
    :class:`Pool`; a bad one (or ``items`` that is not iterable) raises
    ``TypeError`` or ``ValueError`` before any item is taken. The stats that
    ``on_stats`` gets count no ``backpressure_waits``: the call waiting for
    room before it takes the next item is its own pacing, not a caller's wait.

    >>> import anyio
    >>> async def square(x: int) -> int:
    ...     return x * x
    >>> outcomes = anyio.run(apply_to_all, square, range(4))
    >>> [o.result for o in outcomes]
    [0, 1, 4, 9]

    :param handler: called with each item, as a :class:`Pool`'s handler.
    :param items: an iterable or an async iterable (an anyio receive stream
        included), pulled lazily: an item is taken only when the pool has room. If
        the call ends before ``items`` is exhausted (``fail_fast``, an error,
        cancellation), the generator it was reading (``items`` itself, or what its
        ``__iter__`` / ``__aiter__`` returned) is closed before the call ends, so
        its ``finally`` blocks run then: an async generator is ``aclose()``-d
        shielded from the cancellation, for up to 5 seconds (then its cleanup is
        cancelled, logged at WARNING on the pool's logger,
        ``corral.pool[.<name>]``). An exception its cleanup raises is logged at
        ERROR there and does not replace the call's exception. Any other iterator
        (an anyio receive stream) is left open: closing it is the caller's.
    """
    pool: Pool[T, Any] = Pool(
        handler,
        workers=workers,
        max_pending=max_pending,
        retry=retry,
        rate_limit=rate_limit,
        limiter=limiter,
        breaker=breaker,
        hedge=hedge,
        timeout=timeout,
        middleware=middleware,
        on_outcome=on_outcome,
        fail_fast=fail_fast,
        name=name,
        progress=progress,
        on_stats=on_stats,
        stats_interval=stats_interval,
        key=key,
        per_key=per_key,
        cost=cost,
    )
    _check_items(items)
    _count_for_progress(pool, items)
    collected: _Collected[T, Any] = _Collected()
    pool._collected = collected  # the workers record each outcome at its index
    async with pool:
        await _feed(pool, items)
    # the block exited normally, so each of the items submitted has its outcome
    return collected.finish(pool.stats.submitted)


class Outcomes(Generic[T, R]):
    """The async iterator that ``async with apply_to_each(...)`` gives.

    Iterate it with ``async for`` from one task at a time (a second task that
    waits meanwhile gets :class:`anyio.BusyResourceError`). Every ``__anext__``
    is a checkpoint and waits until the next outcome is ready; it is
    cancel-safe: if it raises, no outcome was taken. Iteration stops once
    every item taken from the input has been yielded.

    After leaving the block early, every item taken from the input is in
    exactly one of three places: it was yielded; its outcome was ready but not
    yet consumed (iterating again after the block yields these, then stops);
    or it is in :attr:`unfinished`.
    """

    def __init__(self, pool: Pool[T, R], *, ordered: bool, window: int) -> None:
        self._pool = pool
        self._ordered = ordered
        self._window = window
        self._ready: deque[Outcome[T, R]] = deque()
        self._done: dict[int, Outcome[T, R]] = {}
        self._emitted = 0
        self._pulled = 0
        self._feeding = True
        self._consumer: anyio.Event | None = None
        self._feeder: anyio.Event | None = None
        self._closed = False  # the block has exited: only leftovers remain

    @property
    def unfinished(self) -> list[T]:
        """Items taken from the input that got no outcome (valid after the block)."""
        return self._pool.unfinished

    def __aiter__(self) -> Outcomes[T, R]:
        return self

    def _deliver(self, outcome: Outcome[T, R]) -> None:
        if self._ordered:
            self._done[outcome.index] = outcome
            if outcome.index != self._emitted:
                return
        else:
            self._ready.append(outcome)
        if self._consumer is not None:
            self._consumer.set()
            self._consumer = None

    def _take(self) -> Outcome[T, R] | None:
        if self._ordered:
            return self._done.pop(self._emitted, None)
        return self._ready.popleft() if self._ready else None

    async def __anext__(self) -> Outcome[T, R]:
        await checkpoint()
        while True:
            outcome = self._take()
            if outcome is not None:
                self._emitted += 1
                if self._feeder is not None and self._pulled - self._emitted < self._window:
                    self._feeder.set()
                    self._feeder = None
                return outcome
            if self._closed:
                if self._done:  # ordered, after a gap left by an unfinished item
                    self._emitted = min(self._done)
                    continue
                raise StopAsyncIteration
            if not self._feeding and self._emitted == self._pulled:
                raise StopAsyncIteration
            if self._consumer is not None:
                raise anyio.BusyResourceError("iterating over")
            self._consumer = event = anyio.Event()
            try:
                await event.wait()
            finally:
                if self._consumer is event:
                    self._consumer = None

    def _close(self) -> None:
        self._closed = True
        if self._consumer is not None:
            self._consumer.set()
            self._consumer = None

    @property
    def _finished(self) -> bool:
        """Everything taken from the input has been yielded."""
        return not self._feeding and self._emitted == self._pulled

    async def _after_submit(self) -> None:
        self._pulled += 1
        while self._pulled - self._emitted >= self._window:
            self._feeder = event = anyio.Event()
            await event.wait()

    async def _feed(self, items: Iterable[T] | AsyncIterable[T]) -> None:
        try:
            await _feed(self._pool, items, self._after_submit)
        except PoolClosed:
            pass  # the pool stopped; the item in hand is already recorded unfinished
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as error:  # noqa: BLE001 - re-raised from the block
            self._pool._fail(error)  # the input itself raised
        finally:
            self._feeding = False
            if self._consumer is not None:
                self._consumer.set()
                self._consumer = None


_NOT_AN_ITERATOR = (
    "apply_to_each(...) is an async context manager, not an iterator or an awaitable; "
    "use `async with apply_to_each(handler, items) as outcomes:` and then "
    "`async for outcome in outcomes:` inside the block"
)


class ApplyToEach(Generic[T, R]):
    """What :func:`apply_to_each` returns: use it with ``async with``.

    Entering starts the pool and the task that feeds it from ``items``, and
    gives the :class:`Outcomes` to iterate. It can be entered once (again:
    ``RuntimeError``); ``async for`` over it directly, or ``await`` on it,
    raises ``TypeError`` saying how to use it.
    """

    def __init__(
        self, pool: Pool[T, R], items: Iterable[T] | AsyncIterable[T], ordered: bool
    ) -> None:
        self._pool = pool
        self._items = items
        self._ordered = ordered
        self._cm: AbstractAsyncContextManager[Outcomes[T, R]] | None = None

    def __aiter__(self) -> NoReturn:
        raise TypeError(_NOT_AN_ITERATOR)

    if not TYPE_CHECKING:  # for type checkers, awaiting it stays an error

        def __await__(self) -> NoReturn:
            raise TypeError(_NOT_AN_ITERATOR)

    async def __aenter__(self) -> Outcomes[T, R]:
        if self._cm is not None:
            raise RuntimeError("apply_to_each(...) can be entered only once")
        self._cm = self._run()
        return await self._cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._cm is not None
        return await self._cm.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[Outcomes[T, R]]:
        pool = self._pool
        window = pool._limit.workers + pool._max_pending
        outcomes = Outcomes(pool, ordered=self._ordered, window=window)
        pool._add_sink(outcomes._deliver)
        try:
            async with pool:
                pool._run.start_soon(
                    outcomes._feed, self._items, name="corral apply_to_each feeder"
                )
                yield outcomes
                if not outcomes._finished:
                    # An early exit (`break`): what is still queued or running is
                    # not wanted any more. Otherwise the pool exits normally and
                    # waits for any async on_outcome callbacks still running.
                    pool._stop(pool._run)
        finally:
            outcomes._close()


@overload
def apply_to_each(
    handler: Callable[[T], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    *,
    ordered: bool = False,
    workers: int = 10,
    max_pending: int | None = None,
    retry: Retry | None = None,
    rate_limit: RateLimiter | None = None,
    limiter: AbstractAsyncContextManager[object] | None = None,
    breaker: CircuitBreaker | None = None,
    hedge: Hedge | None = None,
    timeout: float | Timeout | None = None,
    middleware: Sequence[Middleware] = (),
    on_outcome: Callable[[Outcome[T, R]], Any] | None = None,
    fail_fast: bool = False,
    name: str | None = None,
    progress: bool | ProgressBar = False,
    on_stats: Callable[[PoolStats], object] | None = None,
    stats_interval: float = 1.0,
    key: Callable[[T], Hashable] | None = None,
    per_key: int = 1,
    cost: Callable[[T], int] | None = None,
) -> ApplyToEach[T, R]: ...
@overload
def apply_to_each(
    handler: Callable[[T], R],
    items: Iterable[T] | AsyncIterable[T],
    *,
    ordered: bool = False,
    workers: int = 10,
    max_pending: int | None = None,
    retry: Retry | None = None,
    rate_limit: RateLimiter | None = None,
    limiter: AbstractAsyncContextManager[object] | None = None,
    breaker: CircuitBreaker | None = None,
    hedge: Hedge | None = None,
    timeout: float | Timeout | None = None,
    middleware: Sequence[Middleware] = (),
    on_outcome: Callable[[Outcome[T, R]], Any] | None = None,
    fail_fast: bool = False,
    name: str | None = None,
    progress: bool | ProgressBar = False,
    on_stats: Callable[[PoolStats], object] | None = None,
    stats_interval: float = 1.0,
    key: Callable[[T], Hashable] | None = None,
    per_key: int = 1,
    cost: Callable[[T], int] | None = None,
) -> ApplyToEach[T, R]: ...
def apply_to_each(
    handler: Callable[[T], Any],
    items: Iterable[T] | AsyncIterable[T],
    *,
    ordered: bool = False,
    workers: int = 10,
    max_pending: int | None = None,
    retry: Retry | None = None,
    rate_limit: RateLimiter | None = None,
    limiter: AbstractAsyncContextManager[object] | None = None,
    breaker: CircuitBreaker | None = None,
    hedge: Hedge | None = None,
    timeout: float | Timeout | None = None,
    middleware: Sequence[Middleware] = (),
    on_outcome: Callable[[Outcome[T, Any]], Any] | None = None,
    fail_fast: bool = False,
    name: str | None = None,
    progress: bool | ProgressBar = False,
    on_stats: Callable[[PoolStats], object] | None = None,
    stats_interval: float = 1.0,
    key: Callable[[T], Hashable] | None = None,
    per_key: int = 1,
    cost: Callable[[T], int] | None = None,
) -> ApplyToEach[T, Any]:
    """Run ``handler`` on every item; iterate the outcomes as they complete.

    Use as ``async with apply_to_each(handler, items) as outcomes:`` then
    ``async for outcome in outcomes:``. Outcomes come in completion order, or
    in input order with ``ordered=True`` (held in a reorder buffer of at most
    ``workers + max_pending`` outcomes; input is not pulled beyond that).
    Leaving the block early (``break``, an exception, cancellation) stops the
    remaining work at once; ``outcomes.unfinished`` then lists what got no
    outcome, and iterating ``outcomes`` again yields those that were ready but
    not consumed. Leaving it after consuming everything waits for async
    ``on_outcome`` callbacks still running. Takes the keyword options of
    :class:`Pool`, validated here, at the call, which never waits. The stats
    that ``on_stats`` gets count no ``backpressure_waits`` (the feeder waiting
    for room is its own pacing, not a caller's wait).

    The ``async with`` raises, after every task stopped and unwrapped: the
    block's own exception; with ``fail_fast``, the first handler failure; an
    exception raised by ``items``, ``on_outcome`` or ``on_stats``; or the
    cancellation. A bare ``async for`` over the return value, or ``await`` on
    it, raises ``TypeError``, and entering it twice ``RuntimeError``.

    >>> import anyio
    >>> async def square(x: int) -> int:
    ...     return x * x
    >>> async def main() -> list[int]:
    ...     async with apply_to_each(square, range(4), ordered=True) as outcomes:
    ...         return [o.result async for o in outcomes]
    >>> anyio.run(main)
    [0, 1, 4, 9]

    :param handler: called with each item, as a :class:`Pool`'s handler.
    :param items: an iterable or an async iterable (an anyio receive stream
        included), pulled lazily by a feeder task. If the block ends before
        ``items`` is exhausted (``break``, ``fail_fast``, an error, cancellation),
        the generator it was reading (``items`` itself, or what its ``__iter__`` /
        ``__aiter__`` returned) is closed before the ``async with`` ends, so its
        ``finally`` blocks run then: an async generator is ``aclose()``-d shielded
        from the cancellation, for up to 5 seconds (then its cleanup is cancelled,
        logged at WARNING on the pool's logger, ``corral.pool[.<name>]``). An
        exception its cleanup raises is logged at ERROR there and does not replace
        the block's exception. Any other iterator (an anyio receive stream) is left
        open: closing it is the caller's.
    :param ordered: yield outcomes in input order instead of completion order.
    """
    pool: Pool[T, Any] = Pool(
        handler,
        workers=workers,
        max_pending=max_pending,
        retry=retry,
        rate_limit=rate_limit,
        limiter=limiter,
        breaker=breaker,
        hedge=hedge,
        timeout=timeout,
        middleware=middleware,
        on_outcome=on_outcome,
        fail_fast=fail_fast,
        name=name,
        progress=progress,
        on_stats=on_stats,
        stats_interval=stats_interval,
        key=key,
        per_key=per_key,
        cost=cost,
    )
    _check_items(items)
    _count_for_progress(pool, items)
    return ApplyToEach(pool, items, check_bool("ordered", ordered))
