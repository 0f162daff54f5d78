"""Batcher: items are collected into batches and flushed by ``concurrency`` flushers.

How an item travels::

    add / add_many / submit ──► queue (seq, item, key, ticket, added_at)
                                  │  a free flusher cuts up to max_size entries when
                                  │  the batch is due (size, age, natural, flush(), exit)
                                  ▼
                       in_flight[batch] ──► flush(batch) through the middleware chain
                                  │
            success: flushed, submit callers get their results
            failure: submit callers get the error; add items go back to the front

The queue and ``in_flight`` are the only records of items that are not flushed
yet: whatever is in them when the batcher stops is ``unflushed``.

Flushers that have nothing to do park in a FIFO. At most one parked flusher is
woken ("kicked") at a time, and only when its decision may change: the queue
became non-empty (to arm the age timer, or to flush at once under the natural
policy), it reached ``max_size``, :meth:`Batcher.flush` was called, or the
batcher is closing. The age timer is the parked flusher's own cancel-scope
deadline, so an idle batcher has no timer at all and uses no CPU.
"""

from __future__ import annotations

import bisect
import contextvars
import heapq
import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, NoReturn, TypeAlias, TypeVar, overload

import anyio
import anyio.abc
import attrs
from anyio.lowlevel import checkpoint

from ._errors import FlushError, PoolClosed, QueueFull
from ._handlers import check_callable, is_async_callable
from ._lifecycle import _loop_clock as _clock
from ._lifecycle import stray_cancellation as _stray_cancellation
from ._middleware import Middleware, RateLimiter, Timeout, check_middleware
from ._observe import (
    ObservedBlock,
    Observer,
    ProgressBar,
    logger_for,
)
from ._retry import Retry
from ._threads import Threads, holds_of_attempt
from ._validate import check_int, check_number, check_optional_str

__all__ = ["Batcher", "BatcherStats"]


# (temporary: the Batcher moves onto _lifecycle.Block next)
async def _end_task_group(
    tg: anyio.abc.TaskGroup,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
    *,
    drain: Callable[[], Awaitable[None]] | None,
    close: Callable[[], None],
    finalize: Callable[[], None],
) -> tuple[bool, BaseException | None]:
    """The end of a Pool's or Batcher's block, shared.

    ``drain`` (if given) lets the work run out; if it is interrupted (a
    cancellation), the task group exits with that instead. Then ``close``
    takes no more work, the task group exits (cancelling what is left when
    there is an exception), and ``finalize`` records what did not finish, also
    if the exit itself raised. Returns the task group's ``__aexit__`` result
    and what it raised, for the caller to sort out.
    """
    if drain is not None:
        try:
            await drain()
        except BaseException as interrupted:  # noqa: BLE001 - cancellation, re-raised by tg
            exc, exc_type, tb = interrupted, type(interrupted), interrupted.__traceback__
    close()
    try:
        return await tg.__aexit__(exc_type, exc, tb), None
    except BaseException as error:  # noqa: BLE001 - sorted out by the caller
        return False, error
    finally:
        finalize()


def _raise_cancelled(
    log: logging.Logger, block: object, reason: BaseException | None, cancelled: BaseException
) -> NoReturn:
    """The block is cancelled from outside while it stopped itself because of
    ``reason``: the cancellation propagates, as in ``asyncio.TaskGroup``, and
    ``reason`` is logged, not lost (fail_fast's failure is also its item's
    outcome). A ``KeyboardInterrupt`` or ``SystemExit`` beats the cancellation."""
    if reason is not None and not isinstance(reason, Exception):
        raise reason
    if reason is not None:
        log.error(
            "%r stopped because of %r and was cancelled meanwhile; the cancellation propagates",
            block,
            reason,
            exc_info=reason,
        )
    raise cancelled


def _unwrap_group(exc: BaseException) -> BaseException:
    """Undo the one group the task group wrapped a single exception in.

    Only one level: a group that the block, a handler or a callback raised
    itself comes out as it was raised.
    """
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return exc.exceptions[0]
    return exc


T = TypeVar("T")
R = TypeVar("R")

_NEW, _RUNNING, _CLOSING, _CLOSED = "new", "running", "closing", "closed"

# Waits between failed flushes when `retry` gives none (or retries at once),
# and the least wait after any failed flush: never a hot loop.
_FAILURE_BACKOFF = Retry()
_MIN_FAILURE_WAIT = 0.001


class _Ticket:
    """A ``submit`` caller waiting for its item's result."""

    __slots__ = ("abandoned", "error", "event", "handed_back", "result", "traceback")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.traceback: TracebackType | None = None
        self.abandoned = False  # the caller was cancelled: nobody takes the result
        # the entry, when a failed flush handed the item back with the error
        self.handed_back: tuple[Any, ...] | None = None

    def resolve(self, result: Any) -> None:
        self.result = result
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.traceback = error.__traceback__
        self.event.set()


# (seq, item, dedupe key, ticket, added_at). A tuple: one is made per item.
_Entry: TypeAlias = tuple[int, T, Hashable, _Ticket | None, float]


class _SpaceWaiter:
    __slots__ = ("event", "granted", "need", "run")

    def __init__(self, need: int, run: int) -> None:
        self.need = need
        self.run = run  # which entry of the batcher it waits in
        self.granted = False
        self.event = anyio.Event()


class _FlushWaiter:
    """A :meth:`Batcher.flush` caller: waits for the items below ``target``."""

    __slots__ = ("error", "event", "target")

    def __init__(self, target: int) -> None:
        self.target = target
        self.error: BaseException | None = None
        self.event = anyio.Event()


@attrs.frozen
class BatcherStats:
    """A snapshot of a batcher's counters (they accumulate over re-entries).

    ``added``: items taken by ``add``, ``add_many`` and ``submit``.
    ``queued``: waiting for a flush. ``flushing``: in a flush that is running.
    ``flushes``: successful flush calls (batches). ``flushed``: items handed to
    a flush that succeeded (duplicates dropped by ``dedupe_key`` not counted).
    ``deduped``: duplicates dropped from successful batches.
    ``flush_failures``: flushes that failed after their retry policy.
    ``failed``: ``submit`` items whose caller got the flush's error (they left
    the batcher). ``backpressure_waits``: adds that had to wait for room.
    ``unflushed``: ``len(batcher.unflushed)`` after the last exit.
    ``last_flush_time``: :func:`anyio.current_time` at the end of the last
    successful flush, or None.

    Every item added is, at any moment, exactly one of: queued, flushing,
    flushed, deduped, failed, unflushed. All counters accumulate over
    re-entries except ``unflushed``, which is the last exit's.
    """

    added: int
    queued: int
    flushing: int
    flushes: int
    flushed: int
    deduped: int
    flush_failures: int
    failed: int
    backpressure_waits: int
    unflushed: int
    last_flush_time: float | None


class Batcher(ObservedBlock, Generic[T, R]):
    """A batching stage scoped to an ``async with`` block.

    Items added with :meth:`add`, :meth:`add_many` or :meth:`submit` are
    collected and handed to ``flush`` as a list of at most ``max_size`` items.
    A batch is flushed when it is full, when its oldest item has waited
    ``max_wait`` seconds, or, with ``max_wait=None`` (natural batching), as soon
    as a flusher is free: batches then grow while the sink is slow and shrink
    when it is fast. At most ``concurrency`` flushes run at once. ``flush`` may
    be async or plain (it then runs in a worker thread) and goes through the
    same middleware as a :class:`Pool`'s handler (``retry``, ``limiter``,
    ``rate_limit``, ``timeout``, ``middleware``), once per batch.

    A flush that fails after its retry policy puts its ``add`` items back in the
    queue ahead of every newer item, in order, and no flush starts again before
    a backoff that grows with consecutive failures and resets on success:
    ``retry``'s waits if its ``wait_initial`` and ``wait_max`` are both
    positive, else 0.1 s doubling up to 10 s, jittered within the upper half of
    each step (not at all under a ``retry`` with ``wait_jitter=False``); never
    less than 1 ms, and at least an error's finite ``retry_after``, read as
    :class:`Retry` reads it (at most ``wait_max`` under a ``retry`` with
    ``cap_retry_after=True``). The
    ``submit`` callers of that batch get the error instead; their items leave
    the batcher.

    Leaving the block, normally or with an exception, flushes everything that
    was added and waits for it. If a flush that started after the block ended
    fails, flushing ends: :class:`FlushError` is raised with every unflushed
    item in ``.items`` (also in :attr:`unflushed`), in the order they were
    added. Cancellation does not flush: queued items and those in a flush that
    was cancelled are listed in :attr:`unflushed`. Entering a batcher that is
    already running raises ``RuntimeError``; it can be entered again after it
    exited (its stats accumulate).

    >>> import anyio
    >>> async def main() -> list[list[int]]:
    ...     batches = []
    ...     async def save(batch: list[int]) -> None:
    ...         batches.append(batch)
    ...     async with Batcher(save, max_size=3) as batcher:
    ...         for i in range(7):
    ...             await batcher.add(i)
    ...     return batches
    >>> anyio.run(main)
    [[0, 1, 2], [3, 4, 5], [6]]

    :param flush: called with each batch (a list, without the duplicates that
        ``dedupe_key`` dropped), once per attempt. An async callable is awaited
        in a flusher task; a plain one runs in a worker thread, and an
        awaitable it returns is awaited on the event loop. To serve
        :meth:`submit`, it returns a sequence of one result per item of the
        batch, in order (or None: every result is None). An ``Exception`` it
        raises fails the flush (see above); a ``BaseException`` that is
        neither an ``Exception`` nor a cancellation (``KeyboardInterrupt``)
        stops the batcher, and the block re-raises it.
    :param max_size: the most items in one batch, in every path.
    :param max_wait: seconds the oldest queued item may wait before its batch is
        flushed, counted from when it was added; None for natural batching.
    :param concurrency: how many flushes may run at once. Flushers start as
        batches need them, so a large bound costs nothing until it is used. A
        plain ``flush`` runs in at most ``2 * concurrency`` threads, counting
        those a ``timeout`` abandoned (they keep their thread, and their
        ``limiter`` token, until they end).
    :param max_pending: how many queued items make :meth:`add` wait; at least
        ``max_size``; default ``max_size * (concurrency + 1)``.
    :param dedupe_key: a function of an item; later items with the key of one
        already in the same batch are dropped (counted in ``stats.deduped``)
        and their ``submit`` callers share the first one's result.
    :param retry: a :class:`Retry` policy for each flush.
    :param rate_limit: a rate limiter acquired once per flush attempt.
    :param limiter: an :class:`anyio.CapacityLimiter` held for each flush attempt.
    :param timeout: seconds (or a :class:`Timeout`) per flush attempt.
    :param middleware: user :class:`Middleware`, outermost first; they see each
        batch (a list) as their item.
    :param name: a label for repr, task names, the progress bar and the
        logger (``corral.batcher.<name>``; ``corral.batcher`` without a name).
    :param progress: ``True`` draws a tqdm progress bar (``pip install
        'corral[progress]'``) of items flushed, with batches and failed
        flushes; or pass your own tqdm-compatible bar. Updated ten times a
        second from a stats snapshot, never per item.
    :param on_stats: a plain function called with a :class:`BatcherStats`
        snapshot every ``stats_interval`` seconds while the batcher runs, and
        once more at exit. It runs on the event loop: keep it quick. If it
        raises, the batcher stops and the block re-raises that exception.
    :param stats_interval: seconds between two ``on_stats`` calls.
    :param max_consecutive_failures: give up after this many failed flushes in
        a row (each after its ``retry`` policy; a success resets the count;
        flushes that ran at the same time and failed together count once):
        flushing ends, the block is cancelled and raises :class:`FlushError`
        with every item not flushed, as when a final flush fails. None (the
        default) keeps trying, with the growing backoff, for as long as the
        block runs.
    """

    @overload
    def __init__(
        self: Batcher[T, None],
        flush: Callable[[list[T]], Awaitable[None]],
        *,
        max_size: int = 100,
        max_wait: float | None = 1.0,
        concurrency: int = 1,
        max_pending: int | None = None,
        dedupe_key: Callable[[T], Hashable] | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimiter | None = None,
        limiter: anyio.CapacityLimiter | None = None,
        timeout: float | Timeout | None = None,
        middleware: Sequence[Middleware] = (),
        name: str | None = None,
        progress: bool | ProgressBar = False,
        on_stats: Callable[[BatcherStats], object] | None = None,
        stats_interval: float = 1.0,
        max_consecutive_failures: int | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self: Batcher[T, R],
        flush: Callable[[list[T]], Awaitable[Sequence[R] | None]],
        *,
        max_size: int = 100,
        max_wait: float | None = 1.0,
        concurrency: int = 1,
        max_pending: int | None = None,
        dedupe_key: Callable[[T], Hashable] | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimiter | None = None,
        limiter: anyio.CapacityLimiter | None = None,
        timeout: float | Timeout | None = None,
        middleware: Sequence[Middleware] = (),
        name: str | None = None,
        progress: bool | ProgressBar = False,
        on_stats: Callable[[BatcherStats], object] | None = None,
        stats_interval: float = 1.0,
        max_consecutive_failures: int | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self: Batcher[T, None],
        flush: Callable[[list[T]], None],
        *,
        max_size: int = 100,
        max_wait: float | None = 1.0,
        concurrency: int = 1,
        max_pending: int | None = None,
        dedupe_key: Callable[[T], Hashable] | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimiter | None = None,
        limiter: anyio.CapacityLimiter | None = None,
        timeout: float | Timeout | None = None,
        middleware: Sequence[Middleware] = (),
        name: str | None = None,
        progress: bool | ProgressBar = False,
        on_stats: Callable[[BatcherStats], object] | None = None,
        stats_interval: float = 1.0,
        max_consecutive_failures: int | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self: Batcher[T, R],
        flush: Callable[[list[T]], Sequence[R] | None],
        *,
        max_size: int = 100,
        max_wait: float | None = 1.0,
        concurrency: int = 1,
        max_pending: int | None = None,
        dedupe_key: Callable[[T], Hashable] | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimiter | None = None,
        limiter: anyio.CapacityLimiter | None = None,
        timeout: float | Timeout | None = None,
        middleware: Sequence[Middleware] = (),
        name: str | None = None,
        progress: bool | ProgressBar = False,
        on_stats: Callable[[BatcherStats], object] | None = None,
        stats_interval: float = 1.0,
        max_consecutive_failures: int | None = None,
    ) -> None: ...
    def __init__(
        self,
        flush: Callable[[list[T]], Any],
        *,
        max_size: int = 100,
        max_wait: float | None = 1.0,
        concurrency: int = 1,
        max_pending: int | None = None,
        dedupe_key: Callable[[T], Hashable] | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimiter | None = None,
        limiter: anyio.CapacityLimiter | None = None,
        timeout: float | Timeout | None = None,
        middleware: Sequence[Middleware] = (),
        name: str | None = None,
        progress: bool | ProgressBar = False,
        on_stats: Callable[[BatcherStats], object] | None = None,
        stats_interval: float = 1.0,
        max_consecutive_failures: int | None = None,
    ) -> None:
        check_callable("flush", flush)
        self._flush_fn = flush
        self._max_size = check_int("max_size", max_size, minimum=1)
        self._max_wait = (
            None if max_wait is None else check_number("max_wait", max_wait, finite=False)
        )
        # whether items need the time they were added (for the age timer)
        self._timed = self._max_wait is not None and 0 < self._max_wait < math.inf
        self._concurrency = check_int("concurrency", concurrency, minimum=1)
        if max_pending is None:
            max_pending = max_size * (concurrency + 1)
        check_int("max_pending", max_pending, minimum=1)
        if max_pending < max_size:
            raise ValueError(
                f"max_pending must be >= max_size ({max_size}), got {max_pending!r}: "
                "a full batch could never be queued"
            )
        self._max_pending = max_pending
        check_callable("dedupe_key", dedupe_key, optional=True)
        if dedupe_key is not None and is_async_callable(dedupe_key):
            raise TypeError(
                f"dedupe_key must be a plain function returning a hashable key, got {dedupe_key!r}"
            )
        self._dedupe_key = dedupe_key
        # no dedupe key and no age timer: an entry needs neither a key nor a time
        self._plain = dedupe_key is None and not self._timed
        self._layers = check_middleware(
            retry=retry,
            rate_limit=rate_limit,
            limiter=limiter,
            timeout=timeout,
            middleware=middleware,
        )
        policy = self._layers.retry
        self._failure_policy = (
            policy
            if policy is not None and policy.wait_initial > 0 and policy.wait_max > 0
            else _FAILURE_BACKOFF
        )
        self._give_up_after = (
            None
            if max_consecutive_failures is None
            else check_int("max_consecutive_failures", max_consecutive_failures, minimum=1)
        )
        self.name: str | None = check_optional_str("name", name)
        self._observer: Observer[BatcherStats] = Observer(
            progress=progress,
            on_stats=on_stats,
            stats_interval=stats_interval,
            count=_batcher_progress,
        )
        self._log = logger_for("batcher", self.name)

        self._state = _NEW
        self._tg: anyio.abc.TaskGroup | None = None
        self._clock: Callable[[], float] = anyio.current_time
        self._queue: deque[_Entry[T]] = deque()
        self._in_flight: dict[int, list[_Entry[T]]] = {}  # first seq -> the batch
        self._parked: deque[anyio.Event] = deque()  # idle flushers, FIFO
        self._kicked = False  # a parked flusher was woken and has not run yet
        self._space_waiters: deque[_SpaceWaiter] = deque()
        self._reserved = 0  # queue slots granted to a waiting adder, not used yet
        self._granting = False  # a waiting adder was granted room, has not resumed
        self._flush_target = 0  # queued items with a seq below this are due now
        self._flush_waiters: list[_FlushWaiter] = []
        # seqs of submit items handed back with an error, whose caller has not
        # resumed yet: if it was cancelled meanwhile, the item comes back
        self._handed_back: set[int] = set()
        self._resume_at = -math.inf  # no flush starts before (failure backoff)
        self._failures = 0  # consecutive failed flushes
        self._sleepers: set[anyio.CancelScope] = set()  # flushers in backoff
        self._running = 0  # flusher tasks alive (at most concurrency, on demand)
        # per run: the flush chain, and the threads of a plain flush
        self._chain: Callable[[list[T]], Awaitable[Any]] = self._flush_fn
        self._threads: Threads | None = None
        self._context = contextvars.Context()
        self._stopped: anyio.Event | None = None  # set when the last flusher exits
        # why flushing ended (set together): the error of a final flush that
        # failed, or of the last of max_consecutive_failures failed flushes
        self._halt_error: BaseException | None = None
        self._halt_reason = ""
        self._stop_reason: BaseException | None = None  # what broke a flusher
        self._unflushed: list[_Entry[T]] = []
        self._submitted = False  # submit was ever used: batches may carry tickets
        self._run = 0  # counts entries into the block
        # counters
        self._next_seq = 0
        self._flushing = 0
        self._flushes = 0
        self._flushed = 0
        self._deduped = 0
        self._flush_failures = 0
        self._failed = 0
        self._backpressure_waits = 0
        self._last_flush_time: float | None = None

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return (
            f"<corral.Batcher{label} {self._state} max_size={self._max_size} "
            f"max_wait={self._max_wait}>"
        )

    # ------------------------------------------------------------------ state

    @property
    def stats(self) -> BatcherStats:
        """A frozen snapshot of the counters; cheap, never waits, safe to call
        any time (also before entry and after exit)."""
        return BatcherStats(
            added=self._next_seq,
            queued=len(self._queue),
            flushing=self._flushing,
            flushes=self._flushes,
            flushed=self._flushed,
            deduped=self._deduped,
            flush_failures=self._flush_failures,
            failed=self._failed,
            backpressure_waits=self._backpressure_waits,
            unflushed=len(self._unflushed),
            last_flush_time=self._last_flush_time,
        )

    @property
    def unflushed(self) -> list[T]:
        """Items that were added but not flushed when the batcher last exited, in
        the order they were added. Empty after a clean exit; reset on re-entry."""
        return [entry[1] for entry in self._unflushed]

    # -------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Batcher[T, R]:
        if self._state in (_RUNNING, _CLOSING):
            raise RuntimeError(f"{self!r} is already running; enter it only once at a time")
        self._clock = clock = _clock()
        # a flusher runs one flush at a time; as many threads again may have
        # been abandoned by timeouts (see _threads)
        self._threads = self._layers.threads_for(self._flush_fn, 2 * self._concurrency)
        self._chain = self._layers.chain(self._flush_fn, threads=self._threads, clock=clock)
        if self._observer.active:  # before the task group: it may raise
            self._observer.open(self.stats, self.name or "corral")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._unflushed = []
        self._stop_reason = self._halt_error = None
        self._stopped = anyio.Event()
        self._resume_at = -math.inf
        self._failures = 0
        self._reserved = 0
        self._granting = False
        self._handed_back = set()
        self._run += 1
        self._state = _RUNNING
        self._running = 0
        self._context = contextvars.copy_context()
        if self._threads is not None:
            self._threads.start(tg, self.name or hex(id(self)))
        self._start_flusher()  # more start as batches are cut (see _cut)
        if self._observer.active:
            self._observer.start(tg, lambda: self.stats, self._fail)
        self._log.debug("%r started", self)
        return self

    def _exit_summary(self) -> tuple[object, str]:
        stats = self.stats
        summary = f"{stats.flushed} flushed in {stats.flushes} batches, {stats.unflushed} unflushed"
        return stats, summary

    async def _exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        tg = self._tg
        assert tg is not None
        cancelled = anyio.get_cancelled_exc_class()
        body_exc = exc
        flush_all = (exc is None or not isinstance(exc, cancelled)) and self._state is _RUNNING
        # The flushers never raise (one that breaks records why in
        # _stop_reason), so what the task group raises is the block's
        # exception, possibly wrapped, or a cancellation.
        suppress, raised = await _end_task_group(
            tg,
            exc_type,
            exc,
            tb,
            drain=self._flush_all if flush_all else None,
            close=self._close,
            finalize=self._finalize,
        )
        block_failed = body_exc is not None and not isinstance(body_exc, cancelled)
        if not block_failed and raised is not None and isinstance(_unwrap_group(raised), cancelled):
            # cancelled from outside: never swallowed, not by FlushError nor by
            # why the batcher stopped itself (that is logged)
            _raise_cancelled(self._log, self, self._stop_reason, _unwrap_group(raised))
        if self._stop_reason is not None:
            # what broke a flusher (KeyboardInterrupt, on_stats, ...); a block
            # exception is its __context__
            raise self._stop_reason
        if self._halt_error is not None:
            count = len(self._unflushed)
            raise FlushError(
                f"{self!r}: {self._halt_reason} ({self._halt_error!r}); "
                f"{count} item{'s' if count != 1 else ''} not flushed",
                self.unflushed,
            ) from self._halt_error
        if block_failed:
            return False  # the block's own exception, re-raised exactly as it was
        if raised is not None:
            raise _unwrap_group(raised)
        return suppress

    async def _flush_all(self) -> None:
        """Take no new items; let the flushers flush what is left, and wait."""
        self._state = _CLOSING
        self._wake_adders()
        self._wake_all_parked()
        await checkpoint()
        assert self._stopped is not None
        if self._running:
            await self._stopped.wait()

    def _wake_all_parked(self) -> None:
        while self._parked:
            self._parked.popleft().set()
        self._kicked = False

    def _close(self) -> None:
        self._state = _CLOSED
        self._observer.stop()
        if self._threads is not None:
            self._threads.close()
        self._wake_adders()

    def _wake_adders(self) -> None:
        while self._space_waiters:
            self._space_waiters.popleft().event.set()

    def _finalize(self) -> None:
        """After the flushers stopped: whatever is queued or in flight is unflushed."""
        self._close()
        entries = list(self._queue)
        for batch in self._in_flight.values():
            entries.extend(batch)
        entries.sort(key=lambda entry: entry[0])
        self._queue.clear()
        self._in_flight.clear()
        self._flushing = 0
        self._unflushed = entries
        for entry in entries:
            ticket = entry[3]
            if ticket is not None and not ticket.event.is_set():
                ticket.fail(self._not_flushed_error())
        waiters, self._flush_waiters = self._flush_waiters, []
        for waiter in waiters:
            waiter.error = self._not_flushed_error()
            waiter.event.set()
        self._parked.clear()
        self._kicked = False
        self._reserved = 0
        self._granting = False
        self._tg = None

    def _not_flushed_error(self) -> PoolClosed:
        return PoolClosed(
            f"{self!r} stopped before the item was flushed; it is in batcher.unflushed"
        )

    def _closed_error(self) -> PoolClosed:
        if self._state is _NEW:
            return PoolClosed(f"{self!r} is not running yet: add inside `async with batcher:`")
        if self._state is _CLOSING:
            return PoolClosed(f"{self!r} is flushing for exit and takes no new items")
        return PoolClosed(f"{self!r} has exited and takes no new items")

    # ------------------------------------------------------------------- add

    async def add(self, item: T) -> None:
        """Queue ``item`` for flushing.

        Waits while ``max_pending`` items are queued (adders are served first
        come, first served). Always a checkpoint. Cancel-safe: if it raises,
        the item was not added; if it returns, it was.

        :raises PoolClosed: the batcher is not running, or it closed while this
            call waited for room.
        :raises TypeError: ``dedupe_key`` returned an unhashable key (whatever
            ``dedupe_key`` raises propagates too).
        """
        await checkpoint()
        if self._state is not _RUNNING:
            raise self._closed_error()
        key = None if self._dedupe_key is None else self._key(item)
        queue = self._queue
        if self._space_waiters or len(queue) + self._reserved >= self._max_pending:
            await self._wait_for_space(1)
            self._append(item, key, None)
            self._release_grant(1)
        else:
            # _append, inlined: the hot path of a producer that awaits every add
            seq = self._next_seq
            self._next_seq = seq + 1
            queue.append((seq, item, key, None, self._clock() if self._timed else 0.0))
            if self._parked and not self._kicked:
                self._kick_if_due()

    def add_nowait(self, item: T) -> None:
        """Queue ``item`` without waiting, or raise.

        Never waits and is not a checkpoint. If it raises, the item was not
        added; if it returns, it was.

        :raises QueueFull: ``max_pending`` items are queued, or adders are
            waiting for room.
        :raises PoolClosed: the batcher is not running.
        :raises TypeError: ``dedupe_key`` returned an unhashable key.
        """
        if self._state is not _RUNNING:
            raise self._closed_error()
        # _append, inlined: this is the hot path of a fast producer
        queue = self._queue
        if self._plain:  # no dedupe key, no age timer: the entry needs neither
            if self._space_waiters or len(queue) + self._reserved >= self._max_pending:
                raise self._full_error()
            seq = self._next_seq
            self._next_seq = seq + 1
            queue.append((seq, item, None, None, 0.0))
        else:
            # a bad dedupe key is refused before the room is looked at, as by add()
            key = None if self._dedupe_key is None else self._key(item)
            if self._space_waiters or len(queue) + self._reserved >= self._max_pending:
                raise self._full_error()
            seq = self._next_seq
            self._next_seq = seq + 1
            queue.append((seq, item, key, None, self._clock() if self._timed else 0.0))
        if self._parked and not self._kicked:
            self._kick_if_due()

    def _full_error(self) -> QueueFull:
        return QueueFull(f"{self!r} has max_pending={self._max_pending} items queued")

    async def add_many(self, items: Iterable[T]) -> None:
        """Queue all of ``items``, in order and together, or none of them.

        Waits until there is room for all of them (what is queued meanwhile is
        flushed without waiting for ``max_wait``); no other adder's items come
        in between. More items than ``max_pending`` wait until the queue is
        empty and then go in whole (they are in memory already). A
        checkpoint once ``items`` is accepted. Cancel-safe like :meth:`add`:
        if it raises, none of them was added; if it returns, all were.

        :raises PoolClosed: the batcher is not running, or it closed while this
            call waited for room.
        :raises TypeError: ``items`` is not an iterable (or is a ``str`` or
            ``bytes``), or ``dedupe_key`` returned an unhashable key.
        """
        if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
            raise TypeError(f"items must be an iterable of items, got {items!r}")
        batch = list(items)
        await checkpoint()
        if self._state is not _RUNNING:
            raise self._closed_error()
        if not batch:
            return
        keys = [None] * len(batch) if self._dedupe_key is None else list(map(self._key, batch))
        need = len(batch)
        waited = bool(self._space_waiters) or not self._fits(need)
        if waited:
            await self._wait_for_space(need)
        for item, item_key in zip(batch, keys, strict=True):
            self._append(item, item_key, None)
        if waited:
            self._release_grant(need)

    async def submit(self, item: T) -> R:
        """Add ``item`` and wait for its result: its element of the sequence that
        ``flush`` returned for its batch (None if ``flush`` returned None).

        Waits for room like :meth:`add`, then until the item's batch was
        flushed or failed (after its retry policy). Always a checkpoint.
        If it raises while waiting for room, the item was not added. Once
        added, the item stays in the batcher even if the caller is cancelled:
        it is flushed with its batch (the result is discarded) or listed in
        :attr:`unflushed`.

        :raises ValueError: ``flush`` did not return one result per item.
        :raises PoolClosed: the batcher is not running, or it stopped before the
            item was flushed (the item is in :attr:`unflushed`).
        :raises TypeError: ``dedupe_key`` returned an unhashable key.
        :raises Exception: whatever ``flush`` raised for this item's batch after
            its retry policy gave up (the item then leaves the batcher; the
            ``add`` items of that batch are queued again).
        """
        await checkpoint()
        if self._state is not _RUNNING:
            raise self._closed_error()
        key = None if self._dedupe_key is None else self._key(item)
        ticket = _Ticket()
        self._submitted = True
        if self._space_waiters or len(self._queue) + self._reserved >= self._max_pending:
            await self._wait_for_space(1)
            self._append(item, key, ticket)
            self._release_grant(1)
        else:
            self._append(item, key, ticket)
        try:
            await ticket.event.wait()
        except BaseException:
            ticket.abandoned = True
            if ticket.handed_back is not None:
                # A failed flush handed the item back with its error, but we
                # were cancelled before seeing it: the batcher takes it back.
                self._take_back(ticket.handed_back)
            raise
        if ticket.handed_back is not None:
            self._handed_back_seen(ticket.handed_back)
        if ticket.error is not None:
            raise ticket.error.with_traceback(ticket.traceback)
        result: R = ticket.result
        return result

    async def flush(self) -> None:
        """Flush everything added before this call without waiting for
        ``max_wait``, and return when it is flushed (including batches already
        in flight). ``submit`` items handed back to their callers with an error
        count as done.

        Batches keep their order and ``max_size``, and a failure backoff in
        progress is still waited out. Always a checkpoint. Cancelling the wait
        does not undo the request: those items are still flushed without
        waiting for ``max_wait``.

        :raises Exception: a flush of these items failed after its retry policy
            (its ``add`` items are queued again, as for any failed flush).
        :raises PoolClosed: the batcher is not running, or it stopped first.
        """
        await checkpoint()
        if self._state is not _RUNNING:
            raise self._closed_error()
        target = self._next_seq
        if self._oldest_pending() >= target:
            return
        waiter = _FlushWaiter(target)
        self._flush_waiters.append(waiter)
        self._flush_target = target
        self._kick()
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter in self._flush_waiters:
                self._flush_waiters.remove(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error

    def _key(self, item: T) -> Hashable:
        """``dedupe_key(item)``, checked to be hashable (only with a dedupe_key)."""
        assert self._dedupe_key is not None
        key = self._dedupe_key(item)
        try:
            hash(key)
        except TypeError:
            raise TypeError(
                f"dedupe_key must return a hashable key, got {key!r} for {item!r}"
            ) from None
        return key

    def _append(self, item: T, key: Hashable, ticket: _Ticket | None) -> None:
        seq = self._next_seq
        self._next_seq = seq + 1
        self._queue.append((seq, item, key, ticket, self._clock() if self._timed else 0.0))
        if self._parked and not self._kicked:
            self._kick_if_due()

    def _kick_if_due(self) -> None:
        """An item was queued and a flusher is parked: wake it if its decision may
        change (the queue was empty: flush it at once, or arm the age timer; or
        it just became a full batch)."""
        size = len(self._queue)
        if size == 1 or size >= self._max_size:
            self._kick()

    async def _wait_for_space(self, need: int) -> None:
        """Wait until ``need`` queue slots are granted to us.

        Grants go to one waiter at a time, in line order: the next is granted
        only once this one has resumed (and the caller, with no checkpoint in
        between, queues its items), so waiters queue their items in the order
        they came, whatever order the scheduler resumes tasks in.
        """
        self._backpressure_waits += 1
        waiter = _SpaceWaiter(need, self._run)
        self._space_waiters.append(waiter)
        if self._space_waiters[0] is waiter:
            self._make_room()
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted and waiter.run == self._run:  # granted, then interrupted
                self._release_grant(need)  # pass the grant on
            elif waiter in self._space_waiters:
                was_head = self._space_waiters[0] is waiter
                self._space_waiters.remove(waiter)
                if was_head:
                    self._grant()
            raise
        if not waiter.granted or waiter.run != self._run:  # the batcher closed
            raise self._closed_error()
        if self._state is not _RUNNING:  # granted, but it closed before we ran
            self._release_grant(need)
            raise self._closed_error()
        # The caller queues its items now, with no checkpoint in between, then
        # calls _release_grant: the slots stay reserved until they are used.

    def _release_grant(self, need: int) -> None:
        """The granted slots were used (or given up): let the next waiter in."""
        if self._tg is None:  # finalized: counts were reset
            return
        self._reserved -= need
        self._granting = False
        self._grant()

    def _requeue(self, entries: list[_Entry[T]]) -> None:
        """Put entries (in seq order) back into the queue, in their place by add
        order: ahead of every newer item. The queue stays in seq order."""
        if not entries:
            return
        queue = self._queue
        if not queue or entries[-1][0] < queue[0][0]:
            queue.extendleft(reversed(entries))  # the usual case: all at the front
        else:  # another batch that failed earlier is older (concurrency > 1)
            merged = list(heapq.merge(queue, entries, key=lambda entry: entry[0]))
            queue.clear()
            queue.extend(merged)
        if self._parked and not self._kicked:
            self._kick()

    def _handed_back_seen(self, entry: _Entry[T]) -> None:
        """A submit caller saw the error its item was handed back with."""
        self._handed_back.discard(entry[0])
        if not self._handed_back:
            if self._state is not _RUNNING:
                self._wake_all_parked()  # flushers wait for this before they exit
            if self._flush_waiters:
                self._settle_flush_waiters()

    def _take_back(self, entry: _Entry[T]) -> None:
        """Queue again (or, once stopped, list as unflushed) an item whose failure
        its ``submit`` caller never saw, in its place by add order."""
        self._failed -= 1
        self._handed_back.discard(entry[0])
        if self._tg is None:  # finalized: the queue was already listed
            keys = [queued[0] for queued in self._unflushed]
            self._unflushed.insert(bisect.bisect(keys, entry[0]), entry)
            return
        self._requeue([entry])
        if not self._handed_back and self._state is not _RUNNING:
            self._wake_all_parked()

    def _fits(self, need: int) -> bool:
        """Whether ``need`` more items may be queued now (more than max_pending
        fit only into an empty queue)."""
        return len(self._queue) + self._reserved + min(need, self._max_pending) <= self._max_pending

    def _grant(self) -> None:
        """Queue slots were freed: grant them to the first waiting adder."""
        waiters = self._space_waiters
        if not waiters or self._granting:
            return
        if self._fits(waiters[0].need):
            waiter = waiters.popleft()
            waiter.granted = True
            self._granting = True
            self._reserved += waiter.need
            waiter.event.set()
        else:
            self._make_room()

    def _make_room(self) -> None:
        """An adder waits for room: what is queued is due now, whatever its age.

        Otherwise ``add_many`` of more items than are free could wait for a
        batch that is neither full nor old enough, and everyone behind it too.
        """
        if self._flush_target < self._next_seq:
            self._flush_target = self._next_seq
            self._kick()

    # --------------------------------------------------------------- flushers

    def _kick(self) -> None:
        """Wake the first parked flusher, unless one was woken and has not run."""
        if self._parked and not self._kicked:
            self._kicked = True
            self._parked.popleft().set()

    def _start_flusher(self) -> None:
        """Start one more flusher; it parks until a batch is due."""
        assert self._tg is not None
        number = self._running
        self._running = number + 1
        name = f"corral flusher {self.name or hex(id(self))}#{number}"
        # in the context of the task that entered the block, as if all had
        # started there (a spare is started by a flusher)
        tg, chain = self._tg, self._chain
        self._context.run(lambda: tg.start_soon(self._flusher, chain, name=name))

    async def _flusher(self, chain: Callable[[list[T]], Awaitable[Any]]) -> None:
        holds_of_attempt.set(None)  # not the holds of whoever started this flusher
        queue = self._queue
        in_flight = self._in_flight
        clock = self._clock
        max_size = self._max_size
        natural = self._max_wait is None
        dedupe = self._dedupe_key is not None
        cancelled = anyio.get_cancelled_exc_class()
        try:
            batch = await self._next_batch()
            while batch is not None:
                # -- flush the batch --
                final = self._state is not _RUNNING  # started after the block ended
                positions: list[int] | None = None
                if dedupe:
                    items, positions = _dedupe(batch)
                else:
                    items = [entry[1] for entry in batch]
                error: Exception | None = None
                streak = self._failures  # failed flushes in a row as this one starts
                try:
                    result = await chain(items)
                except Exception as exc:  # noqa: BLE001 - a failed flush is handled below
                    error = exc
                except cancelled as exc:
                    error = _stray_cancellation(exc)  # re-raised if we are being cancelled
                # -- one step: the batch leaves in_flight --
                del in_flight[batch[0][0]]
                self._flushing -= len(batch)
                if error is None:
                    self._failures = 0
                    self._flushes += 1
                    self._flushed += len(items)
                    self._deduped += len(batch) - len(items)
                    self._last_flush_time = clock()
                    if self._submitted:
                        self._resolve(batch, items, positions, result)
                    if self._flush_waiters:
                        self._settle_flush_waiters()
                else:
                    self._failed_flush(batch, error, final, streak)
                # -- the next batch --
                if not queue:
                    # Let the tasks that are ready run first: items they add
                    # now are seen without parking and being woken (cheaper).
                    await checkpoint()
                # The next batch is due at once (what _next_batch would decide
                # first thing): cut it here, without its coroutine.
                if (
                    queue
                    and (natural or len(queue) >= max_size)
                    and self._halt_error is None
                    and self._resume_at == -math.inf
                ):
                    batch = self._cut()
                else:
                    batch = await self._next_batch()
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as error:  # noqa: BLE001 - re-raised by __aexit__
            # the flush function raised KeyboardInterrupt/SystemExit (or corral
            # has a bug): stop everything; the block re-raises this exception
            self._fail(error)
        finally:
            self._running -= 1
            if not self._running and self._stopped is not None:
                self._stopped.set()

    def _fail(self, error: BaseException) -> None:
        """Stop everything (unflushed items stay unflushed); the block re-raises ``error``."""
        if self._stop_reason is None:
            self._stop_reason = error
            if self._tg is not None:
                self._tg.cancel_scope.cancel()

    async def _next_batch(self) -> list[_Entry[T]] | None:
        """Wait until a batch is due and cut it (None: nothing more to flush)."""
        queue = self._queue
        clock = self._clock
        max_wait = self._max_wait
        fired_for = -1  # the age timer fired for the entry with this seq
        while True:
            if self._halt_error is not None or (not queue and self._state is not _RUNNING):
                if not self._handed_back:
                    return None
                # A submit caller has not resumed to see its item's error yet;
                # if it was cancelled meanwhile, the item comes back: wait.
                await self._park(math.inf)
                continue
            if not queue:
                await self._park(math.inf)
                continue
            now = clock()
            if now < self._resume_at:  # backing off after a failed flush
                await self._back_off()
                continue
            self._resume_at = -math.inf  # the backoff (if any) is over
            head_seq = queue[0][0]
            if (
                max_wait is None
                or len(queue) >= self._max_size
                or self._state is not _RUNNING
                or head_seq < self._flush_target
                or head_seq <= fired_for
            ):
                return self._cut()
            deadline = queue[0][4] + max_wait
            if now >= deadline:
                return self._cut()
            if await self._park(deadline):
                # The timer fired: the head entry is due, even if a coarse clock
                # (uvloop's moves in whole milliseconds) reads a hair earlier.
                fired_for = head_seq

    async def _back_off(self) -> None:
        """Sleep until the failure backoff ends (cut short if flushing ends)."""
        with anyio.CancelScope(deadline=self._resume_at) as scope:
            self._sleepers.add(scope)
            try:
                await anyio.sleep_forever()
            finally:
                self._sleepers.discard(scope)

    async def _park(self, deadline: float) -> bool:
        """Wait to be kicked or until ``deadline``; True if the deadline passed."""
        event = anyio.Event()
        self._parked.append(event)
        try:
            if deadline == math.inf:  # no timer: a cancel scope costs more than the wait
                await event.wait()
            else:
                with anyio.CancelScope(deadline=deadline):
                    await event.wait()
        except BaseException:
            if event.is_set():
                self._kicked = False
            elif event in self._parked:
                self._parked.remove(event)
            raise
        if event.is_set():
            self._kicked = False
            return False
        self._parked.remove(event)
        return True

    def _cut(self) -> list[_Entry[T]]:
        """Take the next batch off the queue (at most ``max_size`` entries)."""
        queue = self._queue
        if len(queue) <= self._max_size:
            batch = list(queue)
            queue.clear()
        else:
            batch = [queue.popleft() for _ in range(self._max_size)]
        self._flushing += len(batch)
        self._in_flight[batch[0][0]] = batch
        if not self._parked and self._running < self._concurrency:
            # flushers start on demand: one spare stays parked, for the next
            # batch that is due while this one is flushed
            self._start_flusher()
        if self._space_waiters:
            self._grant()
        if queue:
            self._kick()  # another parked flusher: flush or time what is left
        return batch

    def _resolve(
        self,
        batch: list[_Entry[T]],
        items: list[T],
        positions: list[int] | None,
        result: Any,
    ) -> None:
        """A flush succeeded: give its ``submit`` callers their results."""
        tickets = [(number, entry[3]) for number, entry in enumerate(batch) if entry[3] is not None]
        if tickets:
            try:
                results, problem = _check_results(result, len(items))
            except Exception as error:  # noqa: BLE001 - the result object's own len()
                results, problem = None, f"flush's result has no usable length: {error!r}"
            for number, ticket in tickets:
                if ticket.abandoned:
                    continue
                if problem is None:
                    position = number if positions is None else positions[number]
                    try:
                        ticket.resolve(None if results is None else results[position])
                        continue
                    except Exception as error:  # noqa: BLE001 - the result's own indexing
                        problem = f"flush's result could not be indexed: {error!r}"
                ticket.fail(ValueError(problem))

    def _failed_flush(
        self, batch: list[_Entry[T]], error: Exception, final: bool, streak: int
    ) -> None:
        self._flush_failures += 1
        if self._failures == streak:
            # (flushes that ran at the same time, concurrency > 1, and failed
            # together count once: the backoff between them had no chance)
            self._failures += 1
        delay = self._failure_policy._wait(self._failures, error, _equal_jitter)
        if not math.isfinite(delay):
            delay = _FAILURE_BACKOFF.wait_max
        delay = max(delay, _MIN_FAILURE_WAIT)
        self._resume_at = max(self._resume_at, self._clock() + delay)
        keep: list[_Entry[T]] = []
        for entry in batch:
            ticket = entry[3]
            if ticket is None or ticket.abandoned:
                keep.append(entry)
            else:  # the caller takes the error; the item leaves the batcher
                self._failed += 1
                ticket.handed_back = entry
                self._handed_back.add(entry[0])
                ticket.fail(error)
        self._requeue(keep)
        give_up = self._give_up_after is not None and self._failures >= self._give_up_after
        self._log_flush_failure(len(batch), len(keep), error, final or give_up)
        if self._flush_waiters:
            self._settle_flush_waiters(batch, error)
        if (final or give_up) and self._halt_error is None:
            self._halt_error = error  # flushing ends; the rest is unflushed
            if final:
                self._halt_reason = "a final flush failed"
            else:
                self._halt_reason = f"{self._failures} consecutive flushes failed"
                if self._tg is not None:  # the block ends with FlushError
                    self._tg.cancel_scope.cancel()
            self._wake_all_parked()
            for scope in self._sleepers:
                scope.cancel()

    def _log_flush_failure(self, size: int, kept: int, error: Exception, final: bool) -> None:
        """A failed flush, at WARNING, with what becomes of its items."""
        fates = []
        if kept:
            fates.append(f"{kept} back in the queue" if not final else f"{kept} left unflushed")
        if size - kept:
            fates.append(f"{size - kept} handed back to their submit callers")
        self._log.warning(
            "%s: a flush of %d item%s failed (%s)%s: %r",
            self.name or "batcher",
            size,
            "" if size == 1 else "s",
            ", ".join(fates),
            "; flushing ends" if final else "",
            error,
            exc_info=error,
        )

    def _oldest_pending(self) -> float:
        """The lowest seq of an item not flushed yet: queued, in flight, or handed
        back to a ``submit`` caller that has not seen the error (it may come
        back); infinite if none. Batches and the queue are in seq order."""
        oldest = math.inf
        if self._queue:
            oldest = self._queue[0][0]
        for first in self._in_flight:  # keyed by the batch's first (lowest) seq
            oldest = min(oldest, first)
        if self._handed_back:
            oldest = min(oldest, min(self._handed_back))
        return oldest

    def _settle_flush_waiters(
        self, failed: list[_Entry[T]] | None = None, error: Exception | None = None
    ) -> None:
        """Wake the flush() callers whose items are all flushed, or one of whose
        items was in the ``failed`` batch (they get its ``error``)."""
        oldest = self._oldest_pending()
        still: list[_FlushWaiter] = []
        for waiter in self._flush_waiters:
            if failed is not None and failed[0][0] < waiter.target:
                waiter.error = error
                waiter.event.set()
            elif oldest >= waiter.target:
                waiter.event.set()
            else:
                still.append(waiter)
        self._flush_waiters = still


def _batcher_progress(stats: BatcherStats) -> tuple[int, dict[str, int]]:
    """What a progress bar shows of a batcher: items done, batches, failed flushes."""
    done = stats.flushed + stats.deduped + stats.failed
    return done, {"batches": stats.flushes, "failed flushes": stats.flush_failures}


def _dedupe(batch: list[_Entry[T]]) -> tuple[list[T], list[int]]:
    """The batch's items without later duplicates (by dedupe key), and for each
    entry the position of its item among them."""
    items: list[T] = []
    positions: list[int] = []
    first: dict[Hashable, int] = {}
    for entry in batch:
        position = first.get(entry[2])
        if position is None:
            position = first[entry[2]] = len(items)
            items.append(entry[1])
        positions.append(position)
    return items, positions


def _equal_jitter(low: float, high: float) -> float:
    """Between failed flushes: a random wait in the upper half of the backoff, so
    the waits grow with every failure (full jitter could draw ~0 many times)."""
    return random.uniform(high / 2, high)


def _check_results(result: Any, size: int) -> tuple[Any, str | None]:
    """``flush``'s return value as per-item results, or why it cannot be.

    A sequence, or anything indexable by position with a length (a NumPy
    array, say); not a mapping, a set or a string.
    """
    if result is None:
        return None, None
    kind = type(result)
    if (
        isinstance(result, (str, bytes, Mapping))
        or not hasattr(kind, "__len__")
        or not hasattr(kind, "__getitem__")
    ):
        return None, (
            f"flush returned a {kind.__name__}, not a sequence of one result per "
            f"item of the batch of {size}"
        )
    length = len(result)
    if length != size:
        return None, f"flush returned {length} results for a batch of {size} items"
    return result, None
