"""The queue file: one SQLite connection and the statements a queue runs on it.

Everything here is synchronous and runs in a worker thread, one call at a time
per connection (the async side holds a ``CapacityLimiter(1)`` for it). Each
method that writes is one transaction (``BEGIN IMMEDIATE``, so that two
processes never both decide to take the same entry).

The table, one row per entry::

    corral_entries(id, queue, key, state, fields, deliveries, due, consumer, added, error)

    state     'queued'  waiting; handed out once ``due`` (a time) has passed
              'leased'  handed out to ``consumer`` until ``due`` (its lease)
              'done'    handled; kept (``fields`` dropped) only if it has a key,
                        so that a producer run again does not add it twice
              'dead'    dead-lettered; ``error`` says why

    corral_done(queue, done)   entries handled per queue, ever (rows without
                               a key are deleted when done, and pruning drops
                               the rest, so counting rows would not tell)

Times are wall-clock seconds (``time.time()``): the file is shared by
processes and outlives them, so no process's monotonic clock would do.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence

import attrs

from .._errors import CorralError

__all__ = ["Failure", "QueueCounts", "QueueError", "Store", "Taken", "now"]

# AUTOINCREMENT: an id is never reused, so a stale id (an entry settled late,
# after it was deleted) matches nothing rather than a newer entry.

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS corral_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS corral_done (queue TEXT PRIMARY KEY, done INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS corral_entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    key TEXT,
    state TEXT NOT NULL,
    fields TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL,
    consumer TEXT,
    added REAL NOT NULL,
    error TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS corral_entries_key
    ON corral_entries (queue, key) WHERE key IS NOT NULL;
CREATE INDEX IF NOT EXISTS corral_entries_due ON corral_entries (queue, state, due);
"""

_NEVER_SETTLED = "never settled: its consumers died or stalled"


def now() -> float:
    """The time the queue file's timestamps are in (tests may replace it)."""
    return time.time()


class QueueError(CorralError):
    """The queue file cannot be used: it is not a SQLite database, it is
    corrupt, it belongs to something else, it is read-only, the disk is full,
    or another process held it locked for longer than ``timeout``. The message
    names the file; ``__cause__`` is sqlite3's own error."""


@attrs.frozen
class QueueCounts:
    """How many entries a queue holds in each state, and how long the oldest
    waiting one has waited."""

    queued: int  #: waiting to be handed out (failures waiting to come back included)
    in_progress: int  #: handed out, under a lease
    done: int  #: handled, ever (pruning does not lower it)
    dead: int  #: dead-lettered
    oldest_age: float | None  #: seconds the oldest queued entry has waited; None if none


@attrs.frozen
class Taken:
    """One entry handed out by :meth:`Store.take`."""

    id: int
    fields: dict[str, str]
    deliveries: int
    claimed: bool  # its lease had run out: taken over from a consumer that died


class Store:
    """One connection to a queue file."""

    def __init__(self, path: str, *, timeout: float, read_only: bool = False) -> None:
        self.path = path
        self._connection = self._open(path, timeout, read_only)

    def _open(self, path: str, timeout: float, read_only: bool) -> sqlite3.Connection:
        with self._errors("open"):
            if read_only:
                uri = "file:" + path.replace("?", "%3f").replace("#", "%23") + "?mode=ro"
                connection = sqlite3.connect(
                    uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False
                )
            else:
                connection = sqlite3.connect(
                    path, timeout=timeout, isolation_level=None, check_same_thread=False
                )
        try:
            with self._errors("open"):
                self._check(connection, read_only)
                if not read_only:
                    self._create(connection, timeout)
        except BaseException:
            connection.close()
            raise
        return connection

    def _check(self, connection: sqlite3.Connection, read_only: bool) -> None:
        tables = {
            name
            for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not name.startswith("sqlite_")
        }
        if read_only and "corral_meta" not in tables:
            raise QueueError(f"{self.path} is not a corral queue file (it has no queue tables)")
        if tables and "corral_meta" not in tables:
            raise QueueError(
                f"{self.path} is a SQLite database that corral did not make "
                f"(tables: {', '.join(sorted(tables))}): give the queue a file of its own"
            )
        if tables:
            row = connection.execute(
                "SELECT value FROM corral_meta WHERE name = 'schema'"
            ).fetchone()
            if row is None or row[0] != SCHEMA_VERSION:
                found = "none" if row is None else row[0]
                raise QueueError(
                    f"{self.path} is a corral queue of schema version {found}; this corral "
                    f"reads version {SCHEMA_VERSION}"
                )

    def _create(self, connection: sqlite3.Connection, timeout: float) -> None:
        self._use_wal(connection, timeout)
        connection.execute("PRAGMA synchronous = NORMAL")  # durable across a process crash
        with _transaction(connection):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(
                "INSERT OR IGNORE INTO corral_meta VALUES ('schema', ?)", (SCHEMA_VERSION,)
            )

    def _use_wal(self, connection: sqlite3.Connection, timeout: float) -> None:
        """WAL mode (readers never wait for the writer). Switching to it takes
        the file's lock without waiting for the busy timeout, so processes
        opening a new file together try again until ``timeout``."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)  # in a worker thread
                delay = min(delay * 2, 0.1)
        if mode.lower() != "wal":
            raise QueueError(
                f"{self.path}: the queue file cannot use WAL mode (its journal mode is {mode!r}): "
                "give it a file on a local disk"
            )

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except QueueError:
            raise
        except sqlite3.Error as error:
            raise QueueError(
                f"{self.path}: could not {doing} the queue file: {_explain(error)}"
            ) from error

    def close(self) -> None:
        self._connection.close()

    def add(self, queue: str, entries: Sequence[tuple[Mapping[str, str], str | None]]) -> list[int]:
        """Add entries (fields, key); one with a key the queue holds already
        is not added. Returns each entry's id (the existing one's for a key
        held already)."""
        added = now()
        ids = []
        with self._errors("add entries to"), _transaction(self._connection):
            execute = self._connection.execute
            for fields, key in entries:
                cursor = execute(
                    "INSERT INTO corral_entries (queue, key, state, fields, due, added) "
                    "VALUES (?, ?, 'queued', ?, ?, ?) ON CONFLICT DO NOTHING",
                    (queue, key, json.dumps(fields), added, added),
                )
                if cursor.rowcount:
                    ids.append(int(cursor.lastrowid or 0))
                else:
                    (found,) = execute(
                        "SELECT id FROM corral_entries WHERE queue = ? AND key = ?", (queue, key)
                    ).fetchone()
                    ids.append(int(found))
        return ids

    def take(
        self, queue: str, consumer: str, count: int, lease: float, max_deliveries: int
    ) -> tuple[list[Taken], int]:
        """Lease up to ``count`` entries to ``consumer``: those whose lease ran
        out first (their consumer died or stalled), then queued ones that are
        due, oldest first. An entry whose lease ran out after its
        ``max_deliveries``-th delivery is dead-lettered instead. Returns the
        entries and how many were dead-lettered."""
        at = now()
        with self._errors("take entries from"):
            # a read first: an idle consumer's poll takes no write lock
            (due,) = self._connection.execute(
                "SELECT EXISTS (SELECT 1 FROM corral_entries WHERE queue = ? "
                "AND state = 'queued' AND due <= ?) OR EXISTS (SELECT 1 FROM corral_entries "
                "WHERE queue = ? AND state = 'leased' AND due <= ?)",
                (queue, at, queue, at),
            ).fetchone()
        if not due:
            return [], 0
        with self._errors("take entries from"), _transaction(self._connection):
            execute = self._connection.execute
            buried = execute(
                "UPDATE corral_entries SET state = 'dead', error = ?, consumer = NULL, due = ? "
                "WHERE queue = ? AND state = 'leased' AND due <= ? AND deliveries >= ?",
                (_NEVER_SETTLED, at, queue, at, max_deliveries),
            ).rowcount
            rows = execute(
                "SELECT id, fields, deliveries, 1 FROM corral_entries "
                "WHERE queue = ? AND state = 'leased' AND due <= ? ORDER BY due, id LIMIT ?",
                (queue, at, count),
            ).fetchall()
            if len(rows) < count:
                rows += execute(
                    "SELECT id, fields, deliveries, 0 FROM corral_entries "
                    "WHERE queue = ? AND state = 'queued' AND due <= ? ORDER BY due, id LIMIT ?",
                    (queue, at, count - len(rows)),
                ).fetchall()
            self._connection.executemany(
                "UPDATE corral_entries SET state = 'leased', consumer = ?, due = ?, "
                "deliveries = deliveries + 1 WHERE id = ?",
                [(consumer, at + lease, row[0]) for row in rows],
            )
        taken = [
            Taken(entry_id, json.loads(fields), deliveries + 1, bool(claimed))
            for entry_id, fields, deliveries, claimed in rows
        ]
        return taken, buried

    def renew(self, consumer: str, ids: Sequence[int], lease: float) -> int:
        """Extend the lease of the entries still leased to ``consumer``;
        returns how many were."""
        until = now() + lease
        with self._errors("renew leases in"), _transaction(self._connection):
            cursor = self._connection.executemany(
                "UPDATE corral_entries SET due = ? "
                "WHERE id = ? AND state = 'leased' AND consumer = ?",
                [(until, entry_id, consumer) for entry_id in ids],
            )
        return cursor.rowcount

    def settle(
        self, queue: str, consumer: str, done: Sequence[int], failed: Sequence[Failure]
    ) -> tuple[int, int, int]:
        """Record outcomes in one transaction: ``done`` entries are deleted
        (or, with a key, kept as the key alone); each failure goes back to the
        queue (due after its delay) or to the dead letters, if still leased
        to ``consumer``. Returns (acknowledged, requeued, dead-lettered)."""
        at = now()
        requeued = buried = 0
        with self._errors("settle entries in"), _transaction(self._connection):
            execute = self._connection.execute
            acked = self._connection.executemany(
                "DELETE FROM corral_entries WHERE id = ? AND key IS NULL", [(i,) for i in done]
            ).rowcount
            acked += self._connection.executemany(
                "UPDATE corral_entries SET state = 'done', fields = NULL, consumer = NULL, "
                "error = NULL, due = ? WHERE id = ? AND key IS NOT NULL AND state != 'done'",
                [(at, i) for i in done],
            ).rowcount
            if acked:
                execute(
                    "INSERT INTO corral_done VALUES (?, ?) "
                    "ON CONFLICT (queue) DO UPDATE SET done = done + excluded.done",
                    (queue, acked),
                )
            for failure in failed:
                owned = "WHERE id = ? AND state = 'leased' AND consumer = ?"
                if failure.dead:
                    buried += execute(
                        "UPDATE corral_entries SET state = 'dead', consumer = NULL, due = ?, "
                        f"error = ? {owned}",
                        (at, failure.error, failure.id, consumer),
                    ).rowcount
                else:
                    requeued += execute(
                        "UPDATE corral_entries SET state = 'queued', consumer = NULL, due = ?, "
                        f"error = ? {owned}",
                        (at + failure.delay, failure.error, failure.id, consumer),
                    ).rowcount
        return acked, requeued, buried

    def release(self, consumer: str, entries: Sequence[tuple[int, bool]]) -> int:
        """Hand entries leased to ``consumer`` back to the queue, due at once:
        (id, handed out). One never handed out gets its delivery back."""
        with self._errors("hand back entries to"), _transaction(self._connection):
            cursor = self._connection.executemany(
                "UPDATE corral_entries SET state = 'queued', consumer = NULL, due = 0, "
                "deliveries = deliveries - ? WHERE id = ? AND state = 'leased' AND consumer = ?",
                [(0 if handed else 1, entry_id, consumer) for entry_id, handed in entries],
            )
        return cursor.rowcount

    def release_all(self, queue: str, consumer: str) -> int:
        """Hand back every entry of the queue still leased to ``consumer``
        (left by an earlier run under the same name)."""
        with self._errors("hand back entries to"), _transaction(self._connection):
            return self._connection.execute(
                "UPDATE corral_entries SET state = 'queued', consumer = NULL, due = 0 "
                "WHERE queue = ? AND state = 'leased' AND consumer = ?",
                (queue, consumer),
            ).rowcount

    def drained(self, queue: str) -> bool:
        """Nothing queued and nothing leased: every entry done or dead."""
        with self._errors("read"):
            row = self._connection.execute(
                "SELECT 1 FROM corral_entries WHERE queue = ? AND state IN ('queued', 'leased') "
                "LIMIT 1",
                (queue,),
            ).fetchone()
        return row is None

    def counts(self, queue: str) -> QueueCounts:
        with self._errors("read"), _reading(self._connection):
            states = dict(
                self._connection.execute(
                    "SELECT state, count(*) FROM corral_entries WHERE queue = ? GROUP BY state",
                    (queue,),
                ).fetchall()
            )
            row = self._connection.execute(
                "SELECT done FROM corral_done WHERE queue = ?", (queue,)
            ).fetchone()
            (oldest,) = self._connection.execute(
                "SELECT min(added) FROM corral_entries WHERE queue = ? AND state = 'queued'",
                (queue,),
            ).fetchone()
        return QueueCounts(
            queued=states.get("queued", 0),
            in_progress=states.get("leased", 0),
            done=0 if row is None else row[0],
            dead=states.get("dead", 0),
            oldest_age=None if oldest is None else max(0.0, now() - oldest),
        )

    def queues(self) -> list[str]:
        with self._errors("read"):
            rows = self._connection.execute(
                "SELECT queue FROM corral_entries UNION SELECT queue FROM corral_done "
                "ORDER BY queue"
            ).fetchall()
        return [queue for (queue,) in rows]

    def dead(self, queue: str, limit: int) -> list[DeadLetter]:
        """The dead letters, oldest first."""
        with self._errors("read"):
            rows = self._connection.execute(
                "SELECT id, key, deliveries, error, fields FROM corral_entries "
                "WHERE queue = ? AND state = 'dead' ORDER BY id LIMIT ?",
                (queue, limit),
            ).fetchall()
        return [
            DeadLetter(i, key, n, error or "", json.loads(fields or "{}"))
            for i, key, n, error, fields in rows
        ]

    def prune(self, queue: str, older_than: float, dead: bool) -> int:
        """Drop the done entries (with ``dead``, the dead letters too) settled
        more than ``older_than`` seconds ago; returns how many."""
        states = ("done", "dead") if dead else ("done", "done")
        with self._errors("prune"), _transaction(self._connection):
            return self._connection.execute(
                "DELETE FROM corral_entries WHERE queue = ? AND state IN (?, ?) AND due < ?",
                (queue, *states, now() - older_than),
            ).rowcount


@attrs.frozen
class DeadLetter:
    """One dead-lettered entry, as ``python -m corral.sqlite --dead`` lists it."""

    id: int
    key: str | None
    deliveries: int
    error: str
    fields: dict[str, str]


@attrs.frozen
class Failure:
    """A failed entry to settle: back to the queue after ``delay`` seconds,
    or (``dead``) to the dead letters."""

    id: int
    error: str
    dead: bool
    delay: float = 0.0


@contextlib.contextmanager
def _reading(connection: sqlite3.Connection) -> Iterator[None]:
    """One read transaction: every SELECT in it sees the same moment."""
    connection.execute("BEGIN")
    try:
        yield
    finally:
        connection.execute("COMMIT")


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    connection.execute("BEGIN IMMEDIATE")  # the write lock now: no other process interleaves
    try:
        yield
    except BaseException:
        if connection.in_transaction:
            connection.rollback()
        raise
    connection.execute("COMMIT")


def _explain(error: sqlite3.Error) -> str:
    text = str(error)
    hints = {
        "file is not a database": "it is not a SQLite database (or it is encrypted or corrupt)",
        "malformed": "the file is corrupt",
        "readonly": "the file is read-only",
        "full": "the disk (or the database's size limit) is full",
        "locked": "another process held the file locked for longer than timeout",
        "unable to open": "it cannot be opened (does its folder exist?)",
    }
    for clue, hint in hints.items():
        if clue in text:
            return f"{hint} ({text})"
    return text


def check_fields(fields: object) -> dict[str, str]:
    """A copy of an entry's fields: a mapping of str to str (ints and floats
    are written as text, as Redis does)."""
    if not isinstance(fields, Mapping):
        raise TypeError(f"fields must be a mapping of str to str, got {fields!r}")
    checked = {}
    for name, value in fields.items():
        if not isinstance(name, str):
            raise TypeError(f"fields must have str names, got {name!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise TypeError(
                f"fields values must be str (or int or float, written as text), "
                f"got {value!r} for {name!r}"
            )
        checked[name] = value
    return checked


def check_key(key: object) -> str | None:
    if key is not None and (not isinstance(key, str) or not key):
        raise TypeError(f"key must be a non-empty str or None, got {key!r}")
    return key
