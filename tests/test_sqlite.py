"""corral.sqlite in one process: what QueueSink and QueueSource promise, on a
real file. The crash tests with real processes and SIGKILL are in
test_sqlite_processes.py."""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest

import corral
from corral import Outcome, PoolClosed
from corral.sqlite import Delivery, QueueCounts, QueueError, QueueSink, QueueSource, _store

# a sink or source closes its file when its block ends, also when cancelled
pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("sqlite_connections_closed")]


@pytest.fixture
def path(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "queue.sqlite3"


async def fill(
    path: pathlib.Path, count: int, *, queue: str = "default", keyed: bool = True
) -> None:
    async with QueueSink(path, queue) as sink:
        for n in range(count):
            await sink.add({"n": str(n)}, key=str(n) if keyed else None)


async def drain(
    source: QueueSource, handler: Callable[[Delivery[str]], Any], *, workers: int = 10
) -> list[Outcome[Delivery[str], Any]]:
    async with corral.apply_to_each(
        handler, source, workers=workers, on_outcome=source.settle
    ) as outcomes:
        return [outcome async for outcome in outcomes]


async def counts(path: pathlib.Path, queue: str = "default") -> QueueCounts:
    async with QueueSink(path, queue) as sink:
        return attrs.evolve(await sink.counts(), oldest_age=None)  # it is checked on its own


def done(item: Any) -> Outcome[Any, None]:
    """A success for ``item``, as a pool would record it."""
    return Outcome(item=item, index=0, id=0, result=None)


@contextlib.contextmanager
def writing(path: pathlib.Path) -> Iterator[sqlite3.Connection]:
    """A connection of the test's own, in one transaction, closed after it
    (``with connection:`` alone ends the transaction, not the connection, and
    Python 3.13 warns of a connection left to the garbage collector)."""
    connection = sqlite3.connect(path)
    try:
        with connection:
            yield connection
    finally:
        connection.close()


def rows(path: pathlib.Path, sql: str, *args: Any) -> list[Any]:
    with writing(path) as connection:
        return connection.execute(sql, args).fetchall()


async def test_entries_come_out_in_order_with_their_fields(path: pathlib.Path) -> None:
    """What a sink adds, a source hands out oldest first, each with its
    fields and a first delivery; every success is recorded as done."""
    await fill(path, 50)
    seen: list[tuple[str, int]] = []

    async def handle(delivery: Delivery[str]) -> None:
        seen.append((delivery.fields["n"], delivery.deliveries))

    async with QueueSource(path, stop_when_drained=True) as source:
        await drain(source, handle, workers=1)
        assert source.stats.acked == 50
        assert source.stats.delivered == 50
    assert seen == [(str(n), 1) for n in range(50)]
    assert await counts(path) == QueueCounts(
        queued=0, in_progress=0, done=50, dead=0, oldest_age=None
    )


async def test_submit_returns_the_id_and_a_key_is_added_once(path: pathlib.Path) -> None:
    """submit waits for the write and returns the entry's ID; an entry whose
    key the queue holds (queued or done) is not added again, and submit then
    returns the existing entry's ID."""
    async with QueueSink(path) as sink:
        first = await sink.submit({"a": "1"}, key="k")
        again = await sink.submit({"a": "2"}, key="k")
        other = await sink.submit({"a": "3"})
        assert first == again != other
        queued = await sink.counts()
        assert queued.queued == 2
        assert sink.stats.flushed == 3
        assert sink.unflushed == []
        assert queued.oldest_age is not None
        assert queued.oldest_age >= 0
    async with QueueSource(path, stop_when_drained=True) as source:
        await drain(source, lambda d: None)
    async with QueueSink(path) as sink:
        await sink.add({"a": "4"}, key="k")  # done already: still not added
    assert await counts(path) == QueueCounts(
        queued=0, in_progress=0, done=2, dead=0, oldest_age=None
    )


async def test_keys_are_per_queue(path: pathlib.Path) -> None:
    """The same key in two queues of one file is two entries."""
    await fill(path, 3, queue="a")
    await fill(path, 3, queue="b")
    assert (await counts(path, "a")).queued == 3
    assert (await counts(path, "b")).queued == 3


async def test_a_failure_comes_back_and_then_goes_to_the_dead_letters(path: pathlib.Path) -> None:
    """A failure is handed out again after redeliver_after, its deliveries
    counted; on its max_deliveries-th delivery it is dead-lettered with its
    error, and the others are done."""
    await fill(path, 5)
    deliveries: dict[str, list[int]] = {}

    async def handle(delivery: Delivery[str]) -> None:
        deliveries.setdefault(delivery.fields["n"], []).append(delivery.deliveries)
        if delivery.fields["n"] == "3":
            raise ValueError("poison 3")

    async with QueueSource(
        path, max_deliveries=3, redeliver_after=0, stop_when_drained=True
    ) as source:
        await drain(source, handle)
        assert source.stats.failed == 2
        assert source.stats.dead_lettered == 1
    assert deliveries["3"] == [1, 2, 3]
    assert deliveries["0"] == [1]
    assert await counts(path) == QueueCounts(
        queued=0, in_progress=0, done=4, dead=1, oldest_age=None
    )
    ((error, fields),) = rows(path, "SELECT error, fields FROM corral_entries WHERE state = 'dead'")
    assert error == "ValueError('poison 3')"
    assert json.loads(fields) == {"n": "3"}


async def test_dead_letter_on_buries_at_once(path: pathlib.Path) -> None:
    """An error that dead_letter_on matches dead-letters the entry on its
    first delivery."""
    await fill(path, 2)

    async def handle(delivery: Delivery[str]) -> None:
        raise KeyError(delivery.fields["n"])

    async with QueueSource(path, dead_letter_on=KeyError, stop_when_drained=True) as source:
        outcomes = await drain(source, handle)
    assert len(outcomes) == 2
    assert (await counts(path)).dead == 2


async def test_a_failure_waits_redeliver_after(path: pathlib.Path) -> None:
    """A failed entry is not handed out again before redeliver_after has
    passed (by the file's clock)."""
    await fill(path, 1)
    times: list[float] = []

    async def handle(delivery: Delivery[str]) -> None:
        times.append(_store.now())
        if delivery.deliveries == 1:
            raise ValueError("once")

    async with QueueSource(path, redeliver_after=0.3, poll=0.02, stop_when_drained=True) as source:
        with anyio.fail_after(10):
            await drain(source, handle)
    assert len(times) == 2
    assert times[1] - times[0] >= 0.3


async def test_an_expired_lease_is_claimed(path: pathlib.Path) -> None:
    """An entry left leased by a consumer that died (its lease in the past)
    is taken over by another consumer, its delivery counted; one that had
    used up its deliveries goes to the dead letters without being handed out."""
    await fill(path, 2)
    with writing(path) as connection:  # what a SIGKILLed consumer leaves behind
        connection.execute(
            "UPDATE corral_entries SET state = 'leased', consumer = 'gone', due = 0, "
            "deliveries = CASE key WHEN '0' THEN 1 ELSE 5 END"
        )
    seen: list[tuple[str, int]] = []

    async def handle(delivery: Delivery[str]) -> None:
        seen.append((delivery.fields["n"], delivery.deliveries))

    async with QueueSource(path, max_deliveries=5, stop_when_drained=True) as source:
        await drain(source, handle)
        assert source.stats.claimed == 1
        assert source.stats.dead_lettered == 1
    assert seen == [("0", 2)]
    ((error,),) = rows(path, "SELECT error FROM corral_entries WHERE state = 'dead'")
    assert "never settled" in error


async def test_a_live_lease_is_not_claimed(path: pathlib.Path) -> None:
    """An entry leased to another live consumer (its lease in the future) is
    not handed out, and the queue does not count as drained while it is."""
    await fill(path, 1)
    with writing(path) as connection:
        connection.execute(
            "UPDATE corral_entries SET state = 'leased', consumer = 'busy', due = ?",
            (_store.now() + 3600,),
        )
    async with QueueSource(path, stop_when_drained=True, poll=0.01) as source:
        with anyio.move_on_after(0.3):
            async for _ in source:
                pytest.fail("an entry under another consumer's lease was handed out")
        assert (await source.counts()).in_progress == 1


async def test_a_handler_longer_than_the_lease_is_handled_once(path: pathlib.Path) -> None:
    """Two consumers share the queue; a handler takes four times the lease.
    Its lease is renewed while it runs, so the other consumer never gets it."""
    await fill(path, 4)
    handled: list[tuple[str, str, int]] = []

    async def consume(name: str) -> None:
        async def handle(delivery: Delivery[str]) -> None:
            handled.append((delivery.fields["n"], name, delivery.deliveries))
            await anyio.sleep(1.2)

        async with QueueSource(
            path, consumer=name, lease=0.3, poll=0.02, max_in_flight=2, stop_when_drained=True
        ) as source:
            await drain(source, handle, workers=2)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, "one")
            tg.start_soon(consume, "two")
    assert sorted(n for n, _, _ in handled) == ["0", "1", "2", "3"]
    assert all(deliveries == 1 for _, _, deliveries in handled)


async def test_a_cancelled_block_loses_nothing(path: pathlib.Path) -> None:
    """A block cancelled mid-run records what was settled and hands back
    every entry it had taken, at once: the next run gets them all."""
    await fill(path, 40)
    started = anyio.Event()

    async def handle(delivery: Delivery[str]) -> None:
        if delivery.fields["n"] == "0":
            return
        started.set()
        await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        async with (
            QueueSource(path, max_in_flight=20) as source,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(functools.partial(drain, source, handle, workers=5))
            await started.wait()
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    assert await counts(path) == QueueCounts(
        queued=39, in_progress=0, done=1, dead=0, oldest_age=None
    )
    async with QueueSource(path, stop_when_drained=True) as source:
        outcomes = await drain(source, lambda d: None)
    assert len(outcomes) == 39


async def test_entries_taken_but_not_handed_out_get_their_delivery_back(
    path: pathlib.Path,
) -> None:
    """The source takes as many entries as it has room for; at the end of
    the block, those it never handed out go back with their delivery undone,
    and the one handed out and not settled keeps its delivery."""
    await fill(path, 30)
    async with QueueSource(path, max_in_flight=20) as source:
        delivery = await source.__anext__()
        assert (await source.counts()).in_progress == 20
    assert delivery.fields["n"] == "0"
    deliveries = dict(rows(path, "SELECT key, deliveries FROM corral_entries"))
    assert deliveries == {str(n): 1 if n == 0 else 0 for n in range(30)}
    assert (await counts(path)).queued == 30


async def test_a_settle_in_a_cancelled_scope_still_counts(path: pathlib.Path) -> None:
    """A success settled by a caller that is being cancelled is recorded all
    the same: the entry is done, not left leased to come back later."""
    await fill(path, 1)
    async with QueueSource(path) as source:
        delivery = await source.__anext__()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await source.settle(done(delivery))
    assert await counts(path) == QueueCounts(
        queued=0, in_progress=0, done=1, dead=0, oldest_age=None
    )


async def test_many_openers_of_a_new_file_all_succeed(path: pathlib.Path) -> None:
    """Sinks and sources that open a new file at the same moment (workers
    started together) all get in: switching it to WAL mode waits its turn."""
    async with anyio.create_task_group() as tg:
        for n in range(8):
            if n % 2:
                tg.start_soon(fill, path, 1)
            else:

                async def open_source() -> None:
                    async with QueueSource(path):
                        pass

                tg.start_soon(open_source)
    assert (await counts(path)).queued == 1


async def test_a_named_consumer_takes_back_its_own_leases(path: pathlib.Path) -> None:
    """A consumer restarted under the same name gets back at once the
    entries its earlier run left leased, without waiting for the lease."""
    await fill(path, 3)
    with writing(path) as connection:
        connection.execute(
            "UPDATE corral_entries SET state = 'leased', consumer = 'worker-1', due = ?, "
            "deliveries = 1",
            (_store.now() + 3600,),
        )
    async with QueueSource(path, consumer="worker-1", stop_when_drained=True) as source:
        outcomes = await drain(source, lambda d: d.deliveries)
    assert sorted(outcome.result for outcome in outcomes) == [2, 2, 2]


async def test_two_sources_in_one_process_share_the_work(path: pathlib.Path) -> None:
    """Two sources on one file: every entry goes to exactly one of them."""
    await fill(path, 300)
    handled: list[str] = []

    async def consume() -> None:
        async def handle(delivery: Delivery[str]) -> None:
            handled.append(delivery.id)
            await anyio.lowlevel.checkpoint()

        async with QueueSource(path, max_in_flight=10, stop_when_drained=True) as source:
            await drain(source, handle)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            tg.start_soon(consume)
    assert len(handled) == len(set(handled)) == 300


async def test_a_sink_wakes_a_waiting_source(path: pathlib.Path) -> None:
    """An entry added by a sink of the same process is handed out at once,
    not at the source's next poll."""
    async with QueueSource(path, poll=3600) as source, QueueSink(path) as sink:
        async with anyio.create_task_group() as tg:

            async def add() -> None:
                await anyio.wait_all_tasks_blocked()
                await sink.submit({"late": "yes"})

            tg.start_soon(add)
            with anyio.fail_after(10):
                delivery = await source.__anext__()
        assert delivery.fields == {"late": "yes"}
        await source.settle(done(delivery))


async def test_stop_ends_the_iteration(path: pathlib.Path) -> None:
    """stop() ends a waiting iteration; what was handed out can still be settled."""
    await fill(path, 1)
    async with QueueSource(path, poll=3600) as source:
        delivery = await source.__anext__()
        async with anyio.create_task_group() as tg:

            async def stop() -> None:
                await anyio.wait_all_tasks_blocked()
                source.stop()

            tg.start_soon(stop)
            with anyio.fail_after(10), pytest.raises(StopAsyncIteration):
                await source.__anext__()
        await source.settle(done(delivery))
    assert (await counts(path)).done == 1


async def test_prune_drops_old_keys(path: pathlib.Path) -> None:
    """prune drops the keys of done entries (and with dead=True the dead
    letters) older than older_than; a pruned key can be added again."""
    await fill(path, 3)

    async def handle(delivery: Delivery[str]) -> None:
        if delivery.fields["n"] == "2":
            raise ValueError("dead")

    async with QueueSource(path, max_deliveries=1, stop_when_drained=True) as source:
        await drain(source, handle)
        assert await source.prune(older_than=3600) == 0
        assert await source.prune(older_than=0) == 2
        assert await source.prune(older_than=0, dead=True) == 1
    assert rows(path, "SELECT count(*) FROM corral_entries") == [(0,)]
    assert (await counts(path)).done == 2  # handled, ever
    await fill(path, 1)
    assert (await counts(path)).queued == 1


async def test_settle_refuses_what_it_did_not_hand_out(path: pathlib.Path) -> None:
    """settle names the mistake: outside the block, an item that is not a
    Delivery, or a delivery this source did not hand out (or settled)."""
    await fill(path, 1)
    source = QueueSource(path)
    stranger = Delivery("default", "1", {"n": "0"}, 1)
    with pytest.raises(PoolClosed):
        await source.settle(done(stranger))
    async with source:
        with pytest.raises(TypeError, match="Delivery"):
            await source.settle(done(42))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="not handed out"):
            await source.settle(done(stranger))
        delivery = await source.__anext__()
        await source.settle(done(delivery))
        with pytest.raises(ValueError, match="already settled"):
            await source.settle(done(delivery))


async def test_iterating_outside_the_block_and_twice_at_once(path: pathlib.Path) -> None:
    """Iterating outside the block raises PoolClosed; a second task iterating
    at the same time gets BusyResourceError; a block cannot be entered twice."""
    source = QueueSource(path, poll=3600)
    with pytest.raises(PoolClosed):
        await source.__anext__()
    async with source:
        with pytest.raises(RuntimeError, match="already running"):
            await source.__aenter__()
        async with anyio.create_task_group() as tg:

            async def iterate() -> None:
                async for _ in source:
                    pytest.fail("the queue is empty")

            tg.start_soon(iterate)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(anyio.BusyResourceError):
                await source.__anext__()
            source.stop()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: QueueSource(42), "path must be a str"),  # type: ignore[arg-type]
        (lambda: QueueSource("q", queue=""), "queue must not be empty"),
        (lambda: QueueSource("q", queue=3), "queue must be a str"),  # type: ignore[arg-type]
        (lambda: QueueSource("q", consumer=""), "consumer must not be empty"),
        (lambda: QueueSource("q", consumer=3), "consumer must be a str"),  # type: ignore[arg-type]
        (lambda: QueueSink(":memory:"), "path must name a file"),
        (lambda: QueueSource("file::memory:?cache=shared"), "path must name a file"),
        (lambda: QueueSource("q", max_in_flight=0), "max_in_flight"),
        (lambda: QueueSource("q", lease=0), "lease"),
        (lambda: QueueSource("q", max_deliveries=0), "max_deliveries"),
        (lambda: QueueSource("q", redeliver_after=-1), "redeliver_after"),
        (lambda: QueueSource("q", poll=0), "poll"),
        (lambda: QueueSource("q", dead_letter_on=42), "dead_letter_on"),  # type: ignore[arg-type]
        (lambda: QueueSource("q", stop_when_drained="yes"), "stop_when_drained"),  # type: ignore[arg-type]
        (lambda: QueueSink("q", timeout=0), "timeout"),
        (lambda: QueueSink("q", max_size=0), "max_size"),
    ],
)
def test_bad_arguments_name_the_parameter(make: Callable[[], object], message: str) -> None:
    """Each bad argument is refused at once, with the parameter's name."""
    with pytest.raises((TypeError, ValueError), match=message):
        make()


async def test_bad_fields_and_keys_are_refused(path: pathlib.Path) -> None:
    """fields must map str to str (ints and floats are written as text);
    a key must be a non-empty str."""
    async with QueueSink(path) as sink:
        with pytest.raises(TypeError, match="fields must be a mapping"):
            await sink.add(["a"])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="values must be str"):
            await sink.add({"a": None})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="str names"):
            await sink.add({1: "a"})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="key must be"):
            await sink.add({"a": "b"}, key="")
        await sink.submit({"n": 5, "x": 1.5})  # type: ignore[dict-item]
    async with QueueSource(path, stop_when_drained=True) as source:
        outcomes = await drain(source, lambda d: dict(d.fields))
    assert outcomes[0].result == {"n": "5", "x": "1.5"}


# --- files that cannot be used: a clear error, and nothing already added is lost


async def test_a_file_that_is_not_a_database_is_refused(path: pathlib.Path) -> None:
    """A file that is not SQLite is refused on entry, naming the file."""
    await anyio.Path(path).write_text("hello, I am a text file\n" * 100)
    with pytest.raises(QueueError, match="not a SQLite database") as caught:
        async with QueueSource(path):
            pass
    assert str(path) in str(caught.value)
    assert (await anyio.Path(path).read_text()).startswith("hello")  # left as it was


async def test_another_programs_database_is_refused(path: pathlib.Path) -> None:
    """A SQLite file with tables corral did not make is refused, naming them."""
    with writing(path) as connection:
        connection.execute("CREATE TABLE users (id INTEGER)")
    with pytest.raises(QueueError, match=r"did not make.*users"):
        async with QueueSink(path):
            pass


async def test_another_schema_version_is_refused(path: pathlib.Path) -> None:
    """A queue file of another schema version is refused, naming both versions."""
    await fill(path, 1)
    with writing(path) as connection:
        connection.execute("UPDATE corral_meta SET value = '99' WHERE name = 'schema'")
    with pytest.raises(QueueError, match="version 99"):
        async with QueueSource(path):
            pass


async def test_a_corrupt_file_is_refused(path: pathlib.Path) -> None:
    """A queue file whose pages were overwritten gives a clear error, not a
    crash or a silent empty queue."""
    await fill(path, 2000)
    with writing(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(await anyio.Path(path).read_bytes())
    for offset in range(4096, len(data), 4096):  # every page but the first
        data[offset + 8 : offset + 200] = b"\xff" * 192
    await anyio.Path(path).write_bytes(bytes(data))
    with pytest.raises(QueueError, match=str(path)):
        async with QueueSource(path, stop_when_drained=True) as source:
            await drain(source, lambda d: None)


@pytest.fixture
def pragma(monkeypatch: pytest.MonkeyPatch) -> Callable[[pathlib.Path, str], None]:
    """Make corral's connections to one file run a PRAGMA once opened (how the
    tests make a file read-only or full: the tests run as root, for whom a
    chmod does not stop a write)."""

    def install(path: pathlib.Path, statement: str) -> None:
        connect = sqlite3.connect

        def connect_with_pragma(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
            connection = connect(database, *args, **kwargs)
            if str(database) == str(path):
                connection.execute(statement)
            return connection

        monkeypatch.setattr(_store.sqlite3, "connect", connect_with_pragma)

    return install


async def test_a_read_only_file_is_refused_and_keeps_its_entries(
    path: pathlib.Path, pragma: Callable[[pathlib.Path, str], None]
) -> None:
    """A file that cannot be written is refused on entry with an error that
    says so; the entries it holds are still there afterwards."""
    await fill(path, 10)
    pragma(path, "PRAGMA query_only = ON")
    with pytest.raises(QueueError, match="read-only"):
        async with QueueSink(path):
            pass
    with pytest.raises(QueueError, match="read-only"):
        async with QueueSource(path):
            pass
    assert rows(path, "SELECT count(*) FROM corral_entries WHERE state = 'queued'") == [(10,)]


async def test_a_full_disk_fails_the_write_and_loses_nothing_written(
    path: pathlib.Path, pragma: Callable[[pathlib.Path, str], None]
) -> None:
    """When the file cannot grow, submit raises QueueError saying the disk is
    full; every entry written before is still there, and the entries not
    written come back in FlushError.items at the end of the block."""
    await fill(path, 1)
    (pages,) = rows(path, "PRAGMA page_count")[0]
    pragma(path, f"PRAGMA max_page_count = {pages + 2}")
    written: list[str] = []
    with pytest.raises(corral.FlushError) as caught:
        async with QueueSink(path, max_size=10) as sink:
            with pytest.raises(QueueError, match="full"):
                for n in range(100_000):
                    written.append(await sink.submit({"n": str(n), "pad": "x" * 200}))
            for n in range(3):
                await sink.add({"after": str(n)})
    assert [fields for fields, _ in caught.value.items] == [{"after": str(n)} for n in range(3)]
    stored = {str(i) for (i,) in rows(path, "SELECT id FROM corral_entries")}
    assert set(written) <= stored
    assert len(stored) == len(written) + 1


async def test_a_full_disk_does_not_leave_add_waiting(
    path: pathlib.Path, pragma: Callable[[pathlib.Path, str], None]
) -> None:
    """add only queues, so a write that keeps failing must not leave the
    producer waiting for room forever: after a few failures in a row the sink
    gives up, and the block raises FlushError with every entry not written."""
    await fill(path, 1)
    (pages,) = rows(path, "PRAGMA page_count")[0]
    pragma(path, f"PRAGMA max_page_count = {pages}")
    added = 0
    with anyio.fail_after(60), pytest.raises(corral.FlushError) as caught:
        async with QueueSink(path, max_size=10, max_pending=20) as sink:
            for n in range(1000):
                await sink.add({"n": str(n), "pad": "x" * 500})
                added += 1
    assert isinstance(caught.value.__cause__, QueueError)
    stored = rows(path, "SELECT fields FROM corral_entries ORDER BY id")[1:]
    written = [json.loads(fields)["n"] for (fields,) in stored]
    unwritten = [fields["n"] for fields, _ in caught.value.items]
    assert written + unwritten == [str(n) for n in range(added)]  # each one, once, in order
    assert unwritten


# --- python -m corral.sqlite


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral.sqlite", *args], capture_output=True, text=True, timeout=60
    )


async def test_the_command_prints_counts_and_dead_letters(path: pathlib.Path) -> None:
    """python -m corral.sqlite PATH prints each queue's counts; --dead lists
    the dead letters with their errors."""
    await fill(path, 3, queue="emails")

    async def handle(delivery: Delivery[str]) -> None:
        if delivery.fields["n"] == "1":
            raise ValueError("bounced")

    async with QueueSource(path, "emails", max_deliveries=1, stop_when_drained=True) as source:
        await drain(source, handle)
    await fill(path, 2, queue="later")
    shown = run_cli(str(path))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[1].split() == [
        "queue",
        "queued",
        "in",
        "progress",
        "done",
        "dead",
        "oldest",
        "waiting",
    ]
    assert lines[2].split() == ["emails", "0", "0", "2", "1", "-"]
    assert lines[3].split()[:5] == ["later", "2", "0", "0", "0"]
    dead = run_cli(str(path), "--dead", "--queue", "emails")
    assert dead.returncode == 0
    assert "ValueError('bounced')" in dead.stdout
    assert '"n": "1"' in dead.stdout


async def test_the_command_refuses_what_it_cannot_read(tmp_path: pathlib.Path) -> None:
    """A missing file (which it does not create), or one that is not a
    queue, gives exit status 2 and a message."""
    missing = tmp_path / "missing.sqlite3"
    result = run_cli(str(missing))
    assert result.returncode == 2
    assert "no such file" in result.stderr
    assert not missing.exists()
    text = tmp_path / "notes.txt"
    await anyio.Path(text).write_text("not a database\n" * 100)
    result = run_cli(str(text))
    assert result.returncode == 2
    assert "not a SQLite database" in result.stderr


async def test_the_command_in_process(
    path: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() prints the counts and dead letters, says when a file holds no
    entries, and refuses a folder or a SQLite file without a queue (status 2)."""
    from corral.sqlite.__main__ import main

    async with QueueSink(path):
        pass
    assert main([str(path)]) == 0
    assert "(no entries)" in capsys.readouterr().out
    await fill(path, 2)
    async with QueueSource(path, max_deliveries=1, stop_when_drained=True) as source:

        async def handle(delivery: Delivery[str]) -> None:
            raise ValueError(delivery.fields["n"])

        await drain(source, handle)
    assert main([str(path), "--dead", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("error:  ValueError(") == 1  # --limit 1
    assert main([str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    empty = tmp_path / "empty.sqlite3"
    await anyio.Path(empty).write_bytes(b"")
    assert main([str(empty)]) == 2
    assert "not a corral queue file" in capsys.readouterr().err


async def test_a_file_that_turns_read_only_mid_run_loses_nothing(path: pathlib.Path) -> None:
    """If the file stops taking writes while a source runs, its iteration
    ends with QueueError, the block says the successes it could not record,
    and every entry is still in the file to run again."""
    await fill(path, 5)
    handled: list[str] = []

    async def handle(delivery: Delivery[str]) -> None:
        handled.append(delivery.id)
        if len(handled) == 2:  # the disk goes read-only under the running source
            source._live()._connection.execute("PRAGMA query_only = ON")

    source = QueueSource(path, max_in_flight=1)
    with anyio.fail_after(30), pytest.raises(QueueError, match="read-only"):
        async with source:
            await drain(source, handle, workers=1)
    left = await counts(path)
    assert left.done + left.queued + left.in_progress == 5
    assert left.done <= 1


async def test_a_lease_lost_while_handled_is_reported(
    path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """If a delivery's lease was taken over while its handler ran (the
    process stalled past the lease), the renewal says so at WARNING, naming
    the risk: the entry may be handled twice."""
    await fill(path, 1)
    async with QueueSource(path, lease=0.3) as source:
        delivery = await source.__anext__()
        with writing(path) as connection:  # another consumer took it over
            connection.execute("UPDATE corral_entries SET consumer = 'another'")
        with anyio.fail_after(10):
            while "leases had run out" not in caplog.text:  # noqa: ASYNC110 - the renewal's timer
                await anyio.sleep(0.02)
        assert "handled twice" in caplog.text
        await source.settle(done(delivery))
