"""The life of a block (a Pool or a Batcher): one owner for entering, leaving,
and what the ``async with`` raises.

Entering makes a fresh :class:`Run` (the per-entry state, with the task group
every task of the block lives in), so nothing needs resetting between entries.
Leaving lets the work end (``_drain``), takes no more (``_close``), exits the
task group (cancelling what is left when there is an exception), records what
did not finish (``_finalize``), then sorts out what the block raises. The
subclass says only what differs.

States: NEW (never entered), RUNNING, STOPPING (takes no new items: it stopped
itself, or it is draining for exit), CLOSED (exited).
"""

from __future__ import annotations

import contextvars
import logging
import math
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Generic, NoReturn, Self, TypeVar, cast

import anyio
import anyio.abc
import anyio.lowlevel

from ._observe import Observer
from ._telemetry import Probe, probe_for
from ._threads import Threads

__all__ = ["CLOSED", "NEW", "RUNNING", "STOPPING", "Block", "Run", "stray_cancellation", "weakly"]

NEW, RUNNING, STOPPING, CLOSED = "new", "running", "stopping", "closed"


class Run:
    """What one entry into a block owns. Subclasses add their own state."""

    def __init__(self, threads: Threads | None) -> None:
        self.tg: anyio.abc.TaskGroup | None = None
        self.ended = False  # its task group has exited (after CLOSED: tasks end)
        self.threads = threads  # a plain handler's or flush's threads, if any
        self.clock: Callable[[], float] = anyio.current_time  # the loop's, once entered
        self.token: anyio.lowlevel.EventLoopToken | None = None  # that loop's
        # the context of the task that entered the block: tasks started later
        # (on demand) start in it, as if all had started at entry
        self.context = contextvars.Context()
        # why the block stopped itself: an exception that broke one of its
        # tasks (a callback raised, KeyboardInterrupt, ...), or fail_fast's
        self.stop_reason: BaseException | None = None
        self.probe: Probe | None = None  # an instrumentation's (see _telemetry)

    def start_soon(
        self, task: Callable[..., Coroutine[Any, Any, Any]], *args: Any, name: str
    ) -> None:
        """Start ``task`` in the block's task group, in the entry's context."""
        tg = self.tg
        assert tg is not None
        self.context.run(lambda: tg.start_soon(task, *args, name=name))


RunT = TypeVar("RunT", bound=Run)


class Block(Generic[RunT]):
    """The base of Pool and Batcher: ``async with`` and the state it moves through."""

    name: str | None
    _kind: str  # what an instrumentation calls it: pool, batcher
    _observer: Observer[Any]
    _log: logging.Logger
    _state: str
    _run: RunT

    # ------------------------------------------------------ what subclasses say

    def _new_run(self) -> RunT:
        """The state of a new entry (before its task group exists)."""
        raise NotImplementedError

    def _started(self, run: RunT) -> None:
        """The task group runs: start what must run from the start."""

    def _drain(self, exc: BaseException | None) -> Callable[[], Awaitable[None]] | None:
        """What lets the work end before the task group exits, if anything."""
        raise NotImplementedError

    def _on_close(self, run: RunT) -> None:
        """Take no more: wake whoever waits to add work."""
        raise NotImplementedError

    def _on_finalize(self, run: RunT) -> None:
        """The tasks have ended: record what did not finish."""
        raise NotImplementedError

    def _stop(self, run: RunT) -> None:
        """Stop the block's tasks and its body (the block stopped itself)."""
        raise NotImplementedError

    def _stop_error(self, run: RunT, *, block_failed: bool) -> BaseException | None:
        """What the block raises because it stopped itself (None: nothing)."""
        raise NotImplementedError

    @property
    def stats(self) -> Any:
        raise NotImplementedError

    def _exit_summary(self) -> tuple[object, str]:
        """The final stats snapshot, and how the stop is logged."""
        raise NotImplementedError

    # --------------------------------------------------------------- entering

    async def __aenter__(self) -> Self:
        if self._state in (RUNNING, STOPPING) or (self._run.tg and not self._run.ended):
            # (closed, but its tasks are still ending: its exit has not returned)
            raise RuntimeError(f"{self!r} is already running; enter it only once at a time")
        run = self._new_run()
        run.token = anyio.lowlevel.current_token()
        run.clock = _loop_clock(run.token)
        if self._observer.active:  # before the task group: it may raise
            self._observer.open(self.stats, self.name or "corral")
        run.probe = probe_for(self, self._kind, run.clock)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        run.tg = tg
        run.context = contextvars.copy_context()
        self._run = run
        self._state = RUNNING
        if run.threads is not None:
            run.threads.start(tg, self.name or hex(id(self)))
        self._started(run)
        if self._observer.active:
            self._observer.start(tg, lambda: self.stats, self._fail)
        self._log.debug("%r started", self)
        return self

    def _fail(self, error: BaseException) -> None:
        """Stop the block because of ``error``, which the block will raise."""
        run = self._run
        if run.stop_reason is None:
            run.stop_reason = error
            self._stop(run)

    # ----------------------------------------------------------------- leaving

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            suppress = await self._exit(exc_type, exc, tb)
        except BaseException:
            self._after_exit(raising=True)
            raise
        self._after_exit(raising=exc is not None and not suppress)
        return suppress

    async def _exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        run = self._run
        cancelled = anyio.get_cancelled_exc_class()
        block_failed = exc is not None and not isinstance(exc, cancelled)
        suppress, raised = await self._end_task_group(run, exc_type, exc, tb)
        if raised is not None and not block_failed:
            raised = _unwrap_group(raised)
            if isinstance(raised, cancelled):
                # a cancellation from outside wins over why the block stopped
                # itself, as in asyncio.TaskGroup, or asyncio.timeout would never see it
                self._raise_cancelled(run.stop_reason, raised)
        error = self._stop_error(run, block_failed=block_failed)
        if error is not None:
            raise error
        if block_failed:
            return False  # the block's own exception, re-raised exactly as it was
        if raised is not None:
            raise raised
        return suppress

    async def _end_task_group(
        self,
        run: RunT,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> tuple[bool, BaseException | None]:
        """Drain (if the block ended well), close, exit the task group, finalize.

        If the drain is interrupted (a cancellation), the task group exits
        with that instead. Returns its ``__aexit__`` result and what it raised.
        """
        drain = self._drain(exc) if self._state is RUNNING else None
        if drain is not None:
            try:
                await drain()
            except BaseException as interrupted:  # noqa: BLE001 - cancellation, re-raised by tg
                exc, exc_type, tb = interrupted, type(interrupted), interrupted.__traceback__
        self._close()
        tg = run.tg
        assert tg is not None
        try:
            return await tg.__aexit__(exc_type, exc, tb), None
        except BaseException as error:  # noqa: BLE001 - sorted out by _exit
            return False, error
        finally:
            self._close()
            self._on_finalize(run)
            run.ended = True

    def _close(self) -> None:
        if self._state is CLOSED:
            return
        self._state = CLOSED
        self._observer.stop()
        run = self._run
        if run.threads is not None:
            run.threads.close()
        self._on_close(run)

    def _raise_cancelled(self, reason: BaseException | None, cancelled: BaseException) -> NoReturn:
        """Cancelled from outside while the block stopped itself because of
        ``reason``: the cancellation propagates and ``reason`` is logged, not
        lost. A ``KeyboardInterrupt`` or ``SystemExit`` beats the cancellation."""
        if reason is not None and not isinstance(reason, Exception):
            raise reason
        if reason is not None:
            self._log.error(
                "%r stopped because of %r and was cancelled meanwhile; the cancellation propagates",
                self,
                reason,
                exc_info=reason,
            )
        raise cancelled

    def _after_exit(self, *, raising: bool) -> None:
        """Log the stop; the observer's last bar update and ``on_stats`` call.
        What ``on_stats`` raises comes out of the block, unless the block is
        raising already: then it is logged."""
        stats, summary = self._exit_summary()
        self._log.debug("%r stopped: %s", self, summary)
        try:
            self._observer.finish(stats)
        except Exception:
            if not raising:
                raise  # the block ends with on_stats's error
            self._log.exception("on_stats raised at exit, while the block was raising")


def _loop_clock(token: anyio.lowlevel.EventLoopToken) -> Callable[[], float]:
    """The running event loop's clock, looked up once instead of once per read.

    Always the clock :func:`anyio.current_time` reads (so trio's MockClock and
    any asyncio loop with its own ``time()`` apply): on asyncio the loop's own
    ``time`` method; elsewhere the backend's, from anyio's event loop token.
    :func:`anyio.current_time` finds the backend on every call, about 0.9 µs on
    trio, and the per-item path reads the clock twice.
    """
    loop_time = getattr(token.native_token, "time", None)  # an asyncio event loop
    if callable(loop_time):
        return cast("Callable[[], float]", loop_time)
    return token.backend_class.current_time


def _unwrap_group(exc: BaseException) -> BaseException:
    """Undo the one group the task group wrapped a single exception in.

    Only one level: a group that the block, a handler or a callback raised
    itself comes out as it was raised.
    """
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return exc.exceptions[0]
    return exc


def stray_cancellation(exc: BaseException) -> Exception:
    """A cancellation exception that reached a worker or flusher: re-raise it if
    the task is being cancelled; otherwise (asyncio: a handler awaited something
    that was cancelled, or raised CancelledError itself) it is that call's error."""
    if anyio.current_effective_deadline() == -math.inf:
        raise exc
    error = RuntimeError(
        f"the handler raised {type(exc).__name__} although its worker was not "
        "cancelled (did it await a task or future that was cancelled?)"
    )
    error.__cause__ = exc
    return error


def weakly(method: Callable[..., None]) -> Callable[..., None]:
    """``method`` (bound to a block), as a callback that does not keep the block
    alive: a primitive in the block's run state calls it, and a strong reference
    back would make a cycle, so that a block and all it holds (apply_to_all's
    outcomes, say) would wait for the cyclic garbage collector instead of going
    as soon as the last reference does. Once the block is gone it does nothing.
    """
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)

    return call
