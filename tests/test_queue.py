"""Queue: FIFO put/get, backpressure, waiters in line, cancel safety, close,
task_done/join, statistics, validation, and random cancellation of putters and
getters (nothing lost, nothing doubled).

Tasks are sequenced with ``anyio.wait_all_tasks_blocked()`` and events, never
with sleeps. Deadlines are exact on trio's MockClock; on asyncio and uvloop they
are short real ones, and only what holds whatever the timing is asserted.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup
from anyio.lowlevel import checkpoint

from corral import (
    CorralError,
    PoolClosed,
    Queue,
    QueueFull,
    QueueStatistics,
    apply_to_all,
)

pytestmark = pytest.mark.anyio


class QueueTask:
    """A task that calls the queue once (``call``), in a cancel scope the test
    can cancel; an exception it raises is kept in ``error``."""

    def __init__(self, queue: Queue[Any]) -> None:
        self.queue = queue
        self.scope = anyio.CancelScope()
        self.error: Exception | None = None
        self.finished = False

    async def call(self) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        with self.scope:
            try:
                await self.call()
            except Exception as error:
                self.error = error
        self.finished = True

    @property
    def cancelled(self) -> bool:
        return self.scope.cancelled_caught


class Putter(QueueTask):
    """A task that puts one item."""

    def __init__(self, queue: Queue[Any], item: Any) -> None:
        super().__init__(queue)
        self.item = item
        self.returned = False  # put() returned

    async def call(self) -> None:
        await self.queue.put(self.item)
        self.returned = True


class Getter(QueueTask):
    """A task that gets one item (or, with ``loop``, iterates the queue)."""

    def __init__(self, queue: Queue[Any], *, loop: bool = False) -> None:
        super().__init__(queue)
        self.loop = loop
        self.items: list[Any] = []

    async def call(self) -> None:
        if self.loop:
            async for item in self.queue:
                self.items.append(item)
        else:
            self.items.append(await self.queue.get())


async def settle() -> None:
    """Let every other task run until it waits. (The checkpoints first let
    tasks that block at once do so, sparing anyio's wait on asyncio a pause.)"""
    for _ in range(5):
        await checkpoint()
    await anyio.wait_all_tasks_blocked()


async def start(tg: TaskGroup, *tasks: QueueTask) -> None:
    """Start each task and let it block before the next starts, so that they
    wait in the order given."""
    for task in tasks:
        tg.start_soon(task.run)
        await settle()


def drain(queue: Queue[Any]) -> list[Any]:
    """Take everything queued now, without waiting."""
    items = []
    while True:
        try:
            items.append(queue.get_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            return items


async def finishes_at_once(call: Callable[[], Awaitable[object]]) -> bool:
    """Whether ``call()`` returns without waiting for anything (it is cancelled
    if it waits)."""
    finished = False

    async def run() -> None:
        nonlocal finished
        await call()
        finished = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await settle()
        tg.cancel_scope.cancel()
    return finished


# ------------------------------------------------------------ basics


async def test_items_come_out_in_the_order_they_were_put() -> None:
    """put and put_nowait queue items first in, first out; get and get_nowait
    take them in that order; len counts the queued items."""
    queue: Queue[int] = Queue(10)
    assert len(queue) == 0
    await queue.put(1)
    queue.put_nowait(2)
    await queue.put(3)
    queue.put_nowait(4)
    assert len(queue) == 4
    assert await queue.get() == 1
    assert queue.get_nowait() == 2
    assert len(queue) == 2
    await queue.put(5)
    assert [await queue.get(), queue.get_nowait(), await queue.get()] == [3, 4, 5]
    assert len(queue) == 0


def test_properties() -> None:
    """maxsize, name and closed read back what the queue was made with."""
    queue: Queue[int] = Queue(3, name="jobs")
    assert (queue.maxsize, queue.name, queue.closed) == (3, "jobs", False)
    queue.close()
    assert queue.closed
    assert Queue[int](1).name is None


def test_repr_names_the_queue_its_fill_and_whether_it_is_closed() -> None:
    queue: Queue[str] = Queue(5, name="jobs")
    queue.put_nowait("a")
    queue.put_nowait("b")
    assert repr(queue) == "<corral.Queue 'jobs' 2/5>"
    queue.close()
    assert repr(queue) == "<corral.Queue 'jobs' 2/5 closed>"
    assert repr(Queue[int](3)) == "<corral.Queue 0/3>"


async def test_none_and_tuples_are_items_like_any_other() -> None:
    """None (and a tuple) put in the queue comes out as it went in, also when
    it is handed straight to a waiting getter (which must not take a None for
    the end of the queue)."""
    queue: Queue[Any] = Queue(3)
    await queue.put(None)
    queue.put_nowait((1, 2))
    queue.put_nowait(())
    assert [await queue.get(), queue.get_nowait(), await queue.get()] == [None, (1, 2), ()]
    async with anyio.create_task_group() as tg:
        getters = [Getter(queue), Getter(queue)]
        await start(tg, *getters)
        await queue.put(None)
        queue.put_nowait((None,))
    assert [getter.items for getter in getters] == [[None], [(None,)]]
    assert [getter.error for getter in getters] == [None, None]


def test_a_queue_made_outside_an_event_loop_works_in_one(anyio_backend: Any) -> None:
    """A queue needs no event loop to be made: made before the loop runs, its
    put waits for room and its get waits for an item inside it."""
    queue: Queue[int] = Queue(1)
    queue.put_nowait(0)

    async def main() -> list[int]:
        got: list[int] = []

        async def consume() -> None:
            async for item in queue:
                got.append(item)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            for i in range(1, 5):
                await queue.put(i)
            queue.close()
        return got

    name, options = anyio_backend
    assert anyio.run(main, backend=name, backend_options=options) == [0, 1, 2, 3, 4]


def test_a_join_cut_off_in_one_event_loop_leaves_nothing_for_the_next(
    anyio_backend: Any,
) -> None:
    """A queue outlives an event loop: a join() cancelled in one run leaves
    nothing bound to that loop, so join() and task_done() work in the next."""
    queue: Queue[int] = Queue(2)
    queue.put_nowait(1)
    name, options = anyio_backend

    async def cut_off_join() -> None:
        with anyio.move_on_after(0.01) as scope:
            await queue.join()
        assert scope.cancelled_caught

    async def join_in_the_next_loop() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(queue.join)
            await settle()
            assert queue.get_nowait() == 1
            queue.task_done()  # wakes the join of this loop

    anyio.run(cut_off_join, backend=name, backend_options=options)
    anyio.run(join_in_the_next_loop, backend=name, backend_options=options)
    assert queue.statistics().unfinished == 0


def test_an_empty_queue_is_still_true() -> None:
    """``queue or Queue(10)`` keeps an empty queue (asyncio.Queue is always
    true too); len() still says it is empty."""
    queue: Queue[int] = Queue(1)
    assert queue
    assert len(queue) == 0
    assert (queue or Queue(10)) is queue


async def test_a_queue_and_what_it_holds_go_with_its_last_reference() -> None:
    """No reference cycle keeps a used queue, or its items, alive until the
    garbage collector runs: they go as soon as the last reference does."""

    class Thing:
        pass

    gc.collect()
    gc.disable()
    try:
        queue: Queue[Thing] = Queue(1)
        async with anyio.create_task_group() as tg:
            getter, putter = Getter(queue), Putter(queue, Thing())
            await start(tg, getter)
            queue.put_nowait(Thing())  # handed to the waiting getter
            await settle()
            queue.put_nowait(Thing())
            await start(tg, putter)  # waits for room
            queue.get_nowait()
        assert getter.finished
        assert putter.returned
        queue.get_nowait()
        item = Thing()
        queue.put_nowait(item)
        queue_ref, item_ref = weakref.ref(queue), weakref.ref(item)
        del queue, item, getter, putter
        assert queue_ref() is None
        assert item_ref() is None
    finally:
        gc.enable()


# ------------------------------------------------------------ backpressure


async def test_put_waits_while_the_queue_is_full_and_resumes_when_a_get_frees_room() -> None:
    queue: Queue[str] = Queue(2)
    await queue.put("a")
    await queue.put("b")
    async with anyio.create_task_group() as tg:
        putter = Putter(queue, "c")
        await start(tg, putter)
        assert not putter.finished
        assert len(queue) == 2
        assert await queue.get() == "a"
        await settle()
        assert putter.returned
        assert len(queue) == 2
    assert drain(queue) == ["b", "c"]


async def test_get_waits_for_an_item() -> None:
    queue: Queue[str] = Queue(2)
    async with anyio.create_task_group() as tg:
        getter = Getter(queue)
        await start(tg, getter)
        assert not getter.finished
        await queue.put("a")
        await settle()
        assert getter.items == ["a"]
    assert len(queue) == 0


async def test_put_nowait_on_a_full_queue_raises_queue_full_and_puts_nothing() -> None:
    """QueueFull is an anyio.WouldBlock (and a CorralError); the item is not
    put, and the message names the queue and its size."""
    queue: Queue[str] = Queue(2, name="jobs")
    queue.put_nowait("a")
    queue.put_nowait("b")
    with pytest.raises(QueueFull, match=r"queue 'jobs' is full \(maxsize=2\)") as raised:
        queue.put_nowait("c")
    assert isinstance(raised.value, anyio.WouldBlock)
    assert isinstance(raised.value, CorralError)
    with pytest.raises(anyio.WouldBlock):
        queue.put_nowait("c")
    assert queue.statistics().puts == 2
    assert drain(queue) == ["a", "b"]


async def test_put_nowait_refuses_while_putters_wait_even_when_room_was_granted() -> None:
    """Waiting putters come first: put_nowait refuses while any waits, also in
    the moment after a get granted room to the first of them (it has not
    resumed yet), and the room goes to that putter."""
    queue: Queue[str] = Queue(1)
    queue.put_nowait("x")
    async with anyio.create_task_group() as tg:
        first, second = Putter(queue, "first"), Putter(queue, "second")
        await start(tg, first, second)
        with pytest.raises(QueueFull, match="has putters waiting for room"):
            queue.put_nowait("newcomer")
        assert queue.get_nowait() == "x"  # room for one: granted to the first putter
        assert len(queue) == 0
        with pytest.raises(QueueFull, match="has putters waiting for room"):
            queue.put_nowait("newcomer")
        await settle()
        assert first.returned
        assert not second.finished
        assert queue.get_nowait() == "first"
        with pytest.raises(QueueFull):  # room was granted to the second putter
            queue.put_nowait("newcomer")
    assert second.returned
    assert drain(queue) == ["second"]
    queue.put_nowait("newcomer")  # nobody waits and there is room
    assert drain(queue) == ["newcomer"]


async def test_get_nowait_on_a_closed_queue_waits_for_an_item_being_taken() -> None:
    """While an item handed to a getter may still come back (the getter was
    cancelled before it resumed), a closed, empty queue is not at its end:
    get_nowait raises WouldBlock, not EndOfStream, and the item is not lost."""
    queue: Queue[str] = Queue(2)
    async with anyio.create_task_group() as tg:
        getter = Getter(queue)
        await start(tg, getter)
        getter.scope.cancel()
        queue.put_nowait("a")  # handed to the getter, which will give it back
        queue.close()
        assert queue.statistics().being_taken == 1
        with pytest.raises(anyio.WouldBlock):
            queue.get_nowait()
    assert getter.items == []
    assert queue.get_nowait() == "a"
    with pytest.raises(anyio.EndOfStream):
        queue.get_nowait()


async def test_get_nowait_on_an_empty_queue_raises_would_block() -> None:
    queue: Queue[int] = Queue(1)
    with pytest.raises(anyio.WouldBlock):
        queue.get_nowait()
    queue.put_nowait(1)
    assert queue.get_nowait() == 1
    with pytest.raises(anyio.WouldBlock):
        queue.get_nowait()
    assert queue.statistics().gets == 1


# ------------------------------------------------------------ waiters in line


async def test_waiting_putters_get_in_in_the_order_they_came() -> None:
    queue: Queue[int] = Queue(1)
    queue.put_nowait(-1)
    async with anyio.create_task_group() as tg:
        await start(tg, *(Putter(queue, i) for i in range(5)))
        assert queue.statistics().waiting_putters == 5
        assert [await queue.get() for _ in range(6)] == [-1, 0, 1, 2, 3, 4]


async def test_waiting_getters_are_served_in_the_order_they_came() -> None:
    """Each item put goes to the first getter in line; a get_nowait in the same
    step cannot take an item handed to a waiting getter."""
    queue: Queue[int] = Queue(5)
    async with anyio.create_task_group() as tg:
        getters = [Getter(queue) for _ in range(4)]
        await start(tg, *getters)
        assert queue.statistics().waiting_getters == 4
        for i in range(4):
            queue.put_nowait(i)
            with pytest.raises(anyio.WouldBlock):
                queue.get_nowait()
    assert [getter.items for getter in getters] == [[0], [1], [2], [3]]


@pytest.mark.parametrize("cancelled", [0, 1, 2])
async def test_a_cancelled_waiting_putter_gives_its_place_to_the_next(cancelled: int) -> None:
    """A putter cancelled while it waits (first, in the middle or last in line)
    raises, its item is never in the queue, and the others get in in order."""
    queue: Queue[str] = Queue(1)
    queue.put_nowait("x")
    putters = [Putter(queue, name) for name in ("p0", "p1", "p2")]
    async with anyio.create_task_group() as tg:
        await start(tg, *putters)
        putters[cancelled].scope.cancel()
        await settle()
        assert putters[cancelled].finished
        assert queue.statistics().waiting_putters == 2
        got = [await queue.get() for _ in range(3)]
    assert putters[cancelled].cancelled
    assert not putters[cancelled].returned
    others = [putter.item for putter in putters if putter is not putters[cancelled]]
    assert got == ["x", *others]
    assert all(putter.returned for putter in putters if putter is not putters[cancelled])
    assert len(queue) == 0
    queue.put_nowait("y")  # the room is all accounted for
    with pytest.raises(QueueFull):
        queue.put_nowait("z")


@pytest.mark.parametrize("cancelled", [0, 1, 2])
async def test_a_cancelled_waiting_getter_gives_its_place_to_the_next(cancelled: int) -> None:
    """A getter cancelled while it waits (first, in the middle or last in line)
    takes nothing, and the items go to the others in order."""
    queue: Queue[str] = Queue(5)
    getters = [Getter(queue) for _ in range(3)]
    async with anyio.create_task_group() as tg:
        await start(tg, *getters)
        getters[cancelled].scope.cancel()
        await settle()
        assert getters[cancelled].finished
        assert queue.statistics().waiting_getters == 2
        queue.put_nowait("a")
        queue.put_nowait("b")
    assert getters[cancelled].cancelled
    assert getters[cancelled].items == []
    assert [getter.items for getter in getters if getter is not getters[cancelled]] == [
        ["a"],
        ["b"],
    ]
    assert len(queue) == 0


# ------------------------------------------------------------ cancellation races


async def test_a_getter_cancelled_before_it_resumes_puts_its_item_back_in_front() -> None:
    """A getter is cancelled, and an item is handed to it in the same step
    (before it resumes): its get raises, and the item goes back to the front of
    the queue, ahead of the items put after it."""
    queue: Queue[str] = Queue(3)
    getter = Getter(queue)
    async with anyio.create_task_group() as tg:
        await start(tg, getter)
        getter.scope.cancel()
        queue.put_nowait("a")  # handed to the getter, which has not resumed
        queue.put_nowait("b")
        assert len(queue) == 1
    assert getter.cancelled
    assert getter.items == []
    assert drain(queue) == ["a", "b"]
    stats = queue.statistics()
    assert (stats.puts, stats.gets, stats.unfinished) == (2, 2, 2)


async def test_a_getter_cancelled_before_it_resumes_passes_its_item_to_the_next_getter() -> None:
    queue: Queue[str] = Queue(3)
    first, second = Getter(queue), Getter(queue)
    async with anyio.create_task_group() as tg:
        await start(tg, first, second)
        first.scope.cancel()
        queue.put_nowait("a")  # handed to the first getter, which has not resumed
    assert first.cancelled
    assert first.items == []
    assert second.items == ["a"]
    assert len(queue) == 0
    assert queue.statistics().gets == 1


async def test_getters_cancelled_before_they_resume_put_their_items_back_in_order() -> None:
    """Two getters are cancelled and handed an item each before either resumes:
    both items go back to the front in the order they were put, so the queue
    stays first in, first out."""
    queue: Queue[str] = Queue(3)
    first, second = Getter(queue), Getter(queue)
    async with anyio.create_task_group() as tg:
        await start(tg, first, second)
        first.scope.cancel()
        second.scope.cancel()
        queue.put_nowait("a")  # handed to the first getter
        queue.put_nowait("b")  # handed to the second
        queue.put_nowait("c")
    assert (first.items, second.items) == ([], [])
    assert drain(queue) == ["a", "b", "c"]


async def test_a_getter_cancelled_right_after_an_item_is_handed_to_it_loses_nothing() -> None:
    """An item is handed to a waiting getter, then its scope is cancelled in the
    same step: the item is taken exactly once, by that getter's get (which then
    returned) or from the queue afterwards."""
    queue: Queue[str] = Queue(3)
    getter = Getter(queue)
    async with anyio.create_task_group() as tg:
        await start(tg, getter)
        queue.put_nowait("a")
        getter.scope.cancel()
    assert getter.items + drain(queue) == ["a"]
    assert queue.statistics().gets == 1


async def test_a_putter_cancelled_before_it_resumes_passes_the_room_to_the_next() -> None:
    """A waiting putter is cancelled, and a get grants it room in the same step
    (before it resumes): its put raises, its item is never in the queue, and the
    room goes to the next putter in line."""
    queue: Queue[str] = Queue(1)
    queue.put_nowait("x")
    first, second = Putter(queue, "first"), Putter(queue, "second")
    async with anyio.create_task_group() as tg:
        await start(tg, first, second)
        first.scope.cancel()
        assert queue.get_nowait() == "x"  # room granted to the first putter
        with pytest.raises(QueueFull):
            queue.put_nowait("newcomer")
        await settle()
        assert first.finished
        assert second.finished
    assert first.cancelled
    assert not first.returned
    assert second.returned
    assert drain(queue) == ["second"]
    assert queue.statistics().puts == 2  # "x" and "second"


async def test_a_putter_cancelled_before_it_resumes_leaves_the_room_free() -> None:
    """The room granted to a putter that was cancelled first is free again once
    it has resumed (nobody is left in line to take it)."""
    queue: Queue[str] = Queue(1)
    queue.put_nowait("x")
    putter = Putter(queue, "p")
    async with anyio.create_task_group() as tg:
        await start(tg, putter)
        putter.scope.cancel()
        assert queue.get_nowait() == "x"
    assert putter.cancelled
    assert len(queue) == 0
    queue.put_nowait("y")
    with pytest.raises(QueueFull):
        queue.put_nowait("z")
    assert drain(queue) == ["y"]


async def test_a_putter_cancelled_right_after_room_is_granted_to_it_is_consistent() -> None:
    """Room is granted to a waiting putter, then its scope is cancelled in the
    same step: its item is in the queue if and only if its put returned, and
    the room is all accounted for either way."""
    queue: Queue[str] = Queue(1)
    queue.put_nowait("x")
    putter = Putter(queue, "p")
    async with anyio.create_task_group() as tg:
        await start(tg, putter)
        assert queue.get_nowait() == "x"
        putter.scope.cancel()
    assert putter.finished
    assert drain(queue) == (["p"] if putter.returned else [])
    assert putter.error is None
    queue.put_nowait("y")
    with pytest.raises(QueueFull):
        queue.put_nowait("z")


# ------------------------------------------------------------ close


async def test_close_is_idempotent() -> None:
    queue: Queue[int] = Queue(2)
    queue.put_nowait(1)
    queue.close()
    queue.close()
    assert queue.closed
    assert queue.statistics().closed
    assert queue.get_nowait() == 1
    queue.close()
    with pytest.raises(anyio.EndOfStream):
        queue.get_nowait()


async def test_putting_in_a_closed_queue_raises_pool_closed_naming_the_queue() -> None:
    """put and put_nowait on a closed queue raise PoolClosed (an
    anyio.ClosedResourceError), also when it is full; nothing is put."""
    queue: Queue[str] = Queue(1, name="jobs")
    queue.put_nowait("a")
    queue.close()
    with pytest.raises(PoolClosed, match="queue 'jobs' is closed") as raised:
        queue.put_nowait("b")  # full and closed: closed is what it says
    assert isinstance(raised.value, anyio.ClosedResourceError)
    assert isinstance(raised.value, CorralError)
    with pytest.raises(PoolClosed, match="queue 'jobs' is closed"):
        await queue.put("b")
    assert queue.get_nowait() == "a"
    with pytest.raises(PoolClosed, match="queue 'jobs' is closed"):
        await queue.put("b")  # empty and closed
    unnamed: Queue[int] = Queue(1)
    unnamed.close()
    with pytest.raises(PoolClosed, match=r"^queue is closed"):
        unnamed.put_nowait(1)
    stats = queue.statistics()
    assert (stats.puts, stats.queued) == (1, 0)


async def test_putters_waiting_at_close_raise_pool_closed_and_put_nothing() -> None:
    queue: Queue[str] = Queue(1)
    queue.put_nowait("x")
    putters = [Putter(queue, "p0"), Putter(queue, "p1")]
    async with anyio.create_task_group() as tg:
        await start(tg, *putters)
        queue.close()
    assert all(isinstance(putter.error, PoolClosed) for putter in putters)
    assert not any(putter.returned for putter in putters)
    assert drain(queue) == ["x"]
    stats = queue.statistics()
    assert (stats.puts, stats.waiting_putters) == (1, 0)


async def test_a_putter_granted_room_as_the_queue_closes_raises_and_puts_nothing() -> None:
    """A get grants room to a waiting putter and the queue closes before the
    putter resumes: it was still waiting, so its put raises PoolClosed and its
    item is not in the queue."""
    queue: Queue[str] = Queue(1)
    queue.put_nowait("x")
    putter = Putter(queue, "p")
    async with anyio.create_task_group() as tg:
        await start(tg, putter)
        assert queue.get_nowait() == "x"  # room granted to the putter
        queue.close()
    assert isinstance(putter.error, PoolClosed)
    assert not putter.returned
    with pytest.raises(anyio.EndOfStream):
        queue.get_nowait()
    assert queue.statistics().puts == 1


async def test_getters_take_what_is_left_after_close_then_get_end_of_stream() -> None:
    queue: Queue[str] = Queue(3)
    for item in "abc":
        queue.put_nowait(item)
    queue.close()
    assert len(queue) == 3
    assert await queue.get() == "a"
    assert queue.get_nowait() == "b"
    assert await queue.get() == "c"
    with pytest.raises(anyio.EndOfStream):
        await queue.get()
    with pytest.raises(anyio.EndOfStream):
        queue.get_nowait()


async def test_getters_waiting_at_close_get_end_of_stream() -> None:
    queue: Queue[str] = Queue(3)
    getters = [Getter(queue), Getter(queue)]
    async with anyio.create_task_group() as tg:
        await start(tg, *getters)
        queue.close()
    assert all(isinstance(getter.error, anyio.EndOfStream) for getter in getters)
    assert queue.statistics().waiting_getters == 0


async def test_an_item_given_back_at_close_goes_to_a_getter_still_iterating() -> None:
    """A getter is cancelled and handed an item in the same step, and the queue
    closes at once: the item is still the queue's, so a getter iterating it
    takes that item before its loop ends; none is left behind."""
    queue: Queue[str] = Queue(3)
    cancelled, iterating = Getter(queue), Getter(queue, loop=True)
    async with anyio.create_task_group() as tg:
        await start(tg, cancelled, iterating)
        cancelled.scope.cancel()
        queue.put_nowait("a")  # handed to the cancelled getter, which has not resumed
        queue.close()
    assert cancelled.items == []
    assert iterating.error is None
    assert iterating.items == ["a"]
    assert len(queue) == 0


async def test_async_for_ends_once_the_queue_is_closed_and_drained() -> None:
    """Consumers iterating a queue take every item put, each once, and their
    loops end after close() once it is empty."""
    queue: Queue[int] = Queue(2)
    consumers = [Getter(queue, loop=True) for _ in range(3)]
    async with anyio.create_task_group() as tg:
        for consumer in consumers:
            tg.start_soon(consumer.run)
        for i in range(30):
            await queue.put(i)
        queue.close()
    assert all(consumer.finished and consumer.error is None for consumer in consumers)
    taken = [item for consumer in consumers for item in consumer.items]
    assert sorted(taken) == list(range(30))
    for consumer in consumers:
        assert consumer.items == sorted(consumer.items)


async def test_async_for_over_a_single_consumer_keeps_the_order() -> None:
    queue: Queue[int] = Queue(3)
    for i in range(3):
        queue.put_nowait(i)
    got: list[int] = []

    async def produce() -> None:
        for i in range(3, 10):
            await queue.put(i)
        queue.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        async for item in queue:
            got.append(item)
    assert got == list(range(10))


# ------------------------------------------------------------ task_done and join


async def test_join_returns_at_once_when_nothing_is_unfinished() -> None:
    queue: Queue[int] = Queue(2)
    assert await finishes_at_once(queue.join)
    queue.put_nowait(1)
    assert not await finishes_at_once(queue.join)
    queue.get_nowait()
    assert not await finishes_at_once(queue.join)  # taken, not marked done
    queue.task_done()
    assert await finishes_at_once(queue.join)


async def test_join_waits_until_every_item_put_is_marked_done() -> None:
    """Items handed straight to a waiting getter count too."""
    queue: Queue[int] = Queue(3)
    joined = False

    async def join() -> None:
        nonlocal joined
        await queue.join()
        joined = True

    async with anyio.create_task_group() as tg:
        getter = Getter(queue)
        await start(tg, getter)
        for i in range(3):
            queue.put_nowait(i)  # 0 to the getter, 1 and 2 queued
        tg.start_soon(join)
        await settle()
        assert getter.items == [0]
        assert queue.statistics().unfinished == 3
        queue.get_nowait()
        queue.get_nowait()
        queue.task_done()
        queue.task_done()
        await settle()
        assert not joined
        queue.task_done()
        await settle()
        assert joined
    assert queue.statistics().unfinished == 0


async def test_every_joiner_wakes_and_join_can_wait_again() -> None:
    queue: Queue[int] = Queue(3)
    joined: list[int] = []

    async def join(n: int) -> None:
        await queue.join()
        joined.append(n)

    for round_ in range(2):
        queue.put_nowait(round_)
        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(join, n)
            await settle()
            assert joined == []
            queue.get_nowait()
            queue.task_done()
        assert sorted(joined) == [0, 1, 2]
        joined.clear()


async def test_task_done_more_times_than_items_were_put_raises_value_error() -> None:
    queue: Queue[int] = Queue(2, name="jobs")
    with pytest.raises(ValueError, match=r"task_done\(\) called more times"):
        queue.task_done()
    queue.put_nowait(1)
    queue.get_nowait()
    queue.task_done()
    with pytest.raises(ValueError, match="queue 'jobs'"):
        queue.task_done()
    assert queue.statistics().unfinished == 0


# ------------------------------------------------------------ statistics


async def test_statistics_is_a_frozen_snapshot() -> None:
    queue: Queue[int] = Queue(2, name="jobs")
    before = queue.statistics()
    assert isinstance(before, QueueStatistics)
    with pytest.raises(AttributeError):
        before.queued = 5  # type: ignore[misc]
    queue.put_nowait(1)
    assert before.queued == 0
    assert before.puts == 0
    assert queue.statistics() != before
    assert queue.statistics() == queue.statistics()


async def test_statistics_count_puts_gets_and_waiters() -> None:
    queue: Queue[str] = Queue(2, name="stats")

    def expect(**counts: Any) -> QueueStatistics:
        values = {
            "name": "stats",
            "maxsize": 2,
            "waiting_putters": 0,
            "waiting_getters": 0,
            "being_taken": 0,
            "closed": False,
            **counts,
        }
        return QueueStatistics(**values)

    assert queue.statistics() == expect(
        queued=0, unfinished=0, puts=0, gets=0, backpressure_waits=0
    )
    queue.put_nowait("a")
    await queue.put("b")
    async with anyio.create_task_group() as tg:
        putters = [Putter(queue, "c"), Putter(queue, "d")]
        await start(tg, *putters)
        assert queue.statistics() == expect(
            queued=2, unfinished=2, puts=2, gets=0, waiting_putters=2, backpressure_waits=2
        )
        assert queue.get_nowait() == "a"
        await settle()
        assert queue.statistics() == expect(
            queued=2, unfinished=3, puts=3, gets=1, waiting_putters=1, backpressure_waits=2
        )
        assert drain(queue) == ["b", "c"]
        await settle()
        assert drain(queue) == ["d"]
        queue.task_done()
        assert queue.statistics() == expect(
            queued=0, unfinished=3, puts=4, gets=4, backpressure_waits=2
        )
        getters = [Getter(queue), Getter(queue), Getter(queue)]
        await start(tg, *getters)
        assert queue.statistics() == expect(
            queued=0, unfinished=3, puts=4, gets=4, waiting_getters=3, backpressure_waits=2
        )
        queue.put_nowait("e")  # handed to the first getter, which has not resumed
        assert queue.statistics() == expect(
            queued=0,
            unfinished=4,
            puts=5,
            gets=4,
            waiting_getters=2,
            being_taken=1,
            backpressure_waits=2,
        )
        await settle()
        assert queue.statistics() == expect(
            queued=0, unfinished=4, puts=5, gets=5, waiting_getters=2, backpressure_waits=2
        )
        queue.close()
    assert queue.statistics() == expect(
        queued=0, unfinished=4, puts=5, gets=5, backpressure_waits=2, closed=True
    )


# ------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("maxsize", "error", "match"),
    [
        (0, ValueError, "maxsize must be >= 1, got 0"),
        (-1, ValueError, "maxsize must be >= 1, got -1"),
        (1.5, TypeError, "maxsize must be an int, got 1.5"),
        (True, TypeError, "maxsize must be an int, got True"),
        ("3", TypeError, "maxsize must be an int, got '3'"),
        (None, TypeError, "maxsize must be an int, got None"),
    ],
)
def test_a_bad_maxsize_is_refused_naming_it(
    maxsize: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Queue(maxsize)


def test_a_name_that_is_not_a_str_is_refused_naming_it() -> None:
    with pytest.raises(TypeError, match="name must be a str or None, got 3"):
        Queue(1, name=3)  # type: ignore[arg-type]


# ------------------------------------------------------------ checkpoints


async def test_put_is_a_checkpoint_even_when_there_is_room() -> None:
    """In a cancelled scope, put on a queue with room raises the cancellation
    and the item is not put."""
    queue: Queue[str] = Queue(2)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await queue.put("a")
        pytest.fail("put() returned in a cancelled scope")
    assert scope.cancelled_caught
    assert len(queue) == 0
    assert queue.statistics().puts == 0
    queue.close()
    with anyio.CancelScope() as scope:  # also when it is closed
        scope.cancel()
        await queue.put("a")
    assert scope.cancelled_caught


async def test_get_is_a_checkpoint_even_when_an_item_is_queued() -> None:
    """In a cancelled scope, get on a queue with an item raises the cancellation
    and the item stays queued."""
    queue: Queue[str] = Queue(2)
    queue.put_nowait("a")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await queue.get()
        pytest.fail("get() returned in a cancelled scope")
    assert scope.cancelled_caught
    assert drain(queue) == ["a"]
    queue.close()
    with anyio.CancelScope() as scope:  # also when it is closed and empty
        scope.cancel()
        await queue.get()
    assert scope.cancelled_caught


async def test_join_is_a_checkpoint_even_when_nothing_is_unfinished() -> None:
    queue: Queue[str] = Queue(2)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await queue.join()
    assert scope.cancelled_caught


async def test_the_nowait_twins_are_not_checkpoints() -> None:
    """In a cancelled scope, put_nowait and get_nowait still work (they never
    wait, and never raise the cancellation)."""
    queue: Queue[str] = Queue(2)
    with anyio.CancelScope() as scope:
        scope.cancel()
        queue.put_nowait("a")
        queue.put_nowait("b")
        took = queue.get_nowait()
        await checkpoint()
        pytest.fail("a checkpoint in a cancelled scope returned")
    assert scope.cancelled_caught
    assert took == "a"
    assert drain(queue) == ["b"]


# ------------------------------------------------------------ with a pool


async def test_a_pool_fed_from_a_queue_handles_every_item_once() -> None:
    """apply_to_all iterates a queue that a producer fills and closes: every
    item is handled exactly once, and the pool ends when the queue does."""
    queue: Queue[int] = Queue(4)

    async def produce() -> None:
        for i in range(50):
            await queue.put(i)
        queue.close()

    async def handler(item: int) -> int:
        await checkpoint()
        return item * 10

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        outcomes = await apply_to_all(handler, queue, workers=3)
    assert sorted(outcome.item for outcome in outcomes) == list(range(50))
    assert all(outcome.ok and outcome.result == outcome.item * 10 for outcome in outcomes)
    stats = queue.statistics()
    assert (stats.puts, stats.gets, stats.queued) == (50, 50, 0)


# ------------------------------------------------------------ deadlines


class TestDeadlines:
    """Waits cut by a deadline: exact on trio's MockClock, in (short) real time
    with no other task waiting for the deadline elsewhere."""

    @pytest.fixture
    def anyio_backend(self, timing_anyio_backend: Any) -> Any:
        return timing_anyio_backend

    async def test_a_put_that_times_out_on_a_full_queue_puts_nothing(self, exact: bool) -> None:
        unit = 1.0 if exact else 0.02
        queue: Queue[str] = Queue(1)
        queue.put_nowait("a")
        start_time = anyio.current_time()
        with anyio.move_on_after(unit) as scope:
            await queue.put("b")
        waited = anyio.current_time() - start_time
        assert scope.cancelled_caught
        if exact:
            assert waited == unit
        else:
            assert waited >= unit - 0.002  # (uvloop's clock counts milliseconds)
        stats = queue.statistics()
        assert (stats.waiting_putters, stats.backpressure_waits, stats.puts) == (0, 1, 1)
        assert drain(queue) == ["a"]
        queue.put_nowait("c")  # nobody is left in line

    async def test_a_get_that_times_out_takes_nothing(self, exact: bool) -> None:
        unit = 1.0 if exact else 0.02
        queue: Queue[str] = Queue(1)
        start_time = anyio.current_time()
        with anyio.move_on_after(unit) as scope:
            await queue.get()
        waited = anyio.current_time() - start_time
        assert scope.cancelled_caught
        if exact:
            assert waited == unit
        assert queue.statistics().waiting_getters == 0
        queue.put_nowait("a")
        assert len(queue) == 1  # queued, not handed to a getter that left
        assert queue.get_nowait() == "a"

    async def test_a_putter_whose_deadline_passes_gives_its_place_to_the_next(
        self, exact: bool
    ) -> None:
        unit = 1.0 if exact else 0.05
        queue: Queue[str] = Queue(1)
        queue.put_nowait("x")
        gone = anyio.Event()
        started = anyio.current_time()
        left_at = math.nan

        async def put_until_deadline() -> None:
            nonlocal left_at
            with anyio.move_on_after(unit):
                await queue.put("timed")
            left_at = anyio.current_time()
            gone.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(put_until_deadline)
            await settle()
            patient = Putter(queue, "patient")
            await start(tg, patient)
            await gone.wait()
            if exact:
                assert left_at - started == unit
            assert queue.statistics().waiting_putters == 1
            assert await queue.get() == "x"
            assert await queue.get() == "patient"
        assert len(queue) == 0


# ------------------------------------------------------------ random cancellation


Item = tuple[int, int]  # (putter, its sequence number)


async def chaos_trial(seed: int, *, virtual_time: bool) -> None:
    """Putters and getters (some with ``_nowait``) on a queue of random size;
    a chaos task cancels them at random moments, sometimes handing the
    cancelled one an item or room in the same step, and closes the queue at a
    random step (or after its last). With ``virtual_time``, waits also have
    random deadlines and tasks sleep at random.

    Then: every item taken (by a get, or drained at the end) was put, and
    taken once; every item whose put returned was taken; no item whose put
    raised was; what is left is in put order, putter by putter; the
    statistics agree."""
    rng = random.Random(seed)
    maxsize = rng.randint(1, 4)
    putters = rng.randint(1, 4)
    getters = rng.randint(1, 4)
    per_putter = rng.randint(3, 20)
    steps = rng.randint(5, 60)
    queue: Queue[Item] = Queue(maxsize, name=f"chaos {seed}")
    returned: list[Item] = []  # items whose put returned
    refused: list[Item] = []  # items whose put raised
    got: list[Item] = []  # items a get returned
    done = 0  # task_done() calls
    awaited = 0  # put() calls (those that may wait for room)
    live: list[anyio.CancelScope] = []  # the scopes of puts and gets under way
    stopping = False  # the getters stop: nobody takes what is left

    def deadline(r: random.Random) -> float:
        if virtual_time and r.random() < 0.3:
            return anyio.current_time() + r.uniform(0, 2)
        return math.inf

    async def pause(r: random.Random) -> None:
        for _ in range(r.randint(0, 2)):
            await checkpoint()
        if virtual_time and r.random() < 0.2:
            await anyio.sleep(r.uniform(0, 1))

    async def put(p: int) -> None:
        nonlocal awaited
        r = random.Random(f"{seed} putter {p}")
        for n in range(per_putter):
            item = (p, n)
            done_putting = was_put = False
            if r.random() < 0.2:
                try:
                    queue.put_nowait(item)
                    was_put = True
                except QueueFull:
                    pass
                except PoolClosed:
                    done_putting = True
            else:
                scope = anyio.CancelScope(deadline=deadline(r))
                live.append(scope)
                awaited += 1
                try:
                    with scope:
                        await queue.put(item)
                        was_put = True
                except PoolClosed:
                    done_putting = True
                finally:
                    live.remove(scope)
            (returned if was_put else refused).append(item)
            if done_putting:
                return
            await pause(r)

    async def get(g: int) -> None:
        nonlocal done
        r = random.Random(f"{seed} getter {g}")
        while not stopping:
            item: Item | None = None
            if r.random() < 0.2:
                try:
                    item = queue.get_nowait()
                    got.append(item)
                except anyio.WouldBlock:
                    await checkpoint()
                except anyio.EndOfStream:
                    return
            else:
                scope = anyio.CancelScope(deadline=deadline(r))
                live.append(scope)
                try:
                    with scope:
                        item = await queue.get()
                        got.append(item)
                except anyio.EndOfStream:
                    return
                finally:
                    live.remove(scope)
                if scope.cancelled_caught and r.random() < 0.1:
                    return  # a consumer that gives up for good
            if item is not None and r.random() < 0.5:
                queue.task_done()
                done += 1
            await pause(r)

    async def chaos() -> None:
        nonlocal stopping
        r = random.Random(f"{seed} chaos")
        close_at = r.randint(0, 2 * steps)  # after the last step half the time
        own = 0  # the chaos task puts items of its own, as putter number `putters`

        def put_own() -> None:
            nonlocal own
            item = (putters, own)
            own += 1
            try:
                queue.put_nowait(item)
                returned.append(item)
            except (QueueFull, PoolClosed):
                refused.append(item)

        for step in range(steps):
            for _ in range(r.randint(0, 3)):
                await checkpoint()
            if step == close_at:
                queue.close()
            if not live or r.random() < 0.4:
                continue
            # cancel one or more of the puts and gets under way and, in the
            # same step, before they resume, hand them items (those that are
            # waiting getters) or room (waiting putters)
            for scope in r.sample(live, min(len(live), r.randint(1, 3))):
                scope.cancel()
            for _ in range(r.randint(0, 3)):
                if r.random() < 0.5:
                    put_own()
                else:
                    with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
                        got.append(queue.get_nowait())
        if r.random() < 0.5:
            # every put and get under way is cancelled, the getters stop, and
            # items put in the same step are handed to cancelled getters: what
            # they give back is left in the queue
            stopping = True
            for scope in live:
                scope.cancel()
            for _ in range(r.randint(0, getters + maxsize)):
                put_own()
        queue.close()

    async with anyio.create_task_group() as tg:
        for p in range(putters):
            tg.start_soon(put, p)
        for g in range(getters):
            tg.start_soon(get, g)
        tg.start_soon(chaos)

    drained: list[Item] = []
    while True:
        try:
            drained.append(queue.get_nowait())
        except anyio.EndOfStream:
            break
    taken = got + drained
    doubled = sorted(item for item in set(taken) if taken.count(item) > 1)
    assert not doubled, f"taken more than once: {doubled}"
    lost = sorted(set(returned) - set(taken))
    assert not lost, f"put, never taken: {lost}"
    refused_taken = sorted(set(refused) & set(taken))
    assert not refused_taken, f"their put raised, yet they were taken: {refused_taken}"
    assert set(taken) == set(returned)
    for p in range(putters + 1):
        left = [n for q, n in drained if q == p]
        assert left == sorted(left), f"putter {p}'s items left out of order: {left}"
    stats = queue.statistics()
    assert stats.backpressure_waits <= awaited
    assert stats == QueueStatistics(
        name=f"chaos {seed}",
        maxsize=maxsize,
        queued=0,
        unfinished=len(returned) - done,
        puts=len(returned),
        gets=len(taken),
        waiting_putters=0,
        waiting_getters=0,
        being_taken=0,
        backpressure_waits=stats.backpressure_waits,
        closed=True,
    )


class TestRandomCancellation:
    """Seeded random cancellation of putters and getters on every backend; on
    trio the clock is a MockClock, so random deadlines cost no time."""

    @pytest.fixture
    def anyio_backend(self, timing_anyio_backend: Any) -> Any:
        return timing_anyio_backend

    @pytest.mark.parametrize("seed", range(25))
    async def test_nothing_is_lost_or_doubled(self, seed: int, exact: bool) -> None:
        await chaos_trial(seed, virtual_time=exact)
