"""corral's exceptions.

The hierarchy::

    Exception
    └── CorralError                  every error corral raises on its own behalf
        ├── FlushError               a Batcher's final flush failed; ``.items`` holds
        │                            everything that was not flushed
        ├── JobCancelled             the outcome of a job cancelled by ``job.cancel()``
        ├── CircuitOpen              an attempt refused by an open circuit breaker;
        │                            ``.retry_after``: seconds until it half-opens
        └── RetryError               a Retry gave up on a *result* (``on_result``);
                                     ``.result`` holds the last one

    anyio.WouldBlock
    └── QueueFull (+ CorralError)    ``submit_nowait`` / ``add_nowait`` on a full queue

    anyio.ClosedResourceError
    └── PoolClosed (+ CorralError)   submitting to a pool (adding to a batcher) that
                                     is not running, or waiting on a job (a submit)
                                     whose item ended unfinished (unflushed)

Errors raised by *your* handler are never wrapped: they become
``Outcome.error`` (or propagate unchanged where the API says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from ._breaker import CircuitBreaker

__all__ = [
    "CircuitOpen",
    "CorralError",
    "FlushError",
    "JobCancelled",
    "PoolClosed",
    "QueueFull",
    "RetryError",
    "attempt_timed_out",
]


class CorralError(Exception):
    """Base class of the errors corral raises on its own behalf."""


class QueueFull(CorralError, anyio.WouldBlock):
    """Raised by the ``*_nowait`` twins when the call would have to wait.

    ``Pool.submit_nowait`` raises it while ``max_pending`` items are waiting for a
    worker, ``Batcher.add_nowait`` while ``max_pending`` items are queued,
    ``Queue.put_nowait`` while the queue is full or putters wait. It is
    an :class:`anyio.WouldBlock`, so code written against anyio's memory streams
    handles it already. Nothing was enqueued when it is raised.
    """


class PoolClosed(CorralError, anyio.ClosedResourceError):
    """Raised when a pool or batcher cannot accept or finish work because it is
    not running.

    * ``submit`` / ``submit_nowait`` before ``async with pool:`` was entered or
      after the block exited (or while it is shutting down after a failure);
    * ``await job.wait()`` for a job that ended *unfinished* (the pool was
      cancelled, failed fast, or its block raised before the job ran), and
      ``await pool.join()`` on a pool that is not running or stopped first;
    * adding to a :class:`Batcher` that is not running, and
      ``await batcher.submit(x)`` when the batcher stopped before ``x`` was
      flushed (``x`` is then in ``batcher.unflushed``); likewise
      ``await batcher.flush()``;
    * iterating or settling a ``corral.redis.StreamSource`` outside its block;
    * putting into a :class:`~corral.Queue` that was closed (also while the put
      waited for room).

    It is an :class:`anyio.ClosedResourceError`.
    """


class JobCancelled(CorralError):
    """The error of an item whose job was cancelled by :meth:`Job.cancel`: it
    never started, or its running attempt was cancelled (and not retried)."""


class CircuitOpen(CorralError):
    """An attempt refused at once because its :class:`~corral.CircuitBreaker`
    is open (or half-open with its one trial call still running).

    ``retry_after`` is the number of seconds until the breaker half-opens (a
    tenth of its cooldown while it is half-open and its trial call runs), so
    a :class:`~corral.Retry` waits that long before its next attempt instead
    of hammering an open circuit. ``breaker`` is the breaker that refused
    the attempt.
    """

    retry_after: float
    breaker: CircuitBreaker | None

    def __init__(
        self, message: str, *, retry_after: float, breaker: CircuitBreaker | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.breaker = breaker


class RetryError(CorralError):
    """A :class:`~corral.Retry` with ``on_result=`` gave up on a result: the
    last attempt returned a result for which ``on_result(result)`` was true
    (attempts ran out, the deadline left no time for another, or the retry
    budget was spent).

    ``result`` is the last attempt's result; ``attempts`` the number of calls
    the policy made.
    """

    result: Any
    attempts: int

    def __init__(self, message: str, *, result: Any, attempts: int) -> None:
        super().__init__(message)
        self.result = result
        self.attempts = attempts


class FlushError(CorralError):
    """A batcher's flush that started after its block ended failed; nothing more
    will be flushed.

    ``items`` holds every item that was not flushed, in the order it was added;
    the same items are in ``batcher.unflushed``. The flush function's exception is
    the ``__cause__``.
    """

    items: Sequence[Any]

    def __init__(self, message: str, items: Sequence[Any]) -> None:
        super().__init__(message)
        self.items = items


def attempt_timed_out(seconds: float | None) -> TimeoutError:
    """The error of an attempt cut off by the per-attempt ``timeout=``."""
    return TimeoutError(f"attempt timed out after timeout={seconds!r} s")
