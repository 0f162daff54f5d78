"""A simulated service whose concurrency the client does not know, for
``bench_adaptive.py`` and the tests of ``corral.AdaptiveLimiter``.

It serves ``capacity`` requests at once, each for ``service_time`` seconds of
the event loop's clock (on trio's ``MockClock`` a run is exact and takes
little real time), and what it does with more requests depends on its shape:

- ``"queue"``: up to ``queue`` more wait in a FIFO line (``queue`` defaults
  to ``capacity``); beyond that a request is refused with :class:`Overloaded`.
- ``"reject"``: no line: a request beyond ``capacity`` is refused.
- ``"smooth"``: nothing is refused; a request that arrives while ``n``
  requests are in service (itself included) takes
  ``service_time * max(1, n / capacity)``: latency grows smoothly with load
  and throughput stays at ``capacity / service_time`` beyond it.
- ``"noisy"``: as ``"queue"``, with each service time drawn from a
  log-normal distribution of mean ``service_time`` (sigma 0.5, seeded).

A refusal takes ``reject_time`` (default a tenth of ``service_time``: the
round trip without the work). :meth:`Service.set_capacity` changes the
capacity mid-run: requests in service above a lowered capacity finish, and
a raised one starts waiting requests at once.

Every call is recorded with the loop's clock: each success as
``(end, latency, bare)`` (``bare``: its service time with no load) in
:attr:`Service.successes`, each refusal's end in :attr:`Service.refusals`.
Only anyio and the standard library are used.
"""

from __future__ import annotations

import math
import random
from collections import deque

import anyio

__all__ = ["SHAPES", "Overloaded", "Service"]

SHAPES = ("queue", "reject", "smooth", "noisy")
_SIGMA = 0.5  # the noisy shape's log-normal sigma


class Overloaded(Exception):
    """The service refused a request: it was full (a real one would answer
    503 or 429)."""


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False


class Service:
    """A service with a hidden concurrency ``capacity`` (see the module's docstring)."""

    def __init__(
        self,
        capacity: int,
        service_time: float,
        *,
        shape: str = "queue",
        queue: int | None = None,
        reject_time: float | None = None,
        seed: int = 0,
    ) -> None:
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
        if capacity < 1 or service_time <= 0:
            raise ValueError("capacity must be >= 1 and service_time > 0")
        self.shape = shape
        self.capacity = capacity
        self.service_time = service_time
        self.queue = 0 if shape in ("reject", "smooth") else capacity if queue is None else queue
        self.reject_time = service_time / 10 if reject_time is None else reject_time
        self.busy = 0  #: requests in service now
        self.attempts = 0  #: calls made
        self.successes: list[tuple[float, float, float]] = []  #: (end, latency, bare) each
        self.refusals: list[float] = []  #: when each refusal was answered
        self._line: deque[_Waiter] = deque()
        self._random = random.Random(seed)

    @property
    def waiting(self) -> int:
        """Requests in the line now."""
        return len(self._line)

    def set_capacity(self, capacity: int) -> None:
        """Serve ``capacity`` requests at once from now on."""
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._start_waiting()

    async def call(self) -> None:
        """One request: returns when served, or raises :class:`Overloaded`."""
        start = anyio.current_time()
        self.attempts += 1
        if self.shape == "smooth" or (self.busy < self.capacity and not self._line):
            self.busy += 1
        elif len(self._line) < self.queue:
            await self._wait_in_line()
        else:
            await anyio.sleep(self.reject_time)
            self.refusals.append(anyio.current_time())
            raise Overloaded(f"{self.busy} in service, {len(self._line)} waiting")
        try:
            bare = self._bare_time()
            load = self.busy / self.capacity if self.shape == "smooth" else 1.0
            await anyio.sleep(bare * max(1.0, load))
        finally:
            self.busy -= 1
            self._start_waiting()
        end = anyio.current_time()
        self.successes.append((end, end - start, bare))

    async def _wait_in_line(self) -> None:
        waiter = _Waiter()
        self._line.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:  # handed a place it will not use: pass it on
                self.busy -= 1
                self._start_waiting()
            else:
                self._line.remove(waiter)
            raise

    def _start_waiting(self) -> None:
        while self._line and self.busy < self.capacity:
            waiter = self._line.popleft()
            waiter.granted = True
            self.busy += 1
            waiter.event.set()

    def _bare_time(self) -> float:
        if self.shape != "noisy":
            return self.service_time
        mu = math.log(self.service_time) - _SIGMA**2 / 2  # so that the mean is service_time
        return self._random.lognormvariate(mu, _SIGMA)
