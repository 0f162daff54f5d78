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
yet: whatever is in them when the batcher stops is ``unflushed``. Room in the
queue is a :class:`~corral._slots.Slots` (``max_pending`` of it): adders take
it, cutting a batch gives it back.

Flushers that have nothing to do wait in a :class:`~corral._parking.Parking`.
At most one parked flusher is woken ("kicked") at a time, and only when its
decision may change: the queue became non-empty (to arm the age timer, or to
flush at once under the natural policy), it reached ``max_size``,
:meth:`Batcher.flush` was called, or the batcher is closing. The age timer is
the parked flusher's own deadline, so an idle batcher has no timer at all and
uses no CPU.

Everything one entry into the block owns is a :class:`_BatcherRun`, made fresh
at each entry; the counters that accumulate over entries are a
:class:`_Counts`; the checked options, a frozen :class:`_Config`.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import numbers
import random
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Generic, TypeAlias, TypeVar, overload

import anyio
import anyio.lowlevel
import attrs
from anyio.lowlevel import checkpoint

from ._breaker import CircuitBreaker
from ._concurrency import limit_of
from ._errors import FlushError, JobCancelled, PoolClosed, QueueFull
from ._handlers import check_callable, is_async_callable
from ._hedge import Hedge
from ._lifecycle import NEW, RUNNING, STOPPING, Block, Run, stray_cancellation, weakly
from ._middleware import Layers, Middleware, RateLimiter, Timeout, check_middleware
from ._observe import Observer, ProgressBar, logger_for
from ._outcome import Job, _make_outcome
from ._parking import TIMED_OUT, Parking
from ._retry import Retry
from ._slots import Slots
from ._threads import Threads, holds_of_attempt
from ._validate import check_int, check_number, check_optional_str

__all__ = ["Batcher", "BatcherStats"]

T = TypeVar("T")
R = TypeVar("R")

# Waits between failed flushes when `retry` gives none (or retries at once),
# and the least wait after any failed flush: never a hot loop.
_FAILURE_BACKOFF = Retry()
_MIN_FAILURE_WAIT = 0.001

# What became of a submit caller's item (see _Ticket).
WAITING, RESOLVED, FAILED, HANDED_BACK, SEEN, ABANDONED = (
    "waiting",
    "resolved",
    "failed",
    "handed back",
    "seen",
    "abandoned",
)


class _Ticket:
    """A ``submit`` caller waiting for its item's result. Its ``state``:

    * WAITING: the item is in the batcher; the caller waits.
    * RESOLVED: the item's batch was flushed; ``result`` is its result.
    * FAILED: the caller gets ``error``; the item stays accounted for (flushed
      with a result that does not fit, or unflushed).
    * HANDED_BACK: a failed flush handed the item (``entry``) back with
      ``error``: it left the batcher, but the caller has not resumed yet. If
      the caller is cancelled before it resumes, the batcher takes it back.
    * SEEN: the caller resumed and raised the error: the item is gone.
    * ABANDONED: the caller was cancelled: nobody takes the result, and the
      item is flushed (or queued again) like an added one.
    """

    __slots__ = ("entry", "error", "event", "result", "state", "traceback")

    def __init__(self) -> None:
        self.state = WAITING
        self.event = anyio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.traceback: TracebackType | None = None
        self.entry: _Entry[Any] | None = None  # once handed back

    def resolve(self, result: Any) -> None:
        self.state = RESOLVED
        self.result = result
        self.event.set()

    def fail(self, error: BaseException, state: str = FAILED) -> None:
        self.state = state
        self.error = error
        self.traceback = error.__traceback__
        self.event.set()

    def hand_back(self, entry: _Entry[Any], error: BaseException) -> bool:
        """A failed flush hands the item back: True, the batcher keeps track of
        it until the caller has seen the error."""
        self.entry = entry
        self.fail(error, HANDED_BACK)
        return True

    def unflushed(self, error: BaseException) -> None:
        """The batcher stopped before the item was flushed."""
        self.fail(error)

    def abandon(self) -> bool:
        """The caller was cancelled: True if the item was handed back and must
        be taken back (the caller never saw its error)."""
        handed_back = self.state is HANDED_BACK
        if handed_back or self.state is WAITING:
            self.state = ABANDONED
        return handed_back

    def outcome(self) -> Any:
        """The caller resumed: its result, or raise its error."""
        if self.error is not None:
            if self.state is HANDED_BACK:
                self.state = SEEN
            raise self.error.with_traceback(self.traceback)
        return self.result


class _JobTicket:
    """A ``submit_nowait`` item's :class:`~corral.Job`: WAITING until its batch
    is settled, then its Outcome is recorded in the same step (RESOLVED or
    FAILED: nobody has to resume for it, so nothing is ever handed back). If
    the batcher stops first, the job ends unfinished."""

    __slots__ = ("clock", "job", "started", "state")

    def __init__(self, job: Job[Any, Any], clock: Callable[[], float]) -> None:
        self.state = WAITING
        self.job = job
        self.clock = clock
        self.started = clock()

    def _record(self, result: Any, error: BaseException | None) -> None:
        job = self.job
        job._outcome = _make_outcome(
            job.item,
            job.index,
            job.id,
            result,
            error,  # type: ignore[arg-type]  # an Exception: a flush's error, or ours
            1,
            self.clock() - self.started,
        )
        if job._event is not None:
            job._event.set()

    def resolve(self, result: Any) -> None:
        self.state = RESOLVED
        self._record(result, None)

    def fail(self, error: BaseException) -> None:
        self.state = FAILED
        self._record(None, error)

    def hand_back(self, entry: _Entry[Any], error: BaseException) -> bool:
        """A failed flush: the job gets the error; the item left the batcher."""
        self.fail(error)
        return False

    def unflushed(self, error: BaseException) -> None:
        self.state = FAILED
        self.job._abandon()


# (seq, item, key, ticket, added_at). A tuple: one is made per item. The key
# is the dedupe key, or (dedupe key or None, weight) with a weight function.
_Entry: TypeAlias = tuple[int, T, Hashable, _Ticket | _JobTicket | None, float]


class _FlushWaiter:
    """A :meth:`Batcher.flush` caller: waits for the items below ``target``."""

    __slots__ = ("error", "event", "target")

    def __init__(self, target: int) -> None:
        self.target = target
        self.error: BaseException | None = None
        self.event = anyio.Event()


@attrs.frozen
class _Config:
    """A batcher's options, checked (see :func:`_configure`)."""

    flush: Callable[[list[Any]], Any]
    max_size: int
    max_wait: float | None
    concurrency: int
    max_pending: int
    dedupe_key: Callable[[Any], Hashable] | None
    weight: Callable[[Any], float] | None
    max_weight: float  # inf without a weight function
    keyed: bool  # items need a key: a dedupe_key or a weight
    dedupe: Callable[[list[Any]], tuple[list[Any], list[int]]] | None  # _dedupe, if any
    layers: Layers
    failure_policy: Retry  # the waits between failed flushes
    give_up_after: int | None  # max_consecutive_failures
    timed: bool  # whether items need the time they were added (for the age timer)


def _configure(
    flush: Callable[[list[Any]], Any],
    *,
    max_size: int,
    max_wait: float | None,
    concurrency: int,
    max_pending: int | None,
    dedupe_key: Callable[[Any], Hashable] | None,
    weight: Callable[[Any], float] | None,
    max_weight: float | None,
    retry: Retry | None,
    rate_limit: RateLimiter | None,
    cost: Callable[[list[Any]], int] | None,
    limiter: AbstractAsyncContextManager[object] | None,
    breaker: CircuitBreaker | None,
    hedge: Hedge | None,
    timeout: float | Timeout | None,
    middleware: Sequence[Middleware],
    max_consecutive_failures: int | None,
) -> _Config:
    """Check a batcher's options, in the order of its signature."""
    check_callable("flush", flush)
    max_size = check_int("max_size", max_size, minimum=1)
    if max_wait is not None:
        max_wait = check_number("max_wait", max_wait, finite=False)
    concurrency = check_int("concurrency", concurrency, minimum=1)
    max_pending = _check_max_pending(max_pending, max_size, concurrency)
    _check_dedupe_key(dedupe_key)
    heaviest = _check_weight(weight, max_weight)
    layers = check_middleware(
        retry=retry,
        rate_limit=rate_limit,
        limiter=limiter,
        breaker=breaker,
        hedge=hedge,
        timeout=timeout,
        middleware=middleware,
        cost=len if cost is None else cost,  # a batch costs its rows by default
    )
    give_up_after = None
    if max_consecutive_failures is not None:
        give_up_after = check_int("max_consecutive_failures", max_consecutive_failures, minimum=1)
    return _Config(
        flush=flush,
        max_size=max_size,
        max_wait=max_wait,
        concurrency=concurrency,
        max_pending=max_pending,
        dedupe_key=dedupe_key,
        weight=weight,
        max_weight=heaviest,
        keyed=dedupe_key is not None or weight is not None,
        dedupe=_dedupe_for(dedupe_key, weight),
        layers=layers,
        failure_policy=_failure_policy(layers.retry),
        give_up_after=give_up_after,
        timed=max_wait is not None and 0 < max_wait < math.inf,
    )


def _check_max_pending(max_pending: int | None, max_size: int, concurrency: int) -> int:
    if max_pending is None:
        return max_size * (concurrency + 1)
    check_int("max_pending", max_pending, minimum=1)
    if max_pending < max_size:
        raise ValueError(
            f"max_pending must be >= max_size ({max_size}), got {max_pending!r}: "
            "a full batch could never be queued"
        )
    return max_pending


def _check_dedupe_key(dedupe_key: object) -> None:
    check_callable("dedupe_key", dedupe_key, optional=True)
    if dedupe_key is not None and is_async_callable(dedupe_key):
        raise TypeError(
            f"dedupe_key must be a plain function returning a hashable key, got {dedupe_key!r}"
        )


def _check_weight(weight: object, max_weight: object) -> float:
    """``max_weight`` checked (inf without a weight function)."""
    check_callable("weight", weight, optional=True)
    if weight is not None and is_async_callable(weight):
        raise TypeError(f"weight must be a plain function returning a number, got {weight!r}")
    if (weight is None) != (max_weight is None):
        given, missing = (
            ("weight", "max_weight") if max_weight is None else ("max_weight", "weight")
        )
        raise ValueError(
            f"{given} needs {missing}: weight (a function of an item) and max_weight "
            f"(the most a batch may weigh) go together"
        )
    if max_weight is None:
        return math.inf
    check_number("max_weight", max_weight, positive=True)
    return max_weight  # type: ignore[return-value]  # an int stays exact


def _in_loop(token: anyio.lowlevel.EventLoopToken | None) -> bool:
    """Whether the running event loop is the one of ``token`` (its clock can be
    read here and is the same clock; outside a loop, trio's cannot be read, and
    every ``trio.run`` has a clock of its own)."""
    try:
        return token is not None and anyio.lowlevel.current_token() == token
    except RuntimeError:
        return False


def _dedupe_for(dedupe_key: object, weight: object) -> Callable[..., Any] | None:
    """How a batch drops its duplicates, if it does (an entry's key is (dedupe
    key, weight) with a weight function)."""
    if dedupe_key is None:
        return None
    return _dedupe if weight is None else _dedupe_weighed


def _failure_policy(retry: Retry | None) -> Retry:
    """What spaces failed flushes: ``retry`` if it waits at all, else the default."""
    if retry is not None and retry.wait_initial > 0 and retry.wait_max > 0:
        return retry
    if retry is not None and retry.retry_after is not None:  # where its Retry-After is
        return attrs.evolve(_FAILURE_BACKOFF, retry_after=retry.retry_after)
    return _FAILURE_BACKOFF


@attrs.define
class _Counts:
    """The counters that accumulate over entries into the block."""

    flushes: int = 0
    flushed: int = 0
    deduped: int = 0
    flush_failures: int = 0
    failed: int = 0
    backpressure_waits: int = 0
    last_flush_time: float | None = None
    last_flush_loop: anyio.lowlevel.EventLoopToken | None = None  # whose clock that is
    cancelled: int = 0


class _BatcherRun(Run, Generic[T]):
    """What one entry into a batcher owns."""

    def __init__(
        self,
        threads: Threads | None,
        config: _Config,
        make_room: Callable[[], None],
        next_seq: int,
    ) -> None:
        super().__init__(threads)
        # the seq of the next item added; seqs go on from the last entry's,
        # so that this is also how many items were ever added
        self.next_seq = next_seq
        self.queue: deque[_Entry[T]] = deque()
        self.queued_weight: float = 0  # their weight, with a weight function
        self.in_flight: dict[int, list[_Entry[T]]] = {}  # first seq -> the batch
        self.flushing = 0  # items in in_flight
        # room in the queue: queued items, and room granted to an adder that
        # has not queued its items yet (cutting a batch gives its room back)
        self.slots = Slots(config.max_pending, on_blocked=make_room)
        self.parking: Parking[None] = Parking()  # idle flushers
        self.flushers = 0  # flusher tasks alive (at most concurrency, on demand)
        self.stopped: anyio.Event | None = None  # set when the last flusher exits
        self.chain: Callable[[list[T]], Awaitable[Any]] = config.flush
        self.flush_target = 0  # queued items with a seq below this are due now
        self.flush_waiters: list[_FlushWaiter] = []
        # seqs of submit items handed back with an error, whose caller has not
        # resumed yet: if it was cancelled meanwhile, the item comes back
        self.handed_back: set[int] = set()
        self.resume_at = -math.inf  # no flush starts before (failure backoff)
        self.failures = 0  # consecutive failed flushes
        self.sleepers: set[anyio.CancelScope] = set()  # flushers in backoff
        # why flushing ended: the error of a final flush that failed, or of the
        # last of max_consecutive_failures failed flushes, and which of the two
        self.halt: tuple[BaseException, str] | None = None
        self.submitted = False  # submit was used: batches may carry tickets
        self.over = False  # the tasks ended: what was left is in unflushed
        self.unflushed: list[_Entry[T]] = []


@attrs.frozen
class BatcherStats:
    """A snapshot of a batcher's counters (they accumulate over re-entries).

    ``added``: items taken by ``add``, ``add_many``, ``submit`` and
    ``submit_nowait``.
    ``queued``: waiting for a flush. ``flushing``: in a flush that is running.
    ``flushes``: successful flush calls (batches). ``flushed``: items handed to
    a flush that succeeded (duplicates dropped by ``dedupe_key`` not counted).
    ``deduped``: duplicates dropped from successful batches.
    ``flush_failures``: flushes that failed after their retry policy.
    ``failed``: ``submit`` and ``submit_nowait`` items whose caller or job got
    the flush's error (they left the batcher), and cancelled jobs.
    ``backpressure_waits``: adds that had to wait for room.
    ``unflushed``: ``len(batcher.unflushed)`` after the last exit.
    ``last_flush_time``: when the last successful flush ended, or None (none
    yet), read on the event loop's clock, the one :func:`anyio.current_time`
    reads (trio's is its own, a ``MockClock`` in tests): comparable only with
    :func:`anyio.current_time` in the same event loop, not with
    :func:`time.time` or :func:`time.monotonic`. ``last_flush_age``: seconds
    from then to when the snapshot was taken (a snapshot does not age), on
    the same clock; None with no flush yet, or for a snapshot taken outside
    the event loop of the last flush (from another thread, after
    ``anyio.run`` returned, in another ``anyio.run``). It is
    left out of ``==``: two snapshots of the same counters are equal.
    ``cancelled``: jobs cancelled by
    :meth:`Job.cancel` while queued (also counted in ``failed``: their
    outcome is a :class:`~corral.JobCancelled` error). ``limit``: the current
    limit of an :class:`~corral.AdaptiveLimiter` given as ``limiter=`` (None
    with another limiter, or none).

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
    cancelled: int = 0
    limit: int | None = None
    last_flush_age: float | None = attrs.field(default=None, eq=False)


class Batcher(Block[_BatcherRun[T]], Generic[T, R]):
    """A batching stage scoped to an ``async with`` block.

    Items added with :meth:`add`, :meth:`add_many`, :meth:`submit` or
    :meth:`submit_nowait` are collected and handed to ``flush`` as a list of
    at most ``max_size`` items (and at most ``max_weight``, with ``weight``).
    A batch is flushed when it is full, when its oldest item has waited
    ``max_wait`` seconds, or, with ``max_wait=None`` (natural batching), as soon
    as a flusher is free: batches then grow while the sink is slow and shrink
    when it is fast. At most ``concurrency`` flushes run at once. ``flush`` may
    be async or plain (it then runs in a worker thread) and goes through the
    same middleware as a :class:`Pool`'s handler (``retry``, ``limiter``,
    ``rate_limit``, ``timeout``, ``middleware``), once per batch; a batch
    costs ``rate_limit`` one unit per item (see ``cost``).

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
    :param weight: a plain function giving an item's weight (an int or float,
        >= 0), called once as the item is added; with ``max_weight``, no
        batch weighs more than ``max_weight`` (``max_size`` still applies).
        A batch is due at once when it reaches ``max_weight`` or the next
        queued item would not fit. An item heavier than ``max_weight`` is
        refused by the call that adds it (``ValueError``); what ``weight``
        raises propagates from that call; a negative, NaN or non-number
        weight is a ``ValueError`` or ``TypeError`` there. Nothing is added
        then. Duplicates that ``dedupe_key`` drops count in their batch's
        weight. Room (``max_pending``) still counts items.
    :param max_weight: the most a batch may weigh: a positive number, given
        together with ``weight``.
    :param retry: a :class:`Retry` policy for each flush.
    :param rate_limit: a rate limiter acquired once per flush attempt, for
        ``cost(batch)`` units: by default the number of items in the batch
        (after ``dedupe_key``), so ``TokenBucket(500)`` means 500 rows a
        second.
    :param cost: a plain function of the batch (the list given to ``flush``)
        returning the int that each of its flush attempts asks ``rate_limit``
        for; ``cost=lambda batch: 1`` counts flushes instead of rows. A cost
        above what the limiter admits at once is acquired in parts of that
        size. If ``cost`` raises, or returns anything but an int of at least
        1, that attempt fails with the error, as a failed flush.
    :param limiter: an :class:`anyio.CapacityLimiter` held for each flush attempt.
    :param breaker: a :class:`CircuitBreaker` every flush attempt passes; while
        it is open, a flush attempt fails at once with :class:`CircuitOpen` (a
        failed flush: its batch is queued again).
    :param hedge: a :class:`Hedge`: a flush attempt still running after
        ``hedge.after`` seconds gets a copy, the first success wins. Only for a
        ``flush`` that is safe to run twice on the same batch.
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

    _kind = "batcher"

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
        weight: Callable[[T], float] | None = None,
        max_weight: float | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimiter | None = None,
        cost: Callable[[list[T]], int] | None = None,
        limiter: AbstractAsyncContextManager[object] | None = None,
        breaker: CircuitBreaker | None = None,
        hedge: Hedge | None = None,
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
        weight: Callable[[T], float] | None = None,
        max_weight: float | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimiter | None = None,
        cost: Callable[[list[T]], int] | None = None,
        limiter: AbstractAsyncContextManager[object] | None = None,
        breaker: CircuitBreaker | None = None,
        hedge: Hedge | None = None,
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
        weight: Callable[[T], float] | None = None,
        max_weight: float | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimiter | None = None,
        cost: Callable[[list[T]], int] | None = None,
        limiter: AbstractAsyncContextManager[object] | None = None,
        breaker: CircuitBreaker | None = None,
        hedge: Hedge | None = None,
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
        weight: Callable[[T], float] | None = None,
        max_weight: float | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimiter | None = None,
        cost: Callable[[list[T]], int] | None = None,
        limiter: AbstractAsyncContextManager[object] | None = None,
        breaker: CircuitBreaker | None = None,
        hedge: Hedge | None = None,
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
        weight: Callable[[T], float] | None = None,
        max_weight: float | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimiter | None = None,
        cost: Callable[[list[T]], int] | None = None,
        limiter: AbstractAsyncContextManager[object] | None = None,
        breaker: CircuitBreaker | None = None,
        hedge: Hedge | None = None,
        timeout: float | Timeout | None = None,
        middleware: Sequence[Middleware] = (),
        name: str | None = None,
        progress: bool | ProgressBar = False,
        on_stats: Callable[[BatcherStats], object] | None = None,
        stats_interval: float = 1.0,
        max_consecutive_failures: int | None = None,
    ) -> None:
        self._config = _configure(
            flush,
            max_size=max_size,
            max_wait=max_wait,
            concurrency=concurrency,
            max_pending=max_pending,
            dedupe_key=dedupe_key,
            weight=weight,
            max_weight=max_weight,
            retry=retry,
            rate_limit=rate_limit,
            cost=cost,
            limiter=limiter,
            breaker=breaker,
            hedge=hedge,
            timeout=timeout,
            middleware=middleware,
            max_consecutive_failures=max_consecutive_failures,
        )
        self.name: str | None = check_optional_str("name", name)
        self._observer: Observer[BatcherStats] = Observer(
            progress=progress,
            on_stats=on_stats,
            stats_interval=stats_interval,
            count=_batcher_progress,
        )
        self._log = logger_for("batcher", self.name)
        self._state = NEW
        self._counts = _Counts()
        self._run = _BatcherRun(None, self._config, weakly(self._make_room), 0)

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        config = self._config
        return (
            f"<corral.Batcher{label} {self._state} max_size={config.max_size} "
            f"max_wait={config.max_wait}>"
        )

    # ------------------------------------------------------------------ state

    @property
    def stats(self) -> BatcherStats:
        """A frozen snapshot of the counters; cheap, never waits, safe to call
        any time (also before entry and after exit)."""
        counts = self._counts
        run = self._run
        last_flush, age = counts.last_flush_time, None
        if last_flush is not None and _in_loop(counts.last_flush_loop):
            age = run.clock() - last_flush
        return BatcherStats(
            added=run.next_seq,
            queued=len(run.queue),
            flushing=run.flushing,
            flushes=counts.flushes,
            flushed=counts.flushed,
            deduped=counts.deduped,
            flush_failures=counts.flush_failures,
            failed=counts.failed,
            backpressure_waits=counts.backpressure_waits,
            unflushed=len(run.unflushed),
            last_flush_time=last_flush,
            cancelled=counts.cancelled,
            limit=limit_of(self._config.layers.limiter),
            last_flush_age=age,
        )

    @property
    def unflushed(self) -> list[T]:
        """Items that were added but not flushed when the batcher last exited, in
        the order they were added. Empty after a clean exit; reset on re-entry."""
        return [entry[1] for entry in self._run.unflushed]

    # -------------------------------------------------------------- lifecycle

    def _new_run(self) -> _BatcherRun[T]:
        config = self._config
        # a flusher runs one flush at a time; as many threads again may have
        # been abandoned by timeouts (see _threads)
        threads = config.layers.threads_for(config.flush, 2 * config.concurrency)
        return _BatcherRun(threads, config, weakly(self._make_room), self._run.next_seq)

    def _started(self, run: _BatcherRun[T]) -> None:
        config = self._config
        probe = run.probe
        run.chain = config.layers.chain(
            config.flush,
            threads=run.threads,
            clock=run.clock,
            log=self._log,
            attempt=None if probe is None else probe.attempt,
        )
        if probe is not None:
            run.chain = probe.flush(run.chain)
        run.stopped = anyio.Event()
        self._start_flusher(run)  # more start as batches are cut (see _cut)

    def _drain(self, exc: BaseException | None) -> Callable[[], Awaitable[None]] | None:
        """Leaving the block flushes everything, unless it was cancelled."""
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            return None
        return self._flush_all

    async def _flush_all(self) -> None:
        """Take no new items; let the flushers flush what is left, and wait."""
        run = self._run
        self._state = STOPPING
        run.slots.close()  # waiting adders raise PoolClosed
        run.parking.unpark_all()
        await checkpoint()
        assert run.stopped is not None
        if run.flushers:
            await run.stopped.wait()

    def _on_close(self, run: _BatcherRun[T]) -> None:
        run.slots.close()

    def _on_finalize(self, run: _BatcherRun[T]) -> None:
        """After the flushers stopped: whatever is queued or in flight is unflushed."""
        entries = list(run.queue)
        for batch in run.in_flight.values():
            entries.extend(batch)
        entries.sort(key=lambda entry: entry[0])
        run.queue.clear()
        run.queued_weight = 0
        run.in_flight.clear()
        run.flushing = 0
        run.unflushed = entries
        run.over = True
        for entry in entries:
            ticket = entry[3]
            if ticket is not None and ticket.state is WAITING:
                ticket.unflushed(self._not_flushed_error())  # a job ends unfinished
        waiters, run.flush_waiters = run.flush_waiters, []
        for waiter in waiters:
            waiter.error = self._not_flushed_error()
            waiter.event.set()
        if run.probe is not None:
            run.probe.ended(len(entries))

    def _stop(self, run: _BatcherRun[T]) -> None:
        """Stop everything (unflushed items stay unflushed)."""
        assert run.tg is not None
        run.tg.cancel_scope.cancel()

    def _stop_error(self, run: _BatcherRun[T], *, block_failed: bool) -> BaseException | None:
        """What broke a flusher (KeyboardInterrupt, on_stats, ...), or the
        :class:`FlushError` of flushing that ended. A block exception is its
        ``__context__``."""
        if run.stop_reason is not None:
            return run.stop_reason
        if run.halt is None:
            return None
        cause, reason = run.halt
        count = len(run.unflushed)
        error = FlushError(
            f"{self!r}: {reason} ({cause!r}); {count} item{'s' if count != 1 else ''} not flushed",
            self.unflushed,
        )
        error.__cause__ = cause
        return error

    def _exit_summary(self) -> tuple[object, str]:
        stats = self.stats
        summary = f"{stats.flushed} flushed in {stats.flushes} batches, {stats.unflushed} unflushed"
        return stats, summary

    def _not_flushed_error(self) -> PoolClosed:
        return PoolClosed(
            f"{self!r} stopped before the item was flushed; it is in batcher.unflushed"
        )

    def _closed_error(self) -> PoolClosed:
        if self._state is NEW:
            return PoolClosed(f"{self!r} is not running yet: add inside `async with batcher:`")
        if self._state is STOPPING:
            return PoolClosed(f"{self!r} is flushing for exit and takes no new items")
        return PoolClosed(
            f"{self!r} has exited and takes no new items. A block that ends well"
            " flushes only the items already added, not those of tasks that add"
            " later: start those tasks in a task group opened inside the batcher's"
            " `async with` block, or keep the block open until they finish (docs:"
            ' "Pools in task groups and nurseries")'
        )

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
        :raises ValueError: the item is heavier than ``max_weight`` (see
            ``weight`` for a weight that is not a number >= 0).
        """
        await checkpoint()
        if self._state is not RUNNING:
            raise self._closed_error()
        config = self._config
        key = None if not config.keyed else self._key(item)
        run = self._run
        if not run.slots.take_nowait(1):
            await self._wait_for_room(run, 1)
        self._add_entry(run, item, key, None)

    def add_nowait(self, item: T) -> None:
        """Queue ``item`` without waiting, or raise.

        Never waits and is not a checkpoint. If it raises, the item was not
        added; if it returns, it was.

        :raises QueueFull: ``max_pending`` items are queued, or adders are
            waiting for room.
        :raises PoolClosed: the batcher is not running.
        :raises TypeError: ``dedupe_key`` returned an unhashable key.
        :raises ValueError: the item is heavier than ``max_weight``.
        """
        if self._state is not RUNNING:
            raise self._closed_error()
        # a bad dedupe key or weight is refused before the room is looked at,
        # as by add()
        config = self._config
        key = None
        if config.keyed:
            if config.weight is not None:
                self._put_nowait(item, None)
                return
            key = self._key(item)
        run = self._run
        slots = run.slots
        # Slots.take_nowait(1), inlined: the call would cost 13% of add_nowait
        if slots.waiters or slots.granted or slots.used >= slots.capacity:
            raise QueueFull(f"{self!r} has max_pending={config.max_pending} items queued")
        slots.used += 1
        # _append, inlined: the call would cost another 13%
        seq = run.next_seq
        run.next_seq = seq + 1
        queue = run.queue
        queue.append((seq, item, key, None, run.clock() if config.timed else 0.0))
        parking = run.parking
        if parking.spots and not parking.waking:
            size = len(queue)
            if size == 1 or size >= config.max_size:
                parking.unpark()

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
        :raises ValueError: one of them is heavier than ``max_weight``.
        """
        batch = _as_list(items)
        await checkpoint()
        if self._state is not RUNNING:
            raise self._closed_error()
        if not batch:
            return
        keys = self._keys(batch)
        run = self._run
        if not run.slots.take_nowait(len(batch)):
            await self._wait_for_room(run, len(batch))
        for item, key in zip(batch, keys, strict=True):
            self._add_entry(run, item, key, None)

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
        :raises ValueError: the item is heavier than ``max_weight``.
        :raises Exception: whatever ``flush`` raised for this item's batch after
            its retry policy gave up (the item then leaves the batcher; the
            ``add`` items of that batch are queued again).
        """
        await checkpoint()
        if self._state is not RUNNING:
            raise self._closed_error()
        config = self._config
        key = None if not config.keyed else self._key(item)
        run = self._run
        ticket = _Ticket()
        run.submitted = True
        if not run.slots.take_nowait(1):
            await self._wait_for_room(run, 1)
        self._add_entry(run, item, key, ticket)
        result: R = await self._outcome(run, ticket)
        return result

    def submit_nowait(self, item: T) -> Job[T, R]:
        """Add ``item`` without waiting, or raise, and return its
        :class:`~corral.Job`.

        Never waits and is not a checkpoint; refuses like :meth:`add_nowait`.
        ``await job.wait()`` gives the item's :class:`~corral.Outcome`: its
        ``result`` is what :meth:`submit` would return (an error if ``flush``
        did not return one result per item), or its ``error`` is what the
        flush of its batch raised after its retry policy (the item then leaves
        the batcher; counted in ``stats.failed``). ``index`` and ``id`` count
        the batcher's items from 0, ``attempts`` is 1 (a batch's retries are
        not counted per item) and ``elapsed`` runs from this call. If the
        batcher stops before the item is flushed, the job ends unfinished
        (``wait()`` raises :class:`PoolClosed`) and the item is in
        :attr:`unflushed`. :meth:`Job.cancel` takes a queued item out (an item
        whose batch is being flushed stays in it: ``cancel()`` is False).

        :raises QueueFull: ``max_pending`` items are queued, or adders are
            waiting for room.
        :raises PoolClosed: the batcher is not running.
        :raises TypeError: ``dedupe_key`` returned an unhashable key.
        :raises ValueError: the item is heavier than ``max_weight``.
        """
        if self._state is not RUNNING:
            raise self._closed_error()
        job = self._put_nowait(item, self)
        assert job is not None
        return job

    def _put_nowait(self, item: T, owner: Batcher[T, R] | None) -> Job[T, R] | None:
        """Queue ``item`` at once, as :meth:`add_nowait` does, with a job owned
        by ``owner`` (its :meth:`submit_nowait`) if given."""
        config = self._config
        key = None if not config.keyed else self._key(item)
        run = self._run
        if not run.slots.take_nowait(1):  # the rule add_nowait inlines
            raise QueueFull(f"{self!r} has max_pending={config.max_pending} items queued")
        job: Job[T, R] | None = None
        ticket = None
        if owner is not None:
            job = Job(item, run.next_seq, run.next_seq, owner)
            ticket = _JobTicket(job, run.clock)
            run.submitted = True
        self._add_entry(run, item, key, ticket)
        return job

    def _cancel_job(self, job: Job[Any, Any]) -> bool:
        """:meth:`Job.cancel` of a :meth:`submit_nowait` item: if it is still
        queued, it leaves the queue (its room is given back) and its job gets
        a :class:`~corral.JobCancelled` error now: True. If its batch is in
        flight, False: a batch is not split, the item's outcome comes with
        its batch's."""
        run = self._run
        queue = run.queue
        at = _position(queue, job)
        if at is None:
            return False
        entry = queue[at]
        ticket = entry[3]
        assert isinstance(ticket, _JobTicket)
        del queue[at]
        if self._config.weight is not None:
            run.queued_weight = run.queued_weight - entry[2][1] if queue else 0  # type: ignore[index]
        run.slots.release(1)
        self._counts.cancelled += 1
        self._counts.failed += 1
        error = JobCancelled(f"job {job.id!r} was cancelled")
        ticket.fail(error)
        if run.probe is not None:
            run.probe.failed(1, error)
        if run.flush_waiters:
            self._settle_flush_waiters(run)
        return True

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
        if self._state is not RUNNING:
            raise self._closed_error()
        run = self._run
        target = run.next_seq
        if self._oldest_pending(run) >= target:
            return
        waiter = _FlushWaiter(target)
        run.flush_waiters.append(waiter)
        run.flush_target = target
        self._kick(run)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter in run.flush_waiters:
                run.flush_waiters.remove(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error

    async def _outcome(self, run: _BatcherRun[T], ticket: _Ticket) -> Any:
        """Wait for a submitted item's result, or raise its error."""
        try:
            await ticket.event.wait()
        except BaseException:
            if ticket.abandon():
                # A failed flush handed the item back with its error, but we
                # were cancelled before seeing it: the batcher takes it back.
                self._take_back(run, ticket)
            raise
        if ticket.state is HANDED_BACK:
            self._handed_back_seen(run, ticket)
        return ticket.outcome()

    def _key(self, item: T) -> Hashable:
        """The key of an item's entry, checked: ``dedupe_key(item)``, or with a
        weight function (dedupe key or None, weight). Only for a keyed batcher."""
        config = self._config
        dedupe_key = config.dedupe_key
        key = None
        if dedupe_key is not None:
            key = dedupe_key(item)
            try:
                hash(key)
            except TypeError:
                raise TypeError(
                    f"dedupe_key must return a hashable key, got {key!r} for {item!r}"
                ) from None
        if config.weight is None:
            return key
        return key, self._weigh(item)

    def _weigh(self, item: T) -> float:
        """``weight(item)``, checked: a number >= 0, at most ``max_weight``."""
        config = self._config
        assert config.weight is not None
        weight = _checked_weight(config.weight(item), item)
        if weight > config.max_weight:
            raise ValueError(
                f"{item!r} weighs {weight!r}, more than max_weight={config.max_weight!r}: "
                "it fits in no batch"
            )
        return weight

    def _keys(self, batch: list[T]) -> list[Hashable]:
        """The key of each item (None for an unkeyed batcher)."""
        if not self._config.keyed:
            return [None] * len(batch)
        return list(map(self._key, batch))

    async def _wait_for_room(self, run: _BatcherRun[T], need: int) -> None:
        """Wait in line until ``need`` queue slots are ours. The caller queues
        its items as soon as this returns, with no checkpoint in between."""
        self._counts.backpressure_waits += 1
        if not await run.slots.take(need):
            raise self._closed_error()

    def _append(
        self, run: _BatcherRun[T], item: T, key: Hashable, ticket: _Ticket | _JobTicket | None
    ) -> None:
        """Queue an item (its room is taken); wake a parked flusher if its
        decision may change: the queue was empty (flush it at once, or arm the
        age timer), or it is a full batch."""
        seq = run.next_seq
        run.next_seq = seq + 1
        queue = run.queue
        config = self._config
        queue.append((seq, item, key, ticket, run.clock() if config.timed else 0.0))
        parking = run.parking
        if parking.spots and not parking.waking:
            size = len(queue)
            if size == 1 or size >= config.max_size:
                parking.unpark()

    def _add_entry(
        self, run: _BatcherRun[T], item: T, key: Hashable, ticket: _Ticket | _JobTicket | None
    ) -> None:
        """Queue an item whose room is taken: :meth:`_append`, weighed if the
        batcher has a weight function (add_nowait inlines the unweighed case)."""
        if self._config.weight is None:
            self._append(run, item, key, ticket)
        else:
            self._append_weighed(run, item, key, ticket)

    def _append_weighed(
        self, run: _BatcherRun[T], item: T, key: Hashable, ticket: _Ticket | _JobTicket | None
    ) -> None:
        """:meth:`_append` with a weight function (``key`` holds the weight): a
        parked flusher is also woken when the queue reaches ``max_weight``."""
        run.queued_weight += key[1]  # type: ignore[index]
        self._append(run, item, key, ticket)
        if run.queued_weight >= self._config.max_weight:
            self._kick(run)

    def _make_room(self) -> None:
        """An adder waits for room: what is queued is due now, whatever its age,
        and so are the items of an adder granted room that it has not used yet
        (it queues them right after this).

        Otherwise ``add_many`` of more items than are free could wait for a
        batch that is neither full nor old enough, and everyone behind it too.
        """
        run = self._run
        target = run.next_seq + run.slots.used - len(run.queue)
        if run.flush_target < target:
            run.flush_target = target
            self._kick(run)

    def _requeue(self, run: _BatcherRun[T], entries: list[_Entry[T]]) -> None:
        """Put entries (in seq order) back into the queue, in their place by add
        order: ahead of every newer item. The queue stays in seq order."""
        if not entries:
            return
        run.slots.force(len(entries))
        self._weigh_in(run, entries)
        queue = run.queue
        if not queue or entries[-1][0] < queue[0][0]:
            queue.extendleft(reversed(entries))  # the usual case: all at the front
        else:  # another batch that failed earlier is older (concurrency > 1)
            merged = list(heapq.merge(queue, entries, key=lambda entry: entry[0]))
            queue.clear()
            queue.extend(merged)
        self._kick(run)

    def _weigh_in(self, run: _BatcherRun[T], entries: list[_Entry[T]]) -> None:
        """Entries come back into the queue: so does their weight (if weighed)."""
        if self._config.weight is not None:
            run.queued_weight += sum(entry[2][1] for entry in entries)  # type: ignore[index]

    def _handed_back_seen(self, run: _BatcherRun[T], ticket: _Ticket) -> None:
        """A submit caller resumed to see the error its item was handed back with."""
        assert ticket.entry is not None
        run.handed_back.discard(ticket.entry[0])
        if run.probe is not None and isinstance(ticket.error, Exception):
            run.probe.failed(1, ticket.error)
        if not run.handed_back:
            if self._state is not RUNNING:
                run.parking.unpark_all()  # flushers wait for this before they exit
            if run.flush_waiters:
                self._settle_flush_waiters(run)

    def _take_back(self, run: _BatcherRun[T], ticket: _Ticket) -> None:
        """Queue again (or, once stopped, list as unflushed) an item whose failure
        its ``submit`` caller never saw, in its place by add order."""
        entry = ticket.entry
        assert entry is not None
        self._counts.failed -= 1
        run.handed_back.discard(entry[0])
        current = self._run  # run, or the batcher's next entry
        if current.over:  # the queue was already listed
            keys = [queued[0] for queued in current.unflushed]
            current.unflushed.insert(bisect.bisect(keys, entry[0]), entry)
            if current.probe is not None:
                current.probe.ended(1)
            return
        self._requeue(current, [entry])
        if not run.handed_back and self._state is not RUNNING:
            run.parking.unpark_all()

    # --------------------------------------------------------------- flushers

    def _kick(self, run: _BatcherRun[T]) -> None:
        """Wake the first parked flusher, unless one was woken and has not run."""
        parking = run.parking
        if parking.spots and not parking.waking:
            parking.unpark()

    def _start_flusher(self, run: _BatcherRun[T]) -> None:
        """Start one more flusher; it parks until a batch is due."""
        number = run.flushers
        run.flushers = number + 1
        name = f"corral flusher {self.name or hex(id(self))}#{number}"
        run.start_soon(self._flusher, run, name=name)

    async def _flusher(self, run: _BatcherRun[T]) -> None:
        holds_of_attempt.set(None)  # not the holds of whoever started this flusher
        try:
            await self._flush_batches(run)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as error:  # noqa: BLE001 - re-raised by __aexit__
            # the flush function raised KeyboardInterrupt/SystemExit (or corral
            # has a bug): stop everything; the block re-raises this exception
            self._fail(error)
        finally:
            run.flushers -= 1
            if not run.flushers and run.stopped is not None:
                run.stopped.set()

    async def _flush_batches(self, run: _BatcherRun[T]) -> None:
        """Flush batches as they are due, until flushing is over.

        The per-batch path (under natural batching, one batch may be one
        item): what it needs is inlined, each call here costs about 1%.
        """
        chain = run.chain
        dedupe = self._config.dedupe
        natural = self._config.max_wait is None
        cancelled = anyio.get_cancelled_exc_class()
        batch = await self._next_batch(run)
        while batch is not None:
            positions: list[int] | None = None
            if dedupe is not None:
                items, positions = dedupe(batch)
            else:
                items = [entry[1] for entry in batch]
            final = self._state is not RUNNING  # started after the block ended
            streak = run.failures  # failed flushes in a row as this one starts
            error: Exception | None = None
            try:
                result = await chain(items)
            except Exception as exc:  # noqa: BLE001 - a failed flush is handled below
                error = exc
            except cancelled as exc:
                error = stray_cancellation(exc)  # re-raised if we are being cancelled
            # -- one step: the batch leaves in_flight, and what follows --
            del run.in_flight[batch[0][0]]
            run.flushing -= len(batch)
            if error is None:
                self._flushed(run, batch, items, positions, result)
            else:
                self._failed_flush(run, batch, error, final, streak)
            if not run.queue:
                # Let the tasks that are ready run first: items they add
                # now are seen without parking and being woken (cheaper).
                await checkpoint()
            # The next batch, cut here if it is due at once (what _next_batch
            # would decide first thing, without its coroutine; natural
            # batching is always due: _due_at's first case, without the call).
            if (
                run.queue
                and run.halt is None
                and run.resume_at == -math.inf
                and (natural or self._due_at(run, -1) == -math.inf)
            ):
                batch = self._cut(run)
            else:
                batch = await self._next_batch(run)

    def _due_at(self, run: _BatcherRun[T], fired_for: int) -> float:
        """When the batch at the head of the (non-empty) queue is due: -inf if
        it is due now whatever the time (natural batching, a full batch (by
        size, or by weight: it reaches max_weight or the next would not fit), exit,
        :meth:`flush`, making room, or the age timer fired for its head entry),
        else when its oldest item has waited ``max_wait``."""
        queue = run.queue
        config = self._config
        max_wait = config.max_wait
        head_seq = queue[0][0]
        if (
            max_wait is None
            or len(queue) >= config.max_size
            or self._state is not RUNNING
            or head_seq < run.flush_target
            or head_seq <= fired_for
            or run.queued_weight >= config.max_weight  # 0 >= inf without weight
        ):
            return -math.inf
        return queue[0][4] + max_wait

    async def _next_batch(self, run: _BatcherRun[T]) -> list[_Entry[T]] | None:
        """Wait until a batch is due and cut it (None: nothing more to flush)."""
        fired_for = -1  # the age timer fired for the entry with this seq
        while True:
            if run.halt is not None or not run.queue:
                if self._flushing_over(run):
                    return None
                await run.parking.park()
                continue
            now = run.clock()
            if now < run.resume_at:  # backing off after a failed flush
                await self._back_off(run)
                continue
            run.resume_at = -math.inf  # the backoff (if any) is over
            head_seq = run.queue[0][0]
            due = self._due_at(run, fired_for)
            if now >= due:
                return self._cut(run)
            if await run.parking.park(due) is TIMED_OUT:
                # The timer fired: the head entry is due, even if a coarse clock
                # (uvloop's moves in whole milliseconds) reads a hair earlier.
                fired_for = head_seq

    def _flushing_over(self, run: _BatcherRun[T]) -> bool:
        """Nothing queued is ever to be flushed by this run (it halted, or the
        queue is empty at exit), and no handed-back item may come back (a
        ``submit`` caller cancelled before it saw its error)."""
        over = run.halt is not None or self._state is not RUNNING
        return over and not run.handed_back

    async def _back_off(self, run: _BatcherRun[T]) -> None:
        """Sleep until the failure backoff ends (cut short if flushing ends)."""
        with anyio.CancelScope(deadline=run.resume_at) as scope:
            run.sleepers.add(scope)
            try:
                await anyio.sleep_forever()
            finally:
                run.sleepers.discard(scope)

    def _cut(self, run: _BatcherRun[T]) -> list[_Entry[T]]:
        """Take the next batch off the queue (at most ``max_size`` entries, and
        ``max_weight`` with a weight function)."""
        queue = run.queue
        config = self._config
        max_size = config.max_size if config.weight is None else self._fitting(run)
        if len(queue) <= max_size:
            batch = list(queue)
            queue.clear()
        else:
            batch = [queue.popleft() for _ in range(max_size)]
        run.flushing += len(batch)
        run.in_flight[batch[0][0]] = batch
        if not run.parking.spots and run.flushers < self._config.concurrency:
            # flushers start on demand: one spare stays parked, for the next
            # batch that is due while this one is flushed
            self._start_flusher(run)
        run.slots.release(len(batch))  # the next waiting adder may fit now
        if queue:
            self._kick(run)  # another parked flusher: flush or time what is left
        return batch

    def _fitting(self, run: _BatcherRun[T]) -> int:
        """How many entries at the head of the queue make the next batch (at
        most ``max_size``, weighing at most ``max_weight``); their weight leaves
        the queue's. The first always fits: no item weighs more."""
        config = self._config
        max_weight = config.max_weight
        count = 0
        total: float = 0
        for entry in itertools.islice(run.queue, config.max_size):
            weight = entry[2][1]  # type: ignore[index]
            if count and total + weight > max_weight:
                break
            total += weight
            count += 1
        if count == len(run.queue):
            run.queued_weight = 0  # no rounding left behind
        else:
            run.queued_weight -= total
        return count

    def _flushed(
        self,
        run: _BatcherRun[T],
        batch: list[_Entry[T]],
        items: list[T],
        positions: list[int] | None,
        result: Any,
    ) -> None:
        """A flush succeeded."""
        run.failures = 0
        counts = self._counts
        counts.flushes += 1
        counts.flushed += len(items)
        counts.deduped += len(batch) - len(items)
        counts.last_flush_time, counts.last_flush_loop = run.clock(), run.token
        if run.submitted:
            _resolve(batch, items, positions, result)
        if run.flush_waiters:
            self._settle_flush_waiters(run)

    def _failed_flush(
        self,
        run: _BatcherRun[T],
        batch: list[_Entry[T]],
        error: Exception,
        final: bool,
        streak: int,
    ) -> None:
        """A flush failed after its retry policy."""
        self._counts.flush_failures += 1
        if run.failures == streak:
            # (flushes that ran at the same time, concurrency > 1, and failed
            # together count once: the backoff between them had no chance)
            run.failures += 1
        self._schedule_backoff(run, error)
        kept = self._hand_back(run, batch, error)
        self._requeue(run, kept)
        give_up_after = self._config.give_up_after
        give_up = give_up_after is not None and run.failures >= give_up_after
        self._log_flush_failure(len(batch), len(kept), error, final or give_up)
        if run.flush_waiters:
            self._settle_flush_waiters(run, batch, error)
        if final or give_up:
            self._halt(run, error, final)

    def _schedule_backoff(self, run: _BatcherRun[T], error: Exception) -> None:
        """No flush starts before the backoff after this failure."""
        delay = self._config.failure_policy._wait(run.failures, error, _equal_jitter)
        if not math.isfinite(delay):
            delay = _FAILURE_BACKOFF.wait_max
        delay = max(delay, _MIN_FAILURE_WAIT)
        run.resume_at = max(run.resume_at, run.clock() + delay)

    def _hand_back(
        self, run: _BatcherRun[T], batch: list[_Entry[T]], error: Exception
    ) -> list[_Entry[T]]:
        """Give the batch's ``submit`` callers the error (their items leave the
        batcher); the rest are kept, to be queued again."""
        kept: list[_Entry[T]] = []
        for entry in batch:
            ticket = entry[3]
            if ticket is None or ticket.state is ABANDONED:
                kept.append(entry)
            else:
                self._counts.failed += 1
                if ticket.hand_back(entry, error):  # its caller is yet to see it
                    run.handed_back.add(entry[0])
                elif run.probe is not None:  # a job has its outcome now
                    run.probe.failed(1, error)
        return kept

    def _halt(self, run: _BatcherRun[T], error: Exception, final: bool) -> None:
        """Flushing ends; what is left is unflushed."""
        if run.halt is not None:
            return
        if final:
            run.halt = (error, "a final flush failed")
        else:
            run.halt = (error, f"{run.failures} consecutive flushes failed")
            self._stop(run)  # the block ends with FlushError
        run.parking.unpark_all()
        for scope in run.sleepers:
            scope.cancel()

    def _log_flush_failure(self, size: int, kept: int, error: Exception, final: bool) -> None:
        """A failed flush, at WARNING, with what becomes of its items."""
        self._log.warning(
            "%s: a flush of %d item%s failed (%s)%s: %r",
            self.name or "batcher",
            size,
            "" if size == 1 else "s",
            _fates(size, kept, final),
            "; flushing ends" if final else "",
            error,
            exc_info=error,
        )

    def _oldest_pending(self, run: _BatcherRun[T]) -> float:
        """The lowest seq of an item not flushed yet: queued, in flight, or handed
        back to a ``submit`` caller that has not seen the error (it may come
        back); infinite if none. Batches and the queue are in seq order."""
        oldest = math.inf
        if run.queue:
            oldest = run.queue[0][0]
        for first in run.in_flight:  # keyed by the batch's first (lowest) seq
            oldest = min(oldest, first)
        if run.handed_back:
            oldest = min(oldest, min(run.handed_back))
        return oldest

    def _settle_flush_waiters(
        self,
        run: _BatcherRun[T],
        failed: list[_Entry[T]] | None = None,
        error: Exception | None = None,
    ) -> None:
        """Wake the flush() callers whose items are all flushed, or one of whose
        items was in the ``failed`` batch (they get its ``error``)."""
        oldest = self._oldest_pending(run)
        still: list[_FlushWaiter] = []
        for waiter in run.flush_waiters:
            if failed is not None and failed[0][0] < waiter.target:
                waiter.error = error
                waiter.event.set()
            elif oldest >= waiter.target:
                waiter.event.set()
            else:
                still.append(waiter)
        run.flush_waiters = still


def _resolve(
    batch: list[_Entry[T]], items: list[T], positions: list[int] | None, result: Any
) -> None:
    """A flush succeeded: give its ``submit`` callers their results."""
    tickets = [(number, entry[3]) for number, entry in enumerate(batch) if entry[3] is not None]
    if not tickets:
        return
    results, problem = _results(result, len(items))
    for number, ticket in tickets:
        if ticket.state is not ABANDONED:
            position = number if positions is None else positions[number]
            problem = _give_result(ticket, results, position, problem)


def _results(result: Any, size: int) -> tuple[Any, str | None]:
    """``flush``'s return value as per-item results (None: every result is
    None), or why it cannot be."""
    try:
        return _check_results(result, size)
    except Exception as error:  # noqa: BLE001 - the result object's own len()
        return None, f"flush's result has no usable length: {error!r}"


def _give_result(
    ticket: _Ticket | _JobTicket, results: Any, position: int, problem: str | None
) -> str | None:
    """Resolve ``ticket`` with its result, or fail it with a ValueError if the
    results have a ``problem`` (or have one now: then the callers after it
    get the same)."""
    if problem is None:
        try:
            ticket.resolve(None if results is None else results[position])
        except Exception as error:  # noqa: BLE001 - the result's own indexing
            problem = f"flush's result could not be indexed: {error!r}"
        else:
            return None
    ticket.fail(ValueError(problem))
    return problem


def _fates(size: int, kept: int, final: bool) -> str:
    """What becomes of the items of a failed flush of ``size``, ``kept`` of
    them added (not submitted)."""
    fates = []
    if kept:
        fates.append(f"{kept} back in the queue" if not final else f"{kept} left unflushed")
    if size - kept:
        fates.append(f"{size - kept} handed back to their submit callers")
    return ", ".join(fates)


def _as_list(items: Iterable[T]) -> list[T]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"items must be an iterable of items, got {items!r}")
    return list(items)


def _batcher_progress(stats: BatcherStats) -> tuple[int, dict[str, int]]:
    """What a progress bar shows of a batcher: items done, batches, failed flushes."""
    done = stats.flushed + stats.deduped + stats.failed
    postfix = {"batches": stats.flushes, "failed flushes": stats.flush_failures}
    if stats.limit is not None:
        postfix["limit"] = stats.limit
    return done, postfix


def _checked_weight(weight: Any, item: object) -> float:
    """What ``weight(item)`` returned, if it is a number >= 0 (as a float
    unless it is an int or a float)."""
    kind = type(weight)
    if kind is not int and kind is not float:
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"weight must return a number, got {weight!r} for {item!r}")
        weight = float(weight)
    if not weight >= 0:  # negative, or NaN
        raise ValueError(f"weight must return a number >= 0, got {weight!r} for {item!r}")
    return weight  # type: ignore[no-any-return]


def _seq_of(entry: _Entry[Any]) -> int:
    return entry[0]


def _position(queue: deque[_Entry[T]], job: Job[Any, Any]) -> int | None:
    """Where ``job``'s entry is in the queue (in seq order), if it is there."""
    at = bisect.bisect_left(queue, job.index, key=_seq_of)
    if at == len(queue):
        return None
    ticket = queue[at][3]
    return at if isinstance(ticket, _JobTicket) and ticket.job is job else None


def _dedupe_weighed(batch: list[_Entry[T]]) -> tuple[list[T], list[int]]:
    """:func:`_dedupe` for entries whose key is (dedupe key, weight)."""
    items: list[T] = []
    positions: list[int] = []
    first: dict[Hashable, int] = {}
    for entry in batch:
        key = entry[2][0]  # type: ignore[index]
        position = first.get(key)
        if position is None:
            position = first[key] = len(items)
            items.append(entry[1])
        positions.append(position)
    return items, positions


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
