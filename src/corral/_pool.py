"""Pool: one task group, one queue, up to ``workers`` worker tasks.

How an item travels (ARCHITECTURE.md draws the whole engine)::

    submit ──► Slots (room: max_pending) ──► live[index] = entry ──► handed to a
    parked worker (Parking), or queued (the discipline) ──► worker: take → run
    (the middleware chain) → record (_Recorder: outcome, job, on_outcome)

``live`` (a dict in submission order) is the single record of every item that
has no outcome yet; whatever is in it when the pool stops is ``unfinished``.
Everything one entry into the block owns lives in a fresh :class:`_PoolRun`.

Why not an anyio memory object stream between submitters and workers: its
blocking ``send`` hands the item over before the sender resumes, so a native
asyncio cancellation arriving in between makes ``send`` raise although the
item was delivered, and its receivers wake one per item. Slots keep the submit
side exact, and Parking wakes parked workers in a chain (see ``_enqueue``).
"""

from __future__ import annotations

import contextvars
import numbers
import weakref
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, NoReturn, TypeAlias, TypeVar, cast, overload

import anyio
import anyio.abc
import attrs
from anyio.lowlevel import checkpoint

from ._breaker import CircuitBreaker
from ._concurrency import limit_of
from ._errors import JobCancelled, PoolClosed, QueueFull
from ._handlers import check_callable, is_async_callable
from ._hedge import Hedge
from ._lifecycle import CLOSED, NEW, RUNNING, STOPPING, Block, Run, stray_cancellation, weakly
from ._middleware import Middleware, RateLimiter, Timeout, check_middleware
from ._observe import Observer, ProgressBar, logger_for
from ._outcome import Job, Outcome, _make_outcome
from ._parking import Parking
from ._retry import Retry
from ._scheduling import NO_KEY, Discipline, FifoQueue, ScheduledQueue, WorkerLimit
from ._slots import Slots
from ._threads import Threads, holds_of_attempt
from ._validate import check_bool, check_int, check_optional_str

__all__ = ["Pool", "PoolStats"]

T = TypeVar("T")
R = TypeVar("R")

# What travels to a worker and sits in ``live``: (index, item, id, job).
# A tuple, not an object, because it is made once per item; the Job is None for
# items fed by the helpers, which nobody can wait on.
_Entry: TypeAlias = tuple[int, T, Hashable, Job[T, R] | None]

# A worker task sets this to its pool, so that submits made from inside a
# handler (or from tasks the handler starts) can bypass ``max_pending``. A weak
# reference: a thread the pool abandoned as it was cancelled runs on in a copy
# of the worker's context, and must not keep the pool alive.
_worker_of: contextvars.ContextVar[weakref.ref[Pool[Any, Any]] | None] = contextvars.ContextVar(
    "corral_worker_of", default=None
)


def _in_worker_of(pool: Pool[Any, Any]) -> bool:
    """Whether the running task is one of ``pool``'s workers (or started by one)."""
    ref = _worker_of.get()
    return ref is not None and ref() is pool


# The default priority. ``submit`` checks any other value; CPython keeps one
# object for the int 0, so the common case costs one identity test.
_NO_PRIORITY = 0

# A worker checkpoints at least once every this many items, so that a handler
# that never awaits cannot starve the event loop or delay cancellation.
_MAX_STREAK = 64


@attrs.frozen
class PoolStats:
    """A snapshot of a pool's counters (they accumulate over re-entries).

    ``submitted``: items accepted (by :meth:`Pool.submit` and its twin, or by
    the helpers from their input). ``queued``: submitted, waiting for a
    worker. ``running``: in a worker.
    ``succeeded`` / ``failed``: final outcomes. ``retried``: extra attempts
    (retries, and a hedge's copies).
    ``backpressure_waits``: submits that had to wait for room (the helpers'
    own waits before taking the next item are not counted).
    ``unfinished``: items left without an outcome at the last exit (not
    accumulated: it is ``len(pool.unfinished)``).
    ``workers``: the current bound (:meth:`Pool.resize`). ``paused``: see
    :meth:`Pool.pause`. ``cancelled``: jobs cancelled by :meth:`Job.cancel`
    (also counted in ``failed``: their outcome is a ``JobCancelled`` error).
    ``waiting_for_key``: queued items waiting for their key (``key=``, also
    counted in ``queued``); ``busy_keys``: keys with an item started or about to.
    ``limit``: the current limit of an :class:`~corral.AdaptiveLimiter` given
    as ``limiter=`` (None with another limiter, or none).
    """

    submitted: int
    queued: int
    running: int
    succeeded: int
    failed: int
    retried: int
    backpressure_waits: int
    unfinished: int
    workers: int = 0
    paused: bool = False
    cancelled: int = 0
    waiting_for_key: int = 0
    busy_keys: int = 0
    limit: int | None = None


@attrs.define
class _Counters:
    """What a pool counts over all its entries."""

    submitted: int = 0  # also the next submission index
    failed: int = 0
    lost: int = 0  # submitted items that ended unfinished
    retried: int = 0
    backpressure_waits: int = 0
    cancelled: int = 0  # jobs cancelled by Job.cancel (also in failed)


class _Watch:
    """Who waits for outcomes: ``join`` callers and the exit's wait for idle."""

    __slots__ = ("callbacks", "idle", "joiners", "paused", "watched")

    def __init__(self) -> None:
        self.joiners: list[_Joiner] = []
        self.idle: anyio.Event | None = None  # set when nothing is live
        self.callbacks = 0  # workers awaiting an async on_outcome
        self.watched = False  # someone waits: record steps must notify
        self.paused = False  # the pool is paused: every outcome wakes the exit's wait

    def notify(self, index: int | None, live: int) -> None:
        """Wake the waiters an outcome (``index``) or a callback's end concerns."""
        if self.joiners and index is not None:
            for joiner in self.joiners:
                if index < joiner.target:
                    joiner.remaining -= 1
                    if joiner.remaining == 0:
                        joiner.event.set()
            self.joiners = [joiner for joiner in self.joiners if joiner.remaining]
        if (not live or self.paused) and not self.callbacks and self.idle is not None:
            self.idle.set()
            self.idle = None
        self.watched = bool(self.joiners) or self.idle is not None

    def release_all(self) -> None:
        joiners, self.joiners = self.joiners, []
        for joiner in joiners:
            joiner.event.set()


class _PoolRun(Run, Generic[T, R]):
    """What one entry into a pool owns."""

    def __init__(
        self,
        threads: Threads | None,
        max_pending: int,
        give_back: Callable[[_Entry[T, R]], None],
    ) -> None:
        super().__init__(threads)
        # waiting for a worker (FIFO until a priority or a key asks for more)
        self.queue: Discipline[_Entry[T, R]] = FifoQueue()
        # idle workers; give_back: one was handed an entry and cancelled before running it
        self.parking: Parking[_Entry[T, R]] = Parking(give_back)
        self.slots = Slots(max_pending)  # room for queued items
        self.live: dict[int, _Entry[T, R]] = {}  # every item without an outcome
        self.watch = _Watch()
        self.started = 0  # workers started, on demand
        self.orphans: list[T] = []  # taken from a helper's input, never submitted
        self.workers: list[_Worker] = []  # what each worker runs (for Job.cancel)
        self.doomed: set[int] = set()  # cancelled while handed to a parked worker
        self.unpaused: anyio.Event | None = None  # set by resume(); workers wait on it
        # a traced pool's probe's: told of each submit (see _telemetry)
        self.on_submit: Callable[[int], None] | None = None


class Pool(Block[_PoolRun[T, R]], Generic[T, R]):
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
    :param breaker: a :class:`CircuitBreaker` every attempt passes (inside
        ``retry``, outside the limiters): while it is open, attempts fail at
        once with :class:`CircuitOpen`; may be shared by several pools.
    :param hedge: a :class:`Hedge`: an attempt still running after
        ``hedge.after`` seconds gets a copy, the first success wins. Each copy
        passes ``limiter``, ``rate_limit`` and ``timeout``, and counts in
        ``Outcome.attempts``.
    :param timeout: seconds (or a :class:`Timeout`) per attempt; a timed-out
        attempt is a ``TimeoutError``, which ``retry`` may retry. A plain
        handler's timed-out thread runs on, abandoned: it keeps one of the
        pool's threads and its ``limiter`` token until it ends, or until the
        block ends (which does not wait for it). Waiting for a
        free thread counts against the timeout; an attempt that gets none in
        time fails with a ``TimeoutError`` saying so and is not counted in
        ``Outcome.attempts``.
    :param middleware: user :class:`Middleware`, outermost first; they wrap the
        chain ``retry → breaker → hedge → limiter → rate_limit → timeout →
        handler`` and see each item once.
    :param key: a function giving each item's key (any hashable value), called
        once per item as it is submitted. At most ``per_key`` items with equal
        keys run at once, and they start in submission order; an item waiting
        for its key holds no worker and does not delay other keys, but it holds
        its room in ``max_pending``. A retried item keeps its key through the
        backoff. If ``key`` raises, that item's outcome is the error (it never
        runs).
    :param per_key: how many items with equal keys may run at once (with
        ``key=``).
    :param cost: a function giving each item's cost, passed to
        ``rate_limit.acquire(cost)`` on every attempt (default: 1); a cost
        above what the limiter admits at once is acquired in parts. If it
        raises, or returns anything but an int of at least 1, the attempt
        fails with that error.

    Entering a pool that is already running raises ``RuntimeError``; it can be
    entered again after it exited (its stats accumulate).
    """

    _kind = "pool"

    @overload
    def __init__(
        self: Pool[T, R],
        handler: Callable[[T], Awaitable[R]],
        *,
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
    ) -> None: ...
    def __init__(
        self,
        handler: Callable[[T], Any],
        *,
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
    ) -> None:
        check_callable("handler", handler)
        self._handler = handler
        self._limit = WorkerLimit(check_int("workers", workers, minimum=1))
        self._key, self._per_key = key, _check_key(key, per_key)
        self._paused = False
        if max_pending is None:
            max_pending = max(2 * workers, 16)
        self._max_pending = check_int("max_pending", max_pending, minimum=1)
        self._layers = check_middleware(
            retry=retry,
            rate_limit=rate_limit,
            limiter=limiter,
            breaker=breaker,
            hedge=hedge,
            timeout=timeout,
            middleware=middleware,
            cost=cost,
        )
        check_callable("on_outcome", on_outcome, optional=True)
        self._on_outcome = on_outcome
        # apply_to_all's record: every outcome is stored at its index, first
        # thing in the recording step (cheaper than a sink function per item)
        self._collected: _Collected[T, R] | None = None
        self._sinks: list[Callable[[Outcome[T, R]], None]] = []  # the helpers'
        self._fail_fast = check_bool("fail_fast", fail_fast)
        self.name: str | None = check_optional_str("name", name)
        self._observer: Observer[PoolStats] = Observer(
            progress=progress,
            on_stats=on_stats,
            stats_interval=stats_interval,
            count=_pool_progress,
        )
        self._log = logger_for("pool", self.name)
        self._state = NEW
        self._run: _PoolRun[T, R] = self._make_run(None)
        self._counters = _Counters()
        self._unfinished: list[T] = []

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"<corral.Pool{label} {self._state} workers={self._limit.workers}>"

    # ------------------------------------------------------------------ state

    @property
    def stats(self) -> PoolStats:
        """A frozen snapshot of the counters; cheap, never waits, safe to call
        any time (also before entry and after exit)."""
        counters, run = self._counters, self._run
        live = len(run.live)
        # room is held from submit until a worker takes the entry (after exit: none)
        queued = run.slots.used - run.slots.granted if live else 0
        return PoolStats(
            submitted=counters.submitted,
            queued=queued,
            running=live - queued,
            succeeded=counters.submitted - live - counters.lost - counters.failed,
            failed=counters.failed,
            retried=counters.retried,
            backpressure_waits=counters.backpressure_waits,
            unfinished=len(self._unfinished),
            workers=self._limit.workers,
            paused=self._paused,
            cancelled=counters.cancelled,
            waiting_for_key=getattr(run.queue, "waiting", 0),
            busy_keys=getattr(run.queue, "busy_keys", 0),
            limit=limit_of(self._layers.limiter),
        )

    @property
    def workers(self) -> int:
        """The current bound on workers running at once (see :meth:`resize`)."""
        return self._limit.workers

    @property
    def paused(self) -> bool:
        """Whether the pool is paused (see :meth:`pause`)."""
        return self._paused

    @property
    def unfinished(self) -> list[T]:
        """Items left without an outcome when the pool last exited, in submission
        order. Empty after a clean exit; reset when the pool is entered again."""
        return list(self._unfinished)

    @property
    def _live(self) -> dict[int, _Entry[T, R]]:
        """The items of the current run without an outcome, by index."""
        return self._run.live

    @property
    def _tg(self) -> anyio.abc.TaskGroup | None:
        """The current run's task group (None before the first entry)."""
        return self._run.tg

    # -------------------------------------------------------------- lifecycle

    def _new_run(self) -> _PoolRun[T, R]:
        # a worker runs one call at a time; as many threads again may have
        # been abandoned by timeouts (see _threads)
        threads = self._layers.threads_for(self._handler, 2 * self._limit.workers)
        self._unfinished = []
        return self._make_run(threads)

    def _started(self, run: _PoolRun[T, R]) -> None:
        if run.probe is not None and run.probe.traced:
            run.on_submit = run.probe.submitted

    def _make_run(self, threads: Threads | None) -> _PoolRun[T, R]:
        run: _PoolRun[T, R] = _PoolRun(threads, self._max_pending, weakly(self._give_back))
        if self._key is not None:
            run.queue = ScheduledQueue(self._per_key)
        return run

    def _drain(self, exc: BaseException | None) -> Callable[[], Awaitable[None]] | None:
        """A block that ended well waits until the pool is idle."""
        return self._wait_idle if exc is None else None

    def _on_close(self, run: _PoolRun[T, R]) -> None:
        """Accept no more items; wake parked (and paused) workers and waiting
        submitters."""
        run.parking.unpark_all()  # woken with no entry, they find the pool closed
        if run.unpaused is not None:
            run.unpaused.set()
        run.slots.close()

    def _on_finalize(self, run: _PoolRun[T, R]) -> None:
        """After the workers stopped: whatever is still live is unfinished."""
        entries = list(run.live.values())
        run.live.clear()
        run.queue.clear()
        self._counters.lost += len(entries)
        self._unfinished = [entry[1] for entry in entries] + run.orphans
        run.orphans = []
        for entry in entries:
            if entry[3] is not None:
                entry[3]._abandon()
        run.watch.release_all()
        if run.probe is not None:
            run.probe.ended(len(self._unfinished))

    def _stop(self, run: _PoolRun[T, R]) -> None:
        """Cancel the workers and the block's own code; take no new items.

        Queued items do not start: cancellation reaches a worker only at its
        next checkpoint, and a handler that does not await would otherwise
        let it run on through the queue. They stay in ``live``, so they end
        unfinished.
        """
        if self._state is RUNNING:
            self._state = STOPPING
        run.queue.clear()
        run.doomed.clear()
        if run.tg is not None:
            run.tg.cancel_scope.cancel()

    def _stop_error(self, run: _PoolRun[T, R], *, block_failed: bool) -> BaseException | None:
        # fail_fast's failure, or what broke a worker; the block's own exception wins
        return None if block_failed else run.stop_reason

    def _exit_summary(self) -> tuple[object, str]:
        stats = self.stats
        summary = (
            f"{stats.succeeded} succeeded, {stats.failed} failed, {stats.unfinished} unfinished"
        )
        return stats, summary

    def _closed_error(self) -> PoolClosed:
        if self._state is NEW:
            return PoolClosed(f"{self!r} is not running yet: submit inside `async with pool:`")
        if self._state is STOPPING:
            return PoolClosed(f"{self!r} is stopping and takes no new items")
        return PoolClosed(
            f"{self!r} has exited and takes no new items. A block that ends well"
            " waits only for the items already submitted, not for tasks that submit"
            " later: start those tasks in a task group opened inside the pool's"
            " `async with` block, or keep the block open until they finish (docs:"
            ' "Pools in task groups and nurseries")'
        )

    async def _raise_closed(self) -> NoReturn:
        # If the pool is being cancelled (fail_fast, an exception, an early exit
        # from a helper), a caller inside it gets that cancellation here rather
        # than a PoolClosed that would mask why the pool stopped.
        await checkpoint()
        raise self._closed_error()

    # ---------------------------------------------------------------- submit

    async def submit(self, item: T, *, id: Hashable = None, priority: float = 0) -> Job[T, R]:
        """Enqueue ``item`` and return its :class:`Job`.

        Blocks while ``max_pending`` items wait for a worker (submitters are
        served first come, first served), except when called from the pool's own
        handler, which never blocks. Always a checkpoint. Cancel-safe, also under
        native asyncio cancellation: if it raises, the item was not enqueued; if
        it returns, it was.

        :param id: the job's and outcome's ``id``; default the submission index.
        :param priority: among queued items, the lowest priority starts first
            (as in :mod:`heapq`); equal priorities start in submission order.
            Any real number but NaN. Waiting for room is first come, first
            served whatever the priority.
        :raises PoolClosed: the pool is not running, or it closed while this
            call waited for room. A caller inside a pool that is stopping
            (``fail_fast``, an exception) gets that cancellation instead.
        :raises TypeError: ``id`` is not hashable, or ``priority`` is not a
            real number.
        :raises ValueError: ``priority`` is NaN.
        """
        await checkpoint()
        if id is not None:
            _check_id(id)
        if priority is not _NO_PRIORITY:  # (an identity test: the per-item path)
            _check_priority(priority)
        if self._state is not RUNNING:
            await self._raise_closed()
        run = self._run
        if not run.slots.take_nowait():
            if _in_worker_of(self):
                run.slots.force()  # the pool's own handler never waits for room
            else:
                await self._wait_for_room(run)
        return self._put(run, item, id, priority)

    async def _wait_for_room(self, run: _PoolRun[T, R]) -> None:
        self._counters.backpressure_waits += 1
        await self._take_room(run)

    async def _take_room(self, run: _PoolRun[T, R]) -> None:
        if not await run.slots.take():
            await self._raise_closed()
        if self._state is not RUNNING:  # granted room, but the pool stopped meanwhile
            run.slots.release()
            await self._raise_closed()

    def submit_nowait(self, item: T, *, id: Hashable = None, priority: float = 0) -> Job[T, R]:
        """Enqueue ``item`` without waiting, or raise.

        Never waits and is not a checkpoint. If it raises, the item was not
        enqueued; if it returns, it was.

        :param id: the job's and outcome's ``id``; default the submission index.
        :param priority: as for :meth:`submit`.
        :raises QueueFull: ``max_pending`` items are waiting, or submitters
            are waiting for room (never raised for submits from the pool's
            own handler).
        :raises PoolClosed: the pool is not running.
        :raises TypeError: ``id`` is not hashable, or ``priority`` is not a
            real number.
        :raises ValueError: ``priority`` is NaN.
        """
        if id is not None:
            _check_id(id)
        if priority is not _NO_PRIORITY:  # (an identity test: the per-item path)
            _check_priority(priority)
        if self._state is not RUNNING:
            raise self._closed_error()
        run = self._run
        slots = run.slots
        # Slots.take_nowait(), inlined (every submit_nowait passes here); the
        # pool's own handler takes the room whatever is used (Slots.force)
        full = slots.waiters or slots.granted or slots.used >= slots.capacity
        if full and not _in_worker_of(self):
            raise QueueFull(f"{self!r} has max_pending={self._max_pending} items waiting")
        slots.used += 1
        return self._put(run, item, id, priority)

    def _put(self, run: _PoolRun[T, R], item: T, id: Hashable, priority: float) -> Job[T, R]:
        index = self._counters.submitted
        self._counters.submitted = index + 1
        job: Job[T, R] = Job(item, index, index if id is None else id, self)
        run.live[index] = entry = (index, item, job.id, job)
        if run.on_submit is not None:  # a span per item: where it was submitted
            run.on_submit(index)
        if priority or self._key is not None:
            self._schedule(run, entry, priority)
        else:
            self._enqueue(run, entry)
        return job

    async def _submit_paced(self, item: T) -> None:
        """Enqueue without a Job once there is room (the helpers' feeder, whose
        wait is its own pacing: not counted in ``backpressure_waits``)."""
        await checkpoint()
        if self._state is not RUNNING:
            await self._raise_closed()
        run = self._run
        if not run.slots.take_nowait():
            await self._take_room(run)
        self._put_entry(run, item)

    def _submit_if_room(self, item: T) -> bool:
        """Enqueue without a checkpoint or a Job if there is room (the helpers)."""
        run = self._run
        if self._state is not RUNNING or not run.slots.take_nowait():
            return False
        self._put_entry(run, item)
        return True

    def _put_entry(self, run: _PoolRun[T, R], item: T) -> None:
        """Enqueue ``item`` without a Job, its room taken (the helpers)."""
        index = self._counters.submitted
        self._counters.submitted = index + 1
        run.live[index] = entry = (index, item, index, None)
        if self._key is not None:
            self._schedule(run, entry, 0)
        else:
            self._enqueue(run, entry)

    def _fill(self, iterator: Iterator[T]) -> bool:
        """Enqueue items taken from ``iterator`` while there is room, like
        :meth:`_submit_if_room` in a loop (the helpers' sync input).

        An item is taken only when there is room for it. True when ``iterator``
        is exhausted; False when there is no room (or the pool is not running).
        The room check and the enqueue decision are inlined (the per-item path
        of apply_to_all); each has the same rule as the function it copies.
        """
        if self._key is not None:  # each item's key is asked for: one at a time
            return self._fill_one_by_one(iterator)
        run = self._run
        slots, live, queue, parking = run.slots, run.live, run.queue, run.parking
        counters, capacity, limit = self._counters, slots.capacity, self._limit
        if self._state is not RUNNING or not slots.take_nowait():
            return False
        try:
            for item in iterator:
                index = counters.submitted
                counters.submitted = index + 1
                live[index] = entry = (index, item, index, None)
                if parking.waking or not (parking.spots or limit.allows(run.started)):
                    queue.put(entry)  # what _enqueue would do, without the call
                else:
                    self._enqueue(run, entry)
                # room for the next item: Slots.take_nowait
                if self._state is not RUNNING or slots.waiters or slots.granted:
                    return False
                if slots.used >= capacity:
                    return False
                slots.used += 1
        except BaseException:
            slots.release()  # the iterator raised: no item for the room taken
            raise
        slots.release()  # the room taken for an item the iterator did not have
        return True

    def _fill_one_by_one(self, iterator: Iterator[T]) -> bool:
        """:meth:`_fill` through :meth:`_submit_if_room`, an item at a time."""
        run = self._run
        while self._state is RUNNING and not run.slots.waiting and run.slots.fits(1):
            for item in iterator:
                self._submit_if_room(item)  # there is room: always True
                break
            else:
                return True
        return False

    # ------------------------------------------------------------- scheduling

    def _enqueue(self, run: _PoolRun[T, R], entry: _Entry[T, R]) -> None:
        """Hand ``entry`` to an idle worker, or queue it (starting a new worker
        for it while the limit allows).

        Wake-ups are chained: at most one parked worker is being woken (or one
        new worker started) at a time, and each, once it runs, passes the
        next queued entry on to the next parked worker (or a new one). A burst
        of items thus wakes or starts only as many workers as are needed to
        keep up (one, for a handler that never awaits; all of them, one loop
        step apart, for one that does), so a generous ``workers`` costs
        nothing until the work needs it.
        """
        parking = run.parking
        if parking.waking:
            run.queue.put(entry)
        elif parking.spots:
            parking.unpark(entry)
        else:
            run.queue.put(entry)
            if self._limit.allows(run.started):
                self._start_worker(run)

    def _schedule(self, run: _PoolRun[T, R], entry: _Entry[T, R], priority: float) -> None:
        """Queue ``entry`` with its priority and key (the ScheduledQueue), then
        hand the next ready entry on as :meth:`_enqueue` would."""
        queue = run.queue
        if not isinstance(queue, ScheduledQueue):  # the first priority: FIFO no more
            assert isinstance(queue, FifoQueue)
            queue = ScheduledQueue(self._per_key, queue.moved())
            run.queue = queue
        try:  # the key's own methods run here too (hash, ==)
            key = NO_KEY if self._key is None else self._key(entry[1])
            queue.put(entry, priority, key)
        except Exception as error:  # noqa: BLE001 - errors are values
            run.slots.release()  # it never waits for a worker
            self._record_now(run, entry, error)
            return
        self._dispatch(run)

    def _dispatch(self, run: _PoolRun[T, R]) -> None:
        """Hand the next queued entry to a parked worker, or start a worker for
        it, unless a wake-up is already in flight (it passes this one on).
        While paused nothing happens: no worker is parked, and the bound is 0."""
        parking = run.parking
        if not run.queue or parking.waking or self._state is not RUNNING:
            return
        if parking.spots:
            parking.unpark(run.queue.take())
        elif self._limit.allows(run.started):
            self._start_worker(run)

    def _release_key(self, outcome: Outcome[T, R]) -> None:
        """A keyed item got its outcome (a sink of the record step): the next
        item of its key may start."""
        run = self._run
        queue = run.queue
        if isinstance(queue, ScheduledQueue):
            queue.finished(outcome.index)
            self._dispatch(run)

    def _record_now(
        self,
        run: _PoolRun[T, R],
        entry: _Entry[T, R],
        error: Exception,
        attempts: int = 0,
        elapsed: float = 0.0,
    ) -> None:
        """Give an entry its outcome outside the worker loop: ``error`` (its key
        raised, or its job was cancelled). An async on_outcome runs in a task
        of its own."""
        record: _Recorder[T, R] = _Recorder(self, run)
        outcome = record.record(entry, None, error, attempts, elapsed)
        if record.after is not None:
            run.start_soon(self._call_after, record, outcome, name="corral on_outcome")

    async def _call_after(self, record: _Recorder[T, R], outcome: Outcome[T, R]) -> None:
        """An async on_outcome in a task of its own; if it raises, the pool stops."""
        assert record.after is not None
        try:
            await record.call_after(record.after, outcome)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as error:  # noqa: BLE001 - re-raised by __aexit__
            self._fail(error)

    def _wake_next(self, run: _PoolRun[T, R]) -> None:
        """A woken or new worker runs: pass the wake-up on if work is still queued.

        (A new worker calls this before it takes an entry: if the queue then
        holds only the one it takes, the worker started for it finds nothing
        and parks, a spare.)
        """
        run.parking.waking = False
        self._dispatch(run)

    def _give_back(self, entry: _Entry[T, R]) -> None:
        """A worker handed ``entry`` was cancelled before it ran it: it runs
        next (or gets its outcome, if its job was cancelled meanwhile)."""
        run = self._run
        if self._doomed(run, entry):
            return
        run.queue.put_back(entry)
        self._wake_next(run)

    def _start_worker(self, run: _PoolRun[T, R]) -> None:
        """Start one more worker; it takes the entry at the head of the queue."""
        number = run.started
        run.started = number + 1
        run.parking.waking = True  # cleared by the new worker's _wake_next
        worker = _Worker()
        call, attempts = self._worker_call(run, worker)
        name = f"corral worker {self.name or hex(id(self))}#{number}"
        run.start_soon(self._work, run, call, attempts, worker, name=name)

    def _worker_call(
        self, run: _PoolRun[T, R], worker: _Worker
    ) -> tuple[Callable[[T], Awaitable[R]], list[float] | None]:
        """What a new worker calls per item: the handler, or a chain of its own
        around a counter of handler calls (the counter's list: calls, start),
        in a span per item if an instrumentation traces items."""
        layers, clock, threads, probe = self._layers, run.clock, run.threads, run.probe
        if not layers.configured and probe is None:
            return layers.chain(self._handler, threads=threads, clock=clock), None
        attempts: list[float] = [0, 0.0]
        on_start = _counter(attempts, clock)
        attempt = None if probe is None else probe.attempt
        chain = layers.chain(
            self._handler,
            threads=threads,
            clock=clock,
            on_start=on_start,
            log=self._log,
            attempt=attempt,
        )
        if probe is not None and probe.traced:  # a span per item, around its calls

            def index_of() -> int:
                assert worker.entry is not None
                return int(worker.entry[0])

            chain = probe.item(chain, index_of)
        return chain, attempts

    # ----------------------------------------------------- resize, pause, cancel

    def resize(self, n: int) -> None:
        """Set the bound on workers running at once to ``n``, at any time.

        More: workers start at once for queued items (a plain handler's
        thread bound grows with them). Fewer: running items finish, and the
        workers beyond ``n`` stop as they finish; no item is interrupted.
        Before entry or after exit it sets the bound of the next entry.
        Not a checkpoint.

        :raises TypeError: ``n`` is not an int.
        :raises ValueError: ``n`` is below 1 (to stop starting items, :meth:`pause`).
        """
        check_int("n", n, minimum=1)
        limit, run = self._limit, self._run
        grows = n > limit.workers
        limit.workers = n
        if not self._paused:
            limit.bound = n
        if self._state is not RUNNING and self._state is not STOPPING:
            return
        if run.threads is not None:
            run.threads.resize(2 * n)
        if grows:
            self._dispatch(run)
        else:
            self._rebind(run)

    def pause(self) -> None:
        """Stop starting queued items: running items finish, queued ones wait.

        Submits still queue (and still wait for room) while paused. Safe to
        call at any time (before entry, the pool starts paused) and more than
        once; not a checkpoint. Leaving the block normally while paused waits
        for the running items, then stops: the items still queued get no
        outcome and are listed in :attr:`unfinished` (a WARNING on the pool's
        logger says how many), unless :meth:`resume` is called before.
        """
        if self._paused:
            return
        self._paused = True
        self._limit.bound = 0
        run = self._run
        run.watch.paused = True
        if self._state is RUNNING or self._state is STOPPING:
            self._rebind(run)
            if run.watch.idle is not None:  # the exit's wait: running items may be none
                run.watch.notify(None, len(run.live))

    def resume(self) -> None:
        """Start queued items again (see :meth:`pause`). Not a checkpoint."""
        if not self._paused:
            return
        self._paused = False
        self._limit.bound = self._limit.workers
        run = self._run
        run.watch.paused = False
        if run.unpaused is not None:
            run.unpaused.set()
            run.unpaused = None
        self._dispatch(run)

    def _rebind(self, run: _PoolRun[T, R]) -> None:
        """Make every worker look at the pool's state before its next item:
        the queue moves to a new object (a worker in a streak holds the old one,
        now empty, and goes to _next_entry), and parked workers wake."""
        run.queue = run.queue.moved()
        run.parking.unpark_all()
        if run.unpaused is not None and not self._paused:
            run.unpaused.set()
            run.unpaused = None

    def _cancel_job(self, job: Job[Any, Any]) -> bool:
        """:meth:`Job.cancel`: a queued job gets its outcome now; a running
        one's worker scope is cancelled."""
        run = self._run
        entry = run.live.get(job.index)
        if self._state is not RUNNING or entry is None or entry[3] is not job:
            return False  # stopping (it ends unfinished), or it had its outcome
        if job.index in run.doomed:
            return False
        if (queued := run.queue.remove(job.index)) is not None:
            run.slots.release()
            self._record_now(run, queued, _job_cancelled(job))
            return True
        for worker in run.workers:
            if worker.entry is entry:
                if worker.cancelling is not None:
                    return False
                worker.cancelling = entry
                assert worker.scope is not None
                worker.scope.cancel()
                return True
        run.doomed.add(job.index)  # handed to a parked worker that has not run yet
        return True

    # ------------------------------------------------------------------ join

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
        if self._state is NEW or self._state is CLOSED:
            raise self._closed_error()
        run = self._run
        target = self._counters.submitted
        remaining = sum(1 for index in run.live if index < target)
        if not remaining:
            return
        joiner = _Joiner(target, remaining)
        run.watch.joiners.append(joiner)
        run.watch.watched = True
        try:
            await joiner.event.wait()
        except BaseException:
            if joiner in run.watch.joiners:
                run.watch.joiners.remove(joiner)
            raise
        if joiner.remaining:
            raise PoolClosed(f"{self!r} exited before the joined items had outcomes")

    async def _wait_idle(self) -> None:
        await checkpoint()
        run = self._run
        while run.live or run.watch.callbacks:
            if self._paused and not run.watch.callbacks and self.stats.running == 0:
                self._log.warning(
                    "%s exits while paused: %d queued item(s) left unfinished "
                    "(resume() before leaving the block runs them)",
                    self.name or "pool",
                    len(run.live),
                )
                return
            run.watch.idle = event = anyio.Event()
            run.watch.watched = True
            await event.wait()

    # ---------------------------------------------------------------- workers

    async def _work(
        self,
        run: _PoolRun[T, R],
        call: Callable[[T], Awaitable[R]],
        attempts: list[float] | None,
        worker: _Worker,
    ) -> None:
        """A worker task: serve entries until the pool closes; an exception that
        is no handler's error (on_outcome raised, a handler raised
        KeyboardInterrupt/SystemExit) stops everything, and the block re-raises
        this very exception."""
        _worker_of.set(weakref.ref(self))
        holds_of_attempt.set(None)  # not the holds of whoever started this worker
        run.workers.append(worker)
        self._wake_next(run)  # a new worker: the chain of wake-ups goes on
        try:
            while await self._serve_in_scope(run, call, attempts, worker):
                pass  # a job's cancel stopped the entry it ran: serve on
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as error:  # noqa: BLE001 - re-raised by __aexit__
            self._fail(error)
        finally:
            run.workers.remove(worker)

    async def _serve_in_scope(
        self,
        run: _PoolRun[T, R],
        call: Callable[[T], Awaitable[R]],
        attempts: list[float] | None,
        worker: _Worker,
    ) -> bool:
        """Serve in a cancel scope of the worker's own, which :meth:`Job.cancel`
        cancels to stop the entry the worker runs (one scope per worker, not
        per item). True: a job was cancelled, serve again in a new scope.

        The cancelled entry's outcome is JobCancelled whether its call stopped
        at a checkpoint or ended first (then what it returned is dropped): the
        worker leaves the scope before it records anything else.
        """
        with anyio.CancelScope() as worker.scope:
            try:
                await self._serve(run, call, attempts, worker)
            except _JobStopped:
                pass  # its JobCancelled is recorded
            except _WorkerDone:
                return False
        entry = worker.cancelling
        worker.entry = worker.cancelling = None
        if entry is not None and entry[0] in run.live:
            calls, elapsed = 1, 0.0  # (a handler alone: its start is not kept)
            if attempts is not None:
                calls = int(attempts[0])
                elapsed = run.clock() - attempts[1] if calls else 0.0
            self._record_now(run, entry, _job_cancelled(entry[3]), calls, elapsed)
        return True

    async def _serve(
        self,
        run: _PoolRun[T, R],
        call: Callable[[T], Awaitable[R]],
        attempts: list[float] | None,
        worker: _Worker,
    ) -> None:
        """The worker loop: take an entry, run it, record its outcome, until
        :class:`_WorkerDone`; :class:`_JobStopped` once the entry's job was
        cancelled and its outcome recorded.

        The loop binds what it touches to locals once: it is the engine's per-item
        path (see benchmarks/bench_apply.py).
        """
        queue, slots, clock = run.queue, run.slots, run.clock
        record = _Recorder(self, run, worker)
        record_step, after = record.record, record.after
        live, watch, kept = run.live, run.watch, record.kept()
        items, results, times = record.kept_lists()
        # what a success kept as columns has for a job: None, or (without
        # columns) what no entry has, so that one test says both
        jobless = None if kept is not None else _NO_JOB
        cancelled = anyio.get_cancelled_exc_class()
        # the first entry comes from _next_entry (the bound, pause), with no checkpoint
        streak = _MAX_STREAK + 1
        while True:
            if queue and streak < _MAX_STREAK:
                entry = queue.take()
                streak += 1
            else:
                long_streak, streak = streak == _MAX_STREAK, 0
                entry, queue = await self._next_entry(run, long_streak), run.queue  # a new one?
            worker.entry = entry  # what Job.cancel looks for
            # its room goes to the first waiter (Slots.release, inlined: every item)
            if slots.waiters:
                slots.release()
            else:
                slots.used -= 1
            start = clock()
            if attempts is not None:
                outcome = await self._call_layered(record, call, attempts, start, entry, worker)
            else:
                result: R | None = None
                error: Exception | None = None
                try:
                    result = await call(entry[1])
                except Exception as exc:  # noqa: BLE001 - errors are values
                    error = exc
                except cancelled as exc:
                    error = stray_cancellation(exc)
                if error is None and entry[3] is jobless:
                    # _Recorder.succeeded's column store, inlined (apply_to_all's every
                    # success): the call cost 8-10% of a no-await handler's instructions
                    index = entry[0]
                    try:
                        items[index] = entry[1]
                    except IndexError:
                        kept.grow(index)  # type: ignore[union-attr]  # the lists grow in place
                        items[index] = entry[1]
                    results[index], times[index] = result, clock() - start
                    del live[index]
                    if watch.watched:
                        watch.notify(index, len(live))
                    continue
                outcome = record_step(entry, result, error, 1, clock() - start)
            if after is not None:
                await record.call_after(after, outcome)

    async def _next_entry(self, run: _PoolRun[T, R], long_streak: bool) -> _Entry[T, R]:
        """The slow path of taking an entry: a worker that is beyond the bound
        stops, a paused one waits for resume(); after a long streak, a
        checkpoint; with nothing queued, park until handed an entry.
        :class:`_WorkerDone`: the pool closed, or this worker is one too many."""
        checked = not long_streak
        while True:
            if run.started > self._limit.workers:  # resized down: this one stops
                run.started -= 1
                self._dispatch(run)  # what it leaves queued goes to another worker
                raise _WorkerDone
            if self._paused:  # closed while paused: what is queued stays unfinished
                if self._state is CLOSED:
                    raise _WorkerDone
                await self._wait_unpaused(run)
                continue
            if run.queue:
                if not checked:
                    await checkpoint()  # a long streak: let other tasks run
                    checked = True
                    continue
                return run.queue.take()
            if self._state is CLOSED:
                raise _WorkerDone
            handed = await run.parking.park()  # no deadline: an entry or None
            if handed is None or self._doomed(run, entry := cast("_Entry[T, R]", handed)):
                continue
            if self._paused or run.started > self._limit.workers:
                run.queue.put_back(entry)  # handed over just before pause() or resize()
                continue
            self._wake_next(run)
            return entry

    def _doomed(self, run: _PoolRun[T, R], entry: _Entry[T, R]) -> bool:
        """Whether ``entry``, handed over to a worker, had its job cancelled on
        the way: then it gets its JobCancelled here, and its room goes back."""
        if not run.doomed or entry[0] not in run.doomed:
            return False
        run.doomed.discard(entry[0])
        run.slots.release()
        self._record_now(run, entry, _job_cancelled(entry[3]))
        return True

    async def _wait_unpaused(self, run: _PoolRun[T, R]) -> None:
        if run.unpaused is None:
            run.unpaused = anyio.Event()
        await run.unpaused.wait()

    async def _call_layered(
        self,
        record: _Recorder[T, R],
        chain: Callable[[T], Awaitable[R]],
        attempts: list[float],
        start: float,
        entry: _Entry[T, R],
        worker: _Worker,
    ) -> Outcome[T, R] | None:
        """Run an entry through the middleware chain, counting the handler's
        calls. None: a success kept as columns."""
        attempts[0] = 0
        try:
            result = await chain(entry[1])
        except Exception as exc:  # noqa: BLE001 - errors are values
            error: Exception | None = exc
        except anyio.get_cancelled_exc_class() as exc:
            error = stray_cancellation(exc)
        else:
            error = None
        finally:  # extra calls count also for an item that ends unfinished
            calls = int(attempts[0])
            if calls > 1:
                self._counters.retried += calls - 1
        elapsed = record.clock() - (attempts[1] if calls else start)  # from the first call
        if error is not None:
            return record.record(entry, None, error, calls, elapsed)
        return record.succeeded(entry, result, elapsed, calls)

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

    def _add_sink(self, sink: Callable[[Outcome[T, R]], None]) -> None:
        """Deliver every outcome to ``sink`` first, in the recording step."""
        self._sinks.append(sink)


class _JobStopped(Exception):
    """A worker's entry was cancelled by Job.cancel and got its JobCancelled
    (raised by the record step, caught in _serve_in_scope)."""


class _WorkerDone(Exception):
    """A worker stops: the pool closed, or it is beyond the bound (resize)."""


_NO_JOB: Any = object()  # never an entry's job (see _serve)


class _Worker:
    """What one worker runs: its entry (for Job.cancel) and its cancel scope."""

    __slots__ = ("cancelling", "entry", "scope")

    def __init__(self) -> None:
        self.entry: tuple[Any, ...] | None = None
        self.cancelling: tuple[Any, ...] | None = None  # the entry Job.cancel stops
        self.scope: anyio.CancelScope | None = None


def _job_cancelled(job: Job[Any, Any] | None) -> JobCancelled:
    return JobCancelled(f"job {job.id if job else None!r} was cancelled")


def _check_key(key: object, per_key: int) -> int:
    """Refuse a ``key`` that is not a plain function, or ``per_key`` below 1
    or without a key; return ``per_key``."""
    check_callable("key", key, optional=True)
    if key is not None and is_async_callable(key):
        raise TypeError(f"key must be a plain function returning a hashable key, got {key!r}")
    check_int("per_key", per_key, minimum=1)
    if per_key != 1 and key is None:
        raise ValueError(f"per_key={per_key!r} needs key=: a function giving each item's key")
    return per_key


def _check_priority(priority: object) -> None:
    if isinstance(priority, bool) or not isinstance(priority, numbers.Real):
        raise TypeError(f"priority must be a real number, got {priority!r}")
    if priority != priority:  # NaN (math.isnan overflows on a huge int)
        raise ValueError("priority must be a number, got NaN")


class _Recorder(Generic[T, R]):
    """A worker's record step: the item leaves ``live`` and gets its outcome, in
    one step (its job, apply_to_all's store, the helpers' sinks, on_outcome,
    join and idle waiters, fail_fast)."""

    __slots__ = (
        "after",
        "clock",
        "collected",
        "columns",
        "counters",
        "fail_fast",
        "live",
        "pool",
        "sinks",
        "watch",
        "worker",
    )

    def __init__(
        self, pool: Pool[T, R], run: _PoolRun[T, R], worker: _Worker | None = None
    ) -> None:
        on_outcome = pool._on_outcome
        is_async = on_outcome is not None and is_async_callable(on_outcome)
        self.pool, self.live, self.watch, self.clock = pool, run.live, run.watch, run.clock
        self.counters, self.fail_fast, self.collected = (
            pool._counters,
            pool._fail_fast,
            pool._collected,
        )
        # a keyed pool's first sink lets the next item of the key start
        keys = () if pool._key is None else (pool._release_key,)
        watched = () if run.probe is None else (run.probe.outcome,)
        self.sinks: tuple[Callable[[Outcome[T, R]], Any], ...] = (
            keys
            + watched
            + tuple(pool._sinks)
            + (() if on_outcome is None or is_async else (on_outcome,))
        )
        self.after: Callable[[Outcome[T, R]], Awaitable[Any]] | None = (
            on_outcome if is_async else None
        )
        # Successes that nobody sees in the record step (apply_to_all with no
        # on_outcome) are kept as plain columns; their Outcomes are made at the
        # end. So corral leaves no new object for the garbage collector per item
        # while the workers run (its collections then walk every coroutine in
        # flight, which costs the more the more workers there are).
        self.columns = self.collected is not None and not self.sinks and self.after is None
        self.worker = worker or _Worker()  # whose entry Job.cancel may stop

    def kept(self) -> _Collected[T, R] | None:
        """Where successes are kept as columns (see ``columns``), the columns."""
        return self.collected if self.columns else None

    def kept_lists(self) -> tuple[list[Any], list[Any], list[float]]:
        """The columns' lists (items, results, elapsed), or three empty ones."""
        kept = self.kept()
        return (kept.items, kept.results, kept.elapsed) if kept else ([], [], [])

    def succeeded(
        self, entry: _Entry[T, R], result: R, elapsed: float, attempts: int
    ) -> Outcome[T, R] | None:
        """A success: kept as columns (its Outcome made at the end, None
        returned) where nobody sees it now, otherwise recorded."""
        if self.columns and entry[3] is None and attempts == 1:
            assert self.collected is not None
            self.collected.keep(entry[0], entry[1], result, elapsed)
            del self.live[entry[0]]
            if self.watch.watched:
                self.watch.notify(entry[0], len(self.live))
            return None
        return self.record(entry, result, None, attempts, elapsed)

    def record(
        self,
        entry: _Entry[T, R],
        result: R | None,
        error: Exception | None,
        attempts: int,
        elapsed: float,
    ) -> Outcome[T, R]:
        """The record step: the entry's Outcome, which its job, the collected
        outcomes and the sinks get as the item leaves ``live``.

        An entry whose job was cancelled while it ran gets JobCancelled,
        whatever its call did (it ended before the cancellation reached it),
        and the step ends with :class:`_JobStopped`: the worker leaves its
        cancelled scope before it takes another entry."""
        if entry is self.worker.cancelling:
            self._stopped(entry, attempts, elapsed)
        index, item, id_, job = entry
        outcome: Outcome[T, R] = _make_outcome(item, index, id_, result, error, attempts, elapsed)
        if error is not None:
            self.counters.failed += 1
            if error.__class__ is JobCancelled:
                self.counters.cancelled += 1
            else:
                self.pool._log_failure(outcome)
        del self.live[index]
        if job is not None:
            job._outcome = outcome
            if job._event is not None:
                job._event.set()
        if self.collected is not None:
            self.collected.store(index, outcome)
        for sink in self.sinks:
            sink(outcome)
        if self.watch.watched:
            self.watch.notify(index, len(self.live))
        if error is not None and self.fail_fast and error.__class__ is not JobCancelled:
            self.pool._fail(error)
        return outcome

    def _stopped(self, entry: _Entry[T, R], attempts: int, elapsed: float) -> NoReturn:
        """Record JobCancelled for an entry whose job was cancelled while it
        ran (whatever its call did); then the worker leaves its scope."""
        self.worker.cancelling = None  # recorded once
        outcome = self.record(entry, None, _job_cancelled(entry[3]), attempts, elapsed)
        if self.after is not None:  # the worker goes on at once: its own task
            run = self.pool._run
            run.start_soon(self.pool._call_after, self, outcome, name="corral on_outcome")
        raise _JobStopped

    async def call_after(
        self, after: Callable[[Outcome[T, R]], Awaitable[Any]], outcome: Outcome[T, R] | None
    ) -> None:
        """An async ``on_outcome``, awaited by the worker after the record step."""
        assert outcome is not None  # successes are kept as columns only without one
        watch = self.watch
        watch.callbacks += 1
        try:
            await after(outcome)
        finally:
            watch.callbacks -= 1
        if watch.watched:
            watch.notify(None, len(self.live))


def _pool_progress(stats: PoolStats) -> tuple[int, dict[str, int]]:
    """What a progress bar shows of a pool: outcomes, failures, retries, and an
    adaptive limiter's limit."""
    postfix = {"failed": stats.failed, "retried": stats.retried}
    if stats.limit is not None:
        postfix["limit"] = stats.limit
    return stats.succeeded + stats.failed, postfix


def _check_id(id: object) -> None:
    try:
        hash(id)
    except TypeError:
        raise TypeError(f"id must be hashable, got {id!r}") from None


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

    def store(self, index: int, outcome: Outcome[T, R]) -> None:
        if index >= len(self.outcomes):
            self.grow(index)
        self.outcomes[index] = outcome

    def keep(self, index: int, item: T, result: R, elapsed: float) -> None:
        """A success whose Outcome :meth:`finish` makes."""
        if index >= len(self.items):
            self.grow(index)
        self.items[index] = item
        self.results[index] = result
        self.elapsed[index] = elapsed

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


class _Joiner:
    __slots__ = ("event", "remaining", "target")

    def __init__(self, target: int, remaining: int) -> None:
        self.target = target
        self.remaining = remaining
        self.event = anyio.Event()
