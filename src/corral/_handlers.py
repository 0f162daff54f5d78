"""Checking user callables and turning them into one async calling convention."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

__all__ = ["check_callable", "is_async_callable", "make_async"]

T = TypeVar("T")
R = TypeVar("R")


def _unwrap_partial(fn: Any) -> Any:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def is_async_callable(fn: object) -> bool:
    """True when calling ``fn`` returns a coroutine without doing the work.

    A coroutine function, or an object whose ``__call__`` is one, looking
    through :func:`functools.partial`.
    """
    fn = _unwrap_partial(fn)
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - we want the attribute itself
    return call is not None and inspect.iscoroutinefunction(_unwrap_partial(call))


def check_callable(name: str, fn: object, *, optional: bool = False) -> None:
    """Reject what cannot serve as a handler, naming the parameter ``name``."""
    if fn is None and optional:
        return
    if inspect.iscoroutine(fn):
        fn.close()  # it can never run now; do not leave a 'never awaited' warning
        raise TypeError(
            f"{name} must be a callable, got a coroutine object; "
            "pass the function itself, not the result of calling it"
        )
    if not callable(fn):
        raise TypeError(f"{name} must be a callable, got {fn!r}")
    target = _unwrap_partial(fn)
    if inspect.isasyncgenfunction(target) or inspect.isgeneratorfunction(target):
        raise TypeError(
            f"{name} must return a result, but {fn!r} is a generator function; "
            "wrap it in a function that returns what you need"
        )


def make_async(
    fn: Callable[[T], Any], thread_limiter: anyio.CapacityLimiter
) -> Callable[[T], Awaitable[Any]]:
    """An async callable that runs ``fn``: directly if async, else in a thread.

    A plain callable runs through :func:`anyio.to_thread.run_sync` under
    ``thread_limiter``; if it returns an awaitable, that is awaited on the loop.
    The thread is abandoned if the caller is cancelled (it cannot be stopped;
    its result is discarded).
    """
    if is_async_callable(fn):
        return fn
    run_sync = anyio.to_thread.run_sync

    def boxed(item: T) -> tuple[Any]:
        # a 1-tuple, so that a returned coroutine reaches the loop unexamined
        # (trio's to_thread refuses a function that returns one)
        return (fn(item),)

    async def call_in_thread(item: T) -> Any:
        (result,) = await run_sync(boxed, item, abandon_on_cancel=True, limiter=thread_limiter)
        if inspect.isawaitable(result):
            result = await result
        return result

    return call_in_thread
