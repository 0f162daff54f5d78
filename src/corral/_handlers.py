"""Checking user callables; telling async ones from plain ones (which run in
threads, see _threads)."""

from __future__ import annotations

import functools
import inspect
from typing import Any, TypeVar

__all__ = ["check_callable", "is_async_callable"]

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
