"""Pool: one task group, one queue, ``workers`` worker tasks.

How an item travels::

    submit ──► live[index] = entry ──► handed to a parked worker, or queued ──► worker
                                                                                 │
            del live[index]; job gets its outcome; on_outcome ◄── Outcome ◄──────┘

``live`` (a dict in submission order) is the single record of every item that
has no outcome yet; whatever is in it when the pool stops is ``unfinished``.
``max_pending`` is enforced by :meth:`Pool.submit` with its own FIFO of waiting
submitters, so that a submit interrupted at any point (also by a native asyncio
cancellation) either enqueued or did not, and so that submits from the pool's
own workers can bypass the bound.

Why not an anyio memory object stream between submitters and workers: its
blocking ``send`` hands the item over before the sender resumes, so a native
asyncio cancellation arriving in between makes ``send`` raise although the
item was delivered, and its receivers wake one per item. The queue here keeps
the submit side exact and wakes parked workers in a chain (see ``_enqueue``).
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from types import TracebackType
from typing import Any, Generic, NoReturn, TypeAlias, TypeVar, cast, overload

import anyio
import anyio.abc
import attrs
from anyio.lowlevel import checkpoint

from ._errors import PoolClosed, QueueFull
from ._handlers import check_callable, is_async_callable
from ._middleware import Middleware, RateLimiter, Timeout, check_middleware
from ._observe import (
    ObservedBlock,
    Observer,
    ProgressBar,
    logger_for,
)
from ._outcome import Job, Outcome, _make_outcome
from ._retry import Retry
from ._threads import Threads, holds_of_attempt
from ._validate import check_bool, check_int, check_optional_str

__all__ = ["Pool", "PoolStats"]

T = TypeVar("T")
R = TypeVar("R")

# What travels to a worker and sits in ``live``: (index, item, id, job).
# A tuple, not an object, because it is made once per item; the Job is None for
# items fed by the helpers, which nobody can wait on.
_Entry: TypeAlias = tuple[int, T, Hashable, Job[T, R] | None]

_NEW, _RUNNING, _STOPPING, _CLOSED = "new", "running", "stopping", "closed"

# A worker task sets this to its pool, so that submits made from inside a
# handler (or from tasks the handler starts) can bypass ``max_pending``.
_worker_of: contextvars.ContextVar[Pool[Any, Any] | None] = contextvars.ContextVar(
    "corral_worker_of", default=None
)

# A worker checkpoints at least once every this many items, so that a handler
# that never awaits cannot starve the event loop or delay cancellation.
_MAX_STREAK = 64


@attrs.frozen
class PoolStats:
    """A snapshot of a pool's counters (they accumulate over re-entries).

    ``submitted``: items accepted (by :meth:`Pool.submit` and its twin, or by
    the helpers from their input). ``queued``: submitted, waiting for a
    worker. ``running``: in a worker.
    ``succeeded`` / ``failed``: final outcomes. ``retried``: extra attempts.
    ``backpressure_waits``: submits that had to wait for room.
    ``unfinished``: items left without an outcome at the last exit (not
    accumulated: it is ``len(pool.unfinished)``).
    """

    submitted: int
    queued: int
    running: int
    succeeded: int
    failed: int
    retried: int
    backpressure_waits: int
    unfinished: int


def _clock() -> Callable[[], float]:
    """The running event loop's clock, looked up once instead of once per read.

    Always the clock :func:`anyio.current_time` reads (so trio's MockClock and
    any asyncio loop with its own ``time()`` apply): on asyncio the loop's own
    ``time`` method, on trio anyio's backend function.
    """
    try:
        native = anyio.lowlevel.current_token().native_token
        loop_time = getattr(native, "time", None)  # an asyncio event loop
        if callable(loop_time):
            return cast("Callable[[], float]", loop_time)
        from anyio._core._eventloop import get_async_backend

        return get_async_backend().current_time
    except (ImportError, AttributeError):  # pragma: no cover - anyio changed
        return anyio.current_time


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


class Pool(ObservedBlock, Generic[T, R]):
    """A worker pool scoped to an ``async with`` block.

    ``handler`` is called once per item (async, or plain in a worker thread).
    Submit items with :meth:`submit`; each becomes exactly one :class:`Outcome`,
    or is listed in :attr:`unfinished` after the block. Errors are values: a
    handler exception becomes ``Outcome.error`` and does not disturb other items.

    Leaving the block normally waits until the pool is idle (nothing queued,
    nothing running; handlers may keep submitting follow-up work until it runs
    out). Leaving it with an exception, or by cancellation, cancels the workers,
    lists the items without outcome in :attr:`unfinished`, and re-raises the
    exception unwrapped.

    >>> import anyio
    >>> async def double(x: int) -> int:
    ...     return 2 * x
    >>> async def main() -> list[int]:
    ...     async with Pool(double, workers=4) as pool:
    ...         jobs = [await pool.submit(i) for i in range(3)]
    ...     return [job.outcome.result for job in jobs]
    >>> anyio.run(main)
    [0, 2, 4]

    :param handler: called with each item, once per attempt; what it returns
        is the outcome's ``result``, what it raises (an ``Exception``) the
        ``error``. An async callable is awaited in a worker task; a plain one
        runs in a worker thread, and an awaitable it returns is awaited on the
        event loop. A ``BaseException`` that is neither an ``Exception`` nor a
        cancellation (``KeyboardInterrupt``) stops the pool, and the block
        re-raises it.
    :param workers: the most worker tasks running at once. They start as items
        arrive (one at a time, as the work needs them) and stay until the block
        ends, so a large bound costs nothing until it is used. A plain handler
        runs in at most ``2 * workers`` threads at once, counting those a
        ``timeout`` abandoned (see ``timeout``).
    :param max_pending: how many submitted items may wait for a worker before
        :meth:`submit` blocks; default ``2 * workers``, at least 16.
    :param on_outcome: called with every outcome in the same step that
        records it (a plain function) or right after it (an async function is
        awaited by the worker). An exception from it stops the pool and is
        re-raised from the ``async with``.
    :param fail_fast: the first final failure cancels the pool and the block's
        own code; the failing item keeps its error outcome and that exception is
        re-raised, unwrapped, when the block exits.
    :param name: a label for repr, task names, the progress bar and the
        logger (``corral.pool.<name>``; ``corral.pool`` without a name).
    :param progress: ``True`` draws a tqdm progress bar (``pip install
        'corral[progress]'``) of finished items, with failures and retries;
        or pass your own tqdm-compatible bar. Updated ten times a second from
        a stats snapshot, never per item.
    :param on_stats: a plain function called with a :class:`PoolStats`
        snapshot every ``stats_interval`` seconds while the pool runs, and once
        more at exit. It runs on the event loop: keep it quick. If it raises,
        the pool stops and the block re-raises that exception.
    :param stats_interval: seconds between two ``on_stats`` calls.
    :param retry: a :class:`Retry` policy: failed calls are retried per item.
    :param rate_limit: a rate limiter (:class:`TokenBucket`,
        :class:`SlidingWindow`, or anything with ``async acquire(cost=1)``),
        acquired once per attempt; may be shared by several pools.
    :param limiter: an :class:`anyio.CapacityLimiter` held for each attempt
        (not during a retry's backoff); pools sharing one share a concurrency cap.
    :param timeout: seconds (or a :class:`Timeout`) per attempt; a timed-out
        attempt is a ``TimeoutError``, which ``retry`` may retry. A plain
        handler's timed-out thread runs on, abandoned: it keeps one of the
        pool's threads and its ``limiter`` token until it ends, or until the
        block ends (which does not wait for it). Waiting for a
        free thread counts against the timeout; an attempt that gets none in
        time fails with a ``TimeoutError`` saying so and is not counted in
        ``Outcome.attempts``.
    :param middleware: user :class:`Middleware`, outermost first; they wrap the
        chain ``retry → limiter → rate_limit → timeout → handler`` and see each
        item once.

    Entering a pool that is already running raises ``RuntimeError``; it can be
    entered again after it exited (its stats accumulate).
    """

    @overload
    def __init__(
        self: Pool[T, R],
        handler: Callable[[T], Awaitable[R]],
        *,
        workers: int = 10,
        max_pending: int | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimiter | None = None,
        limiter: anyio.CapacityLimiter | None = None,
        timeout: float | Timeout | None = None,
        middleware: Sequence[Middleware] = (),
        on_outcome: Callable[[Outcome[T, R]], Any] | None = None,
        fail_fast: bool = False,
        name: str | None = None,
        progress: bool | ProgressBar = False,
        on_stats: Callable[[PoolStats], object] | None = None,
        stats_interval: float = 1.0,
    ) -> None: ...
    @overload
    def __init__(
        self: Pool[T, R],
        handler: Callable[[T], R],
        *,
        workers: int = 10,
        max_pending: int | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimiter | None = None,
        limiter: anyio.CapacityLimiter | None = None,
        timeout: float | Timeout | None = None,
        middleware: Sequence[Middleware] = (),
        on_outcome: Callable[[Outcome[T, R]], Any] | None = None,
        fail_fast: bool = False,
        name: str | None = None,
        progress: bool | ProgressBar = False,
        on_stats: Callable[[PoolStats], object] | None = None,
        stats_interval: float = 1.0,
    ) -> None: ...
    def __init__(
        self,
        handler: Callable[[T], Any],
        *,
        workers: int = 10,
        max_pending: int | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimiter | None = None,
        limiter: anyio.CapacityLimiter | None = None,
        timeout: float | Timeout | None = None,
        middleware: Sequence[Middleware] = (),
        on_outcome: Callable[[Outcome[T, R]], Any] | None = None,
        fail_fast: bool = False,
        name: str | None = None,
        progress: bool | ProgressBar = False,
        on_stats: Callable[[PoolStats], object] | None = None,
        stats_interval: float = 1.0,
    ) -> None:
        check_callable("handler", handler)
        self._handler = handler
        self._workers = check_int("workers", workers, minimum=1)
        if max_pending is None:
            max_pending = max(2 * workers, 16)
        self._max_pending = check_int("max_pending", max_pending, minimum=1)
        self._layers = check_middleware(
            retry=retry,
            rate_limit=rate_limit,
            limiter=limiter,
            timeout=timeout,
            middleware=middleware,
        )
        check_callable("on_outcome", on_outcome, optional=True)
        self._on_outcome_sync: Callable[[Outcome[T, R]], Any] | None = None
        self._on_outcome_async: Callable[[Outcome[T, R]], Awaitable[Any]] | None = None
        # apply_to_all's record: every outcome is stored at its index, first
        # thing in the recording step (cheaper than a sink function per item)
        self._collected: _Collected[T, R] | None = None
        if on_outcome is not None:
            if is_async_callable(on_outcome):
                self._on_outcome_async = on_outcome
            else:
                self._on_outcome_sync = on_outcome
        self._fail_fast = check_bool("fail_fast", fail_fast)
        self.name: str | None = check_optional_str("name", name)
        self._observer: Observer[PoolStats] = Observer(
            progress=progress,
            on_stats=on_stats,
            stats_interval=stats_interval,
            count=_pool_progress,
        )
        self._log = logger_for("pool", self.name)

        self._state = _NEW
        self._tg: anyio.abc.TaskGroup | None = None
        self._queue: deque[_Entry[T, R]] = deque()  # waiting for a worker
        self._idle_workers: deque[_IdleWorker[T, R]] = deque()  # waiting for work
        self._live: dict[int, _Entry[T, R]] = {}
        self._space_waiters: deque[anyio.Event] = deque()
        self._idle_event: anyio.Event | None = None
        # per run: the threads of a plain handler, the loop's clock, and how
        # many workers have been started (at most ``workers``, on demand)
        self._threads: Threads | None = None
        self._context = contextvars.Context()
        self._clock: Callable[[], float] = anyio.current_time
        self._started = 0
        self._watched = False  # someone waits for idle or join: workers notify
        self._in_callbacks = 0  # workers awaiting an async on_outcome
        self._waking = False  # a parked worker was handed an entry, has not run yet
        self._joiners: list[_Joiner] = []
        self._unfinished: list[T] = []
        self._orphans: list[T] = []  # taken from a helper's input, never submitted
        # why the pool stopped itself: fail_fast's failure, or an exception that
        # broke a worker or feeder (on_outcome raised, KeyboardInterrupt, ...)
        self._stop_reason: BaseException | None = None
        # counters
        self._next_index = 0
        self._queued = 0  # in the queue, plus slots granted to waiting submitters
        self._reserved = 0  # slots granted to waiting submitters, not yet used
        self._failed = 0
        self._lost = 0  # submitted items that ended unfinished, over all entries
        self._retried = 0
        self._backpressure_waits = 0

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"<corral.Pool{label} {self._state} workers={self._workers}>"

    # ------------------------------------------------------------------ state

    @property
    def stats(self) -> PoolStats:
        """A frozen snapshot of the counters; cheap, never waits, safe to call
        any time (also before entry and after exit)."""
        queued = self._queued - self._reserved
        live = len(self._live)
        return PoolStats(
            submitted=self._next_index,
            queued=queued,
            running=live - queued,
            succeeded=self._next_index - live - self._lost - self._failed,
            failed=self._failed,
            retried=self._retried,
            backpressure_waits=self._backpressure_waits,
            unfinished=len(self._unfinished),
        )

    @property
    def unfinished(self) -> list[T]:
        """Items left without an outcome when the pool last exited, in submission
        order. Empty after a clean exit; reset when the pool is entered again."""
        return list(self._unfinished)

    # -------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Pool[T, R]:
        if self._state in (_RUNNING, _STOPPING):
            raise RuntimeError(f"{self!r} is already running; enter it only once at a time")
        self._clock = _clock()
        # a worker runs one call at a time; as many threads again may have
        # been abandoned by timeouts (see _threads)
        self._threads = self._layers.threads_for(self._handler, 2 * self._workers)
        if self._observer.active:  # before the task group: it may raise
            self._observer.open(self.stats, self.name or "corral")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._unfinished = []
        self._stop_reason = None
        self._started = 0  # workers start as items arrive (see _enqueue)
        # ... in the context of the task that entered the block, as if all had
        # started here, not in that of whichever submitter happened to start one
        self._context = contextvars.copy_context()
        self._state = _RUNNING
        if self._threads is not None:
            self._threads.start(tg, self.name or hex(id(self)))
        if self._observer.active:
            self._observer.start(tg, lambda: self.stats, self._fail)
        self._log.debug("%r started", self)
        return self

    def _start_worker(self) -> None:
        """Start one more worker (the caller checked the bound); it takes the
        entry at the head of the queue when it runs."""
        tg = self._tg
        assert tg is not None
        number = self._started
        self._started = number + 1
        self._waking = True  # cleared by the new worker's _wake_next
        name = f"corral worker {self.name or hex(id(self))}#{number}"
        call, attempts = self._worker_call()
        clock = self._clock
        self._context.run(lambda: tg.start_soon(self._work, call, attempts, clock, name=name))

    def _worker_call(self) -> tuple[Callable[[T], Awaitable[R]], list[float] | None]:
        """What a new worker calls per item: the handler, or a chain of its own
        around a counter of handler calls (the counter's list: calls, start)."""
        layers, clock, threads = self._layers, self._clock, self._threads
        if not layers.configured:
            return layers.chain(self._handler, threads=threads, clock=clock), None
        attempts: list[float] = [0, 0.0]
        chain = layers.chain(
            self._handler, threads=threads, clock=clock, on_start=_counter(attempts, clock)
        )
        return chain, attempts

    def _exit_summary(self) -> tuple[object, str]:
        stats = self.stats
        summary = (
            f"{stats.succeeded} succeeded, {stats.failed} failed, {stats.unfinished} unfinished"
        )
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
        # The pool's own tasks never raise (a worker or feeder that breaks
        # records why in _stop_reason), so what the task group raises is the
        # block's exception, possibly wrapped, or a cancellation.
        suppress, raised = await _end_task_group(
            tg,
            exc_type,
            exc,
            tb,
            drain=self._wait_idle if exc is None and self._state is _RUNNING else None,
            close=self._close,
            finalize=self._finalize,
        )
        if body_exc is not None and not isinstance(body_exc, cancelled):
            return False  # the block's own exception, re-raised exactly as it was
        if raised is not None:
            # a cancellation from outside (an outer scope, a native asyncio
            # cancellation): it wins over why the pool stopped itself, as in
            # asyncio.TaskGroup, or asyncio.timeout would never see it
            _raise_cancelled(self._log, self, self._stop_reason, _unwrap_group(raised))
        if self._stop_reason is not None:
            raise self._stop_reason  # fail_fast's failure, or what broke a worker
        return suppress

    def _close(self) -> None:
        """Accept no more items; wake everyone waiting to submit."""
        if self._state is _CLOSED:
            return
        self._state = _CLOSED
        self._observer.stop()
        if self._threads is not None:
            self._threads.close()
        while self._idle_workers:  # woken with no entry, they find the pool closed
            self._idle_workers.popleft().event.set()
        while self._space_waiters:
            self._space_waiters.popleft().set()

    def _finalize(self) -> None:
        """After the workers stopped: whatever is still live is unfinished."""
        self._close()
        entries = list(self._live.values())
        self._live.clear()
        self._lost += len(entries)
        self._unfinished = [entry[1] for entry in entries] + self._orphans
        self._orphans = []
        for entry in entries:
            if entry[3] is not None:
                entry[3]._abandon()
        joiners, self._joiners = self._joiners, []
        for joiner in joiners:
            joiner.event.set()
        self._queued = self._reserved = self._in_callbacks = 0
        self._watched = self._waking = False
        self._queue.clear()
        self._tg = None

    def _closed_error(self) -> PoolClosed:
        if self._state is _NEW:
            return PoolClosed(f"{self!r} is not running yet: submit inside `async with pool:`")
        if self._state is _STOPPING:
            return PoolClosed(f"{self!r} is stopping and takes no new items")
        return PoolClosed(f"{self!r} has exited and takes no new items")

    # ---------------------------------------------------------------- submit

    async def submit(self, item: T, *, id: Hashable = None) -> Job[T, R]:
        """Enqueue ``item`` and return its :class:`Job`.

        Blocks while ``max_pending`` items wait for a worker (submitters are
        served first come, first served), except when called from the pool's own
        handler, which never blocks. Always a checkpoint. Cancel-safe, also under
        native asyncio cancellation: if it raises, the item was not enqueued; if
        it returns, it was.

        :param id: the job's and outcome's ``id``; default the submission index.
        :raises PoolClosed: the pool is not running, or it closed while this
            call waited for room. A caller inside a pool that is stopping
            (``fail_fast``, an exception) gets that cancellation instead.
        :raises TypeError: ``id`` is not hashable.
        """
        await checkpoint()
        if id is not None:
            _check_id(id)
        if self._state is not _RUNNING:
            await self._raise_closed()
        if (self._queued >= self._max_pending or self._space_waiters) and (
            _worker_of.get() is not self
        ):
            await self._wait_for_space()
            self._reserved -= 1  # the slot granted to us is now used
        else:
            self._queued += 1
        return self._put(item, id)

    def submit_nowait(self, item: T, *, id: Hashable = None) -> Job[T, R]:
        """Enqueue ``item`` without waiting, or raise.

        Never waits and is not a checkpoint. If it raises, the item was not
        enqueued; if it returns, it was.

        :param id: the job's and outcome's ``id``; default the submission index.
        :raises QueueFull: ``max_pending`` items are waiting, or submitters
            are waiting for room (never raised for submits from the pool's
            own handler).
        :raises PoolClosed: the pool is not running.
        :raises TypeError: ``id`` is not hashable.
        """
        if id is not None:
            _check_id(id)
        if self._state is not _RUNNING:
            raise self._closed_error()
        if (self._queued >= self._max_pending or self._space_waiters) and (
            _worker_of.get() is not self
        ):
            raise QueueFull(f"{self!r} has max_pending={self._max_pending} items waiting")
        self._queued += 1
        return self._put(item, id)

    def _put(self, item: T, id: Hashable) -> Job[T, R]:
        index = self._next_index
        self._next_index = index + 1
        job: Job[T, R] = Job(item, index, index if id is None else id)
        self._live[index] = entry = (index, item, job.id, job)
        self._enqueue(entry)
        return job

    def _submit_if_room(self, item: T) -> bool:
        """Enqueue without a checkpoint or a Job if there is room (the helpers)."""
        if self._state is not _RUNNING or self._queued >= self._max_pending or self._space_waiters:
            return False
        self._queued += 1
        index = self._next_index
        self._next_index = index + 1
        self._live[index] = entry = (index, item, index, None)
        self._enqueue(entry)
        return True

    def _fill(self, iterator: Iterator[T]) -> bool:
        """Enqueue items taken from ``iterator`` while there is room, like
        :meth:`_submit_if_room` in a loop (the helpers' sync input).

        An item is taken only when there is room for it. True when ``iterator``
        is exhausted; False when there is no room (or the pool is not running).
        """
        live = self._live
        queue = self._queue
        idle_workers = self._idle_workers
        max_pending = self._max_pending
        if self._state is not _RUNNING or self._queued >= max_pending or self._space_waiters:
            return False
        for item in iterator:
            self._queued += 1
            index = self._next_index
            self._next_index = index + 1
            live[index] = entry = (index, item, index, None)
            if not self._waking and (idle_workers or self._started < self._workers):
                self._enqueue(entry)
            else:
                queue.append(entry)
            if self._state is not _RUNNING or self._queued >= max_pending or self._space_waiters:
                return False
        return True

    def _enqueue(self, entry: _Entry[T, R]) -> None:
        """Hand ``entry`` to an idle worker, or queue it (starting a new worker
        for it while there are fewer than ``workers``).

        Wake-ups are chained: at most one parked worker is being woken (or one
        new worker started) at a time, and each, once it runs, passes the
        next queued entry on to the next parked worker (or a new one). A burst
        of items thus wakes or starts only as many workers as are needed to
        keep up (one, for a handler that never awaits; all of them, one loop
        step apart, for one that does), so a generous ``workers`` costs
        nothing until the work needs it.
        """
        if self._waking:
            self._queue.append(entry)
        elif self._idle_workers:
            self._waking = True
            idle = self._idle_workers.popleft()
            idle.entry = entry
            idle.event.set()
        else:
            self._queue.append(entry)
            if self._started < self._workers:
                self._start_worker()

    async def _wait_for_space(self) -> None:
        """Wait until a queue slot is handed to us (then counted in ``_reserved``)."""
        self._backpressure_waits += 1
        event = anyio.Event()
        self._space_waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                # granted, then interrupted: hand the slot on, keep nothing
                if self._state is _RUNNING:
                    self._reserved -= 1
                    self._free_slot()
            else:
                self._space_waiters.remove(event)
            raise
        if self._state is not _RUNNING:
            await self._raise_closed()

    async def _raise_closed(self) -> NoReturn:
        # If the pool is being cancelled (fail_fast, an exception, an early exit
        # from a helper), a caller inside it gets that cancellation here rather
        # than a PoolClosed that would mask why the pool stopped.
        await checkpoint()
        raise self._closed_error()

    def _free_slot(self) -> None:
        """A queued item left the queue: hand its slot to the first waiter."""
        if self._space_waiters and self._queued <= self._max_pending:
            self._space_waiters.popleft().set()
            self._reserved += 1
        else:
            self._queued -= 1

    async def join(self) -> None:
        """Wait until every item submitted before this call has its outcome.

        Returns once their outcomes are recorded (an async ``on_outcome`` may
        still be running). Always a checkpoint. Items submitted meanwhile are
        not waited for. Cancelling the wait does not affect the items. Do not
        call it from the pool's own handler: that handler's item gets its
        outcome only after the handler returns, so the join would wait for
        itself.

        :raises PoolClosed: the pool is not running, or it stopped before all of
            them had an outcome.
        """
        await checkpoint()
        if self._state is _NEW or self._state is _CLOSED:
            raise self._closed_error()
        target = self._next_index
        remaining = sum(1 for index in self._live if index < target)
        if not remaining:
            return
        joiner = _Joiner(target, remaining)
        self._joiners.append(joiner)
        self._watched = True
        try:
            await joiner.event.wait()
        except BaseException:
            if joiner in self._joiners:
                self._joiners.remove(joiner)
            raise
        if joiner.remaining:
            raise PoolClosed(f"{self!r} exited before the joined items had outcomes")

    async def _wait_idle(self) -> None:
        await checkpoint()
        while self._live or self._in_callbacks:
            self._idle_event = event = anyio.Event()
            self._watched = True
            await event.wait()

    # ---------------------------------------------------------------- workers

    async def _work(
        self,
        call: Callable[[T], Awaitable[R]],
        attempts: list[float] | None,
        clock: Callable[[], float],
    ) -> None:
        # Everything the loop touches is bound to a local once: the per-item path
        # is the engine's hot path (see benchmarks/bench_apply.py).
        _worker_of.set(self)
        holds_of_attempt.set(None)  # not the holds of whoever started this worker
        self._wake_next()  # a new worker: the chain of wake-ups goes on
        queue = self._queue
        live = self._live
        space_waiters = self._space_waiters
        sink = self._on_outcome_sync
        after = self._on_outcome_async
        collected = self._collected
        # Successes that nobody sees in the recording step (apply_to_all with no
        # on_outcome) are kept as plain columns; their Outcomes are made at the
        # end. So corral leaves no new object for the garbage collector per item
        # while the workers run (its collections then walk every coroutine in
        # flight, which costs the more the more workers there are).
        defer = collected is not None and sink is None and after is None
        if collected is not None:
            outcomes, kept_items, kept_results, kept_elapsed = (
                collected.outcomes,
                collected.items,
                collected.results,
                collected.elapsed,
            )
        fail_fast = self._fail_fast
        cancelled = anyio.get_cancelled_exc_class()
        streak = 0
        try:
            while True:
                if queue:
                    if streak == _MAX_STREAK:
                        streak = 0
                        await checkpoint()
                        continue
                    index, item, id_, job = queue.popleft()
                    streak += 1
                elif self._state is _CLOSED:
                    return
                else:
                    streak = 0
                    handed = await self._wait_for_work()
                    if handed is None:  # woken by _close
                        continue
                    index, item, id_, job = handed
                if space_waiters and self._queued <= self._max_pending:
                    space_waiters.popleft().set()  # its slot goes to the first waiter
                    self._reserved += 1
                else:
                    self._queued -= 1
                start = clock()
                if attempts is None:
                    try:
                        result = await call(item)
                    except Exception as error:  # noqa: BLE001 - errors are values
                        outcome: Outcome[T, R] = _make_outcome(
                            item, index, id_, None, error, 1, clock() - start
                        )
                        self._failed += 1
                        self._log_failure(outcome)
                    except cancelled as exc:
                        outcome = _make_outcome(
                            item, index, id_, None, _stray_cancellation(exc), 1, clock() - start
                        )
                        self._failed += 1
                        self._log_failure(outcome)
                    else:
                        if defer and job is None:
                            try:
                                kept_items[index] = item
                            except IndexError:
                                collected.grow(index)  # type: ignore[union-attr]
                                kept_items[index] = item
                            kept_results[index] = result
                            kept_elapsed[index] = clock() - start
                            # -- the step, for an outcome that is made later --
                            del live[index]
                            if self._watched:
                                self._notify(index)
                            continue
                        outcome = _make_outcome(item, index, id_, result, None, 1, clock() - start)
                else:
                    outcome = await self._call_layered(
                        call, attempts, clock, start, item, index, id_
                    )
                # -- one step: the item leaves `live` and gets its outcome --
                del live[index]
                if job is not None:
                    job._outcome = outcome
                    if job._event is not None:
                        job._event.set()
                if collected is not None:
                    try:
                        outcomes[index] = outcome
                    except IndexError:
                        collected.grow(index)
                        outcomes[index] = outcome
                if sink is not None:
                    sink(outcome)
                if self._watched:
                    self._notify(index)
                if fail_fast and outcome.error is not None:
                    self._fail(outcome.error)
                # -- end of the step --
                if after is not None:
                    self._in_callbacks += 1
                    try:
                        await after(outcome)
                    finally:
                        self._in_callbacks -= 1
                    if self._watched:
                        self._notify(None)
        except cancelled:
            raise
        except BaseException as error:  # noqa: BLE001 - re-raised by __aexit__
            # on_outcome raised, or a handler raised KeyboardInterrupt/SystemExit:
            # stop everything; the block re-raises this very exception.
            self._fail(error)

    async def _call_layered(
        self,
        chain: Callable[[T], Awaitable[R]],
        attempts: list[float],
        clock: Callable[[], float],
        start: float,
        item: T,
        index: int,
        id_: Hashable,
    ) -> Outcome[T, R]:
        """Run ``item`` through the middleware chain; count the handler's calls."""
        attempts[0] = 0
        error: Exception | None = None
        result: R | None = None
        try:
            result = await chain(item)
        except Exception as exc:  # noqa: BLE001 - errors are values
            error = exc
            self._failed += 1
        except anyio.get_cancelled_exc_class() as exc:
            error = _stray_cancellation(exc)
            self._failed += 1
        finally:  # extra calls count also for an item that ends unfinished
            calls = int(attempts[0])
            if calls > 1:
                self._retried += calls - 1
        end = clock()
        if calls:
            start = attempts[1]  # elapsed runs from the first attempt's start
        outcome = _make_outcome(item, index, id_, result, error, calls, end - start)
        if error is not None:
            self._log_failure(outcome)
        return outcome

    def _log_failure(self, outcome: Outcome[T, R]) -> None:
        """A final failure, at WARNING, with its traceback."""
        self._log.warning(
            "%s: item %r failed after %d attempt%s: %r",
            self.name or "pool",
            outcome.id,
            outcome.attempts,
            "" if outcome.attempts == 1 else "s",
            outcome.error,
            exc_info=outcome.error,
        )

    async def _wait_for_work(self) -> _Entry[T, R] | None:
        """Park until an entry is handed over (None: the pool closed)."""
        idle: _IdleWorker[T, R] = _IdleWorker()
        self._idle_workers.append(idle)
        try:
            await idle.event.wait()
        except BaseException:
            if idle.entry is not None:  # handed an entry, then cancelled: pass it on
                self._queue.appendleft(idle.entry)
                self._wake_next()
            elif not idle.event.is_set():
                self._idle_workers.remove(idle)
            raise
        if idle.entry is not None:
            self._wake_next()
        return idle.entry

    def _wake_next(self) -> None:
        """A woken or new worker runs: pass the wake-up on if work is still queued.

        (A new worker calls this before it takes an entry: if the queue then
        holds only the one it takes, the worker started for it finds nothing
        and parks, a spare.)
        """
        self._waking = False
        if not self._queue:
            return
        if self._idle_workers:
            self._enqueue(self._queue.popleft())
        elif self._started < self._workers and self._state is _RUNNING:
            self._start_worker()

    def _notify(self, index: int | None) -> None:
        """Wake ``join`` and idle waiters an outcome (or a callback's end) concerns."""
        if self._joiners and index is not None:
            for joiner in self._joiners:
                if index < joiner.target:
                    joiner.remaining -= 1
                    if joiner.remaining == 0:
                        joiner.event.set()
            self._joiners = [joiner for joiner in self._joiners if joiner.remaining]
        if not self._live and not self._in_callbacks and self._idle_event is not None:
            self._idle_event.set()
            self._idle_event = None
        self._watched = bool(self._joiners) or self._idle_event is not None

    def _fail(self, error: BaseException) -> None:
        """Stop the pool because of ``error``, which its block will re-raise."""
        if self._stop_reason is None:
            self._stop_reason = error
            self._stop()

    def _stop(self) -> None:
        """Cancel the workers and the block's own code; take no new items.

        Queued items do not start: cancellation reaches a worker only at its
        next checkpoint, and a handler that does not await would otherwise
        let it run on through the queue. They stay in ``live``, so they end
        unfinished.
        """
        if self._state is _RUNNING:
            self._state = _STOPPING
        self._queue.clear()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def _add_sink(self, sink: Callable[[Outcome[T, R]], None]) -> None:
        """Deliver every outcome to ``sink`` first, in the recording step."""
        user = self._on_outcome_sync
        if user is None:
            self._on_outcome_sync = sink
        else:

            def both(outcome: Outcome[T, R]) -> None:
                sink(outcome)
                user(outcome)

            self._on_outcome_sync = both


def _pool_progress(stats: PoolStats) -> tuple[int, dict[str, int]]:
    """What a progress bar shows of a pool: outcomes, failures, retries."""
    return stats.succeeded + stats.failed, {"failed": stats.failed, "retried": stats.retried}


def _check_id(id: object) -> None:
    try:
        hash(id)
    except TypeError:
        raise TypeError(f"id must be hashable, got {id!r}") from None


def _stray_cancellation(exc: BaseException) -> Exception:
    """A cancellation exception that reached a worker: re-raise it if the worker
    is being cancelled; otherwise (asyncio: a handler awaited something that was
    cancelled, or raised CancelledError itself) it is that item's error."""
    if anyio.current_effective_deadline() == -math.inf:
        raise exc
    error = RuntimeError(
        f"the handler raised {type(exc).__name__} although its worker was not "
        "cancelled (did it await a task or future that was cancelled?)"
    )
    error.__cause__ = exc
    return error


def _counter(attempts: list[float], clock: Callable[[], float]) -> Callable[[], None]:
    """Count a call of the handler in ``attempts[0]`` and time the first in
    ``attempts[1]`` (the worker resets the count for each item)."""

    def started() -> None:
        attempts[0] += 1
        if attempts[0] == 1:
            attempts[1] = clock()

    return started


class _Collected(Generic[T, R]):
    """apply_to_all's record of the outcomes, by index.

    ``outcomes[index]`` is the item's Outcome, or None for a success kept as
    ``items[index]``, ``results[index]``, ``elapsed[index]`` (one attempt, its
    id is its index) whose Outcome :meth:`finish` makes. The lists grow
    together, in chunks.
    """

    __slots__ = ("elapsed", "items", "outcomes", "results")

    def __init__(self) -> None:
        self.outcomes: list[Outcome[T, R] | None] = []
        # the columns hold None (or 0.0) where there is no kept success
        self.items: list[Any] = []
        self.results: list[Any] = []
        self.elapsed: list[float] = []

    def grow(self, index: int) -> None:
        """Make room for ``index``."""
        more = max(1024, index + 1 - len(self.outcomes))
        self.outcomes.extend([None] * more)
        self.items.extend([None] * more)
        self.results.extend([None] * more)
        self.elapsed.extend([0.0] * more)

    def finish(self, count: int) -> list[Outcome[T, R]]:
        """The outcomes of items ``0 .. count - 1`` (each must have one)."""
        if count:
            self.grow(count - 1)
        outcomes, items, results, elapsed = self.outcomes, self.items, self.results, self.elapsed
        del outcomes[count:]
        # from the end, a chunk at a time, shortening the columns as they are
        # used: the columns' memory goes back while the Outcomes are made
        end = count
        while end:
            start = max(0, end - 4096)
            for index in range(start, end):
                if outcomes[index] is None:
                    outcomes[index] = _make_outcome(
                        items[index], index, index, results[index], None, 1, elapsed[index]
                    )
            del items[start:], results[start:], elapsed[start:]
            end = start
        return outcomes  # type: ignore[return-value]  # no None is left


class _IdleWorker(Generic[T, R]):
    """A parked worker: set ``entry``, then ``event``, to hand it work."""

    __slots__ = ("entry", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.entry: _Entry[T, R] | None = None


class _Joiner:
    __slots__ = ("event", "remaining", "target")

    def __init__(self, target: int, remaining: int) -> None:
        self.target = target
        self.remaining = remaining
        self.event = anyio.Event()
