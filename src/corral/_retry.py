"""Retry: a retry policy that is also middleware, and its pure backoff function."""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import attrs

from ._handlers import is_async_callable
from ._validate import check_bool, check_int, check_number

__all__ = ["Retry", "backoff"]

T = TypeVar("T")
R = TypeVar("R")

ExceptionFilter = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]


def backoff(
    retry: int,
    *,
    wait_initial: float,
    wait_max: float,
    wait_exp_base: float,
    jitter: bool,
    retry_after: float | None = None,
    cap_retry_after: bool = False,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait before retry number ``retry`` (1 for the first retry).

    ``min(wait_max, wait_initial * wait_exp_base ** (retry - 1))``, drawn
    uniformly from ``[0, that]`` with ``jitter`` ("full jitter"). A server's
    ``retry_after`` hint raises the wait to at least that many seconds, beyond
    ``wait_max`` unless ``cap_retry_after``. Pure: the randomness comes in
    through ``uniform``.

    >>> backoff(3, wait_initial=0.1, wait_max=10.0, wait_exp_base=2.0, jitter=False)
    0.4
    >>> backoff(1, wait_initial=0.1, wait_max=10.0, wait_exp_base=2.0, jitter=False,
    ...         retry_after=30.0)
    30.0
    """
    try:
        ceiling = min(wait_max, wait_initial * wait_exp_base ** (retry - 1))
    except OverflowError:
        ceiling = wait_max if wait_initial > 0 else 0.0
    delay = uniform(0.0, ceiling) if jitter and ceiling > 0 else ceiling
    if retry_after is not None:
        hint = min(retry_after, wait_max) if cap_retry_after else retry_after
        delay = max(delay, hint)
    return delay


def _retry_after(error: Exception) -> float | None:
    """The error's numeric ``retry_after`` attribute in seconds, if it has one.

    Any real number counts (int, float, Fraction); one too large for a float is
    infinite, which no deadline or wait can honour: the item is not retried.
    """
    value = getattr(error, "retry_after", None)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if math.isnan(seconds) or seconds < 0:
        return None
    return seconds


def check_on(value: object, name: str = "on") -> object:
    """Return ``value`` if it is an exception filter; else raise naming ``name``."""

    def is_exception_type(obj: object) -> bool:
        return isinstance(obj, type) and issubclass(obj, Exception)

    if is_exception_type(value):
        return value
    if isinstance(value, tuple) and value and all(is_exception_type(t) for t in value):
        return value
    if isinstance(value, (type, tuple)):
        raise TypeError(
            f"{name} must be an Exception subclass, a tuple of them, or a predicate "
            f"taking the exception; got {value!r} (cancellation and other "
            "BaseExceptions are never retried)"
        )
    if not callable(value):
        raise TypeError(
            f"{name} must be an Exception subclass, a tuple of them, or a predicate "
            f"taking the exception; got {value!r}"
        )
    if is_async_callable(value):
        raise TypeError(
            f"{name} must be a plain predicate, got the async function {value!r} "
            "(its coroutine would always count as true)"
        )
    return value


def matches(on: ExceptionFilter, error: Exception) -> bool:
    """Whether ``error`` matches the exception filter ``on``."""
    if isinstance(on, (type, tuple)):
        return isinstance(error, on)
    return bool(on(error))


@attrs.frozen
class Retry:
    """Call the handler again when it fails, with exponential backoff.

    ``attempts`` counts the first call: ``Retry(attempts=3)`` makes at most three
    calls per item. A failure is retried when it matches ``on`` (an exception
    type, a tuple of them, or a predicate ``on(exc) -> bool``). The wait before
    retry *k* is ``min(wait_max, wait_initial * wait_exp_base ** (k - 1))``,
    drawn uniformly from ``[0, that]`` unless ``wait_jitter=False``. An error
    with a numeric ``retry_after`` attribute (seconds, e.g. from an HTTP 429's
    ``Retry-After``) waits at least that long, even beyond ``wait_max``; pass
    ``cap_retry_after=True`` to cap such waits at ``wait_max`` too.

    ``deadline`` bounds one item's total time, waits included: a running
    attempt is cut off at the deadline (a ``TimeoutError``) and no retry is
    made that could not start before it. Cancellation is never retried, nor is
    any BaseException. When it gives up, the last attempt's error is the
    item's error.

    Used as ``retry=Retry(...)`` on a pool or helper; it is also a
    :class:`~corral.Middleware` and can stand in ``middleware=[...]``. It
    waits between attempts with :func:`anyio.sleep` (as ``retry=`` it wraps
    ``limiter``, so no capacity slot is held meanwhile); a cancellation
    during an attempt or a wait propagates at once. Bad arguments raise
    ``TypeError`` or ``ValueError`` naming the parameter.

    >>> Retry(attempts=5, on=ConnectionError, wait_initial=0.5).attempts
    5
    """

    attempts: int = attrs.field(default=3)
    on: ExceptionFilter = attrs.field(default=Exception, kw_only=True)
    wait_initial: float = attrs.field(default=0.1, kw_only=True)
    wait_max: float = attrs.field(default=10.0, kw_only=True)
    wait_exp_base: float = attrs.field(default=2.0, kw_only=True)
    wait_jitter: bool = attrs.field(default=True, kw_only=True)
    deadline: float | None = attrs.field(default=None, kw_only=True)
    cap_retry_after: bool = attrs.field(default=False, kw_only=True)

    def __attrs_post_init__(self) -> None:
        check_int("attempts", self.attempts, minimum=1)
        check_on(self.on)
        check_number("wait_initial", self.wait_initial)
        check_number("wait_max", self.wait_max, finite=False)
        check_number("wait_exp_base", self.wait_exp_base)
        if self.wait_exp_base < 1:
            raise ValueError(f"wait_exp_base must be >= 1, got {self.wait_exp_base!r}")
        check_bool("wait_jitter", self.wait_jitter)
        if self.deadline is not None:
            check_number("deadline", self.deadline, positive=True)
        check_bool("cap_retry_after", self.cap_retry_after)

    def should_retry(self, error: Exception) -> bool:
        """Whether ``error`` matches ``on`` (an exception a predicate raises
        propagates)."""
        return matches(self.on, error)

    def wait_before(self, retry: int, error: Exception) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first) after
        ``error``, jitter drawn; computes, never waits."""
        return self._wait(retry, error, random.uniform)

    def _wait(
        self, retry: int, error: Exception, uniform: Callable[[float, float], float]
    ) -> float:
        """:meth:`wait_before` with the jitter drawn by ``uniform(low, high)``."""
        return backoff(
            retry,
            wait_initial=self.wait_initial,
            wait_max=self.wait_max,
            wait_exp_base=self.wait_exp_base,
            jitter=self.wait_jitter,
            retry_after=_retry_after(error),
            cap_retry_after=self.cap_retry_after,
            uniform=uniform,
        )

    async def __call__(self, item: T, call_next: Callable[[T], Awaitable[R]]) -> R:
        if self.deadline is None:
            return await self._loop(item, call_next, math.inf)
        ends_at = anyio.current_time() + self.deadline
        with anyio.fail_after(self.deadline):
            return await self._loop(item, call_next, ends_at)

    async def _loop(self, item: T, call_next: Callable[[T], Awaitable[R]], ends_at: float) -> R:
        retry = 0
        while True:
            try:
                return await call_next(item)
            except Exception as error:
                retry += 1
                if retry >= self.attempts or not self.should_retry(error):
                    raise
                delay = self.wait_before(retry, error)
                if anyio.current_time() + delay >= ends_at:
                    raise  # the retry could not start before the deadline
            await anyio.sleep(delay)
