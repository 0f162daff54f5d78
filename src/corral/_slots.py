"""Slots: room for a bounded number of queued items, granted in line order.

The admission primitive of every ``submit`` and ``add``: a caller takes room
at once when nobody waits and it fits (:meth:`Slots.take_nowait`), or waits in
line (:meth:`Slots.take`). Grants go to one waiter at a time, in line order,
and the next is granted only once that one has resumed: a caller that queues
its item right after ``take`` returns, with no checkpoint in between, queues
in the order it came, whatever order the scheduler resumes tasks in.

Cancel-safe: a waiter that is interrupted before its grant leaves the line; one
interrupted after it passes the grant on. Either way it holds nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import anyio

__all__ = ["Slots"]


class _Waiter:
    __slots__ = ("event", "granted", "need")

    def __init__(self, need: int) -> None:
        self.need = need
        self.granted = False
        self.event = anyio.Event()


class Slots:
    """``capacity`` units of room; ``used`` counts what is taken.

    More than ``capacity`` units at once fit only when nothing is used (they
    are in memory already). ``on_blocked`` is called when the first waiter
    does not fit: the owner may then make room sooner (a batcher flushes what
    is queued without waiting for ``max_wait``).
    """

    __slots__ = ("_on_blocked", "capacity", "closed", "granted", "used", "waiters", "waits")

    def __init__(self, capacity: int, on_blocked: Callable[[], None] | None = None) -> None:
        self.capacity = capacity
        self.used = 0
        self.waits = 0  # callers that had to wait
        self.closed = False
        # the callers waiting in line, first come first. Read it, never change
        # it (a per-item path may ask it, at no call's cost)
        self.waiters: deque[_Waiter] = deque()
        self.granted = 0  # units of ``used`` granted to a waiter that has not resumed
        self._on_blocked = on_blocked

    @property
    def waiting(self) -> bool:
        """Whether anyone waits (or was granted room and has not resumed)."""
        return bool(self.waiters) or self.granted > 0

    def fits(self, need: int) -> bool:
        # (more than capacity fits only when nothing is used)
        return self.used + need <= self.capacity or not self.used

    def take_nowait(self, need: int = 1) -> bool:
        """Take ``need`` units if nobody waits and they fit: True if taken."""
        used = self.used
        # fits(need), inlined: this is every add's and submit's path
        if self.waiters or self.granted or (used + need > self.capacity and used):
            return False
        self.used += need
        return True

    def force(self, need: int = 1) -> None:
        """Take ``need`` units whatever is used (room the owner must give)."""
        self.used += need

    async def take(self, need: int = 1) -> bool:
        """Wait in line until ``need`` units are granted: True when taken, False
        if the slots closed meanwhile (then nothing is held)."""
        self.waits += 1
        waiter = _Waiter(need)
        self.waiters.append(waiter)
        if self.waiters[0] is waiter:
            self._grant()
        try:
            await waiter.event.wait()
        except BaseException:
            self._leave(waiter)
            raise
        if waiter.granted:
            self.granted = 0
            if self.closed:
                self.used -= waiter.need  # granted, then closed: nothing is held
                return False
            self._grant()  # the next one resumes after us: no checkpoint between
            return True
        return False

    def _leave(self, waiter: _Waiter) -> None:
        """An interrupted waiter gives up its place, or passes its grant on."""
        if waiter.granted:
            self.granted = 0
            self.release(waiter.need)
        elif waiter in self.waiters:
            was_head = self.waiters[0] is waiter
            self.waiters.remove(waiter)
            if was_head:
                self._grant()

    def release(self, count: int = 1) -> None:
        """``count`` units were freed: grant them to the first waiter."""
        self.used -= count
        if self.waiters:
            self._grant()

    def resize(self, capacity: int) -> None:
        """Change ``capacity``; room it makes goes to the first waiter."""
        self.capacity = capacity
        if self.waiters:
            self._grant()

    def _grant(self) -> None:
        waiters = self.waiters
        if not waiters or self.granted or self.closed:
            return
        if self.fits(waiters[0].need):
            waiter = waiters.popleft()
            waiter.granted = True
            self.granted = waiter.need
            self.used += waiter.need
            waiter.event.set()
        elif self._on_blocked is not None:
            self._on_blocked()

    def close(self) -> None:
        """Take no more: every waiter wakes and its :meth:`take` returns False."""
        self.closed = True
        while self.waiters:
            self.waiters.popleft().event.set()
