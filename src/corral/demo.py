"""``python -m corral.demo``: enrich a few thousand records through a flaky,
rate-limited API and store every result in SQLite, exactly once.

The pipeline, in about twenty lines (see :func:`run`)::

    records ──► apply_to_each(api.enrich, workers=64,
                              retry=Retry(...), rate_limit=SlidingWindow(rate),
                              timeout=Timeout(0.5))
            ──► Batcher(write_rows, max_size=250, max_wait=0.2)   # a plain function:
            ──► SQLite file                                        # runs in a thread

The API is simulated in-process, so the demo needs no network and no setup:
each call takes 5-40 ms, about 3% answer 503, about 1% answer 429 with a
``Retry-After``, a few take 2 s (cut off by the timeout), a few records do
not exist (404, not retried), and the server rejects any request over its own
rate limit. At the end the demo checks the database: every record must be
there exactly once, and it exits with status 1 if not.

It is resumable. Each batch of rows is one transaction, so an interrupted run
(Ctrl-C, or killed outright) leaves the batches it committed and nothing
else; run again with the same ``--db`` (and ``--records`` and ``--seed``) and
it calls the API only for the records not stored yet (among them those whose
outcome had come but whose batch was not committed), then checks that all of
them are stored exactly once. Ctrl-C ends a run with status 130 and says how
far it got. A stored row is a record's final outcome, whether ``ok`` or
``failed``: a record that failed (a 404, or a retryable error that outlasted
its retries) is not called again either, as a finished run would not call it
again. To try the failures once more, delete their rows (``DELETE FROM
corral_demo_results WHERE status = 'failed'``) and run again. The file
remembers the ``--records`` and ``--seed`` it was made with; a file made with
others, or one that is not the demo's, is refused (status 2), never mixed
into; so is a ``--db`` it cannot create or write. Delete the file, or give
another ``--db``, to start over.

With ``--adaptive`` the API has no rate limit but a concurrency capacity that
the client is not told: it serves ``--capacity`` calls at once (default 32),
lets a quarter as many more wait in its queue, and answers a 503
(:class:`Overloaded`) beyond that. The client runs 200 workers, far more
than that, under an :class:`~corral.AdaptiveLimiter` whose drops are those
503s (they are retried too)::

    apply_to_each(api.enrich, workers=200, retry=Retry(...), timeout=Timeout(0.5),
                  limiter=AdaptiveLimiter(min=1, max=200, on=Overloaded))

and the table shows the limit it settled on (its median over the second half
of the run, while every worker had a record) next to the hidden capacity, and
how many 503s it caused.

Options: ``--records N``, ``--rate PER_SECOND``, ``--backend
asyncio|uvloop|trio``, ``--db PATH`` (default: a temporary file, which cannot
be resumed; an existing file from an interrupted run is finished),
``--seed N`` (default 1), ``--adaptive`` and ``--capacity N`` (1 to 100; only with
``--adaptive``, which does not take ``--rate``). ``--rate``, ``--backend``
and ``--adaptive`` may differ between a run and its resumption. With tqdm
installed (``pip install 'corral[progress]'``) it draws a progress bar;
otherwise it prints a status line every second.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import math
import os
import pathlib
import random
import shlex
import sqlite3
import statistics
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import anyio
import anyio.to_thread
import attrs

from ._batcher import Batcher
from ._concurrency import AdaptiveLimiter, AdaptiveLimiterStatistics
from ._extras import install_hint
from ._helpers import apply_to_each
from ._limits import SlidingWindow
from ._outcome import Outcome
from ._pool import PoolStats
from ._retry import Retry

__all__ = ["DemoDatabaseError", "main", "run", "run_adaptive"]

TABLE = "corral_demo_results"
RUN_TABLE = "corral_demo_run"  # one row: the --records and --seed the file is for


# ---------------------------------------------------------------- the fake API


class APIError(Exception):
    """An HTTP error answer from the simulated API."""

    status = 500


class ServiceUnavailable(APIError):
    """503: worth retrying."""

    status = 503


class TooManyRequests(APIError):
    """429 with a ``Retry-After``: :class:`corral.Retry` reads ``retry_after``."""

    status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotFound(APIError):
    """404: the record does not exist; retrying cannot help."""

    status = 404


class Overloaded(ServiceUnavailable):
    """503 from a server at its capacity: every slot busy and its queue full.
    An overload, not bad luck: the ``on=`` of ``--adaptive``'s limiter."""


@attrs.define
class ServerCounts:
    """What the simulated server saw."""

    requests: int = 0
    unavailable: int = 0
    not_found: int = 0
    throttled: int = 0  # 429s sent because of load spikes
    over_limit: int = 0  # 429s sent because the client broke the rate limit
    early_retries: int = 0  # requests that came before their Retry-After was up
    slow: int = 0  # answers that took 2 s
    overloaded: int = 0  # 503s sent because every slot was busy and the queue full
    queued: int = 0  # requests that waited in the queue for a slot


class FakeAPI:
    """An in-process stand-in for a remote JSON API, with its own rate limit,
    or (with ``capacity``) a limit on how many requests it serves at once.

    ``enrich(record_id)`` returns a small dict, or raises an :class:`APIError`.
    The server checks its rate limit (``rate`` requests in any second, give or
    take 5 ms) when a request arrives, and remembers every ``Retry-After`` it
    sent, so that it can count clients that retry too early.

    With ``capacity`` it has no rate limit: it serves ``capacity`` requests at
    once, lets up to ``backlog`` more wait in line for a slot (first come,
    first served), and answers :class:`Overloaded` at once beyond that. A
    request holds its slot for its whole answer (a slow one until the client
    gives up on it).
    """

    def __init__(
        self, rate: int | None, *, seed: int, capacity: int | None = None, backlog: int = 0
    ) -> None:
        self.rate = rate
        self.capacity = capacity
        self.backlog = backlog
        self.counts: ServerCounts = ServerCounts()
        self._random = random.Random(seed)
        self._arrivals: deque[float] = deque()
        self._not_before: dict[int, float] = {}
        self._seed = seed
        self._slots = anyio.Semaphore(capacity) if capacity is not None else None
        self._serving = 0  # requests holding a slot, or waiting for one

    async def enrich(self, record_id: int) -> dict[str, Any]:
        """The record's enrichment, after 5-40 ms; or an :class:`APIError`."""
        slots = self._slots
        if slots is None:
            return await self._answer(record_id)
        assert self.capacity is not None
        if self._serving >= self.capacity + self.backlog:
            self.counts.requests += 1
            self.counts.overloaded += 1
            raise Overloaded(f"503 Service Unavailable: server busy (record {record_id})")
        self._serving += 1
        try:
            if slots.value == 0:
                self.counts.queued += 1
            async with slots:
                return await self._answer(record_id)
        finally:
            self._serving -= 1

    async def _answer(self, record_id: int) -> dict[str, Any]:
        now = anyio.current_time()
        counts = self.counts
        counts.requests += 1
        # (a millisecond of grace for the clocks' granularity: uvloop's is 1 ms)
        if now < self._not_before.pop(record_id, -math.inf) - 0.001:
            counts.early_retries += 1
        if self.rate is not None:
            self._check_rate(record_id, now)
        roll = self._random.random()
        if roll < 0.01:
            counts.throttled += 1
            self._throttle(record_id, now, self._random.uniform(0.2, 0.5))
        await anyio.sleep(self._random.uniform(0.005, 0.040))
        if roll < 0.04:
            counts.unavailable += 1
            raise ServiceUnavailable(f"503 Service Unavailable (record {record_id})")
        if roll < 0.045:
            counts.slow += 1
            await anyio.sleep(2.0)
        if (record_id * 2654435761 + self._seed) % 500 == 0:  # 0.2% of the records
            counts.not_found += 1
            raise NotFound(f"404 Not Found: record {record_id}")
        score = (record_id * 7919) % 1000 / 10
        return {"id": record_id, "score": score, "tier": "gold" if score > 90 else "basic"}

    def _check_rate(self, record_id: int, now: float) -> None:
        assert self.rate is not None
        arrivals = self._arrivals
        # The window is 1 s less 5 ms of grace for jitter, as a real server must
        # allow for the network between a client's limiter and its own clock.
        # Here the jitter is the time between the limiter admitting a call and
        # this line reading the clock: microseconds, unless the process is
        # descheduled or collects garbage in between.
        while arrivals and arrivals[0] <= now - 0.995:
            arrivals.popleft()
        if len(arrivals) >= self.rate:
            self.counts.over_limit += 1
            self._throttle(record_id, now, arrivals[0] + 1.0 - now)
        arrivals.append(now)

    def _throttle(self, record_id: int, now: float, retry_after: float) -> None:
        self._not_before[record_id] = now + retry_after
        raise TooManyRequests(f"429 Too Many Requests (record {record_id})", retry_after)


class TimedLimiter:
    """Wraps a rate limiter and adds up the time callers spent waiting in it."""

    def __init__(self, inner: SlidingWindow) -> None:
        self.inner: SlidingWindow = inner
        self.waited: float = 0.0

    async def acquire(self, cost: int = 1) -> None:
        """The inner limiter's ``acquire``, timed (also when it is cancelled)."""
        start = anyio.current_time()
        try:
            await self.inner.acquire(cost)
        finally:
            self.waited += anyio.current_time() - start


# ------------------------------------------------------------------ the database


class DemoDatabaseError(Exception):
    """The ``--db`` file cannot be used: it cannot be created or written, is not
    a SQLite file, not the demo's, or the demo's for another ``--records`` or
    ``--seed``."""


def open_database(path: pathlib.Path, records: int, seed: int) -> sqlite3.Connection:
    """The results table in ``path``: a new one in a new (or empty) file, or the
    one an earlier run of ``records`` records with ``seed`` left there, to be
    finished. No UNIQUE constraint, so that a duplicate would be stored and
    found by :func:`verify` rather than hidden by an error.

    Raises :class:`DemoDatabaseError` for any other file, which it leaves as
    it was, and for a path where the demo cannot write."""
    _check_path(path)
    try:
        connection = sqlite3.connect(path, check_same_thread=False)
    except sqlite3.Error as error:
        raise DemoDatabaseError(f"cannot open {path}: {error}") from None
    try:
        _adopt(connection, path, records, seed)
        _check_writable(connection, path)
    except BaseException:
        connection.close()
        raise
    return connection


def _check_path(path: pathlib.Path) -> None:
    """Refuse a path that cannot be the demo's file, saying why (where SQLite
    would say only "unable to open database file")."""
    folder = path.parent
    try:
        if path.is_dir():
            raise DemoDatabaseError(f"{path} is a directory: give the path of a file")
        if not folder.is_dir():
            why = "is not a directory" if folder.exists() else "does not exist"
            raise DemoDatabaseError(f"cannot create {path}: {folder} {why}")
        # SQLite writes a journal next to the file, so the directory must be writable too
        if not os.access(folder, os.W_OK | os.X_OK):
            raise DemoDatabaseError(f"cannot write to {path}: the directory {folder} is read-only")
        if path.exists() and not os.access(path, os.W_OK):
            raise DemoDatabaseError(f"cannot write to {path}: the file is read-only")
        if path.exists() and not os.access(path, os.R_OK):
            raise DemoDatabaseError(f"cannot read {path}: permission denied")
    except OSError as error:
        raise DemoDatabaseError(f"cannot open {path}: {error.strerror or error}") from None


def _check_writable(connection: sqlite3.Connection, path: pathlib.Path) -> None:
    """Refuse a file the demo could read but not write (read-only, or locked by
    another run), before any API call: a write, rolled back."""
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(f"UPDATE {RUN_TABLE} SET records = records")
    except sqlite3.Error as error:
        raise DemoDatabaseError(f"cannot write to {path}: {error}") from None
    finally:
        connection.rollback()


def _adopt(connection: sqlite3.Connection, path: pathlib.Path, records: int, seed: int) -> None:
    """Create the demo's tables in an empty database, or check that they are
    there, for ``records`` and ``seed``, and hold no other records."""
    try:
        tables = {
            name
            for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    except sqlite3.Error as error:
        raise DemoDatabaseError(f"{path} is not a SQLite database ({error})") from None
    if not tables:
        try:
            connection.execute("BEGIN")  # both tables or neither, even if killed here
            connection.execute(
                f"CREATE TABLE {TABLE} "
                "(record_id INTEGER, status TEXT, detail TEXT, attempts INTEGER)"
            )
            connection.execute(f"CREATE TABLE {RUN_TABLE} (records INTEGER, seed INTEGER)")
            connection.execute(f"INSERT INTO {RUN_TABLE} VALUES (?, ?)", (records, seed))
            connection.commit()
        except sqlite3.Error as error:
            connection.rollback()
            raise DemoDatabaseError(f"cannot write to {path}: {error}") from None
        return
    made_for = (
        connection.execute(f"SELECT records, seed FROM {RUN_TABLE}").fetchall()
        if tables == {TABLE, RUN_TABLE}
        else []
    )
    if len(made_for) != 1:
        names = ", ".join(sorted(tables))
        raise DemoDatabaseError(
            f"{path} is not a corral demo database (it has the tables {names}); give another --db"
        )
    ((made_records, made_seed),) = made_for
    if (made_records, made_seed) != (records, seed):
        raise DemoDatabaseError(
            f"{path} holds a run of --records {made_records} --seed {made_seed}, "
            f"not --records {records} --seed {seed}: run again with those to finish it, "
            "or give another --db"
        )
    (outside,) = connection.execute(
        f"SELECT COUNT(*) FROM {TABLE} WHERE record_id NOT BETWEEN 0 AND ?", (records - 1,)
    ).fetchone()
    if outside:
        raise DemoDatabaseError(
            f"{path} holds {outside} records outside 0..{records - 1}; give another --db"
        )


def stored_records(connection: sqlite3.Connection) -> set[int]:
    """The records that have a row, ``ok`` or ``failed``: done, not to be called again."""
    return {record for (record,) in connection.execute(f"SELECT record_id FROM {TABLE}")}


def count_stored(path: pathlib.Path) -> int | None:
    """How many distinct records ``path`` has rows for; None if it cannot say."""
    try:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            (count,) = connection.execute(
                f"SELECT COUNT(DISTINCT record_id) FROM {TABLE}"
            ).fetchone()
    except sqlite3.Error:
        return None
    return int(count)


def verify(path: pathlib.Path, records: int) -> list[str]:
    """Every record 0..records-1 in the table exactly once: the problems, if any."""
    problems = []
    with sqlite3.connect(path) as connection:
        duplicates = connection.execute(
            f"SELECT record_id, COUNT(*) FROM {TABLE} GROUP BY record_id HAVING COUNT(*) > 1"
        ).fetchall()
        stored = {row[0] for row in connection.execute(f"SELECT record_id FROM {TABLE}")}
    connection.close()
    if duplicates:
        shown = ", ".join(f"{record} ({count}x)" for record, count in duplicates[:5])
        problems.append(f"{len(duplicates)} records stored more than once: {shown}")
    missing = set(range(records)) - stored
    if missing:
        problems.append(f"{len(missing)} records missing, e.g. {sorted(missing)[:5]}")
    extra = stored - set(range(records))
    if extra:
        problems.append(f"{len(extra)} unknown records stored, e.g. {sorted(extra)[:5]}")
    return problems


# ------------------------------------------------------------------- the job

RECORDS = 3000  # --records, by default
SEED = 1  # --seed, by default
WORKERS = 64
ADAPTIVE_WORKERS = 200  # --adaptive: far more than the server can take at once
CAPACITY = 32  # --adaptive: calls the simulated API serves at once, by default
MAX_CAPACITY = 100  # so that ADAPTIVE_WORKERS can still overload it
RETRY = Retry(
    attempts=6,
    on=(ServiceUnavailable, TooManyRequests, TimeoutError),  # Overloaded is a 503 too
    wait_initial=0.05,
    wait_max=2.0,
)


@attrs.define
class LimitReport:
    """What ``--adaptive``'s limiter settled on, and what it had to find."""

    capacity: int  # calls the server serves at once (the client is not told)
    backlog: int  # calls that may wait in its queue beyond that
    settled: int  # the limit's median over the second half of the loaded time
    low: int  # the limit's range over that half
    high: int
    statistics: AdaptiveLimiterStatistics  # the limiter's, when the run ended


@attrs.define
class Report:
    """What one run did, for the final table."""

    records: int
    already: int = 0  # stored by an earlier run: not called again
    succeeded: int = 0
    failures: dict[str, int] = attrs.Factory(dict)  # exception name -> count
    retries: int = 0
    batches: int = 0
    rows: int = 0
    limiter_wait: float = 0.0
    seconds: float = 0.0
    server: ServerCounts = attrs.Factory(ServerCounts)
    problems: list[str] = attrs.Factory(list)
    limit: LimitReport | None = None  # with --adaptive

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def count(self, outcome: Outcome[int, dict[str, Any]]) -> None:
        """Add a record's outcome to the tally."""
        if outcome.ok:
            self.succeeded += 1
        else:
            kind = type(outcome.error).__name__
            self.failures[kind] = self.failures.get(kind, 0) + 1
        self.retries += outcome.attempts - 1


class LimitTrace:
    """The adaptive limit, read at every outcome while at least as many records
    remained as there are workers: every worker had a record, so the limiter,
    not the input, set the pace."""

    def __init__(self, limiter: AdaptiveLimiter, workers: int) -> None:
        self.limiter: AdaptiveLimiter = limiter
        self.workers: int = workers
        self.readings: list[tuple[float, int]] = []  # (time, limit)

    def __call__(self, remaining: int) -> None:
        """One more outcome came; ``remaining`` records have none yet."""
        if remaining >= self.workers:
            self.readings.append((anyio.current_time(), self.limiter.limit))

    def settled(self) -> tuple[int, int, int]:
        """The limit's median over the second half of the loaded time (the
        first half is spent finding it), and its lowest and highest then."""
        readings = self.readings or [(0.0, self.limiter.limit)]
        middle = (readings[0][0] + readings[-1][0]) / 2
        late = [limit for at, limit in readings if at >= middle]
        return statistics.median_low(late), min(late), max(late)


def _row(outcome: Outcome[int, dict[str, Any]]) -> tuple[int, str, str, int]:
    if outcome.ok:
        assert outcome.result is not None
        detail = f"score={outcome.result['score']} tier={outcome.result['tier']}"
        return (outcome.item, "ok", detail, outcome.attempts)
    return (outcome.item, "failed", repr(outcome.error), outcome.attempts)


def _has_tqdm() -> bool:
    return importlib.util.find_spec("tqdm") is not None


def _print_status(stats: PoolStats) -> None:
    done = stats.succeeded + stats.failed
    print(f"  {done} done, {stats.failed} failed, {stats.retried} retried", flush=True)


async def run(records: int, rate: int, db: pathlib.Path, seed: int = 1) -> Report:
    """Enrich ``records`` records through the fake API at ``rate`` calls per
    second and store one row per record in the SQLite file ``db``; if ``db``
    holds an unfinished run of the same ``records`` and ``seed``, only the
    records it has no row for (see :func:`open_database`)."""
    api = FakeAPI(rate, seed=seed)
    limiter = TimedLimiter(SlidingWindow(rate, per=1.0))
    report = await _pipeline(api, records, db, seed, workers=WORKERS, rate_limit=limiter)
    report.limiter_wait = limiter.waited
    return report


async def run_adaptive(
    records: int,
    db: pathlib.Path,
    seed: int = 1,
    *,
    capacity: int = CAPACITY,
    algorithm: Literal["vegas", "gradient2"] = "vegas",
) -> Report:
    """As :func:`run`, through a fake API that has no rate limit but serves
    ``capacity`` calls at once (a quarter as many more wait in its queue, and
    any more get :class:`Overloaded`), with ``ADAPTIVE_WORKERS`` workers and
    an :class:`AdaptiveLimiter` that is not told the capacity: it finds it."""
    backlog = max(2, capacity // 4)
    api = FakeAPI(None, seed=seed, capacity=capacity, backlog=backlog)
    limiter = AdaptiveLimiter(min=1, max=ADAPTIVE_WORKERS, on=Overloaded, algorithm=algorithm)
    trace = LimitTrace(limiter, workers=ADAPTIVE_WORKERS)
    report = await _pipeline(
        api, records, db, seed, workers=ADAPTIVE_WORKERS, watch=trace, limiter=limiter
    )
    settled, low, high = trace.settled()
    report.limit = LimitReport(capacity, backlog, settled, low, high, limiter.statistics())
    return report


async def _pipeline(
    api: FakeAPI,
    records: int,
    db: pathlib.Path,
    seed: int,
    *,
    workers: int,
    watch: Callable[[int], None] | None = None,
    **limits: Any,
) -> Report:
    """The records ``db`` has no row for through ``api`` (with the ``limits``
    passed on to ``apply_to_each``) into ``db``; ``watch`` is called after
    every outcome, with the number of records still without one."""
    connection = open_database(db, records, seed)
    # one writer at a time; held by a write that cancellation abandoned (its
    # thread runs on), so that the connection is not closed under it
    writing = threading.Lock()

    def write_rows(rows: list[tuple[int, str, str, int]]) -> None:
        # a plain function: corral runs it in a worker thread, off the event loop
        with writing, connection:
            connection.executemany(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?)", rows)

    def close() -> None:
        with writing:
            connection.close()

    show_bar = _has_tqdm()
    start = anyio.current_time()
    try:
        stored = stored_records(connection)
        todo = [record for record in range(records) if record not in stored]
        report = Report(records, already=len(stored))
        remaining = len(todo)
        async with (
            Batcher(write_rows, max_size=250, max_wait=0.2, name="sqlite") as batcher,
            apply_to_each(
                api.enrich,
                todo,
                workers=workers,
                retry=RETRY,
                timeout=0.5,
                name="api",
                progress=show_bar,
                on_stats=None if show_bar else _print_status,
                **limits,
            ) as outcomes,
        ):
            async for outcome in outcomes:
                await batcher.add(_row(outcome))
                report.count(outcome)
                remaining -= 1
                if watch is not None:
                    watch(remaining)
    finally:
        with anyio.CancelScope(shield=True):  # bounded: at most one batch's write
            await anyio.to_thread.run_sync(close)
    report.seconds = anyio.current_time() - start
    report.server = api.counts
    report.batches = batcher.stats.flushes
    report.rows = batcher.stats.flushed
    report.problems = verify(db, records)
    return report


def format_report(report: Report, db: pathlib.Path) -> str:
    """The final stats table."""
    server = report.server
    honoured = server.throttled + server.over_limit
    mean_batch = report.rows / max(report.batches, 1)
    per_second = (report.records - report.already) / max(report.seconds, 1e-6)  # this run's
    kinds = ", ".join(f"{count} {name}" for name, count in sorted(report.failures.items()))
    kinds = f" ({kinds})" if kinds else ""
    lines = [("records", f"{report.records}")]
    if report.already:
        lines.append(("already stored", f"{report.already} (from an earlier run)"))
    lines += [
        ("succeeded / failed", f"{report.succeeded} / {report.failed}{kinds}"),
        ("API calls", f"{report.server.requests} ({report.retries} retries)"),
        ("  503s retried", f"{server.unavailable}"),
        ("  slow answers timed out", f"{server.slow} (after 0.5 s)"),
        ("  429s honoured", f"{honoured - server.early_retries} of {honoured}"),
    ]
    if report.limit is None:
        lines.append(("  over the server's limit", f"{server.over_limit}"))
    else:
        lines += _limit_lines(report.limit, server)
    lines += [
        (
            "batches written",
            f"{report.batches} (mean {mean_batch:.0f} rows)",
        ),
        ("items per second", f"{per_second:.0f}"),
    ]
    if report.limit is None:
        lines.append(
            ("waiting on the limiter", f"{report.limiter_wait:.1f} s (summed over 64 workers)")
        )
    lines += [
        ("wall time", f"{report.seconds:.1f} s"),
        ("database", f"{db}"),
    ]
    width = max(len(name) for name, _ in lines)
    table = [f"{name:<{width}}  {value}" for name, value in lines]
    if report.problems:
        table += ["", "DATABASE CHECK FAILED:"] + [f"  - {p}" for p in report.problems]
    else:
        table += ["", f"database check: all {report.records} records stored exactly once"]
    return "\n".join(table)


def _limit_lines(limit: LimitReport, server: ServerCounts) -> list[tuple[str, str]]:
    """``--adaptive``'s rows: the limit it settled on, next to the hidden capacity."""
    stats = limit.statistics

    def ms(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds * 1000:.0f} ms"

    return [
        (
            "  503s: server busy",
            f"{server.overloaded} (the limiter's drops; {stats.decreases} lowered its limit)",
        ),
        ("  queued at the server", f"{server.queued} calls waited for a slot"),
        (
            "concurrency limit",
            f"settled at {limit.settled} ({stats.algorithm}; "
            f"{limit.low}-{limit.high} over the run's second half)",
        ),
        (
            "  server's capacity",
            f"{limit.capacity} calls at once + a queue of {limit.backlog} (hidden from the client)",
        ),
        ("  latency", f"{ms(stats.latency)} (baseline {ms(stats.baseline)})"),
    ]


def _parser() -> argparse.ArgumentParser:
    """The command line: ``python -m corral.demo --help``."""
    parser = argparse.ArgumentParser(
        prog="python -m corral.demo",
        description="Enrich records through a flaky, rate-limited API into SQLite.",
        epilog=(
            "With --adaptive the simulated API has no rate limit: it serves a number of "
            "calls at once (--capacity), queues a few more and answers 503 beyond that, "
            "and does not say how many. The client runs 200 workers under an "
            "AdaptiveLimiter that finds the capacity from latency and 503s; the table "
            "shows the limit it settled on next to the capacity."
        ),
    )
    parser.add_argument(
        "--records", type=int, default=RECORDS, help=f"how many (default {RECORDS})"
    )
    parser.add_argument("--rate", type=int, help="API calls/s (default 500; not with --adaptive)")
    parser.add_argument(
        "--backend",
        choices=["asyncio", "uvloop", "trio"],
        default="asyncio",
        help="the event loop: asyncio (default), uvloop (needs the extra corral[uvloop]) "
        "or trio (needs the extra corral[trio])",
    )
    parser.add_argument(
        "--db",
        type=pathlib.Path,
        help="SQLite file (default: a temporary one); run again with the same file to "
        "finish an interrupted run",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help=f"seed of the simulated API's dice (default {SEED})",
    )
    parser.add_argument(
        "--adaptive",
        action="store_true",
        help="a concurrency capacity instead of a rate limit, found by an AdaptiveLimiter",
    )
    parser.add_argument(
        "--capacity",
        type=int,
        help=f"with --adaptive: calls the API serves at once (default {CAPACITY}, "
        f"at most {MAX_CAPACITY})",
    )
    return parser


def _check_options(parser: argparse.ArgumentParser, options: argparse.Namespace) -> None:
    """Exit with argparse's usage error if the options do not make sense."""
    if options.records < 1:
        parser.error("--records must be >= 1")
    if options.rate is not None and options.rate < 1:
        parser.error("--rate must be >= 1")
    if options.adaptive and options.rate is not None:
        parser.error("--rate does not go with --adaptive (its API limits calls at once, not rate)")
    if options.capacity is not None and not options.adaptive:
        parser.error("--capacity needs --adaptive")
    if options.capacity is not None and not 1 <= options.capacity <= MAX_CAPACITY:
        parser.error(f"--capacity must be between 1 and {MAX_CAPACITY}")
    module = {"trio": "trio", "uvloop": "uvloop"}.get(options.backend)
    if module and importlib.util.find_spec(module) is None:
        parser.error(f"--backend {options.backend} needs {module}: {install_hint(module)}")


def _is_interrupt(error: BaseException) -> bool:
    """Whether ``error`` is a KeyboardInterrupt, or a group of nothing else
    (the form it can take when it comes out of a task group)."""
    if isinstance(error, BaseExceptionGroup):
        return error.split(KeyboardInterrupt)[1] is None
    return isinstance(error, KeyboardInterrupt)


def _interrupted(options: argparse.Namespace, db: pathlib.Path) -> str:
    """What an interrupted run says: how far it got, and how to finish."""
    stored = count_stored(db)
    progress = "some" if stored is None else f"{stored} of {options.records}"
    if options.db is None:
        return (
            f"interrupted: {progress} records were stored, in a temporary file that is "
            "now deleted; give --db PATH to be able to resume"
        )
    again = f"--db {shlex.quote(str(db))}"
    if options.records != RECORDS:
        again += f" --records {options.records}"
    if options.seed != SEED:
        again += f" --seed {options.seed}"
    return f"interrupted: {progress} records stored in {db}; run again with {again} to finish"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo from the command line: 0 if the database checks out, 1 if
    not, 2 for bad options or a ``--db`` it cannot use, 130 on Ctrl-C."""
    parser = _parser()
    options = parser.parse_args(argv)
    _check_options(parser, options)
    backend, backend_options = options.backend, {}
    if backend == "uvloop":
        backend, backend_options = "asyncio", {"use_uvloop": True}
    rate = options.rate or 500
    capacity = options.capacity or CAPACITY
    with tempfile.TemporaryDirectory() as scratch:
        db = options.db or pathlib.Path(scratch) / "corral-demo.sqlite3"
        try:
            with contextlib.closing(open_database(db, options.records, options.seed)) as opened:
                already = len(stored_records(opened))
        except DemoDatabaseError as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
        if options.adaptive:
            api = f"that serves {capacity} calls at once (the client is not told)"
            job = functools.partial(
                run_adaptive, options.records, db, options.seed, capacity=capacity
            )
        else:
            api = f"at {rate:g} calls/s"
            job = functools.partial(run, options.records, rate, db, options.seed)
        print(
            f"corral demo: {options.records} records through a simulated API {api} "
            f"into {db}, on {options.backend}",
            flush=True,
        )
        if already:
            print(
                f"resuming: {already} already stored, {options.records - already} to go",
                flush=True,
            )
        try:
            report = anyio.run(job, backend=backend, backend_options=backend_options)
        except (KeyboardInterrupt, BaseExceptionGroup) as error:
            if not _is_interrupt(error):
                raise
            print(f"\n{_interrupted(options, db)}", file=sys.stderr)
            return 130
        print(format_report(report, db if options.db else pathlib.Path("(temporary file)")))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
