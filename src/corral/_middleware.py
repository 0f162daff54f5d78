"""The Middleware protocol, Timeout, and the one function that builds a chain.

A chain is built once per worker when a pool starts (never per item)::

    middleware[0] → … → retry → breaker → hedge → limiter → rate_limit → timeout → handler

This is the one place the order is decided, and why:

* user ``middleware`` sees each item once (it wraps everything, retries too);
* ``retry`` sees every failure of the item and decides whether to call again;
* ``breaker`` sees every attempt: while open it refuses one at once (a
  :class:`~corral.CircuitOpen`, which ``retry`` may wait out), before it takes
  a capacity slot or a rate-limit token;
* ``hedge`` turns one attempt into a race of copies; each copy is a call
  that passes the limiter, the rate limiter and the timeout, and counts in
  ``Outcome.attempts``;
* ``limiter``, ``rate_limit`` and ``timeout`` see every call, and no capacity
  slot is held during a retry's backoff.
* an instrumentation's ``attempt`` layer (``corral.otel``), when one is
  installed, sits between ``rate_limit`` and ``timeout``: it times each call
  with its timeout, not the waits for the limiters.

With nothing configured the chain *is* the handler.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

import anyio
import attrs

from ._adaptive import AdaptiveRate
from ._breaker import CircuitBreaker
from ._errors import attempt_timed_out
from ._handlers import check_callable, is_async_callable
from ._hedge import Hedge
from ._limits import SlidingWindow, TokenBucket, _FairLimiter
from ._retry import Retry, read_retry_after, retry_after_of
from ._threads import Holds, Threads, holds_of_attempt
from ._validate import check_int, check_number

_log = logging.getLogger("corral.limits")

__all__ = [
    "Layers",
    "Middleware",
    "RateLimiter",
    "Timeout",
    "build_chain",
    "check_middleware",
]

T = TypeVar("T")
R = TypeVar("R")

Call = Callable[[Any], Awaitable[Any]]


@runtime_checkable
class Middleware(Protocol):
    """Wraps every call of the handler for one item.

    ``await call_next(item)`` runs the rest of the chain (possibly several
    times, as :class:`Retry` does) and returns the handler's result; whatever
    the middleware returns is the item's result, and whatever it raises is the
    item's error. It runs in the worker's task, inside its cancel scopes, so it
    must let cancellation propagate.

    >>> import anyio
    >>> class Log:
    ...     async def __call__(self, item, call_next):
    ...         print("start", item)
    ...         return await call_next(item)
    >>> async def main():
    ...     import corral
    ...     async def double(x): return 2 * x
    ...     [o] = await corral.apply_to_all(double, [21], middleware=[Log()])
    ...     return o.result
    >>> anyio.run(main)
    start 21
    42
    """

    async def __call__(self, item: Any, call_next: Callable[[Any], Awaitable[Any]], /) -> Any: ...


@runtime_checkable
class RateLimiter(Protocol):
    """What ``rate_limit=`` takes: anything with ``async acquire(cost=1)``.

    ``acquire`` returns when ``cost`` units are admitted (the admission happens
    at that moment) and should be cancel-safe: if it raises, nothing was
    consumed. If the object also has ``acquire_nowait(cost=1)`` raising
    :class:`anyio.WouldBlock` when it would have to wait, corral tries that
    first and awaits ``acquire`` only when needed. :class:`SlidingWindow` and
    :class:`TokenBucket` are both.
    """

    async def acquire(self, cost: int = 1) -> None:
        """Wait until ``cost`` units are admitted. Returning means admitted;
        raising (a cancellation included) means nothing was consumed."""
        ...


@attrs.frozen
class Timeout:
    """A per-attempt deadline: the attempt is cancelled after ``seconds`` and the
    outcome is a ``TimeoutError`` (which a :class:`Retry` may retry) saying
    ``attempt timed out after timeout=2.5 s`` (``timed out after
    Timeout(2.5)`` when the ``Timeout`` stands in ``middleware=[...]``, where it
    bounds what it wraps). A ``TimeoutError`` the handler raises itself is
    passed on as it is.

    ``timeout=2.5`` on a pool is shorthand for ``Timeout(2.5)``. An async
    handler is interrupted at its next checkpoint (one that reaches none
    before it returns keeps its result). A plain (threaded) handler cannot be
    interrupted: its timed-out attempt is abandoned, the thread finishes in
    the background and its result is discarded; it still counts against the
    pool's ``2 * workers`` threads and holds its ``limiter`` token until it
    ends. ``seconds`` must be a
    positive, finite number (else ``TypeError`` or ``ValueError``).

    >>> Timeout(2.5).seconds
    2.5
    """

    seconds: float

    def __attrs_post_init__(self) -> None:
        check_number("seconds", self.seconds, positive=True)

    async def __call__(self, item: T, call_next: Callable[[T], Awaitable[R]]) -> R:
        with anyio.CancelScope(deadline=anyio.current_time() + self.seconds):
            return await call_next(item)
        # reached only when the deadline cancelled the call
        raise TimeoutError(f"timed out after Timeout({self.seconds!r})")


def check_middleware(
    *,
    retry: object,
    rate_limit: object,
    limiter: object,
    timeout: object,
    middleware: object,
    cost: object = None,
    breaker: object = None,
    hedge: object = None,
) -> Layers:
    """Validate the middleware options of a pool or helper, naming the parameter.

    ``cost``: None (each attempt costs the rate limiter 1), or a plain
    function of the item giving what ``rate_limit.acquire(cost)`` is asked.
    """
    if retry is not None and not isinstance(retry, Retry):
        raise TypeError(f"retry must be a corral.Retry or None, got {retry!r}")
    if rate_limit is not None and not callable(getattr(rate_limit, "acquire", None)):
        raise TypeError(
            f"rate_limit must have an async acquire(cost=1) method "
            f"(e.g. corral.TokenBucket), got {rate_limit!r}"
        )
    _check_limiter(limiter)
    if breaker is not None and not isinstance(breaker, CircuitBreaker):
        raise TypeError(f"breaker must be a corral.CircuitBreaker or None, got {breaker!r}")
    if hedge is not None and not isinstance(hedge, Hedge):
        raise TypeError(f"hedge must be a corral.Hedge or None, got {hedge!r}")
    layers = _check_layers(middleware)
    _check_cost_function(cost)
    return Layers(
        retry,
        rate_limit,  # type: ignore[arg-type]
        limiter,
        _check_timeout(timeout),
        layers,
        cost,  # type: ignore[arg-type]
        breaker,
        hedge,
    )


def _check_limiter(limiter: object) -> None:
    if isinstance(limiter, _FairLimiter):  # an async context manager too, but a rate
        raise TypeError(
            f"limiter takes a concurrency limiter (anyio.CapacityLimiter, "
            f"corral.AdaptiveLimiter); {limiter!r} is a rate limiter: pass it as rate_limit="
        )
    if limiter is not None and not (
        hasattr(limiter, "__aenter__") and hasattr(limiter, "__aexit__")
    ):
        raise TypeError(
            f"limiter must be an anyio.CapacityLimiter (or another async context "
            f"manager), got {limiter!r}"
        )


def _check_cost_function(cost: object) -> None:
    check_callable("cost", cost, optional=True)
    if cost is not None and is_async_callable(cost):
        raise TypeError(f"cost must be a plain function returning an int, got {cost!r}")


def _check_timeout(timeout: object) -> Timeout | None:
    if timeout is None or isinstance(timeout, Timeout):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"timeout must be a number of seconds, a corral.Timeout or None, got {timeout!r}"
        )
    return Timeout(check_number("timeout", timeout, positive=True))


def _check_layers(middleware: object) -> tuple[Middleware, ...]:
    if isinstance(middleware, (str, bytes)) or not isinstance(middleware, Sequence):
        raise TypeError(f"middleware must be a sequence of middleware, got {middleware!r}")
    for index, layer in enumerate(middleware):
        check_callable(f"middleware[{index}]", layer)
        if not (isinstance(layer, Retry) or is_async_callable(layer)):  # Retry also decorates
            raise TypeError(
                f"middleware[{index}] must be async: "
                f"`async def __call__(self, item, call_next)`, got {layer!r}"
            )
    return tuple(middleware)


@attrs.frozen
class Layers:
    """The middleware options of a pool or batcher, checked: what wraps every
    call of its handler (see the module docstring for the order)."""

    retry: Retry | None
    rate_limit: RateLimiter | None
    limiter: Any
    timeout: Timeout | None
    middleware: tuple[Middleware, ...]
    cost: Callable[[Any], int] | None = None  # what an attempt costs the rate limiter
    breaker: CircuitBreaker | None = None
    hedge: Hedge | None = None

    @property
    def configured(self) -> bool:
        """Whether any layer is configured (else the chain is the handler)."""
        layers = (self.retry, self.rate_limit, self.limiter, self.timeout, self.breaker, self.hedge)
        return bool(self.middleware) or any(layer is not None for layer in layers)

    def threads_for(self, fn: Callable[[Any], Any], limit: int) -> Threads | None:
        """The threads a plain ``fn`` runs in (None for an async one). They keep
        track of calls given up on while the pool runs on only where that can
        happen: a timeout, a Retry deadline, a hedge (which cancels the copies
        that lost), or user middleware (which may cancel)."""
        if is_async_callable(fn):
            return None
        retry = self.retry
        abandonable = (
            self.timeout is not None
            or self.hedge is not None
            or bool(self.middleware)
            or (retry is not None and retry.deadline is not None)
        )
        return Threads(fn, limit, abandonable=abandonable)

    def chain(
        self,
        fn: Callable[[Any], Any],
        *,
        threads: Threads | None,
        clock: Callable[[], float],
        on_start: Callable[[], None] | None = None,
        log: logging.Logger | None = None,
        attempt: Callable[[Call], Call] | None = None,
    ) -> Call:
        """``fn`` (run in ``threads`` if given) wrapped in the layers;
        ``on_start`` is called as each call of ``fn`` starts; ``log`` is the
        block's logger (where a retry says so); ``attempt`` wraps each call of
        ``fn`` with its timeout (an instrumentation's layer)."""
        timeout = self.timeout
        if threads is not None:  # they keep the timeout, and know when a call starts
            seconds = None if timeout is None else timeout.seconds
            call = threads.caller(timeout=seconds, clock=clock, on_start=on_start)
            timeout = None
        elif on_start is not None:
            call = _counted(fn, on_start)
        else:
            call = fn
        return build_chain(
            call,
            retry=self.retry,
            limiter=self.limiter,
            rate_limit=self.rate_limit,
            timeout=timeout,
            middleware=self.middleware,
            clock=clock,
            threaded=threads is not None and threads.abandonable,
            cost=self.cost,
            breaker=self.breaker,
            hedge=self.hedge,
            log=log,
            attempt=attempt,
        )


def _counted(call: Call, on_start: Callable[[], None]) -> Call:
    async def counted(item: Any) -> Any:
        on_start()
        return await call(item)

    return counted


def build_chain(
    call: Call,
    *,
    retry: Retry | None = None,
    limiter: Any = None,
    rate_limit: RateLimiter | None = None,
    timeout: Timeout | None = None,
    middleware: Sequence[Middleware] = (),
    clock: Callable[[], float] = anyio.current_time,
    threaded: bool = False,
    cost: Callable[[Any], int] | None = None,
    breaker: CircuitBreaker | None = None,
    hedge: Hedge | None = None,
    log: logging.Logger | None = None,
    attempt: Callable[[Call], Call] | None = None,
) -> Call:
    """Wrap ``call`` in the configured layers, innermost first; ``call`` itself
    when nothing is configured. ``clock`` is the running loop's clock (what
    :func:`anyio.current_time` reads), passed in to spare a lookup per attempt.

    ``threaded``: ``call`` is a :class:`~corral._threads.Threads` caller, which
    keeps the per-attempt timeout itself (pass ``timeout=None``); a capacity
    limiter's token then stays held until the attempt's thread ends.

    ``cost``: a function of the item, giving the units every attempt asks
    ``rate_limit`` for (None: 1).

    ``log``: where a retry logs (None: ``corral.retry``).

    ``attempt``: a layer around each attempt with its timeout, inside the
    limiters (an instrumentation times what the handler took, not the waits).
    """
    chain = call
    if timeout is not None:
        chain = _with_timeout(chain, timeout.seconds, clock)
    if attempt is not None:
        chain = attempt(chain)
    if rate_limit is not None:
        where = retry.retry_after if retry is not None and retry.retry_after else retry_after_of
        chain = _with_rate_limit(chain, rate_limit, clock, where, cost)
    if limiter is not None:
        chain = _with_limiter(chain, limiter, threaded, clock)
    if hedge is not None:
        chain = hedge._layer(chain, clock)
    if breaker is not None:
        chain = breaker._layer(chain, clock)
    if retry is not None:
        chain = retry._layer(chain, log or logging.getLogger("corral.retry"), clock)
    for layer in reversed(middleware):
        chain = _bind(layer, chain)
    return chain


def _bind(layer: Middleware | Retry, call_next: Call) -> Call:
    async def bound(item: Any) -> Any:
        return await layer(item, call_next)

    return bound


# The layers below take the `*_nowait` fast path of a limiter when it has one:
# an admission that needs no waiting then costs no scheduling round trip (the
# worker still checkpoints regularly, see Pool). Only when it would block do
# they await the blocking call, which is where cancellation is honoured.


def _with_timeout(call_next: Call, seconds: float, clock: Callable[[], float]) -> Call:
    async def timed(item: Any) -> Any:
        # a bare cancel scope: anyio.fail_after costs a generator on top
        with anyio.CancelScope(deadline=clock() + seconds):
            return await call_next(item)
        # reached only when the deadline cancelled the call; a TimeoutError the
        # handler raised itself propagated above, untouched
        raise attempt_timed_out(seconds)

    return timed


RetryAfterReader = Callable[[Exception], object]


def _with_rate_limit(
    call_next: Call,
    rate_limit: RateLimiter,
    clock: Callable[[], float],
    where: RetryAfterReader,
    cost: Callable[[Any], int] | None = None,
) -> Call:
    """The rate limiter's layer: an admission per attempt (of ``cost(item)``
    units if ``cost`` is given, else 1), and a failed attempt's Retry-After
    (read by ``where``) pauses the limiter, so that every worker sharing it
    slows down, not only the one that was told to.

    A ``cost`` that raises, or that the limiter refuses, fails the attempt
    with that error; a cost above what the limiter admits at once is taken
    in parts (see :func:`_acquire_cost`)."""
    if isinstance(rate_limit, AdaptiveRate):
        return _with_adaptive_rate(call_next, rate_limit, clock, where, cost)
    if type(rate_limit) in (SlidingWindow, TokenBucket):  # ours, not a subclass
        return _with_own_limiter(
            call_next, cast("SlidingWindow | TokenBucket", rate_limit), clock, where, cost
        )
    acquire = rate_limit.acquire
    acquire_nowait = getattr(rate_limit, "acquire_nowait", None)
    if not callable(acquire_nowait):
        acquire_nowait = None
    pause = getattr(rate_limit, "pause", None)

    async def rate_limited(item: Any) -> Any:
        if cost is not None:
            await _acquire_cost(rate_limit, cost(item), None)
        elif acquire_nowait is None:
            await acquire()
        else:
            try:
                acquire_nowait()
            except anyio.WouldBlock:
                await acquire()
        try:
            return await call_next(item)
        except Exception as error:
            if callable(pause):
                seconds = read_retry_after(error, where)
                if seconds and math.isfinite(seconds):  # never a pause for good
                    await pause_limiter(pause, seconds)
            raise

    return rate_limited


async def _acquire_cost(
    limiter: Any, units: int, admit_at: Callable[[int, float], bool] | None, now: float = 0.0
) -> None:
    """Acquire ``units`` (checked: an int of at least 1) from ``limiter``: at
    once if ``admit_at(units, now)`` admits them, else by waiting. A cost above
    what the limiter admits at once (its ``burst``, or a quota's rate) is taken
    in parts of that size, one after the other, so that "500 rows per second"
    holds for a batch of any size instead of refusing it."""
    check_int("cost", units, minimum=1)
    most = getattr(limiter, "_capacity", None) or getattr(limiter, "burst", None)
    if isinstance(most, int):
        while units > most >= 1:
            await limiter.acquire(most)
            units -= most
            admit_at = None  # waited: the clock read before is stale
    if admit_at is None or not admit_at(units, now):
        await limiter.acquire(units)


def _with_own_limiter(
    call_next: Call,
    own: SlidingWindow | TokenBucket,
    clock: Callable[[], float],
    where: RetryAfterReader,
    cost: Callable[[Any], int] | None,
) -> Call:
    """:func:`_with_rate_limit` for corral's own limiters: no exception and no
    clock lookup when an admission needs no waiting."""
    admit_at, acquire, failed = own._admit_at, own.acquire, own._failed

    async def rate_limited_own(item: Any) -> Any:
        if cost is not None:
            await _acquire_cost(own, cost(item), admit_at, clock())
        elif not admit_at(1, clock()):
            await acquire()
        try:
            return await call_next(item)
        except Exception as error:
            failed(error, read_retry_after(error, where))
            raise

    return rate_limited_own


async def pause_limiter(pause: Callable[[float], object], seconds: float) -> None:
    """Call a third-party limiter's ``pause(seconds)`` (awaited if it is a
    coroutine, as a shared limiter's round trip is). If it fails, the attempt's
    own error is what propagates; the failure is logged."""
    try:
        paused = pause(seconds)
        if inspect.isawaitable(paused):
            await paused
    except Exception:  # noqa: BLE001 - the attempt's own error must propagate, not this
        _log.warning("could not pause the rate limiter for %.3g s", seconds, exc_info=True)


def _with_adaptive_rate(
    call_next: Call,
    rate: AdaptiveRate,
    clock: Callable[[], float],
    where: RetryAfterReader,
    cost: Callable[[Any], int] | None = None,
) -> Call:
    """As :func:`_with_rate_limit`, and the limiter hears how every attempt it
    admitted ended, with the time it was admitted."""
    admit_at, acquire, ended = rate._admit_at, rate.acquire, rate._ended

    async def rate_limited_adaptive(item: Any) -> Any:
        admitted_at = clock()
        if cost is not None:
            await _acquire_cost(rate, cost(item), admit_at, admitted_at)
            admitted_at = clock()
        elif not admit_at(1, admitted_at):
            await acquire()
            admitted_at = clock()
        try:
            result = await call_next(item)
        except Exception as error:
            ended(admitted_at, error, read_retry_after(error, where))
            raise
        ended(admitted_at, None, None)
        return result

    return rate_limited_adaptive


def _with_limiter(
    call_next: Call, limiter: Any, threaded: bool, clock: Callable[[], float]
) -> Call:
    own_layer = getattr(limiter, "_layer", None)
    if own_layer is not None:  # a layer of its own: AdaptiveLimiter, RedisCapacityLimiter
        return cast("Call", own_layer(call_next, clock, threaded))
    if threaded and isinstance(limiter, anyio.CapacityLimiter):
        return _with_limiter_for_thread(call_next, limiter)
    if not isinstance(limiter, anyio.CapacityLimiter):

        async def limited(item: Any) -> Any:
            async with limiter:
                return await call_next(item)

        return limited

    async def capacity_limited(item: Any) -> Any:
        try:
            limiter.acquire_nowait()
        except anyio.WouldBlock:
            await limiter.acquire()
        try:
            return await call_next(item)
        finally:
            limiter.release()

    return capacity_limited


def _with_limiter_for_thread(call_next: Call, limiter: anyio.CapacityLimiter) -> Call:
    """The capacity limiter's layer over a threaded call: the attempt's token is
    held on behalf of its :class:`Holds`, which the call hands to its thread if
    the thread outlives the attempt (a timeout), so that a thread still running
    keeps its token and the limiter is never exceeded by running calls."""

    async def capacity_limited_thread(item: Any) -> Any:
        holds = Holds()
        try:
            limiter.acquire_on_behalf_of_nowait(holds)
        except anyio.WouldBlock:
            await limiter.acquire_on_behalf_of(holds)
        holds.releases.append(lambda: limiter.release_on_behalf_of(holds))
        token = holds_of_attempt.set(holds)
        try:
            return await call_next(item)
        finally:
            holds_of_attempt.reset(token)
            if not holds.taken:
                holds.release()

    return capacity_limited_thread
