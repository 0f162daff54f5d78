"""Queue: the engine's cancel-safe admission, with hand-written consumers.

Two of the engine's primitives make it: :class:`~corral._slots.Slots` is the
room (``used`` counts the items queued, those handed to a getter that has not
resumed, and room granted to a putter that has not resumed), and
:class:`~corral._parking.Parking` is the line of waiting getters. A put hands
its item straight to the first parked getter, so a getter woken for an item
gets that item (no other caller can take it in between) and getters are served
in the order they came. An item is handed over as ``(seq, item)``: ``None`` is
an item like any other, and ``seq`` numbers the puts.

A getter cancelled after it was handed an item, before it resumed, gives the
item back (``Parking``'s give-back): to the next parked getter, or into
``returned``, a heap by ``seq`` that is taken before the buffer, so that items
given back in any order come out in the order they were put. Every item in the
buffer was put after every item handed over or given back (a put hands over
only while a getter is parked, which it does only when nothing is queued).

Invariants: while items are queued (``returned`` or the buffer), no getter is
parked. ``handed`` counts the items handed to getters that have not resumed;
getters end with :class:`anyio.EndOfStream` only when the queue is closed,
nothing is queued and ``handed`` is 0, since a handed item may still come back.
"""

from __future__ import annotations

from collections import deque
from heapq import heappop, heappush
from typing import Generic, Self, TypeVar

import anyio
import attrs
from anyio.lowlevel import checkpoint

from ._errors import PoolClosed, QueueFull
from ._lifecycle import weakly
from ._parking import Parking
from ._slots import Slots
from ._validate import check_int, check_optional_str

__all__ = ["Queue", "QueueStatistics"]

T = TypeVar("T")


@attrs.frozen
class QueueStatistics:
    """A snapshot of a :class:`Queue`, from :meth:`Queue.statistics`.

    ``name`` and ``maxsize``: as given. ``queued``: items in the queue now
    (``len(queue)``). ``being_taken``: items handed to a waiting getter that has
    not resumed yet (they count against ``maxsize``, as queued items do).
    ``unfinished``: items put and not yet marked done with
    :meth:`Queue.task_done`. ``puts`` / ``gets``: items put and taken so far.
    ``waiting_putters``: tasks in ``put`` waiting for room (or granted room and
    not yet resumed). ``waiting_getters``: tasks in ``get`` waiting for an item.
    ``backpressure_waits``: calls to ``put`` that had to wait for room.
    ``closed``: whether :meth:`Queue.close` was called.
    """

    name: str | None
    maxsize: int
    queued: int
    being_taken: int
    unfinished: int
    puts: int
    gets: int
    waiting_putters: int
    waiting_getters: int
    backpressure_waits: int
    closed: bool


class Queue(Generic[T]):
    """A bounded FIFO queue for your own producer and consumer tasks, the same
    on asyncio, uvloop and trio.

    ``put`` waits for room while ``maxsize`` items are queued (backpressure);
    ``get`` waits for an item. Both are cancel-safe: if ``put`` raises, the item
    is not in the queue, and if it returns, it is; if ``get`` raises, no item was
    taken. Waiting putters and waiting getters are each served first come, first
    served, and a cancelled waiter gives its place to the next. ``put``, ``get``
    and ``join`` are always checkpoints; the ``_nowait`` twins never are. A call
    takes its place in line after that checkpoint, as ``Pool.submit`` does: of
    two tasks that call ``put`` in the same scheduling step, trio (which runs
    ready tasks in a random order) may let either in first.

    ``maxsize`` counts the items queued and those being handed to a getter that
    has not resumed yet, so ``put`` may wait a moment while ``len(queue)`` is
    below it. A getter cancelled after an item was handed to it gives the item
    back: to the next waiting getter, or into the queue in its place.

    ``task_done()`` and ``join()`` count items as :class:`asyncio.Queue` does.
    ``close()`` stops the producers: later puts raise :class:`PoolClosed`, and
    the consumers take what is left, after which ``get`` raises
    :class:`anyio.EndOfStream` and ``async for item in queue`` ends.

    A queue needs no event loop to be made and starts no task. It is not
    thread-safe: use it from the tasks of one event loop.

    >>> import anyio
    >>> async def main() -> list[int]:
    ...     queue: Queue[int] = Queue(2)
    ...     got: list[int] = []
    ...     async def consume() -> None:
    ...         async for item in queue:
    ...             got.append(item)
    ...     async with anyio.create_task_group() as tg:
    ...         tg.start_soon(consume)
    ...         for i in range(5):
    ...             await queue.put(i)  # waits while 2 items are queued
    ...         queue.close()  # the consumer takes what is left, then stops
    ...     return got
    >>> anyio.run(main)
    [0, 1, 2, 3, 4]

    :param maxsize: how many items the queue holds before ``put`` waits (>= 1).
    :param name: shown in its ``repr``, its errors and its statistics.
    """

    __slots__ = (
        "__weakref__",
        "_buffer",
        "_getters",
        "_handed",
        "_joiners",
        "_name",
        "_puts",
        "_returned",
        "_slots",
        "_unfinished",
    )

    def __init__(self, maxsize: int, *, name: str | None = None) -> None:
        self._slots = Slots(check_int("maxsize", maxsize, minimum=1))
        self._name = check_optional_str("name", name)
        self._buffer: deque[T] = deque()
        self._returned: list[tuple[int, T]] = []  # given back, by seq: taken first
        # (a weak callback: a queue and what it holds go with its last reference)
        self._getters: Parking[tuple[int, T]] = Parking(weakly(self._give_back))
        self._handed = 0  # items handed to getters that have not resumed
        self._unfinished = 0
        # the join() calls waiting (each on an event of its own, gone with its
        # call: a queue may outlive an event loop)
        self._joiners: Parking[None] = Parking()
        self._puts = 0

    @property
    def maxsize(self) -> int:
        """How many items the queue holds before ``put`` waits."""
        return self._slots.capacity

    @property
    def name(self) -> str | None:
        """The name given, shown in the ``repr``, errors and statistics."""
        return self._name

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._slots.closed

    def __len__(self) -> int:
        """The items in the queue now (not those a getter is taking)."""
        return len(self._returned) + len(self._buffer)

    def __repr__(self) -> str:
        name = "" if self._name is None else f" {self._name!r}"
        state = " closed" if self.closed else ""
        return f"<corral.Queue{name} {len(self)}/{self.maxsize}{state}>"

    def _refusal(self) -> PoolClosed:
        return PoolClosed(f"{self._describe()} is closed: it takes no more items")

    def _describe(self) -> str:
        return "queue" if self._name is None else f"queue {self._name!r}"

    def _deliver(self, item: T) -> None:
        """Room for ``item`` is held: hand it to the first waiting getter, or
        queue it. Synchronous, so the caller's put has happened when it returns."""
        self._puts += 1
        self._unfinished += 1
        if self._getters.spots:
            self._handed += 1
            self._getters.unpark((self._puts, item))
        else:
            self._buffer.append(item)

    def _give_back(self, handed: tuple[int, T]) -> None:
        """A getter was cancelled after it was handed an item: the item (its
        room still held) goes to the next getter, or is queued again in its
        place by the order of the puts."""
        if self._getters.spots:
            self._getters.unpark(handed)
        else:
            self._handed -= 1
            heappush(self._returned, handed)

    def _take(self) -> T:
        """The next queued item (there is one), its room released."""
        item = heappop(self._returned)[1] if self._returned else self._buffer.popleft()
        slots = self._slots
        if slots.waiters:
            slots.release()  # the room goes to the first waiting putter
        else:
            slots.used -= 1  # Slots.release, inlined (every get's path): nobody waits
        return item

    @property
    def _ended(self) -> bool:
        """Closed, nothing queued and nothing that may come back: getters end."""
        return self._slots.closed and not self._handed and not len(self)

    async def put(self, item: T) -> None:
        """Put ``item`` in the queue, waiting for room while it is full (behind
        the putters that came first). Always a checkpoint.

        :raises PoolClosed: the queue is closed (also if it is closed while
            this waits); the item was not put.
        """
        await checkpoint()
        if self._slots.closed:
            raise self._refusal()
        if not self._slots.take_nowait() and not await self._slots.take():
            raise self._refusal()
        self._deliver(item)

    def put_nowait(self, item: T) -> None:
        """Put ``item`` in the queue now. Never waits and is not a checkpoint.

        :raises QueueFull: the queue is full (its items and those being handed
            to getters), or putters are waiting (they come first); the item was
            not put.
        :raises PoolClosed: the queue is closed.
        """
        slots = self._slots
        if slots.closed:
            raise self._refusal()
        # Slots.take_nowait, inlined (every put's path; maxsize >= 1): room if
        # nobody waits or was granted room, and the queue is not full
        if slots.waiters or slots.granted or slots.used >= slots.capacity:
            raise QueueFull(
                f"{self._describe()} has putters waiting for room"
                if slots.waiting
                else f"{self._describe()} is full (maxsize={self.maxsize})"
            )
        slots.used += 1
        self._deliver(item)

    async def get(self) -> T:
        """Take the next item, waiting for one (behind the getters that came
        first). Always a checkpoint.

        :raises anyio.EndOfStream: the queue is closed and empty. (While an
            item handed to another getter may still come back, because that
            getter was cancelled before it resumed, this waits for it.)
        """
        await checkpoint()
        if self._returned or self._buffer:
            return self._take()
        if self._ended:
            raise anyio.EndOfStream
        handed = await self._getters.park()
        if not isinstance(handed, tuple):  # woken with nothing: the queue ended
            raise anyio.EndOfStream
        self._handed -= 1
        self._slots.release()
        if self._ended:  # the last item that might have come back was taken
            self._getters.unpark_all()
        return handed[1]

    def get_nowait(self) -> T:
        """Take the next item now. Never waits and is not a checkpoint.

        :raises anyio.WouldBlock: the queue is empty (also when it is closed,
            while an item handed to a getter may still come back).
        :raises anyio.EndOfStream: the queue is closed and empty.
        """
        if self._returned or self._buffer:
            return self._take()
        raise anyio.EndOfStream if self._ended else anyio.WouldBlock

    def task_done(self) -> None:
        """Mark one item taken from the queue as done, for :meth:`join`.

        :raises ValueError: called more times than items were put.
        """
        if self._unfinished <= 0:
            what = self._describe()
            raise ValueError(f"task_done() called more times than items were put in the {what}")
        self._unfinished -= 1
        if self._unfinished == 0 and self._joiners.spots:
            self._joiners.unpark_all()

    async def join(self) -> None:
        """Wait until no item is unfinished: every item put was marked done with
        :meth:`task_done`, those put while this waits included (as
        :meth:`asyncio.Queue.join` counts). Returns at once if none is
        unfinished. Always a checkpoint."""
        await checkpoint()
        if self._unfinished:
            await self._joiners.park()

    def close(self) -> None:
        """Take no more items. Waiting putters raise :class:`PoolClosed`; getters
        take what is queued, then ``get`` raises :class:`anyio.EndOfStream`.
        Closing again does nothing."""
        if self._slots.closed:
            return
        self._slots.close()
        if self._ended:  # (parked getters wait on until nothing may come back)
            self._getters.unpark_all()

    def statistics(self) -> QueueStatistics:
        """Where the queue stands now (a frozen snapshot)."""
        slots = self._slots
        return QueueStatistics(
            name=self._name,
            maxsize=slots.capacity,
            queued=len(self),
            being_taken=self._handed,
            unfinished=self._unfinished,
            puts=self._puts,
            gets=self._puts - len(self) - self._handed,  # every other item put was taken
            waiting_putters=len(slots.waiters) + (slots.granted > 0),
            waiting_getters=len(self._getters),
            backpressure_waits=slots.waits,
            closed=slots.closed,
        )

    def __bool__(self) -> bool:
        """Always True, empty or not (as for :class:`asyncio.Queue`): ``queue
        or Queue(10)`` must not swap an empty queue for another."""
        return True

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        """The next item; the iteration ends when the queue is closed and empty."""
        try:
            return await self.get()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
