"""How callables are classified: async (run on the loop) or plain (run in a thread)."""

from __future__ import annotations

import functools
import threading
from typing import Any

import anyio
import pytest

from corral import Pool
from corral._handlers import is_async_callable

pytestmark = pytest.mark.anyio


class AsyncCallable:
    async def __call__(self, x: int) -> int:
        return x


class SyncCallable:
    def __call__(self, x: int) -> int:
        return x


async def coro_fn(x: int, y: int = 0) -> int:
    return x + y


def test_classification() -> None:
    """Coroutine functions, async __call__ and partials of either are async."""
    assert is_async_callable(coro_fn)
    assert is_async_callable(functools.partial(coro_fn, y=1))
    assert is_async_callable(AsyncCallable())
    assert is_async_callable(functools.partial(AsyncCallable()))
    assert not is_async_callable(SyncCallable())
    assert not is_async_callable(lambda x: x)
    assert not is_async_callable(functools.partial(len))


async def test_each_kind_runs_where_it_should() -> None:
    """Async callables run on the loop thread, plain ones in worker threads."""
    loop_thread = threading.get_ident()
    where: dict[str, bool] = {}

    class Recorder:
        def __init__(self, label: str) -> None:
            self.label = label

        def __call__(self, x: int) -> int:
            where[self.label] = threading.get_ident() == loop_thread
            return x

    class AsyncRecorder(Recorder):
        async def __call__(self, x: int) -> int:  # type: ignore[override]
            where[self.label] = threading.get_ident() == loop_thread
            return x

    handlers: list[Any] = [
        Recorder("plain"),
        AsyncRecorder("async"),
        functools.partial(AsyncRecorder("partial-async")),
        functools.partial(Recorder("partial-plain")),
    ]
    for h in handlers:
        async with Pool(h, workers=1) as pool:
            await pool.submit(1)
    assert where == {
        "plain": False,
        "async": True,
        "partial-async": True,
        "partial-plain": False,
    }
    await anyio.lowlevel.checkpoint()
