"""Plain handlers in worker threads, every thread accounted for.

A thread cannot be interrupted: when a timeout gives up on a threaded call, the
thread runs on, *abandoned*. So that abandoned threads neither pile up nor let
more calls run than a shared :class:`anyio.CapacityLimiter` allows, each call
runs in a runner task (in a task group of :class:`Threads`, inside the pool's)
that holds the call's thread slot, and the attempt's capacity token, until the
thread has ended, whatever its caller did meanwhile::

    caller:  [wait for a thread slot] ── hand the call to a runner ── wait ────┐
                  (the attempt's timeout runs from here, over both waits)      │ timeout:
    runner:                  run_sync(fn, item) ── release slot and token      │ caller goes on,
                                                                               ┘ the runner holds on

Runners park between calls. Only where an attempt can be given up on (a
timeout, a Retry deadline, user middleware) is this needed; otherwise the
worker runs the thread itself, which saves a hand-over per call.

A pool has ``2 * workers`` thread slots: a worker runs one call at a time, and
at most as many threads again may have been abandoned. A call that cannot get a
slot before its timeout fails with a ``TimeoutError`` saying so, and does not
count as an attempt (its handler was never called). When the pool ends, it does
not wait for abandoned threads: they finish in the background, and their slots
and tokens are given back as the block ends.

This is the same on every backend (anyio's own ``to_thread`` differs: on
asyncio a cancelled call gives its limiter token back at once, on trio only
when its thread ends).
"""

from __future__ import annotations

import contextvars
import inspect
import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from ._errors import attempt_timed_out

__all__ = ["Holds", "Threads", "holds_of_attempt"]


class Holds:
    """What one attempt holds (a capacity token, a thread slot): released when the
    attempt ends or, once its call runs in a thread, when that thread ends.

    It is also the borrower of those tokens in their limiters.
    """

    __slots__ = ("releases", "taken")

    def __init__(self) -> None:
        self.releases: list[Callable[[], None]] = []
        self.taken = False  # the call's runner releases them, not the attempt

    def release(self) -> None:
        """Release everything held (again: nothing)."""
        releases, self.releases = self.releases, []
        for release in reversed(releases):
            release()


# The holds of the attempt running in this task: set by the capacity limiter's
# layer of a threaded handler's chain (see _middleware), taken over by its call.
holds_of_attempt: contextvars.ContextVar[Holds | None] = contextvars.ContextVar(
    "corral_holds_of_attempt", default=None
)


class _Parked:
    """A runner waiting for a call: set ``call``, then ``event``."""

    __slots__ = ("call", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.call: _Call | None = None


class _Call:
    """One call of the plain function, between its caller and its runner."""

    __slots__ = (
        "abandoned",
        "context",
        "done",
        "error",
        "holds",
        "item",
        "on_start",
        "result",
        "skip",
        "started",
    )

    def __init__(self, item: Any, holds: Holds, on_start: Callable[[], None] | None) -> None:
        self.item = item
        self.holds = holds
        self.on_start = on_start
        # the caller's context variables, which the thread sees (a runner is
        # reused, and its own context is that of the call it started for)
        self.context = contextvars.copy_context()
        self.done = anyio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = False  # a runner took it: it releases the holds
        self.skip = False  # the caller gave up before a runner took it
        self.abandoned = False  # the caller gave up while the thread ran


def _boxed(fn: Callable[[Any], Any], item: Any) -> tuple[Any]:
    # a 1-tuple, so that a returned coroutine reaches the loop unexamined
    # (trio's to_thread refuses a function that returns one)
    return (fn(item),)


def _caught(fn: Callable[[Any], Any], item: Any) -> tuple[Any, BaseException | None]:
    """``fn(item)`` and what it raised, whatever it raised: a cancellation
    exception raised by ``fn`` must not pass for the runner's own."""
    try:
        return fn(item), None
    except BaseException as error:  # noqa: BLE001 - handed to the caller, who re-raises it
        return None, error


def _discard(result: Any) -> None:
    """A result nobody will await: close it if it is a coroutine (no warning)."""
    if inspect.iscoroutine(result):
        result.close()


class Threads:
    """The worker threads of one run of a pool or batcher, at most ``limit`` at
    once, abandoned ones included.

    :meth:`start` it in the pool's task group; :meth:`close` (when the pool
    ends) stops waiting for abandoned threads.
    """

    def __init__(self, fn: Callable[[Any], Any], limit: int, *, abandonable: bool) -> None:
        self._fn = fn
        self.limit = limit
        # Can a call be given up on while the pool goes on (a per-attempt
        # timeout, a Retry deadline, user middleware)? If not, a worker runs its
        # thread itself, without the hand-over to a runner (20-30% of a trivial
        # plain handler's cost; see BENCHMARKS.md and _call_directly).
        self.abandonable = abandonable
        self._slots = anyio.CapacityLimiter(limit)
        # what anyio's to_thread counts the call against: never the bottleneck
        # (the slots are), and never anyio's default of 40 threads
        self._unlimited = anyio.CapacityLimiter(math.inf)
        self._tg: anyio.abc.TaskGroup | None = None  # hosts the runners
        self._idle: list[_Parked] = []  # runners waiting for a call
        self._ready = anyio.Event()  # _tg is set
        self._closed = False
        self.abandoned = 0  # threads still running whose caller gave up

    def resize(self, limit: int) -> None:
        """A new bound on threads at once (a pool's workers were resized)."""
        self.limit = limit
        self._slots.total_tokens = limit

    def start(self, tg: anyio.abc.TaskGroup, label: str) -> None:
        """Start hosting runners in ``tg`` (the pool's), if calls may be given up on."""
        if self.abandonable:
            tg.start_soon(self.serve, name=f"corral threads {label}")

    async def serve(self) -> None:
        """Host the runners until :meth:`close` (or the pool's cancellation)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._ready.set()
            if self._closed:
                tg.cancel_scope.cancel()
            try:
                await anyio.sleep_forever()
            finally:
                # the task group may close as soon as its runners are done
                # (trio refuses new tasks then): no runner starts any more
                self._closed = True

    def close(self) -> None:
        """Stop: abandoned threads are no longer waited for (their holds are
        released now; the threads finish in the background)."""
        self._closed = True
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def caller(
        self,
        *,
        timeout: float | None,
        clock: Callable[[], float],
        on_start: Callable[[], None] | None = None,
    ) -> Callable[[Any], Awaitable[Any]]:
        """An async callable running the function in a thread, each attempt
        within ``timeout`` seconds (waiting for a thread slot included);
        ``on_start`` is called as a call starts (the pool counts attempts)."""
        slots = self._slots
        if not self.abandonable:
            assert timeout is None
            return self._call_directly(on_start)

        async def call_in_thread(item: Any) -> Any:
            if self._tg is None:  # serve() has not run yet
                await self._ready.wait()
            holds = holds_of_attempt.get() or Holds()
            ends_at = math.inf if timeout is None else clock() + timeout
            try:
                slots.acquire_on_behalf_of_nowait(holds)
            except anyio.WouldBlock:
                with anyio.CancelScope(deadline=ends_at) as waiting:
                    await slots.acquire_on_behalf_of(holds)
                if waiting.cancelled_caught:
                    raise self._no_thread_error(timeout) from None
            holds.releases.append(lambda: slots.release_on_behalf_of(holds))
            return await self._run(_Call(item, holds, on_start), ends_at, timeout)

        return call_in_thread

    def _call_directly(
        self, on_start: Callable[[], None] | None
    ) -> Callable[[Any], Awaitable[Any]]:
        """The caller when no call is given up on while the pool runs: the
        worker runs the thread itself, under the thread slots (a cancellation
        abandons the thread, but only as the whole pool stops)."""
        fn, slots, run_sync = self._fn, self._slots, anyio.to_thread.run_sync

        async def call_in_thread(item: Any) -> Any:
            if on_start is not None:
                on_start()
            (result,) = await run_sync(_boxed, fn, item, abandon_on_cancel=True, limiter=slots)
            if inspect.isawaitable(result):
                result = await result
            return result

        return call_in_thread

    async def _run(self, call: _Call, ends_at: float, seconds: float | None) -> Any:
        """Hand the call to a runner and wait for it (until ``ends_at``)."""
        assert self._tg is not None
        if self._closed:  # the pool is being cancelled, and this worker with it
            call.holds.release()
            await anyio.lowlevel.checkpoint()
            raise RuntimeError("the pool stopped: no thread is started any more")
        if self._idle:
            runner = self._idle.pop()
            runner.call = call
            runner.event.set()
        else:
            self._tg.start_soon(self._runner, call)
        call.holds.taken = True
        try:
            with anyio.CancelScope(deadline=ends_at):
                await call.done.wait()
        except BaseException:
            self._give_up(call)
            raise
        if not call.done.is_set():
            self._give_up(call)
            raise attempt_timed_out(seconds)
        if call.error is not None:
            raise call.error
        if not inspect.isawaitable(call.result):
            return call.result
        # awaited on the loop, within the timeout and the holds (the runner
        # left them to us)
        try:
            with anyio.CancelScope(deadline=ends_at):
                return await call.result
        finally:
            call.holds.release()
        raise attempt_timed_out(seconds)

    def _give_up(self, call: _Call) -> None:
        """The caller stops waiting: a call no runner has taken never will be; a
        running one is abandoned (its runner releases the holds when the thread
        ends); one that ended meanwhile only needs its holds released."""
        if call.done.is_set():
            _discard(call.result)
            call.holds.release()
        elif not call.started:
            call.skip = True
            call.holds.release()
        else:
            call.abandoned = True
            self.abandoned += 1

    async def _runner(self, call: _Call) -> None:
        """A task that runs calls, one at a time, and parks in between (handing a
        call to a parked runner costs a third of starting a task for it)."""
        while True:
            await self._execute(call)
            parked = _Parked()
            self._idle.append(parked)
            try:
                await parked.event.wait()
            except BaseException:
                if parked.call is None:
                    self._idle.remove(parked)
                else:  # handed a call, never ran it
                    parked.call.error = RuntimeError("the pool stopped before the call ran")
                    self._give_up(parked.call)
                    parked.call.done.set()
                raise
            assert parked.call is not None
            call = parked.call

    async def _execute(self, call: _Call) -> None:
        """Run the call's thread; release its holds when the thread ends (or,
        for an awaitable result, leave them to the caller who awaits it)."""
        call.started = True
        if call.skip:
            return
        if call.on_start is not None:
            call.on_start()  # the attempt counts from here: the handler is called
        try:
            call.result, call.error = await anyio.to_thread.run_sync(
                call.context.run,
                _caught,
                self._fn,
                call.item,
                abandon_on_cancel=True,
                limiter=self._unlimited,
            )
        except anyio.get_cancelled_exc_class():
            call.error = RuntimeError("the pool stopped before its thread finished")
            raise
        finally:
            if call.abandoned:
                self.abandoned -= 1
                _discard(call.result)
            if call.abandoned or not inspect.isawaitable(call.result):
                call.holds.release()
            call.done.set()

    def _no_thread_error(self, timeout: float | None) -> TimeoutError:
        return TimeoutError(
            f"timed out after timeout={timeout!r} s waiting for a free thread: all "
            f"{self.limit} threads are busy, {self.abandoned} of them abandoned by "
            "timeouts (the handler was not called)"
        )
