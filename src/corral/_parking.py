"""Parking: idle tasks (a pool's workers, a batcher's flushers, a Queue's
getters and its join() calls) wait here to be handed work, first parked, first
woken.

At most one wake-up is in flight by the owner's choice: :attr:`Parking.waking`
is True from :meth:`Parking.unpark` until the woken task runs, and owners
check it before waking another. The woken task passes the wake-up on if work
is left, so a burst wakes only as many tasks as keep up with it (the chained
hand-off that makes a pool cheaper than one wake-up per item).

Cancel-safe: a task interrupted while parked leaves the line; one interrupted
after it was handed a value gives the value back through ``give_back``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio

__all__ = ["TIMED_OUT", "Parking"]

V = TypeVar("V")


class _TimedOut:
    __slots__ = ()

    def __repr__(self) -> str:
        return "TIMED_OUT"


TIMED_OUT = _TimedOut()  # what park() returns when its deadline passed


class _Spot(Generic[V]):
    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.value: V | None = None


class Parking(Generic[V]):
    """The parked tasks; ``give_back(value)`` takes back a value handed to a
    task that was interrupted before it could use it."""

    __slots__ = ("_give_back", "spots", "waking")

    def __init__(self, give_back: Callable[[V], None] | None = None) -> None:
        # the parked tasks' spots, first parked first. Read it, never change
        # it: a deque is truthy when a task is parked, at no call's cost (the
        # per-item paths ask this instead of len(parking))
        self.spots: deque[_Spot[V]] = deque()
        self._give_back = give_back
        self.waking = False  # a task was unparked (or started) and has not run yet

    def __len__(self) -> int:
        return len(self.spots)

    def unpark(self, value: V | None = None) -> None:
        """Wake the first parked task (there must be one), handing it ``value``."""
        spot = self.spots.popleft()
        spot.value = value
        self.waking = True
        spot.event.set()

    def unpark_all(self) -> None:
        """Wake every parked task with no value (the owner is closing)."""
        while self.spots:
            self.spots.popleft().event.set()
        self.waking = False

    async def park(self, deadline: float = math.inf) -> V | _TimedOut | None:
        """Wait to be woken: what was handed over (None if nothing), or
        :data:`TIMED_OUT` when ``deadline`` passed first."""
        spot: _Spot[V] = _Spot()
        self.spots.append(spot)
        try:
            if deadline == math.inf:  # no timer: a cancel scope costs more than the wait
                await spot.event.wait()
            else:
                with anyio.CancelScope(deadline=deadline):
                    await spot.event.wait()
        except BaseException:
            if not spot.event.is_set():
                self.spots.remove(spot)
            else:
                self.waking = False
                if spot.value is not None and self._give_back is not None:
                    self._give_back(spot.value)
            raise
        if not spot.event.is_set():
            self.spots.remove(spot)
            return TIMED_OUT
        self.waking = False
        return spot.value
