"""Batched inserts into a SQLite file through a `corral.Batcher`.

Several producer tasks emit thousands of events with `await batcher.add(...)`;
the batcher hands them to `insert` in batches of at most `max_size`, or
sooner when the oldest queued event has waited `max_wait` seconds. `insert`
is a plain (blocking) function using the standard library's `sqlite3`, so
corral runs it in a worker thread, off the event loop; one transaction per
batch. Leaving the `async with` block flushes what is left. Then SQL checks
that every event is in the table exactly once.

Run it with `python examples/batch_insert.py [asyncio|uvloop|trio] [--db PATH]`:
asyncio and trio by default, on a database in a temporary directory unless `--db`
names a file (its `events` table is replaced).
"""

from __future__ import annotations

import argparse
import pathlib
import random
import sqlite3
import tempfile
import threading

import anyio
from _backends import add_argument, chosen, run_on

import corral

PRODUCERS = 5
EVENTS_PER_PRODUCER = 1_000
KINDS = ("click", "view", "scroll", "purchase")

Event = tuple[int, int, str]  # (producer, sequence number, kind)


class EventStore:
    """A SQLite table of events, written one transaction per batch."""

    def __init__(self, path: pathlib.Path) -> None:
        # One connection, used by one flush at a time (the Batcher's default
        # concurrency=1), from whichever worker thread runs that flush.
        self.db = sqlite3.connect(path, check_same_thread=False)
        with self.db:
            self.db.execute("DROP TABLE IF EXISTS events")
            # no uniqueness constraint: the check below must find duplicates, not prevent them
            self.db.execute("CREATE TABLE events (producer INTEGER, seq INTEGER, kind TEXT)")
        self.batch_sizes: list[int] = []
        self.threads: set[int] = set()

    def insert(self, events: list[Event]) -> None:
        """The batcher's flush: a plain function, so it runs in a worker thread."""
        self.threads.add(threading.get_ident())
        with self.db:  # one transaction: the whole batch or none of it
            self.db.executemany("INSERT INTO events VALUES (?, ?, ?)", events)
        self.batch_sizes.append(len(events))

    def verify(self, producers: int, per_producer: int) -> int:
        """Check with SQL that every event is stored exactly once; returns the row count."""
        (rows,) = self.db.execute("SELECT count(*) FROM events").fetchone()
        duplicates = self.db.execute(
            "SELECT producer, seq, count(*) FROM events GROUP BY producer, seq HAVING count(*) > 1"
        ).fetchall()
        per_source = self.db.execute(
            "SELECT producer, count(DISTINCT seq), min(seq), max(seq) FROM events"
            " GROUP BY producer ORDER BY producer"
        ).fetchall()
        assert duplicates == [], f"stored more than once: {duplicates[:5]}"
        # distinct sequence numbers 0 .. n-1 for each producer, and no other rows: all, once
        assert per_source == [(p, per_producer, 0, per_producer - 1) for p in range(producers)]
        assert rows == producers * per_producer, rows
        return int(rows)

    def close(self) -> None:
        self.db.close()


async def produce(batcher: corral.Batcher[Event, None], producer: int) -> None:
    rng = random.Random(producer)
    for seq in range(EVENTS_PER_PRODUCER):
        await batcher.add((producer, seq, rng.choice(KINDS)))  # waits while the queue is full
        if rng.random() < 0.02:
            await anyio.sleep(rng.uniform(0.0, 0.02))  # a lull in this producer's traffic


async def run(path: pathlib.Path) -> None:
    store = EventStore(path)
    try:
        loop_thread = threading.get_ident()
        started = anyio.current_time()
        async with (
            corral.Batcher(store.insert, max_size=250, max_wait=0.05) as batcher,
            anyio.create_task_group() as tg,
        ):
            for producer in range(PRODUCERS):
                tg.start_soon(produce, batcher, producer)
        # the producers are done, and leaving the batcher's block flushed the rest
        elapsed = anyio.current_time() - started

        stats = batcher.stats
        events = PRODUCERS * EVENTS_PER_PRODUCER
        print(
            f"{events} events from {PRODUCERS} producers in {elapsed:.2f} s: "
            f"{stats.flushes} batches, mean {stats.flushed / stats.flushes:.1f} rows per batch, "
            f"largest {max(store.batch_sizes)}"
        )
        assert loop_thread not in store.threads, "a flush ran on the event loop's thread"
        print(f"every flush ran in a worker thread ({len(store.threads)} thread(s) used)")
        assert batcher.unflushed == []
        assert stats.flushed == events
        assert len(store.batch_sizes) == stats.flushes
        assert max(store.batch_sizes) <= 250
        rows = store.verify(PRODUCERS, EVENTS_PER_PRODUCER)
        print(f"verified with SQL: {rows} rows, every event stored exactly once")
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Batched inserts into a SQLite file.")
    add_argument(parser)
    parser.add_argument("--db", type=pathlib.Path, help="SQLite file (default: a temporary one)")
    args = parser.parse_args()
    names = chosen(parser, args.backend)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db or pathlib.Path(tmp) / "events.db"
        for name in names:
            run_on(name, run, path)


if __name__ == "__main__":
    main()
