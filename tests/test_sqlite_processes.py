"""Real OS processes sharing one SQLite queue file: consumers drain a queue
while two of them are killed with SIGKILL, and nothing is lost; a handler four
times longer than the lease runs once; a producer killed part way and run
again adds nothing twice; poison entries end in the dead letters with their
error.

The worker processes (sqlite_worker.py) run on the backend of the test
(asyncio, uvloop or trio: conftest.py's ``anyio_backend``). Each records
every entry it handles as a line of its own log file; the tests read those
logs, the queue file (through QueueSink.counts and read-only SQL) and
``python -m corral.sqlite``. They wait for other processes by polling the file
or the logs, within a deadline.
"""

from __future__ import annotations

import collections
import contextlib
import json
import pathlib
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import anyio
import anyio.abc
import attrs
import pytest

from corral.sqlite import QueueCounts, QueueSink

pytestmark = pytest.mark.anyio

WORKER = pathlib.Path(__file__).with_name("sqlite_worker.py")


@pytest.fixture
def backend(anyio_backend: Any) -> str:
    """The worker processes' backend: that of the test."""
    name, options = anyio_backend
    return "uvloop" if options.get("use_uvloop") else str(name)


@attrs.frozen
class Handled:
    """One line of a consumer's log: an entry its handler ran on."""

    n: int
    id: str
    deliveries: int
    ok: bool
    by: str  # the log's (the worker's) name


class Workers:
    """The worker processes of one test; their logs and output are files in
    the test's folder, named after the worker."""

    def __init__(self, folder: pathlib.Path, path: pathlib.Path, backend: str) -> None:
        self.folder, self.path, self.backend = folder, path, backend
        self.processes: dict[str, anyio.abc.Process] = {}

    async def start(self, name: str, mode: str, *args: object) -> anyio.abc.Process:
        command = [sys.executable, str(WORKER), mode, str(self.path), self.backend]
        with (
            self.folder.joinpath(f"{name}.out").open("wb") as out,
            self.folder.joinpath(f"{name}.err").open("wb") as err,
        ):  # the child keeps its own descriptors
            process = await anyio.open_process(
                [*command, *map(str, args)], stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        self.processes[name] = process
        return process

    async def consume(self, name: str, **options: object) -> anyio.abc.Process:
        args = [f"--{option.replace('_', '-')}={value}" for option, value in options.items()]
        return await self.start(name, "consume", f"--log={self.log(name)}", *args)

    def log(self, name: str) -> pathlib.Path:
        return self.folder / f"{name}.log"

    def handled(self, *names: str) -> list[Handled]:
        """Every line of these workers' logs (all of them by default)."""
        lines = []
        for name in names or self.processes:
            if self.log(name).exists():
                for line in self.log(name).read_text().splitlines():
                    n, entry_id, deliveries, status = line.split()
                    lines.append(Handled(int(n), entry_id, int(deliveries), status == "ok", name))
        return lines

    def stats(self, name: str) -> dict[str, int]:
        """What a consumer printed when it finished: its source's stats."""
        return dict(json.loads(self.folder.joinpath(f"{name}.out").read_text()))

    def output(self) -> str:
        """Every worker's stdout and stderr, for a failure's message."""
        return "\n".join(
            f"--- {name}.{kind}:\n{self.folder.joinpath(f'{name}.{kind}').read_text()}"
            for name in self.processes
            for kind in ("out", "err")
        )

    async def wait(self, *names: str, within: float) -> list[int]:
        """The exit codes of these workers, waiting at most ``within`` seconds."""
        with anyio.fail_after(within):
            return [await self.processes[name].wait() for name in names]

    async def close(self) -> None:
        """Kill any worker still running (a test that failed) and reap them all."""
        with anyio.CancelScope(shield=True):
            for process in self.processes.values():
                if process.returncode is None:
                    process.kill()
                await process.aclose()


@contextlib.asynccontextmanager
async def workers(folder: pathlib.Path, backend: str) -> AsyncIterator[Workers]:
    running = Workers(folder, folder / "queue.sqlite3", backend)
    try:
        yield running
    finally:
        await running.close()


async def wait_until(check: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    """Poll ``check`` (the state of other processes) every 10 ms until it is
    true; fail the test if it is not within ``within`` seconds."""
    with anyio.move_on_after(within):
        while True:
            if await check():
                return
            await anyio.sleep(0.01)
    pytest.fail(f"not within {within} s: {what}")


async def fill(path: pathlib.Path, total: int, poison: Collection[int] = ()) -> None:
    """Add entries {"n": i} (with "poison" for those in ``poison``), key "key-i"."""
    async with QueueSink(path) as sink:
        for i in range(total):
            fields = {"n": str(i)} | ({"poison": "1"} if i in poison else {})
            await sink.add(fields, key=f"key-{i}")


async def counts(path: pathlib.Path) -> QueueCounts:
    async with QueueSink(path) as sink:
        return await sink.counts()


def query(path: pathlib.Path, sql: str, *parameters: object) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on the queue file."""
    uri = path.absolute().as_uri() + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
        return connection.execute(sql, parameters).fetchall()


async def show(path: pathlib.Path, *options: str) -> str:
    """``python -m corral.sqlite PATH ...``: its output, once it exited with 0."""
    with anyio.fail_after(30):
        done = await anyio.run_process(
            [sys.executable, "-m", "corral.sqlite", str(path), *options], check=False
        )
    assert done.returncode == 0, done.stderr.decode()
    return str(done.stdout.decode())


def row_of(table: str, queue: str = "default") -> list[str]:
    """The cells of ``queue``'s row in ``python -m corral.sqlite``'s table."""
    [row] = [line.split() for line in table.splitlines() if line.startswith(queue + " ")]
    return row


def leased_to(path: pathlib.Path, consumer: str) -> set[str]:
    """The IDs of the entries leased to ``consumer`` now."""
    sql = "SELECT id FROM corral_entries WHERE state = 'leased' AND consumer = ?"
    return {str(entry_id) for (entry_id,) in query(path, sql, consumer)}


@pytest.mark.timeout(120)
async def test_consumers_killed_mid_run_lose_nothing(tmp_path: pathlib.Path, backend: str) -> None:
    """Four consumer processes drain 4,000 entries; two are killed with
    SIGKILL mid-run. One is restarted under its name (and hands its entries
    back at once); the other never comes back, and its entries come back once
    its lease runs out. Every entry is handled at least once and ends done;
    the only entries handled twice are ones leased to a killed process when it
    died (handled, their success not yet written), handled again on a later
    delivery, and they are few; the queue is empty at the end."""
    total, max_in_flight = 4_000, 50
    path = tmp_path / "queue.sqlite3"
    await fill(path, total)
    victims = ("victim1", "victim2")
    async with workers(tmp_path, backend) as run:
        # leases are renewed every lease / 3: the victims' entries are still
        # leased to them (for 2 s at least) when the test reads the file after
        # their death, and only a process stalled for 1.3 s would lose one
        for name in victims:
            await run.consume(
                name, consumer=name, lease=3.0, handle=0.01, max_in_flight=max_in_flight
            )
        for name in ("c1", "c2"):
            await run.consume(name, lease=2.0, handle=0.01)

        async def victims_mid_run() -> bool:
            logs = [run.log(name) for name in victims]
            return all(log.exists() and log.read_bytes().count(b"\n") >= 200 for log in logs)

        await wait_until(victims_mid_run, within=60, what="the victims handled 200 entries each")
        for name in victims:
            run.processes[name].send_signal(signal.SIGKILL)
        assert await run.wait(*victims, within=10) == [-signal.SIGKILL] * 2
        leased = [leased_to(path, name) for name in victims]
        await run.consume("victim1-again", consumer="victim1", lease=2.0, handle=0.01)
        await run.consume("c3", lease=2.0, handle=0.01)
        consumers = ("c1", "c2", "c3", "victim1-again")
        assert await run.wait(*consumers, within=60) == [0] * 4, run.output()
        handled = run.handled()
        stats = [run.stats(name) for name in consumers]

    print(f"leased to the victims at their death: {[len(ids) for ids in leased]}")
    assert all(leased), "the victims died with entries in progress"
    assert all(line.ok for line in handled)
    times = collections.Counter(line.n for line in handled)
    assert set(times) == set(range(total)), "every entry was handled"
    # each entry a victim held came back, on a later delivery: victim1's
    # handed back by its restart, victim2's taken over after its lease
    held = leased[0] | leased[1]
    later = {line.id for line in handled if line.by not in victims and line.deliveries >= 2}
    assert later == held
    assert sum(s["claimed"] for s in stats) >= len(leased[1])
    # handled twice: only entries a victim held, the first time by the victim
    twice = {line.id for line in handled if times[line.n] > 1}
    print(f"handled twice: {len(twice)}")
    assert max(times.values()) <= 2
    assert twice <= held
    for victim, ids in zip(victims, leased, strict=True):
        assert {line.id for line in handled if line.by == victim} >= twice & ids
        # a victim held at most max_in_flight deliveries, and the successes its
        # source had queued to write: its settle Batcher's max_size is
        # max(100, max_in_flight), its max_pending twice that, one batch writing
        assert len(ids) <= max_in_flight + 3 * max(100, max_in_flight)
    assert await counts(path) == QueueCounts(
        queued=0, in_progress=0, done=total, dead=0, oldest_age=None
    )
    assert row_of(await show(path)) == ["default", "0", "0", str(total), "0", "-"]


@pytest.mark.timeout(120)
async def test_a_handler_longer_than_the_lease_runs_once(
    tmp_path: pathlib.Path, backend: str
) -> None:
    """Two consumers with a 0.5 s lease share 8 entries whose handler takes
    2 s (four leases): the leases are renewed while the handlers run, so the
    other consumer never takes an entry over. Each entry is handled exactly
    once, on its first delivery, and both consumers took part."""
    total = 8
    path = tmp_path / "queue.sqlite3"
    await fill(path, total)
    async with workers(tmp_path, backend) as run:
        for name in ("c1", "c2"):
            await run.consume(name, lease=0.5, handle=2.0, max_in_flight=4, workers=4)
        codes = await run.wait("c1", "c2", within=60)
        assert codes == [0, 0], run.output()
        handled = run.handled()
        stats = [run.stats(name) for name in ("c1", "c2")]
        output = run.output()

    assert sorted(line.n for line in handled) == list(range(total)), output
    assert all(line.ok and line.deliveries == 1 for line in handled), handled
    assert {line.by for line in handled} == {"c1", "c2"}, "both consumers took entries"
    assert [s["claimed"] for s in stats] == [0, 0]
    assert sum(s["acked"] for s in stats) == total
    assert "had run out" not in output
    assert await counts(path) == QueueCounts(
        queued=0, in_progress=0, done=total, dead=0, oldest_age=None
    )


@pytest.mark.timeout(120)
async def test_a_producer_run_twice_adds_nothing_twice(
    tmp_path: pathlib.Path, backend: str
) -> None:
    """A producer adding 2,000 keyed entries is killed with SIGKILL part way;
    a consumer handles what it added; the producer run again to completion
    adds only the entries the queue does not hold (neither queued nor done),
    and a consumer handles those. Every key is in the file exactly once, and
    every entry was handled exactly once."""
    total = 2_000
    path = tmp_path / "queue.sqlite3"
    async with workers(tmp_path, backend) as run:
        producer = await run.start("producer", "produce", f"--count={total}", "--pace=0.002")

        async def some_added() -> bool:
            return path.exists() and (await counts(path)).queued >= 300

        await wait_until(some_added, within=60, what="the producer added 300 entries")
        producer.send_signal(signal.SIGKILL)
        assert await run.wait("producer", within=10) == [-signal.SIGKILL]
        first = (await counts(path)).queued
        assert 300 <= first < total, "the producer was killed part way"

        await run.consume("c1", handle=0)
        assert await run.wait("c1", within=60) == [0], run.output()
        assert await counts(path) == QueueCounts(
            queued=0, in_progress=0, done=first, dead=0, oldest_age=None
        )

        await run.start("producer-again", "produce", f"--count={total}")
        assert await run.wait("producer-again", within=60) == [0], run.output()
        after = await counts(path)
        assert (after.queued, after.done) == (total - first, first)

        await run.consume("c2", handle=0)
        assert await run.wait("c2", within=60) == [0], run.output()
        handled = run.handled()

    assert sorted(line.n for line in handled) == list(range(total)), "each handled once"
    assert all(line.ok and line.deliveries == 1 for line in handled)
    assert {line.n for line in handled if line.by == "c1"} == set(range(first))
    keys = query(path, "SELECT key, count(*) FROM corral_entries GROUP BY key")
    assert sorted(keys) == sorted((f"key-{i}", 1) for i in range(total))
    assert await counts(path) == QueueCounts(
        queued=0, in_progress=0, done=total, dead=0, oldest_age=None
    )


@pytest.mark.timeout(120)
async def test_poison_entries_end_in_the_dead_letters(tmp_path: pathlib.Path, backend: str) -> None:
    """Two consumers share 300 entries, 5 of which fail every time: each of
    those is delivered exactly max_deliveries (3) times, then dead-lettered
    with its error, which ``python -m corral.sqlite --dead`` lists; every
    other entry is handled once and done."""
    total, max_deliveries = 300, 3
    poison = set(range(7, total, 60))
    path = tmp_path / "queue.sqlite3"
    await fill(path, total, poison)
    options = {"max_deliveries": max_deliveries, "redeliver_after": 0, "handle": 0.002}
    async with workers(tmp_path, backend) as run:
        for name in ("c1", "c2"):
            await run.consume(name, **options)
        assert await run.wait("c1", "c2", within=60) == [0, 0], run.output()
        handled = run.handled()
        stats = [run.stats(name) for name in ("c1", "c2")]

    good = [line for line in handled if line.n not in poison]
    assert sorted(line.n for line in good) == sorted(set(range(total)) - poison)
    assert all(line.ok and line.deliveries == 1 for line in good)
    bad = [line for line in handled if line.n in poison]
    attempts = collections.defaultdict(list)
    for line in bad:
        assert not line.ok
        attempts[line.n].append(line.deliveries)
    assert {n: sorted(d) for n, d in attempts.items()} == {n: [1, 2, 3] for n in poison}
    assert sum(s["dead_lettered"] for s in stats) == len(poison)
    assert sum(s["failed"] for s in stats) == len(poison) * (max_deliveries - 1)
    assert await counts(path) == QueueCounts(
        queued=0, in_progress=0, done=total - len(poison), dead=len(poison), oldest_age=None
    )

    listing = await show(path, "--dead")
    assert row_of(listing) == ["default", "0", "0", str(total - len(poison)), str(len(poison)), "-"]
    ids = {line.n: line.id for line in bad}
    for n in poison:
        letter = f"[default] id={ids[n]} key=key-{n} deliveries={max_deliveries}\n"
        assert f"{letter}  error:  ValueError('poison {n}')\n" in listing, listing
        assert '"poison": "1"' in listing
    assert listing.count("error:") == len(poison)
