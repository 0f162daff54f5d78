"""Outcome (the value every item ends as) and Job (a handle on a submitted item)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Generic, Protocol, TypeVar

import anyio
import attrs

from ._errors import PoolClosed

__all__ = ["Job", "Outcome"]

T = TypeVar("T")
R = TypeVar("R")


@attrs.frozen
class Outcome(Generic[T, R]):
    """What became of one item: its result or its error, never both.

    ``index`` is the item's position (in the input for the helpers, in submission
    order for a :class:`Pool`); ``id`` is the caller's id or, by default, the
    index. ``attempts`` counts calls of the handler (more than one only under a
    retry policy or a hedge, whose every copy is a call). ``elapsed`` is the
    time in seconds from the start of the first attempt to the outcome, read
    with :func:`anyio.current_time`.

    >>> Outcome(item=2, index=0, id=0, result=4).unwrap()
    4
    """

    item: T
    index: int
    id: Hashable
    result: R | None = None
    error: Exception | None = None
    attempts: int = 1
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the handler returned (``error`` is None)."""
        return self.error is None

    def unwrap(self) -> R:
        """Return ``result``, or raise ``error`` if the item failed.

        :raises Exception: the item's ``error`` itself, not wrapped.
        """
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


# A private fast constructor for the worker's hot path. attrs' __init__ for a
# frozen class sets each field through object.__setattr__ by name; this makes
# the same object (same class, every slot set, so equal to what
# ``Outcome(...)`` makes) by calling the slots' own descriptors.
_FIELDS = ("item", "index", "id", "result", "error", "attempts", "elapsed")
assert tuple(field.name for field in attrs.fields(Outcome)) == _FIELDS
_new = object.__new__
(
    _set_item,
    _set_index,
    _set_id,
    _set_result,
    _set_error,
    _set_attempts,
    _set_elapsed,
) = (Outcome.__dict__[name].__set__ for name in _FIELDS)


def _make_outcome(
    item: T,
    index: int,
    id: Hashable,
    result: R | None,
    error: Exception | None,
    attempts: int,
    elapsed: float,
) -> Outcome[T, R]:
    """``Outcome(item, index, id, result, error, attempts, elapsed)``, faster."""
    outcome: Outcome[T, R] = _new(Outcome)
    _set_item(outcome, item)
    _set_index(outcome, index)
    _set_id(outcome, id)
    _set_result(outcome, result)
    _set_error(outcome, error)
    _set_attempts(outcome, attempts)
    _set_elapsed(outcome, elapsed)
    return outcome


class _Owner(Protocol):
    """What a job's pool or batcher does for :meth:`Job.cancel`."""

    def _cancel_job(self, job: Job[Any, Any], /) -> bool: ...


class Job(Generic[T, R]):
    """Handle on one item submitted to a :class:`Pool` or a :class:`Batcher`.

    Returned by ``Pool.submit``, ``Pool.submit_nowait`` and
    ``Batcher.submit_nowait``. ``item`` is the
    item, ``index`` its submission index, ``id`` the id given to ``submit``
    (default: the index). Creating a job costs no event: one is made only when
    somebody awaits :meth:`wait` before the outcome exists.
    """

    __slots__ = ("_ended", "_event", "_outcome", "_owner", "id", "index", "item")

    def __init__(self, item: T, index: int, id: Hashable, owner: _Owner | None = None) -> None:
        self.item: T = item
        self.index: int = index
        self.id: Hashable = id
        self._outcome: Outcome[T, R] | None = None
        self._event: anyio.Event | None = None
        self._ended = False  # True once the job can no longer get an outcome
        self._owner = owner  # the pool or batcher that can cancel it

    @property
    def done(self) -> bool:
        """True once the item has its outcome (False also for a job that ended
        unfinished)."""
        return self._outcome is not None

    @property
    def outcome(self) -> Outcome[T, R] | None:
        """The item's outcome, or None while it is queued or running."""
        return self._outcome

    async def wait(self) -> Outcome[T, R]:
        """Wait for the item's outcome and return it.

        Returns as soon as the outcome is recorded (an async ``on_outcome``
        may still be running). Always a checkpoint. Cancelling the wait does
        not affect the item.

        :raises PoolClosed: the pool exited without giving this item an outcome
            (it is in ``pool.unfinished``).
        """
        if self._outcome is None and not self._ended and self._event is None:
            self._event = anyio.Event()
        if self._event is not None and self._outcome is None and not self._ended:
            await self._event.wait()
        else:
            await anyio.lowlevel.checkpoint()
        if self._outcome is None:
            raise PoolClosed(
                f"job {self.id!r} ended unfinished: its pool exited before the item "
                "had an outcome (see pool.unfinished)"
            )
        return self._outcome

    def cancel(self) -> bool:
        """Cancel the item: a queued item never starts; a running one's attempt
        is cancelled at its next checkpoint and not retried (a plain handler's
        thread cannot be interrupted: its call runs to its end, and its result
        is dropped). Either way the outcome's ``error`` is a
        :class:`~corral.JobCancelled`, recorded at once for a queued item and
        when the attempt has stopped for a running one.

        Returns True if the job was cancelled, False if it already had its
        outcome (or ended unfinished, or is already being cancelled). Not a
        checkpoint; safe to call from any task of the event loop.
        """
        if self._outcome is not None or self._ended or self._owner is None:
            return False
        return self._owner._cancel_job(self)

    def _abandon(self) -> None:
        """Mark the job unfinished for good and wake its waiters."""
        self._ended = True
        if self._event is not None:
            self._event.set()

    def __repr__(self) -> str:
        state = "done" if self._outcome is not None else "pending"
        return f"<Job id={self.id!r} item={self.item!r} {state}>"
