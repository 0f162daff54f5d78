"""Retry: a retry policy that is also middleware, and its pure backoff function."""

from __future__ import annotations

import logging
import math
import numbers
import random
import re
import time
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


_log = logging.getLogger("corral.retry")

# delay-seconds (RFC 9110, section 10.2.3) is whole digits; "1.5" is taken too
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+", re.ASCII)


def _parse_retry_after(value: object, now: Callable[[], float] = time.time) -> float:
    """Seconds to wait for a ``retry_after`` value, as a server or a client meant it.

    ``value`` may be a real number of seconds (any ``numbers.Number`` that
    converts to a float, bool excepted), a ``datetime.timedelta``, or the text of
    an HTTP ``Retry-After`` header as ``str`` or ``bytes``: decimal seconds
    (``"120"``, ``"1.5"``, surrounding whitespace allowed) or an HTTP-date in
    any of RFC 9110's three formats (a date without a zone is UTC), meaning the
    date minus ``now()`` (seconds since the epoch), or 0 when it has passed. A
    value too large for a float is ``math.inf``. Raises ``ValueError`` saying
    why for a negative or NaN value or text that is neither, ``TypeError`` for
    any other type (bool included).
    """
    if isinstance(value, bool):
        raise TypeError("a bool, not a number of seconds")
    if isinstance(value, numbers.Number):
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except OverflowError:
            seconds = math.inf
        except (TypeError, ValueError) as error:
            raise TypeError(f"not a real number of seconds ({error})") from None
    elif isinstance(value, (str, bytes, bytearray)):
        text = value.strip() if isinstance(value, str) else bytes(value).strip().decode("latin-1")
        if _SECONDS.fullmatch(text):
            seconds = float(text)  # a string of 400 digits is inf, never an error
        else:
            return _seconds_until(text, now)
    else:
        # imported here: datetime is only needed when a hint is not a number
        from datetime import timedelta

        if not isinstance(value, timedelta):
            raise TypeError(
                "wanted seconds, a timedelta, or a Retry-After header's seconds or "
                "HTTP-date as str or bytes"
            )
        seconds = value.total_seconds()
    if math.isnan(seconds):
        raise ValueError("not a number (NaN)")
    if seconds < 0:
        raise ValueError("negative")
    return seconds


def _seconds_until(text: str, now: Callable[[], float]) -> float:
    """Seconds from ``now()`` to the HTTP-date ``text``, 0 if it has passed."""
    # imported here: parsing a date happens only after a failure, and email.utils
    # costs tens of milliseconds at import
    from datetime import UTC
    from email.utils import parsedate_to_datetime

    try:
        date = parsedate_to_datetime(text)
        if date.tzinfo is None:  # asctime and "-0000" carry no zone: UTC (RFC 9110)
            date = date.replace(tzinfo=UTC)
        at = date.timestamp()
    except (TypeError, ValueError, OverflowError) as error:
        why = str(error)
        detail = "" if why.startswith("Invalid date value") else f" ({why})"
        raise ValueError(f"neither decimal seconds nor an HTTP-date{detail}") from None
    # The one wall-clock reading in corral: an HTTP-date names a moment of the
    # wall clock, which anyio.current_time() (a monotonic clock, or a test's
    # mock clock) cannot be compared with. The difference becomes a duration.
    return max(0.0, at - now())


def retry_after_of(error: Exception) -> object:
    """The Retry-After an error carries, as it came, or None.

    Looked for, in order: the error's ``retry_after`` attribute (corral's own
    convention); the ``Retry-After`` header of ``error.response`` (httpx's
    ``HTTPStatusError``, requests' ``HTTPError``); ``error.headers`` (aiohttp's
    ``ClientResponseError``). Duck-typed: no HTTP library is imported.
    """
    value = getattr(error, "retry_after", None)
    if value is not None:
        return value
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) if response is not None else None
    if headers is None:
        headers = getattr(error, "headers", None)
    if headers is None:
        return None
    get = getattr(headers, "get", None)
    if not callable(get):
        return None  # not a mapping after all: no hint
    return get("Retry-After") or get("retry-after")


def read_retry_after(
    error: Exception, where: Callable[[Exception], object] = retry_after_of
) -> float | None:
    """Seconds the Retry-After found by ``where(error)`` asks to wait, if any.

    Read by :func:`_parse_retry_after`, only after a failure. A value that
    cannot be read is logged at DEBUG to ``corral.retry`` and ignored (None);
    so is an exception ``where`` raises (it runs on every failed attempt,
    whatever the error, and must not replace it). One too large for a float is
    infinite, which no deadline or wait can honour: the item is not retried.
    """
    try:
        value = where(error)
    except Exception as why:  # noqa: BLE001 - the attempt's own error must propagate
        _log.debug("ignoring retry_after of %s: %r raised %r", type(error).__name__, where, why)
        return None
    if value is None:
        return None
    try:
        return _parse_retry_after(value)
    except (TypeError, ValueError) as why:
        _log.debug("ignoring retry_after=%r of %s: %s", value, type(error).__name__, why)
        return None


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
    drawn uniformly from ``[0, that]`` unless ``wait_jitter=False``.

    An error with a ``retry_after`` attribute waits at least that long, even
    beyond ``wait_max`` (pass ``cap_retry_after=True`` to cap such waits at
    ``wait_max`` too). It may be a number of seconds, a
    ``datetime.timedelta``, or an HTTP ``Retry-After`` header's value copied
    as it came, ``str`` or ``bytes``: seconds (``"120"``, also ``"1.5"``) or an
    HTTP-date (``"Wed, 21 Oct 2026 07:28:00 GMT"``, any of RFC 9110's three
    formats; the wait lasts until that time by the wall clock, none if it has
    passed). A value that cannot be read is ignored and logged at DEBUG to
    ``corral.retry``; an infinite one ends the retrying.

    ``deadline`` bounds one item's total time, waits included: a running
    attempt is cut off at the deadline, a ``TimeoutError`` saying
    ``Retry deadline=... s passed``, and no retry is made that could not start
    before it. Cancellation is never retried, nor is any BaseException. When
    it gives up, the last attempt's error is the item's error.

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
    retry_after: Callable[[Exception], object] | None = attrs.field(default=None, kw_only=True)

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
        if self.retry_after is not None and (
            not callable(self.retry_after) or is_async_callable(self.retry_after)
        ):
            raise TypeError(
                "retry_after must be a plain function taking the error and returning "
                f"its Retry-After (seconds, a timedelta, the header's text) or None, "
                f"got {self.retry_after!r}"
            )

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
            retry_after=read_retry_after(error, self.retry_after or retry_after_of),
            cap_retry_after=self.cap_retry_after,
            uniform=uniform,
        )

    async def __call__(self, item: T, call_next: Callable[[T], Awaitable[R]]) -> R:
        if self.deadline is None:
            return await self._loop(item, call_next, math.inf)
        ends_at = anyio.current_time() + self.deadline
        with anyio.CancelScope(deadline=ends_at):
            return await self._loop(item, call_next, ends_at)
        # reached only when the deadline cancelled the loop (an error the loop
        # raises, a per-attempt TimeoutError included, passes through as it is)
        raise TimeoutError(
            f"Retry deadline={self.deadline!r} s passed (this item's total time, waits included)"
        )

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
