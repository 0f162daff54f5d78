"""QueueSink and QueueSource: a durable queue in one SQLite file.

The life of an entry::

    sink.add ──► queued ──take (BEGIN IMMEDIATE; up to the free room)──► leased ──► Delivery
                   ▲                                                    │  renewed every
                   │ the lease ran out (its consumer died)              │  lease / 3 while
                   ├────────────────────────────────────────────────────┤  its handler runs
                   │ failed, deliveries < max: due after redeliver_after│
                   │                                                    ▼
                   └──────────────────────────────── source.settle(outcome)
                                                      ok ──► done (batched)
                                                      failed, deliveries >= max ──► dead

An entry leaves the queue only as done (after a success) or dead. Everything
else (a crash, a cancellation, a failure with deliveries left) leaves it
queued, or leased until its lease runs out: at least once, never lost.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import socket
import threading
import weakref
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import attrs
from anyio.lowlevel import cancel_shielded_checkpoint, checkpoint

from .._batcher import Batcher, BatcherStats
from .._delivery import Deliveries, Delivery
from .._errors import FlushError, PoolClosed, QueueFull
from .._outcome import Outcome
from .._retry import ExceptionFilter, Retry, check_on, matches
from .._validate import check_bool, check_int, check_number
from ._store import Failure, QueueCounts, QueueError, Store, check_fields, check_key

__all__ = ["QueueSink", "QueueSource", "QueueStats"]

R = TypeVar("R")
T = TypeVar("T")

_log = logging.getLogger("corral.sqlite")

_SETTLE_WAIT = 0.01  # seconds a settlement may wait for others to share its transaction
# failed writes in a row (about 1.5 s of backoff) before a batcher gives up: a
# read-only or full file does not mend itself, and adds must not wait forever
_GIVE_UP_AFTER = 5

# The sources of each thread, by (file, queue): a sink that has written wakes
# those of its own thread (its event loop) at once, instead of their next poll.
_threads = threading.local()


def _sources() -> dict[tuple[str, str], weakref.WeakSet[QueueSource]]:
    sources: dict[tuple[str, str], weakref.WeakSet[QueueSource]]
    sources = _threads.__dict__.setdefault("sources", {})
    return sources


class _QueueFile:
    """What the sink and the source share: the file, opened in a worker thread
    when the block is entered, and used one call at a time."""

    def __init__(self, path: object, queue: object, timeout: object) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or a path, got {path!r}")
        self.path: str = os.fspath(path)
        if not self.path or self.path == ":memory:" or self.path.startswith("file:"):
            raise ValueError(
                f"path must name a file, got {self.path!r}: each connection to an in-memory "
                "database has its own, so the queue would be lost"
            )
        if not isinstance(queue, str):
            raise TypeError(f"queue must be a str, got {queue!r}")
        if not queue:
            raise ValueError("queue must not be empty")
        self.queue: str = queue
        self.timeout: float = check_number("timeout", timeout, positive=True)
        self._where = (os.path.realpath(self.path), queue)  # the file and queue, for nudges
        self._store: Store | None = None
        self._one = anyio.CapacityLimiter(1)  # one call at a time on the connection

    async def _open(self) -> None:
        if self._store is not None:
            raise RuntimeError(f"{self!r} is already running")
        self._store = await anyio.to_thread.run_sync(
            functools.partial(Store, self.path, timeout=self.timeout)
        )

    async def _close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(store.close, limiter=self._one)

    async def _run(self, method: Callable[..., T], *args: Any) -> T:
        """Run a Store method in a worker thread. If the caller is cancelled
        meanwhile, the call still completes (its transaction is never cut in
        half) and the cancellation is raised at the caller's next checkpoint."""
        if self._store is None:
            raise PoolClosed(f"{self!r} is not running: use it inside its `async with` block")
        return await anyio.to_thread.run_sync(functools.partial(method, *args), limiter=self._one)

    async def _live_store(self) -> Store:
        """The open store, after a checkpoint (also when there is none)."""
        await checkpoint()
        return self._live()

    def _live(self) -> Store:
        if self._store is None:
            raise PoolClosed(f"{self!r} is not running: use it inside its `async with` block")
        return self._store

    async def counts(self) -> QueueCounts:
        """How many entries the queue holds in each state
        (:class:`QueueCounts`): one read, in a worker thread.

        :raises PoolClosed: the block is not running.
        :raises QueueError: the file cannot be read.
        """
        store = await self._live_store()
        return await self._run(store.counts, self.queue)

    async def prune(self, *, older_than: float, dead: bool = False) -> int:
        """Drop the keys of entries done more than ``older_than`` seconds ago
        (with ``dead=True``, the dead letters too); returns how many rows went.

        Done entries are kept only as their keys, so that a producer run
        again does not add them twice; an entry whose key was pruned would
        be added again.

        :raises PoolClosed: the block is not running.
        :raises QueueError: the file cannot be written.
        :raises ValueError: ``older_than`` is negative.
        """
        seconds = check_number("older_than", older_than)
        store = await self._live_store()
        return await self._run(store.prune, self.queue, seconds, check_bool("dead", dead))


class QueueSink(_QueueFile):
    """Entries into a SQLite queue file, written in batches: one transaction
    per batch, through a :class:`~corral.Batcher` (natural batching: a batch
    goes as soon as the last one is written). For example::

        async with QueueSink("work.sqlite3") as sink:
            await sink.add({"record": "42"}, key="42")

    With ``key``, an entry whose key the queue already holds (queued, in
    progress, done or dead) is not added again, so a producer that is run
    again after a crash adds nothing twice.

    Leaving the block writes everything added and waits for it: if a write
    that starts after the block ended fails, :class:`~corral.FlushError` is
    raised and the entries not written are in :attr:`unflushed`. Nothing
    written is lost: each batch is one transaction, written to the file
    before :meth:`submit` returns (durable across a crash of the process; in
    WAL mode with ``synchronous=NORMAL``, a power cut may lose the last
    transactions).

    :param path: the queue file; created (with its folder's permission) if
        missing. Several processes may share it.
    :param queue: the queue's name within the file.
    :param max_size: the most entries in one transaction.
    :param max_wait: seconds the oldest entry may wait for its batch to fill;
        None (the default) for natural batching.
    :param max_pending: how many queued entries make :meth:`add` wait.
    :param retry: a :class:`~corral.Retry` policy per batch.
    :param max_consecutive_failures: failed writes in a row (each after
        ``retry``, with a growing backoff) before the sink gives up: the
        block is cancelled and raises :class:`~corral.FlushError` with the
        entries not written, so that a read-only or full file never leaves
        :meth:`add` waiting forever. None: keep trying while the block runs.
    :param timeout: seconds to wait for another process's write lock before
        :class:`QueueError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        queue: str = "default",
        *,
        max_size: int = 500,
        max_wait: float | None = None,
        max_pending: int | None = None,
        retry: Retry | None = None,
        max_consecutive_failures: int | None = _GIVE_UP_AFTER,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(path, queue, timeout)
        self._what = f"QueueSink({self.path!r}, queue={queue!r})"
        self._batcher: Batcher[tuple[dict[str, str], str | None], str] = Batcher(
            self._write, max_size=max_size, max_wait=max_wait, max_pending=max_pending,
            retry=retry, max_consecutive_failures=max_consecutive_failures, name=self._what,
        )  # fmt: skip

    def __repr__(self) -> str:
        return self._what

    @property
    def stats(self) -> BatcherStats:
        """The underlying :class:`~corral.Batcher`'s counters: ``flushes`` are
        transactions, ``flushed`` entries written."""
        return self._batcher.stats

    @property
    def unflushed(self) -> list[tuple[dict[str, str], str | None]]:
        """Entries not written when the block ended (cancelled, or the final
        write failed), as (fields, key), in the order they were added."""
        return self._batcher.unflushed

    async def __aenter__(self) -> QueueSink:
        await self._open()
        try:
            await self._batcher.__aenter__()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            return await self._batcher.__aexit__(exc_type, exc, tb)
        finally:
            await self._close()

    async def add(self, fields: Mapping[str, str], *, key: str | None = None) -> None:
        """Queue one entry for writing; waits while ``max_pending`` are queued.

        A checkpoint once the arguments are accepted. Cancel-safe: if it
        raises, the entry was not queued; if it returns, it was (and is
        written before the block ends, or listed in :attr:`unflushed`).

        :raises TypeError: ``fields`` is not a mapping of str to str, or
            ``key`` is not a non-empty str.
        :raises PoolClosed: the sink's block is not running.
        """
        await self._batcher.add((check_fields(fields), check_key(key)))

    async def submit(self, fields: Mapping[str, str], *, key: str | None = None) -> str:
        """Queue one entry and wait until it is written; its ID (the ID of
        the entry already holding ``key``, if one does).

        :raises QueueError: its batch could not be written (after ``retry``);
            the entry was not added.
        :raises TypeError: ``fields`` is not a mapping of str to str, or
            ``key`` is not a non-empty str.
        :raises PoolClosed: the sink's block is not running, or it stopped
            before the entry was written.
        """
        return await self._batcher.submit((check_fields(fields), check_key(key)))

    async def _write(self, batch: list[tuple[dict[str, str], str | None]]) -> list[str]:
        ids = await self._run(self._live().add, self.queue, batch)
        for source in list(_sources().get(self._where, ())):
            source._nudge()
        return [str(entry_id) for entry_id in ids]


@attrs.frozen
class QueueStats:
    """A snapshot of a :class:`QueueSource`'s counters (this process only)."""

    delivered: int  #: entries handed out, claimed ones included
    claimed: int  #: entries taken over after their lease ran out (included in ``delivered``)
    acked: int  #: successes recorded as done
    failed: int  #: failures put back in the queue for another delivery
    dead_lettered: int  #: entries this consumer moved to the dead letters
    in_flight: int  #: handed out and not yet settled


@attrs.define
class _Counts:
    claimed: int = 0
    acked: int = 0
    failed: int = 0
    buried: int = 0


class QueueSource(_QueueFile, Deliveries[str]):
    """A SQLite queue as corral's input: an async iterable of
    :class:`~corral.redis.Delivery`, with at-least-once delivery; the same
    shape and rules as :class:`corral.redis.StreamSource`, on one file.

    Feed it to :func:`~corral.apply_to_each` or a :class:`~corral.Pool` and
    pass :meth:`settle` as ``on_outcome``::

        async with QueueSource("work.sqlite3") as source:
            async with apply_to_each(
                enrich, source, workers=20, retry=Retry(3), on_outcome=source.settle
            ) as outcomes:
                async for outcome in outcomes:
                    ...

    * **Leases.** An entry handed out is leased to this consumer for
      ``lease`` seconds, and the lease is renewed (every ``lease / 3``
      seconds) while it is in flight, so a long handler is never delivered
      twice while its process lives. When a process dies, its entries come
      back once their lease runs out. The renewal is a task of the event
      loop: a handler that blocks the loop for longer than ``lease`` (rather
      than running in a thread, as a plain handler does) stalls it, and its
      entries may be handed out again. Several processes may share the file;
      each entry goes to one of them at a time.
    * **Backpressure reaches the file.** It takes at most as many entries as
      it has room for: ``max_in_flight`` minus those handed out and not yet
      settled. With several processes, set ``max_in_flight`` near the
      pool's ``workers``, so that one process does not hold entries its
      workers cannot start while another's are idle.
    * **Done after success, only.** :meth:`settle` records a success as done
      (batched: one transaction per 10 ms). A failure goes back to the
      queue, handed out again after ``redeliver_after`` seconds; on its
      ``max_deliveries``-th delivery, or at once if it matches
      ``dead_letter_on``, it goes to the dead letters with its error. An
      entry whose lease ran out after its ``max_deliveries``-th delivery (it
      killed or stalled every consumer it reached) goes there too.
    * **Leaving the block** records everything settled, and hands back the
      entries taken and not settled (those never handed out get their
      delivery back), due at once, also when the block is cancelled
      (shielded, within ``timeout``). If that cannot be written, they come
      back when their lease runs out; a block that ended cleanly then raises
      :class:`QueueError` saying how many successes were not recorded.

    ``consumer`` names this consumer in the file (for ``python -m
    corral.sqlite`` and the dead letters); by default a name made of the
    host, the process ID and a random part. A name given explicitly must not
    be used by two live sources at once: entering the block hands back
    every entry still leased to that name by an earlier run, so a restarted
    worker resumes at once instead of after the lease.

    Iteration runs until :meth:`stop` is called or, with
    ``stop_when_drained=True``, until the queue has nothing queued and nothing
    in progress anywhere (every entry done or dead). While there is nothing to
    take it looks again every ``poll`` seconds (at once when a
    :class:`QueueSink` of this thread has written to the queue). If the file
    cannot be read, iteration ends with :class:`QueueError`; nothing is lost.
    One task iterates at a time (another gets :class:`anyio.BusyResourceError`);
    iterating outside the block raises :class:`~corral.PoolClosed`.

    :param path: the queue file; created if missing.
    :param queue: the queue's name within the file.
    :param consumer: this consumer's name (see above).
    :param max_in_flight: the most deliveries handed out and not settled.
    :param lease: seconds an entry stays leased to this consumer without a
        renewal: how long a dead process's entries wait.
    :param max_deliveries: deliveries before a failing entry is dead-lettered.
    :param dead_letter_on: errors that dead-letter an entry at once: an
        exception type, a tuple of them, or a predicate (as ``Retry(on=...)``).
    :param redeliver_after: seconds before a failed entry is handed out again;
        default ``lease``.
    :param stop_when_drained: end iteration once the queue has no work left.
    :param poll: seconds between looks at an empty queue.
    :param timeout: seconds to wait for another process's write lock before
        :class:`QueueError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        queue: str = "default",
        consumer: str | None = None,
        *,
        max_in_flight: int = 100,
        lease: float = 30.0,
        max_deliveries: int = 5,
        dead_letter_on: ExceptionFilter | None = None,
        redeliver_after: float | None = None,
        stop_when_drained: bool = False,
        poll: float = 0.1,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(path, queue, timeout)
        if consumer is not None and not isinstance(consumer, str):
            raise TypeError(f"consumer must be a str or None, got {consumer!r}")
        if consumer == "":
            raise ValueError("consumer must not be empty")
        self._named = consumer is not None
        self.consumer: str = consumer or (
            f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        )
        self.max_in_flight: int = check_int("max_in_flight", max_in_flight, minimum=1)
        self.lease: float = check_number("lease", lease, positive=True)
        self.max_deliveries: int = check_int("max_deliveries", max_deliveries, minimum=1)
        if dead_letter_on is not None:
            check_on(dead_letter_on, "dead_letter_on")
        self.dead_letter_on: ExceptionFilter | None = dead_letter_on
        self.redeliver_after: float = (
            self.lease
            if redeliver_after is None
            else check_number("redeliver_after", redeliver_after)
        )
        self.stop_when_drained: bool = check_bool("stop_when_drained", stop_when_drained)
        self.poll: float = check_number("poll", poll, positive=True)
        self._what = f"QueueSource({self.path!r}, queue={queue!r}, consumer={self.consumer!r})"
        self._init_deliveries(queue)
        self._thread = 0  # the thread of the loop the block runs in
        self._tasks: anyio.abc.TaskGroup | None = None  # the lease renewals
        self._counts = _Counts()
        self._settles: Batcher[int | Failure, None] = self._settle_batcher()
        self._late: list[int | Failure] = []  # settlements the batcher would not take

    def __repr__(self) -> str:
        return self._what

    def _settle_batcher(self) -> Batcher[int | Failure, None]:
        """Settlements wait up to 10 ms to share one transaction; a late one
        only widens the window in which a crash makes an entry run twice."""
        size = max(100, self.max_in_flight)
        return Batcher(
            self._settle_batch, max_size=size, max_wait=_SETTLE_WAIT,
            max_consecutive_failures=_GIVE_UP_AFTER, name=f"settle {self._what}",
        )  # fmt: skip

    @property
    def stats(self) -> QueueStats:
        """A snapshot of this source's counters (:class:`QueueStats`)."""
        counts = self._counts
        return QueueStats(
            delivered=self._delivered,
            claimed=counts.claimed,
            acked=counts.acked,
            failed=counts.failed,
            dead_lettered=counts.buried,
            in_flight=self._in_flight_count,
        )

    async def __aenter__(self) -> QueueSource:
        await self._open()
        tasks = anyio.create_task_group()  # entered first, so that it is left last
        try:
            if self._named:
                await self._run(self._live().release_all, self.queue, self.consumer)
            await tasks.__aenter__()
            try:
                await self._settles.__aenter__()
            except BaseException as error:
                tasks.cancel_scope.cancel()
                await tasks.__aexit__(type(error), error, error.__traceback__)
                raise
        except BaseException:
            await self._close()
            raise
        self._tasks, self._stopping = tasks, False
        self._thread = threading.get_ident()
        _sources().setdefault(self._where, weakref.WeakSet()).add(self)
        tasks.start_soon(self._renew_leases)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._stopping = True
        handed = [(int(entry_id), True) for entry_id in self._in_flight]
        unread = [(int(delivery.id), False) for delivery in self._buffer]
        failed: FlushError | None = None
        try:
            suppress = await self._settles.__aexit__(exc_type, exc, tb)
        except FlushError as error:
            # _clean_up tries them once more; whether or not that works, the
            # block's own exception goes on, not one about them
            failed, suppress = error, None
        finally:
            self._forget_deliveries()
            unsettled = await self._clean_up(handed + unread)
        if failed is not None and exc is None and unsettled:
            raise QueueError(
                f"{self._what}: {unsettled} successful entr{'y' if unsettled == 1 else 'ies'} "
                f"could not be recorded as done ({failed.__cause__!r}); they run again once "
                f"their lease runs out"
            ) from failed
        return suppress

    async def _clean_up(self, entries: list[tuple[int, bool]]) -> int:
        """Once, shielded, within ``timeout``: record the settlements the
        batcher did not write (it does not flush when cancelled), hand back
        the entries taken and not settled, stop the renewals and close the
        file. Whatever fails here comes back after its lease (at least once,
        still). Returns how many successes could not be recorded."""
        settles = self._settles.unflushed + self._late
        self._late = []
        unsettled = sum(1 for settle in settles if isinstance(settle, int))
        tasks, self._tasks = self._tasks, None
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout):
                # not even a file error may replace the exception leaving the block
                with contextlib.suppress(QueueError):
                    if settles:
                        await self._settle_batch(settles)
                        unsettled = 0
                with contextlib.suppress(QueueError):
                    if entries:
                        await self._run(self._live().release, self.consumer, entries)
        finally:
            try:
                if tasks is not None:
                    # shielded, so that a cancellation of the block does not
                    # make leaving the group raise before the file is closed
                    tasks.cancel_scope.shield = True
                    tasks.cancel_scope.cancel()
                    await tasks.__aexit__(None, None, None)
            finally:
                self._forget()
                await self._close()
        return unsettled

    async def _renew_leases(self) -> None:
        while True:
            await anyio.sleep(self.lease / 3)
            ids = {int(entry_id) for entry_id in self._in_flight}
            ids.update(int(delivery.id) for delivery in self._buffer)
            if not ids:
                continue
            try:
                renewed = await self._run(
                    self._live().renew, self.consumer, sorted(ids), self.lease
                )
            except QueueError as error:
                _log.warning("%s: could not renew %d leases: %s", self._what, len(ids), error)
                continue
            if renewed < len(ids):
                _log.warning(
                    "%s: %d of %d leases had run out (the process stalled for longer than "
                    "lease?): those entries may be handled twice",
                    self._what, len(ids) - renewed, len(ids),
                )  # fmt: skip

    def _forget(self) -> None:
        """Leave this thread's registry of sources (dropping an empty entry)."""
        sources = _sources()
        same = sources.get(self._where)
        if same is not None:
            same.discard(self)
            if not same:
                del sources[self._where]

    def _nudge(self) -> None:
        """Entries were added (by a sink of this process): look now."""
        if threading.get_ident() == self._thread:
            self._wake_up()

    def _is_open(self) -> bool:
        return self._tasks is not None

    async def _fetch(self) -> None:
        room = self._room()
        if room > 0 and await self._take(room):
            return
        if (
            room > 0
            and self.stop_when_drained
            and self._in_flight_count == 0
            and await self._run(self._live().drained, self.queue)
        ):
            self._stopping = True
            return
        await self._wait(None if room <= 0 else self.poll)

    async def _take(self, count: int) -> bool:
        taken, buried = await self._run(
            self._live().take, self.queue, self.consumer, count, self.lease, self.max_deliveries
        )
        self._counts.buried += buried
        for entry in taken:
            self._buffer.append(Delivery(self.queue, str(entry.id), entry.fields, entry.deliveries))
            self._counts.claimed += entry.claimed
        return bool(taken)

    async def settle(self, outcome: Outcome[Delivery[str], R]) -> None:
        """Settle one delivery by its outcome: pass it as ``on_outcome``.

        A success is recorded as done, a failure goes back to the queue (due
        after ``redeliver_after``) or, on its ``max_deliveries``-th delivery
        or matching ``dead_letter_on``, to the dead letters with its error
        (``repr``). Both are queued for a batched transaction: a checkpoint
        that waits only while settlements back up. Once the checks pass, the
        delivery counts as settled here (its room in ``max_in_flight`` is
        freed) before anything is awaited; if the call is cancelled after
        that, the entry comes back after its lease (at least once, still).

        :raises PoolClosed: the source's block is not running.
        :raises TypeError: the outcome's item is not a :class:`~corral.redis.Delivery`.
        :raises ValueError: it is not one this source handed out and has not
            settled yet.
        """
        delivery = await self._settling(outcome)
        error = outcome.error
        if error is None:
            await self._queue_settlement(int(delivery.id))
            return
        dead = delivery.deliveries >= self.max_deliveries or (
            self.dead_letter_on is not None and matches(self.dead_letter_on, error)
        )
        await self._queue_settlement(
            Failure(int(delivery.id), repr(error), dead, self.redeliver_after)
        )

    async def _queue_settlement(self, settlement: int | Failure) -> None:
        """Queue a settlement for the batched write. One that cannot be queued
        (the caller was cancelled while settlements backed up, or the writes
        failed for good) is kept for the last try at exit, not dropped."""
        try:
            self._settles.add_nowait(settlement)
        except QueueFull:
            try:
                await self._settles.add(settlement)
            except BaseException:
                self._late.append(settlement)
                raise
        except PoolClosed:
            self._late.append(settlement)
        await cancel_shielded_checkpoint()

    async def _settle_batch(self, batch: list[int | Failure]) -> list[None]:
        done = [entry for entry in batch if isinstance(entry, int)]
        failed = [entry for entry in batch if isinstance(entry, Failure)]
        acked, requeued, buried = await self._run(
            self._live().settle, self.queue, self.consumer, done, failed
        )
        self._counts.acked += acked
        self._counts.failed += requeued
        self._counts.buried += buried
        return [None] * len(batch)
