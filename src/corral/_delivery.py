"""Delivery, one entry of a durable queue handed to a consumer, and
Deliveries, the iteration the queue sources share.

Shared by ``corral.redis.StreamSource`` and ``corral.sqlite.QueueSource``,
so that a handler written for one takes the other unchanged. Nothing here
needs an optional extra.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any, AnyStr, Generic, Self

import anyio
import attrs
from anyio.lowlevel import checkpoint

from ._errors import PoolClosed
from ._outcome import Outcome

__all__ = ["Deliveries", "Delivery"]


@attrs.frozen
class Delivery(Generic[AnyStr]):
    """One queue entry handed to this consumer.

    ``stream`` is the name of the queue it came from (a Redis stream's key, or
    a SQLite queue's name), ``id`` its ID there. ``fields`` are the entry's
    field/value pairs, as ``str`` (or ``bytes``, as a Redis client decodes
    them). ``deliveries`` counts how many times the entry has been handed
    out, this time included: more than 1 means an earlier attempt failed or
    its consumer died, so the handler may be running it a second time (make it
    idempotent).
    """

    stream: str
    id: str
    fields: Mapping[AnyStr, AnyStr]
    deliveries: int


class Deliveries(Generic[AnyStr]):
    """What the queue sources share: the iteration and its bookkeeping.

    Entries read ahead wait in ``_buffer``; one handed out is counted in
    ``_in_flight`` (by ID: the same entry may be out twice, after its lease
    or claim ran out) until :meth:`settle` takes it back (``_settling``).
    A subclass says whether its block runs (``_is_open``), fetches more
    entries or waits when the buffer is empty (``_fetch``, which may set
    ``_stopping``), and names its queue (``_queue_name``). ``_wait`` sleeps
    until settle frees room, ``stop()`` is called, a subclass calls
    ``_wake_up``, or the time given passes; one of those that came while the
    source was busy elsewhere (``_woken``) makes the next wait return at once.
    """

    max_in_flight: int
    _what: str

    def _init_deliveries(self, queue_name: str) -> None:
        self._queue_name = queue_name
        self._buffer: deque[Delivery[AnyStr]] = deque()  # read ahead, not handed out yet
        self._in_flight: dict[str, int] = {}  # id -> deliveries of it handed out, unsettled
        self._in_flight_count = 0
        self._stopping = False
        self._reading = False  # one task iterates at a time
        self._wake: anyio.Event | None = None
        self._woken = False
        self._delivered = 0

    def _is_open(self) -> bool:
        raise NotImplementedError

    async def _fetch(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """End the iteration: the next ``__anext__`` (or the one waiting now,
        once its current read returns) raises ``StopAsyncIteration``.
        Deliveries already handed out can still be settled until the block
        ends. Never waits."""
        self._stopping = True
        self._wake_up()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Delivery[AnyStr]:
        if not self._is_open():
            await checkpoint()
            raise PoolClosed(f"{self!r} is not running: iterate it inside `async with source:`")
        if self._reading:
            raise anyio.BusyResourceError("reading from")
        self._reading = True
        try:
            while True:
                if self._stopping:
                    await checkpoint()  # the last step is a checkpoint too
                    raise StopAsyncIteration
                if self._buffer:
                    await checkpoint()  # a checkpoint on the fast path too, before taking it
                    if self._stopping or not self._buffer:
                        continue
                    return self._hand_out()
                await self._fetch()
        finally:
            self._reading = False

    def _hand_out(self) -> Delivery[AnyStr]:
        delivery = self._buffer.popleft()
        self._in_flight[delivery.id] = self._in_flight.get(delivery.id, 0) + 1
        self._in_flight_count += 1
        self._delivered += 1
        return delivery

    def _room(self) -> int:
        """How many more deliveries may be handed out now."""
        return self.max_in_flight - self._in_flight_count

    def _wake_up(self) -> None:
        self._woken = True
        if self._wake is not None:
            self._wake.set()

    async def _wait(self, seconds: float | None) -> None:
        """Until settle frees room, stop() or ``_wake_up``, or ``seconds``
        pass (None: no limit)."""
        if self._woken:
            self._woken = False
            return
        self._wake = anyio.Event()
        try:
            with anyio.move_on_after(math.inf if seconds is None else seconds):
                await self._wake.wait()
        finally:
            self._wake = None
            self._woken = False

    async def _settling(self, outcome: Outcome[Delivery[AnyStr], Any]) -> Delivery[AnyStr]:
        """Take a delivery back from the pool: checked, then no longer in
        flight (its room freed) before anything is awaited."""
        if not self._is_open():
            await checkpoint()
            raise PoolClosed(
                f"{self!r} is not running: settle outcomes inside its block "
                "(enter the pool inside `async with source:`)"
            )
        delivery = outcome.item
        if not isinstance(delivery, Delivery):
            raise TypeError(f"settle takes the Outcome of a Delivery, got item {delivery!r}")
        count = self._in_flight.get(delivery.id) if delivery.stream == self._queue_name else None
        if not count:
            raise ValueError(f"{delivery!r} was not handed out by {self!r}, or already settled")
        if count == 1:
            del self._in_flight[delivery.id]
        else:
            self._in_flight[delivery.id] = count - 1
        self._in_flight_count -= 1
        self._wake_up()
        return delivery

    def _forget_deliveries(self) -> list[Delivery[AnyStr]]:
        """At exit: nothing is in flight any more; returns the entries read
        ahead and never handed out (emptying the buffer)."""
        self._in_flight.clear()
        self._in_flight_count = 0
        unread = list(self._buffer)
        self._buffer.clear()
        return unread
