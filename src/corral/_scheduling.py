"""The pool's two scheduling seams: which queued item a worker takes next (the
queue discipline), and how many workers may run (the concurrency limit).

A pool asks only these objects, so that another discipline (priority, per-key
order) or another limit (resizing, pausing, an adaptive limit) is a new class
here, not a change to the worker loop.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol, TypeVar

__all__ = ["Discipline", "FifoQueue", "WorkerLimit"]

E = TypeVar("E")


class Discipline(Protocol[E]):
    """What the pool needs of its queue of entries waiting for a worker."""

    def put(self, entry: E, /) -> None:
        """Queue a new entry."""

    def take(self) -> E:
        """Remove and return the entry to run next (the queue is not empty)."""

    def put_back(self, entry: E, /) -> None:
        """Return an entry that was taken but not run: it runs next."""

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


class WorkerLimit:
    """How many workers may run at once: ``workers``."""

    __slots__ = ("workers",)

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def allows(self, started: int) -> bool:
        """Whether one more worker may start, with ``started`` running."""
        return started < self.workers
