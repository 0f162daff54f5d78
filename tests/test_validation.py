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


# ----------------------------------------------------- random bad input


class Opaque:
    """An object of no type any parameter accepts."""


BAD_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    -0.5,
    float("nan"),
    float("inf"),
    "3",
    b"x",
    [],
    {},
    Opaque(),
    object,
    handler,
]


def _good_options() -> dict[str, dict[str, Any]]:
    from corral import Retry, SlidingWindow, Timeout, TokenBucket

    return {
        "Pool": {
            "workers": 2,
            "max_pending": 4,
            "retry": Retry(2),
            "rate_limit": TokenBucket(100),
            "limiter": anyio.CapacityLimiter(2),
            "timeout": 1.0,
            "middleware": (),
            "on_outcome": print,
            "fail_fast": False,
            "name": "p",
            "key": str,
            "per_key": 1,
            "cost": len,
        },
        "Batcher": {
            "max_size": 10,
            "max_wait": 0.5,
            "concurrency": 1,
            "max_pending": 20,
            "dedupe_key": str,
            "weight": len,
            "max_weight": 100,
            "retry": Retry(2),
            "rate_limit": SlidingWindow(10),
            "cost": len,
            "limiter": anyio.CapacityLimiter(2),
            "timeout": Timeout(1.0),
            "middleware": (),
            "name": "b",
        },
        "Retry": {
            "attempts": 3,
            "on": ValueError,
            "wait_initial": 0.1,
            "wait_max": 1.0,
            "wait_exp_base": 2.0,
            "wait_jitter": True,
            "deadline": 5.0,
            "cap_retry_after": False,
            "retry_after": None,
        },
        "TokenBucket": {"rate": 10, "per": 1.0, "burst": 2},
        "SlidingWindow": {"limit": 10, "per": 1.0, "burst": 3},
        "AdaptiveRate": {"initial": 10, "min": 1.0, "max": 100.0, "on": ValueError},
    }


def _is_accepted(factory: str, name: str, value: Any) -> bool:
    """The few 'bad-looking' values a parameter legitimately accepts."""
    optional = {
        "Pool": {
            "max_pending",
            "retry",
            "rate_limit",
            "limiter",
            "timeout",
            "on_outcome",
            "name",
            "key",
            "cost",
        },
        "Batcher": {
            "max_wait",
            "max_pending",
            "dedupe_key",
            "retry",
            "rate_limit",
            "cost",
            "limiter",
            "timeout",
            "name",
        },
        "Retry": {"deadline", "retry_after"},
        "TokenBucket": {"burst"},  # a quota, paced
        "SlidingWindow": {"burst"},
        "AdaptiveRate": {"min", "max", "on"},
    }
    if value is None and name in optional.get(factory, set()):
        return True
    if name == "name" and isinstance(value, str):
        return True
    if name in ("fail_fast", "wait_jitter", "cap_retry_after") and value is True:
        return True
    if name == "on_outcome" and callable(value):
        return True  # a plain or async callback
    if name == "retry_after" and callable(value) and value not in (handler,):
        return True  # a plain function reading the error
    if factory == "AdaptiveRate" and name == "max" and value == float("inf"):
        return True  # no ceiling
    if name == "on" and callable(value) and value not in (object, handler):
        return True  # a plain predicate (an async one would always be true)
    if name in ("dedupe_key", "weight", "cost", "key") and value is object:
        return True  # callable; it fails at add() or at a flush, where the item is known
    if name == "max_wait" and (value == 0 or value == float("inf")):
        return True  # flush at once / only by size and flush()
    if name == "wait_max" and value in (0, float("inf")):
        return True  # retry at once / no cap
    if name == "wait_initial" and value == 0:
        return True
    return name == "middleware" and value == []  # an empty sequence; not a dict


def test_random_bad_values_raise_value_or_type_error_naming_the_parameter() -> None:
    """Every option of every constructor, given bad values (alone and several at
    once): a ValueError or TypeError naming a bad parameter, never anything else."""
    import random

    from corral import AdaptiveRate, Batcher, Retry, SlidingWindow, TokenBucket

    factories: dict[str, Any] = {
        "AdaptiveRate": AdaptiveRate,
        "Pool": lambda **kw: Pool(handler, **kw),
        "Batcher": lambda **kw: Batcher(handler, **kw),
        "Retry": Retry,
        "TokenBucket": TokenBucket,
        "SlidingWindow": SlidingWindow,
    }
    good = _good_options()
    rng = random.Random(5)
    cases = 0
    for _ in range(3000):
        factory = rng.choice(list(factories))
        options = dict(good[factory])
        names = rng.sample(sorted(options), min(len(options), rng.choice([1, 1, 1, 2, 3])))
        bad: list[str] = []
        for name in names:
            value = rng.choice(BAD_VALUES)
            options[name] = value
            if not _is_accepted(factory, name, value):
                bad.append(name)
        refused: Exception | None = None
        try:
            factories[factory](**options)
        except (ValueError, TypeError) as error:
            refused = error
        if refused is None:
            assert not bad, f"{factory} accepted bad {bad}: {options}"
        else:
            assert bad, f"{factory}({options}) refused good options: {refused}"
            assert any(name in str(refused) for name in bad), (factory, bad, str(refused))
            cases += 1
    assert cases > 2000


@pytest.mark.anyio
async def test_bad_call_arguments_are_refused_at_the_call() -> None:
    from corral import Batcher

    async with Pool(handler) as pool:
        with pytest.raises(TypeError, match="id must be hashable"):
            await pool.submit(1, id=[1])
        with pytest.raises(TypeError, match="id must be hashable"):
            pool.submit_nowait(1, id={})
        assert pool.stats.submitted == 0
    async with Batcher(handler, dedupe_key=lambda x: x) as batcher:
        with pytest.raises(TypeError, match="dedupe_key must return a hashable"):
            await batcher.add([1])
        with pytest.raises(TypeError, match="items"):
            await batcher.add_many(None)  # type: ignore[arg-type]
        assert batcher.stats.added == 0
