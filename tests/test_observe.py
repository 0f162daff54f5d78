"""Progress bars, on_stats sampling and logging, on Pool, Batcher and the helpers."""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint

import corral
from corral import Batcher, BatcherStats, Pool, PoolStats

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend(timing_anyio_backend: Any) -> Any:
    return timing_anyio_backend


class FakeBar:
    """A tqdm-compatible bar that records what corral did to it."""

    def __init__(self, total: int | None = None, **options: Any) -> None:
        self.total = total
        self.options = options
        self.n = 0
        self.updates: list[float] = []
        self.postfix: dict[str, Any] = {}
        self.refreshed = 0
        self.closed = False
        self.waiters: list[tuple[int, anyio.Event]] = []

    def update(self, n: float = 1) -> None:
        assert not self.closed
        self.updates.append(n)
        self.n += int(n)
        for count, event in self.waiters:
            if self.n >= count:
                event.set()

    async def wait_for(self, count: int) -> None:
        event = anyio.Event()
        self.waiters.append((count, event))
        await event.wait()

    def set_postfix(self, ordered_dict: dict[str, Any], refresh: bool = True) -> None:
        self.postfix = dict(ordered_dict)

    def refresh(self) -> None:
        self.refreshed += 1

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def made_bars(monkeypatch: pytest.MonkeyPatch) -> list[FakeBar]:
    """Make ``progress=True`` build FakeBars (tqdm itself draws on stderr)."""
    import tqdm.auto

    bars: list[FakeBar] = []

    def make(**options: Any) -> FakeBar:
        bars.append(FakeBar(**options))
        return bars[-1]

    monkeypatch.setattr(tqdm.auto, "tqdm", make)
    return bars


async def flaky(n: int) -> int:
    await checkpoint()
    if n % 10 == 3:
        raise ValueError(f"item {n} is bad")
    return n


# ------------------------------------------------------------------ progress


async def test_progress_true_counts_every_item_with_total_and_failures(
    made_bars: list[FakeBar],
) -> None:
    """apply_to_all(progress=True) makes one bar whose total is the input's length;
    at the end it has counted every item and shows the failures, and is closed."""
    outcomes = await corral.apply_to_all(flaky, list(range(50)), workers=4, progress=True)
    assert len(outcomes) == 50
    (bar,) = made_bars
    assert bar.total == 50
    assert bar.n == 50
    assert bar.postfix == {"failed": 5, "retried": 0}
    assert bar.closed


async def test_progress_total_unknown_for_a_generator(made_bars: list[FakeBar]) -> None:
    """An input without a length gives a bar without a total (a count and a rate)."""
    async with corral.apply_to_each(flaky, (n for n in range(20)), progress=True) as outcomes:
        assert len([o async for o in outcomes]) == 20
    (bar,) = made_bars
    assert bar.total is None
    assert bar.n == 20


async def test_progress_total_unknown_for_a_queue(made_bars: list[FakeBar]) -> None:
    """A corral.Queue as input has a length (what is queued now), which is not
    the total: its bar has none."""
    queue: corral.Queue[int] = corral.Queue(20)
    for n in range(4):
        queue.put_nowait(n)

    async def produce() -> None:
        for n in range(4, 12):
            await queue.put(n)
        queue.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        outcomes = await corral.apply_to_all(flaky, queue, progress=True)
    assert len(outcomes) == 12
    (bar,) = made_bars
    assert bar.total is None
    assert bar.n == 12


async def test_progress_shows_retries(made_bars: list[FakeBar]) -> None:
    """Retried attempts appear in the bar's postfix."""
    calls: dict[int, int] = {}

    async def twice(n: int) -> int:
        calls[n] = calls.get(n, 0) + 1
        if calls[n] == 1:
            raise ConnectionError("first call fails")
        return n

    retry = corral.Retry(attempts=2, wait_initial=0)
    await corral.apply_to_all(twice, range(10), retry=retry, progress=True)
    assert made_bars[0].postfix == {"failed": 0, "retried": 10}
    assert made_bars[0].n == 10


async def test_progress_moves_while_the_pool_runs() -> None:
    """The bar advances during the run, not only at the end: it is sampled
    periodically (here, while 5 items wait on a gate and 5 are done)."""
    bar = FakeBar()
    gate = anyio.Event()

    async def handler(n: int) -> int:
        if n >= 5:
            await gate.wait()
        return n

    async with Pool(handler, workers=10, progress=bar) as pool:
        for n in range(10):
            await pool.submit(n)
        with anyio.fail_after(10):
            await bar.wait_for(5)
        assert bar.n == 5
        gate.set()
    assert bar.n == 10


async def test_user_bar_is_left_open_and_counts_each_run() -> None:
    """A bar passed in is updated but never closed; a pool entered twice adds
    each run's items to it (not the accumulated stats twice)."""
    bar = FakeBar(total=30)
    pool = Pool(flaky, progress=bar)
    for run in (10, 20):
        async with pool:
            for n in range(run):
                await pool.submit(n)
    assert bar.n == 30
    assert not bar.closed
    assert bar.refreshed == 2
    assert bar.total == 30


async def test_batcher_progress_counts_items_and_batches(made_bars: list[FakeBar]) -> None:
    """A Batcher's bar counts flushed items and shows the batches."""

    async def save(batch: list[int]) -> None:
        await checkpoint()

    async with Batcher(save, max_size=10, progress=True, name="sink") as batcher:
        for n in range(95):
            await batcher.add(n)
    (bar,) = made_bars
    assert bar.n == 95
    assert bar.postfix == {"batches": 10, "failed flushes": 0}
    assert bar.options["desc"] == "sink"
    assert bar.closed


def test_progress_true_without_tqdm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for a bar without tqdm fails at construction with the install hint."""
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ModuleNotFoundError, match=r"corral\[progress\]"):
        Pool(flaky, progress=True)
    with pytest.raises(ModuleNotFoundError, match=r"corral\[progress\]"):
        Batcher(print, progress=True)


def test_progress_rejects_what_is_not_a_bar() -> None:
    """progress= must be a bool or have update(n); the error names the parameter."""
    with pytest.raises(TypeError, match="progress must be"):
        Pool(flaky, progress="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="progress must be"):
        corral.apply_to_each(flaky, [1], progress=object())  # type: ignore[arg-type]


def test_progress_false_needs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without progress=, tqdm is never imported (it is an optional extra)."""
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    Pool(flaky)
    Batcher(print)


# ------------------------------------------------------------------ on_stats


async def test_on_stats_is_called_every_interval_and_at_exit(exact: bool) -> None:
    """on_stats gets a snapshot every stats_interval while the pool runs and a
    last one at exit, equal to the final stats."""
    unit = 1.0 if exact else 0.05
    snapshots: list[tuple[float, PoolStats]] = []

    def record(stats: PoolStats) -> None:
        snapshots.append((anyio.current_time(), stats))

    async def slow(n: int) -> int:
        await anyio.sleep(unit)
        return n

    start = anyio.current_time()
    async with Pool(slow, workers=1, on_stats=record, stats_interval=2.2 * unit) as pool:
        for n in range(10):
            await pool.submit(n)
    assert snapshots[-1][1] == pool.stats
    assert snapshots[-1][1].succeeded == 10
    periodic = snapshots[:-1]
    if exact:
        assert [round(t - start, 6) for t, _ in periodic] == [2.2, 4.4, 6.6, 8.8]
        assert [s.succeeded for _, s in periodic] == [2, 4, 6, 8]
    else:
        assert 2 <= len(periodic) <= 5
    done = [s.succeeded for _, s in snapshots]
    assert done == sorted(done)


async def test_batcher_on_stats_final_snapshot() -> None:
    """A Batcher's on_stats gets its BatcherStats; the last call is the final one."""
    seen: list[BatcherStats] = []

    async def save(batch: list[int]) -> None:
        pass

    async with Batcher(save, max_size=4, on_stats=seen.append) as batcher:
        for n in range(10):
            await batcher.add(n)
    assert seen[-1] == batcher.stats
    assert seen[-1].flushed == 10


async def test_on_stats_that_raises_stops_the_pool_and_is_reraised() -> None:
    """An on_stats error stops the pool like an on_outcome error: the block
    re-raises it and the items without outcome are in unfinished."""
    gate = anyio.Event()

    async def stuck(n: int) -> int:
        await gate.wait()
        return n

    def broken(stats: PoolStats) -> None:
        raise RuntimeError("exporter down")

    pool = Pool(stuck, workers=2, on_stats=broken, stats_interval=0.01)
    with pytest.raises(RuntimeError, match="exporter down"):
        async with pool:
            for n in range(3):
                await pool.submit(n)
            await anyio.sleep_forever()
    assert pool.unfinished == [0, 1, 2]


async def test_on_stats_error_at_exit_is_raised() -> None:
    """If only the final call fails, the otherwise clean block raises it."""
    calls: list[PoolStats] = []

    def fails_at_end(stats: PoolStats) -> None:
        calls.append(stats)
        if stats.succeeded == 3:
            raise RuntimeError("final export failed")

    with pytest.raises(RuntimeError, match="final export failed"):
        await corral.apply_to_all(flaky, [0, 1, 2], on_stats=fails_at_end, stats_interval=60)
    assert len(calls) == 1


def test_on_stats_must_be_a_plain_callable_and_interval_positive() -> None:
    """Bad on_stats / stats_interval get a clear error naming the parameter."""

    async def async_export(stats: PoolStats) -> None:
        pass

    with pytest.raises(TypeError, match="on_stats must be a plain function"):
        Pool(flaky, on_stats=async_export)
    with pytest.raises(TypeError, match="on_stats must be a callable"):
        Batcher(print, on_stats=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stats_interval must be > 0"):
        Pool(flaky, on_stats=print, stats_interval=0)
    with pytest.raises(TypeError, match="stats_interval must be a number"):
        Batcher(print, stats_interval="1")  # type: ignore[arg-type]


# ------------------------------------------------------------------- logging


async def test_logging_failures_at_warning_and_lifecycle_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A named pool logs to corral.pool.<name>: start and stop at DEBUG, each
    retry at INFO, each final failure at WARNING with the item id, attempts
    and the exception; nothing for successful items."""
    caplog.set_level(logging.DEBUG, logger="corral")
    retry = corral.Retry(attempts=2, wait_initial=0)
    async with Pool(flaky, retry=retry, name="fetch") as pool:
        for n in range(6):
            await pool.submit(n, id=f"rec-{n}")
    records = [r for r in caplog.records if r.name == "corral.pool.fetch"]
    levels = [logging.DEBUG, logging.INFO, logging.WARNING, logging.DEBUG]
    assert [r.levelno for r in records] == levels
    assert "retrying 3 after attempt 1 of 2 failed with ValueError" in records[1].getMessage()
    failure = records[2]
    assert "'rec-3'" in failure.getMessage()
    assert "after 2 attempts" in failure.getMessage()
    assert "item 3 is bad" in failure.getMessage()
    assert failure.exc_info is not None
    assert isinstance(failure.exc_info[1], ValueError)
    assert "5 succeeded, 1 failed, 0 unfinished" in records[3].getMessage()


async def test_logging_flush_failures(caplog: pytest.LogCaptureFixture) -> None:
    """A Batcher logs each failed flush at WARNING, saying what happens next."""
    caplog.set_level(logging.WARNING, logger="corral")
    failures = iter([True, False])
    saved = anyio.Event()

    async def save(batch: list[int]) -> None:
        if next(failures):
            raise ConnectionError("database restarting")
        saved.set()

    async with Batcher(save, max_size=5) as batcher:
        for n in range(5):
            await batcher.add(n)
        with anyio.fail_after(10):
            await saved.wait()  # after the failure's backoff, inside the block
    (record,) = caplog.records
    assert record.name == "corral.batcher"
    assert record.levelno == logging.WARNING
    assert "a flush of 5 items failed (5 back in the queue)" in record.getMessage()
    assert batcher.stats.flushed == 5


async def test_logging_says_what_becomes_of_a_failed_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The WARNING for a failed flush says which items go to their submit
    callers and, for a final flush, that the rest is left unflushed."""
    caplog.set_level(logging.WARNING, logger="corral")

    async def save(batch: list[int]) -> None:
        raise ConnectionError("database gone")

    errors: list[BaseException] = []

    async def submit(batcher: Batcher[int, None], n: int) -> None:
        try:
            await batcher.submit(n)
        except ConnectionError as error:
            errors.append(error)

    with pytest.raises(corral.FlushError):
        async with (
            Batcher(save, max_size=3, max_wait=0.01, name="db") as batcher,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(submit, batcher, 0)
            await anyio.wait_all_tasks_blocked()
            batcher.add_nowait(1)
    messages = [r.getMessage() for r in caplog.records if r.name == "corral.batcher.db"]
    assert "1 handed back to their submit callers" in messages[0]
    assert "1 left unflushed" in messages[-1]
    assert messages[-1].count("flushing ends") == 1
    assert len(errors) == 1


def test_no_output_unless_the_application_configures_logging() -> None:
    """With logging unconfigured, a failing item prints nothing (corral's logger
    has a NullHandler, so Python's last-resort stderr handler stays quiet)."""
    code = (
        "import anyio, corral\n"
        "async def bad(n):\n"
        "    raise ValueError(n)\n"
        "outcomes = anyio.run(corral.apply_to_all, bad, [1, 2])\n"
        "assert not any(o.ok for o in outcomes)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == result.stderr == ""


# ------------------------------------------------------- found in review


async def test_an_empty_job_with_observers_ends() -> None:
    """With nothing to do, a pool with progress and on_stats still ends at once:
    its samplers are stopped even if they had not started yet (trio runs new
    tasks in random order, so this is tried many times)."""
    for _ in range(30):
        with anyio.fail_after(5):
            outcomes = await corral.apply_to_all(
                flaky, [], progress=FakeBar(), on_stats=lambda stats: None
            )
        assert outcomes == []


class FalsyBar(FakeBar):
    """Like tqdm(total=0), which is falsy."""

    def __bool__(self) -> bool:
        return False


class NoTruthBar(FakeBar):
    """Like tqdm() without a total, whose bool() raises."""

    def __bool__(self) -> bool:
        raise TypeError("bool() undefined when iterable == total == None")


@pytest.mark.parametrize("bar_class", [FalsyBar, NoTruthBar])
async def test_a_bar_whose_truth_is_odd_is_still_used(bar_class: type[FakeBar]) -> None:
    """corral never asks a bar for its truth value: tqdm bars are falsy or
    refuse bool() depending on their total."""
    bar = bar_class()
    async with Pool(flaky, progress=bar) as pool:
        for n in range(5):
            await pool.submit(n)
    assert bar.n == 5


async def test_a_bar_that_cannot_be_made_leaves_nothing_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If making the bar fails, entering the pool fails before any task
    starts: the pool is not left running and can be entered again."""
    import tqdm.auto

    def broken(**options: Any) -> Any:
        raise OSError("no terminal")

    monkeypatch.setattr(tqdm.auto, "tqdm", broken)
    pool = Pool(flaky, progress=True)
    with pytest.raises(OSError, match="no terminal"):
        async with pool:
            pass
    monkeypatch.undo()
    monkeypatch.setattr(tqdm.auto, "tqdm", FakeBar)
    async with pool:  # the same pool: it was not left running
        await pool.submit(1)
    assert pool.stats.succeeded == 1


async def test_a_huge_or_lazy_input_length_is_not_asked_for_without_a_bar() -> None:
    """Only a bar of corral's own asks the input for its length; a length
    beyond len() (range(10**20)) gives a bar without a total."""

    class Lazy:
        def __len__(self) -> int:
            raise AssertionError("len() must not be called")

        def __iter__(self) -> Any:
            return iter(range(3))

    assert len(await corral.apply_to_all(flaky, Lazy(), on_stats=lambda stats: None)) == 3
    async with corral.apply_to_each(flaky, range(10**20), progress=FakeBar()) as outcomes:
        async for _ in outcomes:
            break


class Abort(BaseException):
    """Neither an Exception nor a cancellation, like KeyboardInterrupt."""


async def test_on_stats_raising_a_base_exception_stops_the_pool() -> None:
    """A BaseException from on_stats stops the pool and comes out of the block
    unwrapped, as one from on_outcome does."""

    def abort(stats: PoolStats) -> None:
        raise Abort

    gate = anyio.Event()

    async def stuck(n: int) -> int:
        await gate.wait()
        return n

    pool = Pool(stuck, on_stats=abort, stats_interval=0.01)
    with pytest.raises(Abort):
        async with pool:
            await pool.submit(1)
            await anyio.sleep_forever()
    assert pool.unfinished == [1]


def test_progress_bar_protocol_matches_tqdm_and_look_alikes() -> None:
    """corral.ProgressBar (runtime-checkable) matches a tqdm bar and any object
    with update(n), and not one without: the shape progress= accepts."""
    import tqdm

    with tqdm.tqdm(total=1, disable=True) as bar:
        assert isinstance(bar, corral.ProgressBar)
    assert isinstance(FakeBar(), corral.ProgressBar)
    assert not isinstance(object(), corral.ProgressBar)


class DrawingBar(FakeBar):
    """A FakeBar that knows what a real bar would show: the postfix as of its
    last redraw (tqdm redraws on update, refresh() or set_postfix(refresh=True))."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: dict[str, Any] = {}
        self.shows_failures = anyio.Event()

    def _draw(self) -> None:
        self.shown = dict(self.postfix)
        if self.shown.get("failed flushes"):
            self.shows_failures.set()

    def update(self, n: float = 1) -> None:
        super().update(n)
        self._draw()

    def set_postfix(self, ordered_dict: dict[str, Any], refresh: bool = True) -> None:
        super().set_postfix(ordered_dict)
        if refresh:
            self._draw()

    def refresh(self) -> None:
        super().refresh()
        self._draw()


# untraced: while the flush's thread runs, trio's MockClock jumps from timer to
# timer; under coverage's tracer the thread took long enough to reach fail_after
@pytest.mark.untraced
async def test_a_batcher_bar_shows_failed_flushes_before_anything_is_flushed() -> None:
    """A flush that never succeeds: the bar, stuck at 0 items, still shows the
    failed flushes from the first one (it looked like a silent hang)."""
    bar = DrawingBar()

    def broken(batch: list[int]) -> None:
        raise sqlite3.ProgrammingError("Cannot operate on a closed database.")

    # a guard against a hang, in virtual time, which jumps from timer to timer
    # (the bar's, ten a second) while the flush's thread runs: generous, so
    # that a slow thread is no failure (120 s of jumps once ran out on 3.13)
    with anyio.fail_after(3600):
        with anyio.CancelScope() as scope:
            async with Batcher(broken, max_size=2, progress=bar) as batcher:
                await batcher.add(1)
                await batcher.add(2)
                await bar.shows_failures.wait()
                assert bar.n == 0
                scope.cancel()
    assert batcher.unflushed == [1, 2]


# ------------------------------------------- the bar's rate, logging beside it


async def test_the_bar_shows_the_average_rate_not_the_bursts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Items that finish in bursts, as under a rate limiter (5, then 15, then
    5, ..., a burst a second): every rate the bar of corral's own shows is
    within 2% of the items done so far over the time so far (with tqdm's
    default smoothing, 10.9 item/s after 2, 4, 6 s, for 10). The bar's clock
    is the test's."""
    import tqdm.auto
    import tqdm.std

    now = 0.0
    monkeypatch.setattr(tqdm.std, "time", lambda: now)
    bars: list[Any] = []
    reached: list[tuple[int, anyio.Event]] = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            bars.append(self)

        def update(self, n: float = 1) -> bool | None:
            drawn: bool | None = super().update(n)
            for count, event in reached:
                if self.n >= count:
                    event.set()
            return drawn

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    sizes = [5, 15] * 4
    bursts = [anyio.Event() for _ in sizes]

    async def handler(burst: int) -> None:
        await bursts[burst].wait()

    rates: list[tuple[float, float]] = []  # (shown, done / elapsed)
    async with Pool(handler, workers=sum(sizes), progress=True) as pool:
        for burst, size in enumerate(sizes):
            for _ in range(size):
                await pool.submit(burst)
        done = 0
        for burst, size in enumerate(sizes):
            now += 1.0
            bursts[burst].set()
            done += size
            event = anyio.Event()
            reached.append((done, event))
            with anyio.fail_after(60):
                await event.wait()
            shown = re.search(r"([\d.]+)item/s", str(bars[0]))
            assert shown is not None
            rates.append((float(shown.group(1)), done / now))
    assert all(shown == pytest.approx(rate, rel=0.02) for shown, rate in rates), rates


@contextlib.contextmanager
def console_logging() -> Iterator[logging.Handler]:
    """The application's logging as ``logging.basicConfig()`` sets it up: a
    handler on the root logger that writes to ``sys.stderr``, where tqdm draws
    its bars too (in a test's body, where ``sys.stderr`` is capsys's)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def _logging_setup() -> tuple[list[logging.Handler], bool, list[logging.Handler]]:
    corral_logger = logging.getLogger("corral")
    return list(corral_logger.handlers), corral_logger.propagate, list(logging.root.handlers)


@pytest.mark.parametrize("own", [True, False], ids=["own-bar", "given-bar"])
async def test_a_failure_logged_beside_a_bar_is_written_through_the_bar(
    own: bool, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """With console logging on the root logger, a failure logged while a tqdm
    bar that corral draws is shown (its own, or one passed as progress=) comes
    through tqdm.write: on lines of its own, not appended to the bar's line,
    and formatted by the application's handler. Its other handlers (pytest's
    here, a log file elsewhere) still get it, and afterwards the logging setup
    is as it was."""
    import tqdm

    with console_logging():
        before = _logging_setup()
        given = None if own else tqdm.tqdm(file=sys.stderr, unit="item")
        try:
            outcomes = await corral.apply_to_all(
                flaky, range(10), workers=2, progress=True if given is None else given
            )
        finally:
            if given is not None:
                given.close()
        assert [o.ok for o in outcomes].count(False) == 1
        assert _logging_setup() == before
    lines = re.split(r"[\r\n]", capsys.readouterr().err)
    logged = [line for line in lines if "WARNING:" in line]
    assert len(logged) == 1
    assert logged[0].startswith("WARNING:corral.pool:pool: item 3 failed"), lines
    assert "ValueError: item 3 is bad" in lines  # its traceback, on lines of its own
    assert any("item/s" in line for line in lines)  # the bar was drawn there
    assert [r.getMessage() for r in caplog.records if r.name == "corral.pool"] == [
        "pool: item 3 failed after 1 attempt: ValueError('item 3 is bad')"
    ]


async def test_logging_is_put_back_when_the_block_fails_or_is_cancelled(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The logging setup is restored however the block with a bar ends, and,
    with two bars shown at once, only when the last of them is closed: a
    failure logged after the inner one closed still goes through tqdm.write."""
    import tqdm.std

    written: list[str] = []
    write = tqdm.std.tqdm.write.__func__

    def spy(cls: Any, s: str, *args: Any, **kwargs: Any) -> None:
        written.append(s)
        write(cls, s, *args, **kwargs)

    monkeypatch.setattr(tqdm.std.tqdm, "write", classmethod(spy))
    with console_logging():
        before = _logging_setup()
        with pytest.raises(RuntimeError, match="block failed"):
            async with Pool(flaky, progress=True) as pool:
                await pool.submit(1)
                raise RuntimeError("block failed")
        assert _logging_setup() == before
        with anyio.CancelScope() as scope:
            async with Pool(flaky, progress=True):
                scope.cancel()
                await anyio.sleep_forever()
        assert _logging_setup() == before
        async with Pool(flaky, progress=True) as outer:
            async with Pool(flaky, progress=True) as inner:
                await inner.submit(1)
            await outer.submit(3)  # fails while the outer bar is still shown
            await outer.join()
        assert _logging_setup() == before
    assert len(written) == 1
    assert written[0].startswith("WARNING:corral.pool:pool: item 0 failed")
    assert written[0].endswith("ValueError: item 3 is bad")  # the traceback's end
