"""Bad input is refused at the call that made it, with the parameter named."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from corral import Pool, apply_to_all, apply_to_each


async def handler(x: int) -> int:
    return x


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"workers": 0}, ValueError, "workers must be >= 1, got 0"),
        ({"workers": -3}, ValueError, "workers"),
        ({"workers": 2.5}, TypeError, "workers must be an int"),
        ({"workers": True}, TypeError, "workers must be an int"),
        ({"max_pending": 0}, ValueError, "max_pending must be >= 1"),
        ({"max_pending": "10"}, TypeError, "max_pending must be an int"),
        ({"on_outcome": 3}, TypeError, "on_outcome must be a callable"),
        ({"fail_fast": 1}, TypeError, "fail_fast must be True or False"),
        ({"name": 7}, TypeError, "name must be a str"),
    ],
)
def test_pool_rejects_bad_options(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Each bad option raises ValueError/TypeError naming the parameter and value."""
    with pytest.raises(error, match=match):
        Pool(handler, **kwargs)


def test_non_callable_handler() -> None:
    """A non-callable handler is a TypeError naming `handler`."""
    with pytest.raises(TypeError, match="handler must be a callable, got 42"):
        Pool(42)  # type: ignore[call-overload]


def test_coroutine_object_instead_of_function() -> None:
    """Passing handler(x) instead of handler says so, and leaves no warning behind."""
    with pytest.raises(TypeError, match="coroutine object; pass the function itself"):
        Pool(handler(1))  # type: ignore[call-overload]


def test_generator_functions_are_refused() -> None:
    """A generator function cannot be a handler (it would return a generator)."""

    def gen(x: int) -> Iterator[int]:
        yield x

    async def agen(x: int) -> Any:
        yield x

    with pytest.raises(TypeError, match="generator function"):
        Pool(gen)
    with pytest.raises(TypeError, match="generator function"):
        Pool(functools.partial(agen))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"retry": 3}, TypeError, "retry must be a corral.Retry"),
        ({"rate_limit": object()}, TypeError, "rate_limit must have an async acquire"),
        ({"limiter": 4}, TypeError, "limiter must be an anyio.CapacityLimiter"),
        ({"timeout": 0}, ValueError, "timeout must be > 0, got 0"),
        ({"timeout": -1.5}, ValueError, "timeout must be > 0"),
        ({"timeout": "5"}, TypeError, "timeout must be a number"),
        ({"middleware": "abc"}, TypeError, "middleware must be a sequence"),
        ({"middleware": [42]}, TypeError, r"middleware\[0\] must be a callable"),
        (
            {"middleware": [lambda item, nxt: nxt(item)]},
            TypeError,
            r"middleware\[0\] must be async",
        ),
    ],
)
def test_pool_rejects_bad_middleware_options(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Middleware options are checked at construction, naming the parameter."""
    with pytest.raises(error, match=match):
        Pool(handler, **kwargs)


def test_helpers_validate_at_the_call() -> None:
    """apply_to_each validates when called, before `async with`; both check items."""
    with pytest.raises(ValueError, match="workers"):
        apply_to_each(handler, [1], workers=0)
    with pytest.raises(TypeError, match="items must be an iterable"):
        apply_to_each(handler, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ordered must be True or False"):
        apply_to_each(handler, [1], ordered="yes")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_apply_to_all_validates() -> None:
    """apply_to_all raises for bad input before running anything."""
    with pytest.raises(TypeError, match="items must be an iterable"):
        await apply_to_all(handler, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pending"):
        await apply_to_all(handler, [1], max_pending=-1)
    await anyio.lowlevel.checkpoint()
