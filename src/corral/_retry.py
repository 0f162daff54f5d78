"""Retry: a retry policy that is also middleware, and its pure backoff function."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
import random
import re
import reprlib
import time
from collections.abc import Awaitable, Callable
from types import CoroutineType
from typing import Any, ParamSpec, TypeVar, overload

import anyio
import attrs

from ._budget import RetryBudget
from ._errors import RetryError
from ._handlers import check_callable, is_async_callable
from ._validate import check_bool, check_int, check_number

__all__ = ["Retry", "backoff"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

ExceptionFilter = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]
Call = Callable[[Any], Awaitable[Any]]
# before_sleep(item, error_or_result, attempt, wait), plain or async
BeforeSleep = Callable[[Any, Any, int, float], object]


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

# how a log record shows an item: a batch or a long text is cut short
_brief = reprlib.Repr()
_brief.maxother = _brief.maxstring = 120
_brief.maxlist = _brief.maxtuple = _brief.maxset = _brief.maxdict = 8

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

    ``on_result``: a plain predicate of a result; a result for which it is
    true is retried like an error (same waits, no Retry-After), and when the
    policy gives up on it the item's error is a :class:`~corral.RetryError`
    carrying the last ``result`` and the ``attempts`` made. An exception the
    predicate raises is the item's error, not retried.

    ``before_sleep``: called as ``before_sleep(item, error_or_result, attempt,
    wait)`` before every retry (``attempt``: the call that just failed, 1 for
    the first; ``wait``: the seconds about to be waited), awaited if async. An
    exception it raises is the item's error, raised from the failure. Every
    retry is also logged at INFO, to the pool's logger (``corral.retry`` for
    a single call or as middleware).

    ``budget``: a :class:`~corral.RetryBudget`, which may be shared by several
    policies and pools. Every item's first call counts in it; a retry it
    refuses is not made: the failure is final at once, its error carries a
    note saying so, and an INFO record says so too.

    ``deadline`` bounds one item's total time, waits included: a running
    attempt is cut off at the deadline, a ``TimeoutError`` saying
    ``Retry deadline=... s passed``, and no retry is made that could not start
    before it. Cancellation is never retried, nor is any BaseException. When
    it gives up, the last attempt's error is the item's error.

    Used as ``retry=Retry(...)`` on a pool or helper; it is also a
    :class:`~corral.Middleware` and can stand in ``middleware=[...]``. On a
    single call, ``await retry.call(fn, *args, **kwargs)``; as a decorator,
    ``@retry`` makes an async function of an async or a plain one (a plain
    one runs in a worker thread, abandoned if the deadline cuts it off). It
    waits between attempts with :func:`anyio.sleep` (as ``retry=`` it wraps
    ``limiter``, so no capacity slot is held meanwhile); a cancellation
    during an attempt or a wait propagates at once. Bad arguments raise
    ``TypeError`` or ``ValueError`` naming the parameter.

    >>> Retry(attempts=5, on=ConnectionError, wait_initial=0.5).attempts
    5
    >>> @Retry(attempts=3, wait_initial=0)
    ... async def fetch(key):
    ...     return key.upper()
    >>> anyio.run(fetch, "ok")
    'OK'
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
    on_result: Callable[[Any], object] | None = attrs.field(default=None, kw_only=True)
    before_sleep: BeforeSleep | None = attrs.field(default=None, kw_only=True)
    budget: RetryBudget | None = attrs.field(default=None, kw_only=True)

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
        _check_hooks(self.on_result, self.before_sleep, self.budget)

    def should_retry(self, error: Exception) -> bool:
        """Whether ``error`` matches ``on`` (an exception a predicate raises
        propagates)."""
        return matches(self.on, error)

    def wait_before(self, retry: int, error: Exception) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first) after
        ``error``, jitter drawn; computes, never waits."""
        return self._wait(retry, error, random.uniform)

    def _wait(
        self, retry: int, error: Exception | None, uniform: Callable[[float, float], float]
    ) -> float:
        """:meth:`wait_before` with the jitter drawn by ``uniform(low, high)``
        (after a rejected result, ``error`` is None: no Retry-After)."""
        hint = (
            None if error is None else read_retry_after(error, self.retry_after or retry_after_of)
        )
        return backoff(
            retry,
            wait_initial=self.wait_initial,
            wait_max=self.wait_max,
            wait_exp_base=self.wait_exp_base,
            jitter=self.wait_jitter,
            retry_after=hint,
            cap_retry_after=self.cap_retry_after,
            uniform=uniform,
        )

    # -- the entry points: middleware, a pool's layer, a call, a decorator ---

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]], /) -> Callable[P, Awaitable[R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Callable[P, Awaitable[R]]: ...
    @overload
    def __call__(
        self, item: T, call_next: Callable[[T], Awaitable[R]], /
    ) -> CoroutineType[Any, Any, R]: ...
    def __call__(self, *args: Any) -> Any:
        """``retry(fn)`` decorates ``fn``; ``retry(item, call_next)`` is the
        middleware's coroutine (its retries logged to ``corral.retry``)."""
        if len(args) == 1:
            return self._decorate(args[0])
        if len(args) != 2:
            raise TypeError(
                f"a Retry is called with a function to decorate, or as middleware with "
                f"(item, call_next); got {len(args)} arguments"
            )
        item, call_next = args
        return self._run(item, call_next, _log)

    def _layer(
        self, call_next: Call, log: logging.Logger, clock: Callable[[], float] = anyio.current_time
    ) -> Call:
        """This policy as a layer of a pool's chain around ``call_next``,
        logging its retries to ``log`` (the pool's logger); ``clock`` is the
        event loop's (what :func:`anyio.current_time` reads)."""
        run = self._run

        async def retried(item: Any) -> Any:
            return await run(item, call_next, log, clock)

        return retried

    @overload
    async def call(
        self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R: ...
    @overload
    async def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R: ...
    async def call(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """``await fn(*args, **kwargs)`` under this policy: its result, or the
        error it gave up on. A plain ``fn`` runs in a worker thread (abandoned,
        running on, if the deadline cuts it off). The hooks see
        ``functools.partial(fn, *args, **kwargs)`` as the item; retries are
        logged to ``corral.retry``."""
        check_callable("fn", fn)
        call = _call_async if is_async_callable(fn) else _call_in_thread
        return await self._run(functools.partial(fn, *args, **kwargs), call, _log)

    def _decorate(self, fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        """``fn`` made into an async function that runs under this policy."""
        if not callable(fn):
            raise TypeError(
                f"a Retry decorates a function (and as middleware takes item, call_next), "
                f"got {fn!r}"
            )
        check_callable("fn", fn)
        call = _call_async if is_async_callable(fn) else _call_in_thread
        run = self._run

        @functools.wraps(fn)
        async def retried(*args: Any, **kwargs: Any) -> Any:
            return await run(functools.partial(fn, *args, **kwargs), call, _log)

        return retried

    # -- the loop ------------------------------------------------------------

    async def _run(
        self,
        item: T,
        call_next: Callable[[T], Awaitable[R]],
        log: logging.Logger,
        clock: Callable[[], float] = anyio.current_time,
    ) -> R:
        if self.deadline is None:
            return await self._loop(item, call_next, math.inf, log, clock)
        ends_at = clock() + self.deadline
        with anyio.CancelScope(deadline=ends_at):
            return await self._loop(item, call_next, ends_at, log, clock)
        # reached only when the deadline cancelled the loop (an error the loop
        # raises, a per-attempt TimeoutError included, passes through as it is)
        raise TimeoutError(
            f"Retry deadline={self.deadline!r} s passed (this item's total time, waits included)"
        )

    async def _loop(
        self,
        item: T,
        call_next: Callable[[T], Awaitable[R]],
        ends_at: float,
        log: logging.Logger,
        clock: Callable[[], float],
    ) -> R:
        if self.budget is not None:
            self.budget.deposit(clock())
        on_result = self.on_result
        attempt = 1
        while True:
            try:
                result = await call_next(item)
            except Exception as error:
                delay = self._after_error(item, error, attempt, ends_at, log)
                if delay is None:
                    raise
                seen: object = error
                cause: Exception = error
            else:
                if on_result is None or not on_result(result):
                    return result
                cause = RetryError(_rejected(result, attempt), result=result, attempts=attempt)
                delay = self._after_result(item, cause, attempt, ends_at, log)  # or raises cause
                seen = result
            try:
                if self.before_sleep is not None:
                    await self._before_sleep(item, seen, cause, attempt, delay)
                del seen, cause  # not kept through the wait
                await anyio.sleep(delay)
            except BaseException:
                if self.budget is not None:  # the retry was not made: give it back
                    self.budget._give_back()
                raise
            attempt += 1

    def _after_error(
        self, item: object, error: Exception, attempt: int, ends_at: float, log: logging.Logger
    ) -> float | None:
        """The wait before retrying after ``error``, or None: it is final."""
        if attempt >= self.attempts or not self.should_retry(error):
            return None
        delay = self.wait_before(attempt, error)
        return self._admit(item, error, attempt, delay, ends_at, log)

    def _after_result(
        self, item: object, rejected: RetryError, attempt: int, ends_at: float, log: logging.Logger
    ) -> float:
        """The wait before retrying after a result ``on_result`` rejects; raises
        ``rejected`` when it is final."""
        if attempt < self.attempts:
            delay = self._admit(
                item, rejected, attempt, self._wait(attempt, None, random.uniform), ends_at, log
            )
            if delay is not None:
                return delay
        raise rejected

    def _admit(
        self,
        item: object,
        failure: Exception,
        attempt: int,
        delay: float,
        ends_at: float,
        log: logging.Logger,
    ) -> float | None:
        """``delay`` if a retry may wait it, else None: it could not start before
        the deadline, or the budget refuses it (``failure`` then says so)."""
        now = anyio.current_time()
        if now + delay >= ends_at:
            return None  # the retry could not start before the deadline
        budget = self.budget
        if budget is not None and not budget.try_withdraw(now):
            failure.add_note(f"not retried: {budget._spent()}")
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "not retrying %s after attempt %d of %d %s: the retry budget is spent",
                    _brief.repr(item),
                    attempt,
                    self.attempts,
                    _what(failure),
                )
            return None
        if log.isEnabledFor(logging.INFO):
            log.info(
                "retrying %s after attempt %d of %d %s; waiting %.3g s",
                _brief.repr(item),
                attempt,
                self.attempts,
                _what(failure),
                delay,
            )
        return delay

    async def _before_sleep(
        self, item: object, seen: object, cause: Exception, attempt: int, delay: float
    ) -> None:
        """Call ``before_sleep``; what it raises is raised from ``cause``."""
        assert self.before_sleep is not None
        try:
            called = self.before_sleep(item, seen, attempt, delay)
            if inspect.isawaitable(called):
                await called
        except Exception as error:
            raise error from cause


def _what(failure: Exception) -> str:
    """How a failed attempt ended, for a log record."""
    if isinstance(failure, RetryError):
        return "returned a result on_result rejects"
    return f"failed with {failure!r}"


def _rejected(result: object, attempt: int) -> str:
    return f"on_result rejected the result of attempt {attempt}: {reprlib.repr(result)}"


async def _call_async(call: Callable[[], Awaitable[R]]) -> R:
    return await call()


async def _call_in_thread(call: Callable[[], Any]) -> Any:
    """``call()`` in a worker thread, abandoned if cancelled; an awaitable it
    returns is awaited here."""
    # boxed: the thread hands back whatever the call returned, an awaitable too
    (result,) = await anyio.to_thread.run_sync(lambda: (call(),), abandon_on_cancel=True)
    if inspect.isawaitable(result):
        result = await result
    return result


def _check_hooks(on_result: object, before_sleep: object, budget: object) -> None:
    """Check ``on_result``, ``before_sleep`` and ``budget``, naming the parameter."""
    if on_result is not None and not callable(on_result):
        raise TypeError(
            f"on_result must be a predicate taking a result (true: retry), got {on_result!r}"
        )
    if on_result is not None and is_async_callable(on_result):
        raise TypeError(
            f"on_result must be a plain predicate, got the async function {on_result!r} "
            "(its coroutine would always count as true)"
        )
    if before_sleep is not None and not callable(before_sleep):
        raise TypeError(
            "before_sleep must be a function (plain or async) taking "
            f"(item, error_or_result, attempt, wait), got {before_sleep!r}"
        )
    if budget is not None and not isinstance(budget, RetryBudget):
        raise TypeError(f"budget must be a corral.RetryBudget or None, got {budget!r}")
