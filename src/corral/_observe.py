"""Watching a Pool or Batcher run: progress bars, periodic stats, logging.

None of it touches the per-item path. A progress bar and ``on_stats`` are fed
by a task in the pool's own task group that takes a stats snapshot every so
often; logging happens at entry, at exit and on failures only.

Loggers: ``corral`` is the root; a pool logs to ``corral.pool`` (or
``corral.pool.<name>``), a batcher to ``corral.batcher`` (``.<name>``). The
root has a :class:`logging.NullHandler`, so nothing is printed unless the
application configures logging. While a tqdm bar that corral draws is shown,
corral's records that the application's handlers would print to the console
are written with ``tqdm.write`` instead, so that a failure's line does not land
in the middle of the bar's (see :class:`_ThroughBars`).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.abc

from ._handlers import is_async_callable
from ._validate import check_number

__all__ = [
    "Observer",
    "ProgressBar",
    "check_on_stats",
    "check_progress",
    "logger_for",
]

S = TypeVar("S")

logging.getLogger("corral").addHandler(logging.NullHandler())

# how often a progress bar is moved (tqdm redraws at most every 0.1 s anyway)
_PROGRESS_INTERVAL = 0.1

# The rate a bar of corral's own shows: tqdm's moving average of each redraw's
# step, weighted 0.05 (its default, 0.3, follows a rate limiter's bursts: a few
# redraws make up the rate shown); about the last 20 redraws, a few seconds.
# Not 0, tqdm's average since the start: then it redraws only after as many
# items as the largest step seen so far.
_SMOOTHING = 0.05


def logger_for(kind: str, name: str | None) -> logging.Logger:
    """``corral.<kind>``, or ``corral.<kind>.<name>`` for a named pool or batcher."""
    return logging.getLogger(f"corral.{kind}.{name}" if name else f"corral.{kind}")


def _console_stream(handler: logging.Handler) -> Any:
    """The stream of a handler that writes to the console (where a bar is), or None."""
    if isinstance(handler, logging.StreamHandler):
        stream = handler.stream
        if stream is sys.stderr or stream is sys.stdout:
            return stream
    return None


class _ThroughBars(logging.Handler):
    """While corral shows tqdm bars: on the ``corral`` logger, whose
    propagation is turned off meanwhile, it does what propagation did (hands
    each record to the handlers of the logger's ancestors, the root's that
    ``logging.basicConfig`` set up, say), except that a handler that writes to
    ``sys.stderr`` or ``sys.stdout`` has its formatted record written with the
    bars' ``write`` (``tqdm.write``: clears the bars, writes, draws them again)
    instead of in the middle of a bar's line. Handlers of corral's own loggers
    (``corral``, ``corral.pool``, ...) are left as they are.
    """

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger
        self.propagate = logger.propagate  # as it was: put back at the end
        self.bar_classes: list[Any] = []  # of the bars shown, the newest last

    def emit(self, record: logging.LogRecord) -> None:
        if not self.propagate:
            return  # the application turned it off: nothing went to the ancestors
        found = False
        logger = self.logger.parent
        while logger is not None:  # Logger.callHandlers, from the parent up
            for handler in logger.handlers:
                found = True
                if record.levelno >= handler.level:
                    self._hand(handler, record)
            logger = logger.parent if logger.propagate else None
        last_resort = logging.lastResort  # used when no handler at all is found
        if (
            not found
            and last_resort is not None
            and record.levelno >= last_resort.level
            and not self._handled_below(record)
        ):
            self._hand(last_resort, record)

    def _handled_below(self, record: logging.LogRecord) -> bool:
        """A handler other than this one, from the record's logger to ``corral``."""
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return True
            logger = None if logger is self.logger else logger.parent
        return False

    def _hand(self, handler: logging.Handler, record: logging.LogRecord) -> None:
        stream = _console_stream(handler)
        if stream is None:
            handler.handle(record)
            return
        assert isinstance(handler, logging.StreamHandler)
        allowed = handler.filter(record)  # (a record, on Python 3.12+, or a bool)
        if not allowed:
            return
        if isinstance(allowed, logging.LogRecord):
            record = allowed
        handler.acquire()
        try:
            line = handler.format(record)
            self.bar_classes[-1].write(line, file=stream, end=handler.terminator)
            handler.flush()
        except RecursionError:  # as logging.StreamHandler.emit does
            raise
        except Exception:  # noqa: BLE001 - logging's way: reported, never raised
            handler.handleError(record)
        finally:
            handler.release()


_through_lock = threading.Lock()
_through: _ThroughBars | None = None  # while a bar corral draws is shown


def _log_through(bar_class: Any) -> None:
    """Write corral's console logging with ``bar_class.write`` until the
    matching :func:`_stop_logging_through` (bars of several pools can be
    shown at once: the first installs :class:`_ThroughBars`, the last removes it)."""
    global _through
    with _through_lock:
        if _through is None:
            logger = logging.getLogger("corral")
            _through = _ThroughBars(logger)
            logger.addHandler(_through)
            logger.propagate = False
        _through.bar_classes.append(bar_class)


def _stop_logging_through(bar_class: Any) -> None:
    """Undo one :func:`_log_through`; the last puts the ``corral`` logger back
    as it was."""
    global _through
    with _through_lock:
        if _through is None:
            return
        if bar_class in _through.bar_classes:
            _through.bar_classes.remove(bar_class)
        if not _through.bar_classes:
            _through.logger.removeHandler(_through)
            _through.logger.propagate = _through.propagate
            _through = None


@runtime_checkable
class ProgressBar(Protocol):
    """What ``progress=`` accepts besides ``True``: a tqdm-compatible bar.

    corral calls ``update(n)`` with the number of items finished since the last
    call and, when the bar has them, ``set_postfix(dict, refresh=False)`` with
    the failure and retry counts and ``refresh()`` at the end. It never closes
    a bar it did not create.
    """

    def update(self, n: float = 1, /) -> object:
        """Count ``n`` more finished items (called on the event loop: must not block)."""
        ...


def check_progress(progress: object) -> None:
    """Reject a ``progress=`` value corral cannot use, naming the parameter.

    ``True`` needs tqdm: without it, the error says how to install it.
    """
    if progress is None or progress is False:
        return
    if progress is True:
        try:
            import tqdm.auto  # noqa: F401 - only checking it is there
        except ImportError:
            from ._extras import install_hint

            raise ModuleNotFoundError(
                "progress=True draws its bar with tqdm, which is not installed: "
                f"{install_hint('progress')}; or pass a tqdm-compatible bar object"
            ) from None
        return
    if not callable(getattr(progress, "update", None)):
        raise TypeError(
            f"progress must be True, False or a tqdm-compatible bar with an "
            f"update(n) method, got {progress!r}"
        )


def check_on_stats(on_stats: object, stats_interval: object) -> float:
    """Validate ``on_stats`` (a plain callable or None) and ``stats_interval``."""
    if on_stats is not None:
        if not callable(on_stats):
            raise TypeError(f"on_stats must be a callable, got {on_stats!r}")
        if is_async_callable(on_stats):
            raise TypeError(
                f"on_stats must be a plain function, got the async {on_stats!r}: it is "
                "called on the event loop with a snapshot; hand slow work to a task of yours"
            )
    return check_number("stats_interval", stats_interval, positive=True)


class Observer(Generic[S]):
    """The progress bar and ``on_stats`` of one Pool or Batcher.

    ``count`` maps a snapshot to (items finished, postfix fields) for the bar.
    """

    def __init__(
        self,
        *,
        progress: bool | ProgressBar | None,
        on_stats: Callable[[S], object] | None,
        stats_interval: float,
        count: Callable[[S], tuple[int, dict[str, int]]],
    ) -> None:
        """Check the user's ``progress``, ``on_stats`` and ``stats_interval``."""
        check_progress(progress)
        self._interval = check_on_stats(on_stats, stats_interval)
        # identity tests only: a tqdm bar has a __bool__ (False for total=0, an
        # error without a total)
        self._progress = None if progress is False else progress
        self._on_stats = on_stats
        self._count = count
        self.total: int | None = None  # set by apply_to_all / apply_to_each
        self._bar: Any = None
        self._owned = False
        self._base = self._shown = 0
        self._postfix: dict[str, int] = {}  # the postfix last shown
        # the bar's drawing or on_stats raised: the pool is stopping, and that
        # one is not called again at exit
        self._bar_broken = self._stats_broken = False
        self._bar_scope: anyio.CancelScope | None = None
        self._stats_scope: anyio.CancelScope | None = None
        self._bar_class: Any = None  # the tqdm class whose write() takes corral's logging

    @property
    def active(self) -> bool:
        return self._progress is not None or self._on_stats is not None

    @property
    def wants_total(self) -> bool:
        """A bar of corral's own, which shows the input's length as its total."""
        return self._progress is True

    def open(self, snapshot: S, label: str) -> None:
        """Before the task group: open the bar (``progress=True``) and take the
        baseline, so that nothing that can fail happens after the pool started."""
        self._bar_broken = self._stats_broken = False
        self._bar_scope, self._stats_scope = anyio.CancelScope(), anyio.CancelScope()
        # the bar counts this run's items (a pool's stats accumulate over entries)
        self._base, self._shown = self._count(snapshot)[0], 0
        self._postfix = {}
        if self._progress is True:
            from tqdm.auto import tqdm

            self._bar, self._owned = (
                tqdm(total=self.total, desc=label, unit="item", smoothing=_SMOOTHING),
                True,
            )
        elif self._progress is not None:
            self._bar, self._owned = self._progress, False
        self._log_through_bar(self._bar)

    def start(
        self,
        tg: anyio.abc.TaskGroup,
        snapshot: Callable[[], S],
        fail: Callable[[BaseException], None],
    ) -> None:
        """Start sampling in ``tg``; :meth:`stop` ends it even before it ran."""
        if self._bar is not None and self._bar_scope is not None:
            tg.start_soon(self._every, self._bar_scope, _PROGRESS_INTERVAL, snapshot, fail)
        if self._on_stats is not None and self._stats_scope is not None:
            tg.start_soon(self._every, self._stats_scope, self._interval, snapshot, fail)

    async def _every(
        self,
        scope: anyio.CancelScope,
        interval: float,
        snapshot: Callable[[], S],
        fail: Callable[[BaseException], None],
    ) -> None:
        on_stats = self._on_stats if scope is self._stats_scope else None
        with scope:
            while True:
                await anyio.sleep(interval)
                try:
                    if on_stats is None:
                        self._draw(snapshot())
                    else:
                        on_stats(snapshot())
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as error:  # noqa: BLE001 - stops the pool, re-raised by it
                    if on_stats is None:
                        self._bar_broken = True
                    else:
                        self._stats_broken = True
                    fail(error)
                    return

    def stop(self) -> None:
        """Stop sampling (the pool is closing; its task group must be able to end)."""
        for scope in (self._bar_scope, self._stats_scope):
            if scope is not None:
                scope.cancel()

    def finish(self, stats: S) -> None:
        """After the block: last bar update and ``on_stats`` call; close an own bar.

        Raises what ``on_stats`` raised.
        """
        bar, self._bar = self._bar, None
        try:
            if bar is not None and not self._bar_broken:
                self._draw(stats, bar)
                refresh = getattr(bar, "refresh", None)
                if not self._owned and callable(refresh):
                    refresh()  # (closing an own bar draws it a last time)
        finally:
            try:
                if self._owned:
                    self._owned = False
                    bar.close()
            finally:
                self._log_through_bar(None)
        if self._on_stats is not None and not self._stats_broken:
            self._on_stats(stats)

    def _log_through_bar(self, bar: Any) -> None:
        """While ``bar`` (a tqdm bar) is shown, write corral's log records that
        would go to the console with its ``write``; None: stop (at exit)."""
        if self._bar_class is not None:  # (also one left by an entry that never exited)
            _stop_logging_through(self._bar_class)
            self._bar_class = None
        tqdm_std = sys.modules.get("tqdm.std")  # loaded if bar is a tqdm bar
        if bar is not None and tqdm_std is not None and isinstance(bar, tqdm_std.tqdm):
            _log_through(type(bar))
            self._bar_class = type(bar)

    def _draw(self, stats: S, bar: Any = None) -> None:
        bar = self._bar if bar is None else bar
        done, postfix = self._count(stats)
        done -= self._base
        set_postfix = getattr(bar, "set_postfix", None)
        if postfix and callable(set_postfix):
            # redrawn at once when only the postfix changed (failures and no
            # progress): else a bar stuck at 0 would not show them
            changed = postfix != self._postfix
            set_postfix(postfix, refresh=changed and done == self._shown)
            self._postfix = postfix
        if done != self._shown:
            bar.update(done - self._shown)
            self._shown = done
