"""The pool's two scheduling seams: which queued item a worker takes next (the
queue discipline), and how many workers may run (the worker limit).

A pool asks only these objects, so that another discipline or another limit is
a new class here, not a change to the worker loop. A pool starts with a
:class:`FifoQueue` (or a :class:`ScheduledQueue` if it has ``key=``) and
moves its entries to a :class:`ScheduledQueue` at the first ``priority``
other than 0: a pool that never uses them pays nothing for them.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Hashable, Iterable
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["NO_KEY", "Discipline", "FifoQueue", "ScheduledQueue", "WorkerLimit"]

E = TypeVar("E", bound=tuple[Any, ...])  # an entry: its index first


class _NoKey:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_KEY"


NO_KEY: Any = _NoKey()  # an entry without a key (None is a key like any other)


class Discipline(Protocol[E]):
    """What the pool needs of its queue of entries waiting for a worker.

    ``len`` (and truth) counts the entries a worker may take now.
    """

    def put(self, entry: E, /) -> None:
        """Queue a new entry (priority 0, no key)."""

    def take(self) -> E:
        """Remove and return the entry to run next (the queue is not empty)."""

    def put_back(self, entry: E, /) -> None:
        """Return an entry that was taken but not run: it runs next."""

    def remove(self, index: int, /) -> E | None:
        """Take out the queued entry with this index (a cancelled job), if queued."""

    def moved(self) -> Discipline[E]:
        """A new queue holding every entry of this one, which is left empty."""

    def clear(self) -> None: ...

    def __len__(self) -> int: ...


class FifoQueue(deque[E]):
    """First in, first out: entries run in submission order.

    The deque's own methods under the discipline's names, so that taking an
    entry costs no more than ``popleft`` (the per-item path).
    """

    __slots__ = ()

    put = deque.append
    take = deque.popleft
    put_back = deque.appendleft

    def remove(self, index: int, /) -> E | None:  # type: ignore[override]
        for position, entry in enumerate(self):
            if entry[0] == index:
                del self[position]
                return entry
        return None

    def moved(self) -> FifoQueue[E]:
        new = FifoQueue(self)
        self.clear()
        return new


class ScheduledQueue(Generic[E]):
    """Priority and per-key order.

    Entries a worker may take wait in a heap by ``(priority, index)``: the
    lowest priority first, equal ones in submission order. An entry with a key
    is ready only while fewer than ``per_key`` entries of its key are ready or
    running; the others wait in their key's line, in submission order, and
    hold no worker. :meth:`finished` (the pool calls it as a keyed entry gets
    its outcome) moves the next of its key into the heap.
    """

    __slots__ = ("_heap", "_keys", "_lines", "_taken", "per_key", "waiting")

    def __init__(self, per_key: int = 1, entries: Iterable[E] = ()) -> None:
        self.per_key = per_key
        self._heap: list[tuple[float, int, E]] = [(0, entry[0], entry) for entry in entries]
        heapq.heapify(self._heap)
        self._lines: dict[Hashable, deque[tuple[float, int, E]]] = {}  # waiting for a key
        self._taken: dict[Hashable, int] = {}  # a key's entries ready or running
        self._keys: dict[int, Hashable] = {}  # the key of each entry ready or running
        self.waiting = 0  # entries waiting for their key

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def busy_keys(self) -> int:
        """Keys with an entry ready or running."""
        return len(self._taken)

    def put(self, entry: E, priority: float = 0, key: Hashable = NO_KEY) -> None:
        index = entry[0]
        if key is not NO_KEY:
            taken = self._taken.get(key, 0)
            if taken >= self.per_key or key in self._lines:
                self._lines.setdefault(key, deque()).append((priority, index, entry))
                self.waiting += 1
                return
            self._taken[key] = taken + 1
            self._keys[index] = key
        heapq.heappush(self._heap, (priority, index, entry))

    def take(self) -> E:
        return heapq.heappop(self._heap)[2]

    def put_back(self, entry: E) -> None:
        # before everything, -inf priorities included (no index is -1)
        heapq.heappush(self._heap, (-math.inf, -1, entry))

    def finished(self, index: int) -> None:
        """The entry ``index`` got its outcome: its key goes to the next in line."""
        key = self._keys.pop(index, NO_KEY)
        if key is NO_KEY:
            return
        line = self._lines.get(key)
        if line:
            waiting = line.popleft()
            if not line:
                del self._lines[key]
            self.waiting -= 1
            self._keys[waiting[1]] = key
            heapq.heappush(self._heap, waiting)
            return
        taken = self._taken[key] - 1
        if taken:
            self._taken[key] = taken
        else:
            del self._taken[key]

    def remove(self, index: int) -> E | None:
        for position, (_, _, entry) in enumerate(self._heap):
            if entry[0] == index:
                self._heap[position] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                self.finished(index)
                return entry
        for key, line in self._lines.items():
            for waiting in line:
                if waiting[1] == index:
                    line.remove(waiting)
                    if not line:
                        del self._lines[key]
                    self.waiting -= 1
                    return waiting[2]
        return None

    def moved(self) -> ScheduledQueue[E]:
        new: ScheduledQueue[E] = ScheduledQueue(self.per_key)
        for name in ("_heap", "_lines", "_taken", "_keys", "waiting"):
            setattr(new, name, getattr(self, name))
        self._heap, self._lines, self._taken, self._keys = [], {}, {}, {}
        self.waiting = 0
        return new

    def clear(self) -> None:
        self._heap.clear()
        self._lines.clear()
        self._taken.clear()
        self._keys.clear()
        self.waiting = 0


class WorkerLimit:
    """How many workers may run at once: ``workers``; none start while paused."""

    __slots__ = ("bound", "workers")

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.bound = workers  # what allows() reads: 0 while paused

    def allows(self, started: int) -> bool:
        """Whether one more worker may start, with ``started`` running."""
        return started < self.bound
