"""corral's SQLite queue (``corral.sqlite``) against persist-queue's
``SQLiteAckQueue`` driven from threads, on a real file in a temporary folder.

1. Produce: entries per second into a fresh queue file. corral's
   ``await QueueSink.add`` from one task (natural batching: one transaction
   per batch of up to 500, written while the next batch gathers),
   ``await QueueSink.submit`` (each waits until its entry is written) from
   100 tasks at once, whose entries share transactions, and from one task,
   one transaction per entry; on every installed backend. persist-queue's
   ``SQLiteAckQueue.put`` (one transaction per entry) from one thread and
   from ``--put-threads`` threads sharing one queue. The sink is opened before
   the clock starts and closed (everything written) before it stops.
2. Consume: entries per second to drain a queue file filled beforehand
   (untimed). corral: ``QueueSource(stop_when_drained=True, poll=0.01)``
   feeding ``apply_to_each`` (100 workers, ``on_outcome=source.settle``), the
   clock running from the first read to the block left, every settlement
   written (``poll``, 0.1 s by default, only delays the end: a process that
   finds nothing left to take waits that long before it looks whether the
   other has settled its last entries);
   persist-queue: ``--threads`` threads each looping ``get(block=False)`` ->
   handler -> ``ack()`` until ``Empty``, on one ``SQLiteAckQueue`` opened with
   ``multithreading=True`` and ``auto_commit=True`` (as its documentation
   says for threads; an ack queue always commits each call). Handlers: one
   that does nothing (``await anyio.sleep(0)``; persist-queue's does nothing
   at all) and one that sleeps 1 ms (``anyio.sleep`` / ``time.sleep``). In one
   process (this one), then in two processes draining one file at once
   (started and opened before the clock starts; the clock runs from "go" to
   both done).

After every run the script checks what was handled (each process reports
the entries it handled) and what the file holds (read with ``sqlite3``): for
corral every entry handled exactly once and none left, or it stops with
FAILED; for persist-queue, entries handled twice or lost are counted and
shown in the table, and a lost entry is reported on its own line.

Both keep the file in WAL mode. corral sets ``synchronous=NORMAL`` (durable
across a crash of the process, not of the machine); persist-queue keeps
SQLite's default ``FULL`` (an fsync per commit), so each persist-queue table
has a row with ``PRAGMA synchronous=NORMAL`` set on its two connections too.
persist-queue does not support several processes on one queue (its
maintainer says so); the two-process rows show what it does then.

Every contender is run once per repeat, in turn (A B C ... A B C ...); each
ratio is the median of the per-run ratios of the time per entry to the first
persist-queue row's in the same repeat (below 1: faster). Without
persist-queue, its rows say so and the rest runs.

    python benchmarks/bench_sqlite.py [--entries 10000] [--repeat 3] [--threads 10]
        [--put-threads 4] [--handler sleep0 sleep-1ms] [--dir FOLDER] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio
from _harness import backends, installed, key_ratio, ratio  # the script's folder is on sys.path

import corral
from corral.sqlite import QueueSink, QueueSource

WORKERS = 100  # apply_to_each workers per corral consumer process
SUBMITTERS = 100  # tasks awaiting QueueSink.submit at once
# seconds between a corral consumer's looks at a queue with nothing to take
# (default 0.1): only the end of a run waits for it, when one process has
# drained the queue and waits for the other's last entries to be settled
POLL = 0.01
PAYLOAD = "x" * 32
PQ_TABLE = "ack_queue_default"  # SQLiteAckQueue's table for name="default"
PQ_PUT = "persist-queue `SQLiteAckQueue.put`, 1 thread"
PQ_ACKED = 5  # persistqueue.AckStatus.acked

HANDLER_TITLES = {"sleep0": "`anyio.sleep(0)` handler", "sleep-1ms": "1 ms sleep handler"}
PAUSE = {"sleep0": 0.0, "sleep-1ms": 0.001}


class Lost(Exception):
    """A corral run did not handle every entry exactly once."""


def entry(index: int) -> dict[str, str]:
    return {"n": str(index), "payload": PAYLOAD}


def backend_options() -> dict[str, tuple[str, dict[str, Any]]]:
    return {label: (name, options) for label, name, options in backends()}


# ----------------------------------------------------------------- the files


def fresh(root: str) -> str:
    """A new empty folder under ``root`` for one run."""
    return tempfile.mkdtemp(dir=root, prefix="run-")


def corral_file(folder: str) -> str:
    return os.path.join(folder, "queue.sqlite3")


def pq_file(folder: str) -> str:
    return os.path.join(folder, "data.db")  # SQLiteAckQueue keeps its file in a folder


def states(path: str, table: str, column: str) -> dict[Any, int]:
    """How many rows of ``table`` are in each ``column`` value, read with
    plain sqlite3 (not through the code under test)."""
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute(
            f"SELECT {column}, count(*) FROM {table} GROUP BY {column}"
        ).fetchall()
    finally:
        connection.close()
    return dict(rows)


def fill_corral(folder: str, entries: int) -> None:
    async def main() -> None:
        async with QueueSink(corral_file(folder)) as sink:
            for index in range(entries):
                await sink.add(entry(index))

    anyio.run(main)
    found = states(corral_file(folder), "corral_entries", "state")
    assert found == {"queued": entries}, found


def open_pq(folder: str, synchronous: str | None) -> Any:
    """A SQLiteAckQueue as its documentation sets it up for threads; with
    ``synchronous``, that PRAGMA on both its connections (the getter reads,
    the putter writes)."""
    import persistqueue

    queue = persistqueue.SQLiteAckQueue(folder, multithreading=True, auto_commit=True)
    if synchronous is not None:
        for connection in {id(c): c for c in (queue._getter, queue._putter)}.values():
            connection.execute(f"PRAGMA synchronous = {synchronous}")
    return queue


def fill_pq(folder: str, entries: int) -> None:
    queue = open_pq(folder, "OFF")  # only the filling: no fsync per put
    try:
        for index in range(entries):
            queue.put(entry(index))
    finally:
        queue.close()
    found = states(pq_file(folder), PQ_TABLE, "status")
    assert found == {0: entries}, found


# ------------------------------------------------------------------- checks


@dataclasses.dataclass
class Tally:
    """One run: its time, and the entries handled twice and lost (persist-queue's
    are shown in the table; corral's stop the script)."""

    seconds: float
    twice: int = 0
    lost: int = 0


def tally(
    kind: str, label: str, seconds: float, entries: int, handled: list[str], left: dict[Any, int]
) -> Tally:
    """Compare what was handled with ``entries``: corral must have handled
    each exactly once and left nothing (``left``: the file's rows by state)."""
    distinct = set(handled)
    twice = len(handled) - len(distinct)
    lost = entries - len(distinct & {str(i) for i in range(entries)})
    if kind == "corral":
        if twice or lost or left:
            raise Lost(
                f"FAILED: {label}: handled {len(handled)} times {len(distinct)} distinct entries "
                f"of {entries} ({twice} twice, {lost} lost); left in the file: {left or 'none'}"
            )
    else:
        unacked = sum(count for status, count in left.items() if status != PQ_ACKED)
        lost = max(lost, unacked)
    return Tally(seconds, twice, lost)


# ------------------------------------------------------------------ produce


def corral_produce(backend: str, how: str) -> Callable[[str, int], Tally]:
    """``how``: "add" from one task, "submit" one at a time from one task, or
    "submit-tasks": submit from SUBMITTERS tasks at once."""
    name, options = backend_options()[backend]

    async def submit(sink: QueueSink, indexes: range) -> None:
        for index in indexes:
            await sink.submit(entry(index))

    def run(folder: str, entries: int) -> Tally:
        elapsed = 0.0

        async def main() -> None:
            nonlocal elapsed
            sink = QueueSink(corral_file(folder))
            await sink.__aenter__()
            start = time.perf_counter()
            try:
                if how == "add":
                    for index in range(entries):
                        await sink.add(entry(index))
                elif how == "submit":
                    await submit(sink, range(entries))
                else:
                    async with anyio.create_task_group() as tg:
                        for first in range(SUBMITTERS):
                            tg.start_soon(submit, sink, range(first, entries, SUBMITTERS))
            finally:
                await sink.__aexit__(None, None, None)
            elapsed = time.perf_counter() - start

        anyio.run(main, backend=name, backend_options=options)
        found = states(corral_file(folder), "corral_entries", "state")
        if found != {"queued": entries}:
            raise Lost(f"FAILED: corral produce on {backend}: the file holds {found}")
        return Tally(elapsed)

    return run


def pq_produce(threads: int, synchronous: str | None) -> Callable[[str, int], Tally]:
    def run(folder: str, entries: int) -> Tally:
        queue = open_pq(folder, synchronous)

        def put(indexes: range) -> None:
            for index in indexes:
                queue.put(entry(index))

        start = time.perf_counter()
        if threads == 1:
            put(range(entries))
        else:
            workers = [
                threading.Thread(target=put, args=(range(i, entries, threads),))
                for i in range(threads)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        elapsed = time.perf_counter() - start
        queue.close()
        found = states(pq_file(folder), PQ_TABLE, "status")
        return Tally(elapsed, lost=entries - found.get(0, 0))

    return run


# ------------------------------------------------------------------ consume


async def corral_consumer(path: str, handler: str) -> Callable[[], Any]:
    """Enter a QueueSource on ``path`` now; return the run (it leaves the
    source: every settlement written), which returns the entries handled."""
    pause = PAUSE[handler]
    handled: list[str] = []

    async def handle(delivery: Any) -> None:
        handled.append(delivery.fields["n"])
        await anyio.sleep(pause)

    source = QueueSource(path, stop_when_drained=True, poll=POLL)
    await source.__aenter__()

    async def run() -> list[str]:
        failures = 0
        try:
            async with corral.apply_to_each(
                handle, source, workers=WORKERS, on_outcome=source.settle
            ) as outcomes:
                async for outcome in outcomes:
                    failures += outcome.error is not None
        finally:
            await source.__aexit__(None, None, None)
        stats = source.stats
        if failures or stats.failed or stats.claimed or stats.dead_lettered:
            raise Lost(f"FAILED: {failures} handler failures; {stats}")
        return handled

    return run


def pq_consumer(queue: Any, threads: int, handler: str) -> list[str]:
    """``threads`` threads each looping get -> handler -> ack until the queue
    has nothing ready; returns the entries handled."""
    import persistqueue

    pause = PAUSE[handler]
    handled: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while True:
                try:
                    item = queue.get(block=False)
                except persistqueue.Empty:
                    return
                if pause:
                    time.sleep(pause)
                queue.ack(item)
                handled.append(item["n"])
        except BaseException as error:  # counted: the entries it held are lost
            errors.append(error)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        print(f"persist-queue consumer thread failed: {errors[0]!r}", file=sys.stderr)
    return handled


def corral_consume(backend: str, handler: str) -> Callable[[str, int], Tally]:
    name, options = backend_options()[backend]

    def run(folder: str, entries: int) -> Tally:
        fill_corral(folder, entries)
        elapsed = 0.0
        handled: list[str] = []

        async def main() -> None:
            nonlocal elapsed, handled
            consume = await corral_consumer(corral_file(folder), handler)
            start = time.perf_counter()
            handled = await consume()
            elapsed = time.perf_counter() - start

        anyio.run(main, backend=name, backend_options=options)
        left = states(corral_file(folder), "corral_entries", "state")
        label = f"corral, {backend}, 1 process, {handler}"
        return tally("corral", label, elapsed, entries, handled, left)

    return run


def pq_consume(threads: int, synchronous: str | None, handler: str) -> Callable[[str, int], Tally]:
    def run(folder: str, entries: int) -> Tally:
        fill_pq(folder, entries)
        queue = open_pq(folder, synchronous)
        start = time.perf_counter()
        handled = pq_consumer(queue, threads, handler)
        elapsed = time.perf_counter() - start
        queue.close()
        left = states(pq_file(folder), PQ_TABLE, "status")
        return tally("pq", "persist-queue", elapsed, entries, handled, left)

    return run


def worker(kind: str, folder: str, handler: str, backend: str, threads: int) -> int:
    """One consumer process: open the queue, say "ready", wait for "go",
    drain it, say "done <JSON list of the entries handled>"."""
    if kind == "pq":
        queue = open_pq(folder, None)
        print("ready", flush=True)
        sys.stdin.readline()
        handled = pq_consumer(queue, threads, handler)
        queue.close()
        print("done " + json.dumps(handled), flush=True)
        return 0
    name, options = backend_options()[backend]

    async def main() -> None:
        consume = await corral_consumer(corral_file(folder), handler)
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        handled = await consume()
        print("done " + json.dumps(handled), flush=True)

    anyio.run(main, backend=name, backend_options=options)
    return 0


def processes_consume(
    kind: str, processes: int, handler: str, backend: str, threads: int
) -> Callable[[str, int], Tally]:
    def run(folder: str, entries: int) -> Tally:
        (fill_pq if kind == "pq" else fill_corral)(folder, entries)
        command = [sys.executable, __file__, "--worker", kind, "--folder", folder,
                   "--handler", handler, "--backend", backend,
                   "--threads", str(threads)]  # fmt: skip
        children = [
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(processes)
        ]
        try:
            for child in children:
                assert child.stdout is not None
                line = child.stdout.readline()
                if line.strip() != "ready":
                    raise RuntimeError(f"a {kind} consumer did not start: {line!r}")
            start = time.perf_counter()
            for child in children:
                assert child.stdin is not None
                child.stdin.write("go\n")
                child.stdin.flush()
            lines = []
            for child in children:
                assert child.stdout is not None
                lines.append(child.stdout.readline())
            elapsed = time.perf_counter() - start
            for child in children:
                if child.wait(timeout=60) != 0:
                    raise RuntimeError(f"a {kind} consumer failed: exit code {child.returncode}")
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        handled = [n for line in lines if line.startswith("done ") for n in json.loads(line[5:])]
        if kind == "pq":
            left = states(pq_file(folder), PQ_TABLE, "status")
        else:
            left = states(corral_file(folder), "corral_entries", "state")
        label = f"{kind}, {backend}, {processes} processes, {handler}"
        return tally(kind, label, elapsed, entries, handled, left)

    return run


# ------------------------------------------------------------------- tables

#: A row: (label, run(folder, entries) -> Tally), or (label, reason it did not run).
Row = tuple[str, "Callable[[str, int], Tally] | str"]


def measure(root: str, rows: list[Row], entries: int, repeat: int) -> dict[str, list[Tally]]:
    """Every runnable row once per repeat, in turn, each on a fresh file."""
    results: dict[str, list[Tally]] = {label: [] for label, run in rows if not isinstance(run, str)}
    for _ in range(repeat):
        for label, run in rows:
            if isinstance(run, str):
                continue
            folder = fresh(root)
            try:
                results[label].append(run(folder, entries))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    return results


def seconds(tallies: list[Tally], entries: int) -> list[float]:
    """µs per entry of each run."""
    return [t.seconds / entries * 1e6 for t in tallies]


def print_table(
    title: str,
    columns: list[str],
    rows: list[Row],
    results: list[dict[str, list[Tally]]],
    entries: int,
    base: str,
) -> None:
    print(f"\n{title}\n")
    print("| contender | " + " | ".join(columns) + " |")
    print("| --- | " + " | ".join("---:" for _ in columns) + " |")
    for label, run in rows:
        cells = []
        for found in results:
            if isinstance(run, str):
                cells.append(run)
                continue
            tallies = found[label]
            rates = [entries / t.seconds for t in tallies]
            cell = f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"
            if label != base and base in found:
                cell += f" **{ratio(seconds(tallies, entries), seconds(found[base], entries))}**"
            twice = max(t.twice for t in tallies)
            lost = max(t.lost for t in tallies)
            if twice:
                cell += f", up to {twice} handled twice"
            if lost:
                cell += f", **LOST up to {lost}**"
            cells.append(cell)
        print(f"| {label} | " + " | ".join(cells) + " |")
    for label, run in rows:
        if not isinstance(run, str):
            for found in results:
                lost = max((t.lost for t in found[label]), default=0)
                if lost:
                    print(f"\nWARNING: {label} lost up to {lost} of {entries} entries in a run")
    sys.stdout.flush()


def produce_table(
    root: str, entries: int, repeat: int, put_threads: int, peer: str | None
) -> dict[str, list[Tally]]:
    rows: list[Row] = []
    for label, run in [
        (PQ_PUT, pq_produce(1, None)),
        (f"persist-queue `put`, {put_threads} threads, one queue", pq_produce(put_threads, None)),
        ("persist-queue `put`, 1 thread, `synchronous=NORMAL`", pq_produce(1, "NORMAL")),
    ]:
        rows.append((label, peer or run))
    for how, what in [
        ("add", "`await QueueSink.add`, 1 task"),
        ("submit-tasks", f"`await QueueSink.submit`, {SUBMITTERS} tasks"),
        ("submit", "`await QueueSink.submit`, 1 task (a transaction per entry)"),
    ]:
        for backend in backend_options():
            rows.append((f"corral {what}, {backend}", corral_produce(backend, how)))
    results = measure(root, rows, entries, repeat)
    print_table(
        f"#### Produce: {entries} entries into a fresh queue file: entries/s, median (min-max) "
        f"of {repeat} runs in turn; **ratio** of the time per entry to persist-queue's "
        "`put` from 1 thread (below 1: faster)",
        ["entries/s"],
        rows,
        [results],
        entries,
        rows[0][0],
    )
    return results


PQ_CONSUME = "persist-queue `SQLiteAckQueue`, {threads} threads, 1 process"


def consume_rows(handler: str, threads: int, peer: str | None) -> list[Row]:
    rows: list[Row] = [
        (PQ_CONSUME.format(threads=threads), peer or pq_consume(threads, None, handler)),
        (
            f"persist-queue, {threads} threads, `synchronous=NORMAL`, 1 process",
            peer or pq_consume(threads, "NORMAL", handler),
        ),
    ]
    for backend in backend_options():
        rows.append((corral_row(backend, 1), corral_consume(backend, handler)))
    rows.append(
        (
            f"persist-queue, {threads} threads each, 2 processes (not supported)",
            peer or processes_consume("pq", 2, handler, "asyncio", threads),
        )
    )
    for backend in backend_options():
        rows.append((corral_row(backend, 2), processes_consume("corral", 2, handler, backend, 0)))
    return rows


def corral_row(backend: str, processes: int) -> str:
    plural = "process" if processes == 1 else "processes"
    return f"corral `QueueSource` + `apply_to_each`, {backend}, {processes} {plural}"


def consume_table(
    root: str, entries: int, repeat: int, handlers: list[str], threads: int, peer: str | None
) -> dict[str, dict[str, list[Tally]]]:
    rows_by_handler = {handler: consume_rows(handler, threads, peer) for handler in handlers}
    results = {
        handler: measure(root, rows, entries, repeat) for handler, rows in rows_by_handler.items()
    }
    # one table, a column per handler (the rows' labels do not depend on the handler)
    print_table(
        f"#### Consume: {entries} entries from a queue file filled beforehand, {WORKERS} "
        f"workers per corral process, {threads} threads per persist-queue process: entries/s, "
        f"median (min-max) of {repeat} runs in turn; **ratio** of the time per entry to "
        f"persist-queue's in one process with its defaults (below 1: faster). This machine "
        f"has {os.cpu_count()} logical cores",
        [HANDLER_TITLES[h] for h in handlers],
        rows_by_handler[handlers[0]],
        [results[h] for h in handlers],
        entries,
        PQ_CONSUME.format(threads=threads),
    )
    return results


# --------------------------------------------------------------------- main


def filesystem(folder: str) -> str:
    """The type of the file system ``folder`` is on (Linux), else "unknown"."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    real = os.path.realpath(folder)
    for line in mounts:
        parts = line.split()
        if len(parts) < 3 or len(parts[1]) <= len(best):
            continue
        if real == parts[1] or real.startswith(parts[1].rstrip("/") + "/"):
            best, kind = parts[1], parts[2]
    return kind


def key_ratios(
    produced: dict[str, list[Tally]],
    consumed: dict[str, dict[str, list[Tally]]],
    entries: int,
    threads: int,
    peer: str | None,
) -> None:
    def paired(
        found: dict[str, list[Tally]], row: Callable[[str], str], base: Callable[[str], str]
    ) -> Any:
        """µs per entry of a row and of its base, by backend (as key_ratio reads them)."""
        return {
            backend: {
                "row": seconds(found[row(backend)], entries),
                "base": seconds(found[base(backend)], entries),
            }
            for backend in backend_options()
        }

    def pq_get(_: str) -> str:
        return PQ_CONSUME.format(threads=threads)

    print()
    if peer is None:
        key_ratio(
            "`QueueSink.add` / persist-queue `put`",
            paired(
                produced, lambda b: f"corral `await QueueSink.add`, 1 task, {b}", lambda _: PQ_PUT
            ),
            "row",
            "base",
            target=1.0,
        )
        for handler, found in consumed.items():
            key_ratio(
                f"`QueueSource`, 1 process / persist-queue, 1 process, `{handler}`",
                paired(found, lambda b: corral_row(b, 1), pq_get),
                "row",
                "base",
                target=1.0,
            )
    for handler, found in consumed.items():
        key_ratio(
            f"`QueueSource`, 2 processes / 1 process, `{handler}`",
            paired(found, lambda b: corral_row(b, 2), lambda b: corral_row(b, 1)),
            "row",
            "base",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000, help="entries per run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=10, help="persist-queue consumer threads per process"
    )
    parser.add_argument("--put-threads", type=int, default=4, help="persist-queue producer threads")
    parser.add_argument(
        "--handler", nargs="+", choices=sorted(PAUSE), default=["sleep0", "sleep-1ms"]
    )
    parser.add_argument(
        "--dir", help="where the queue files go (default: the system's temporary folder)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="2000 entries, 3 repeats, the sleep0 handler only"
    )
    # the consumer processes that this script starts run it with these
    for option in ("--worker", "--folder", "--backend"):
        parser.add_argument(option, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.folder, args.handler[0], args.backend, args.threads)
    if args.quick:
        args.entries, args.repeat, args.handler = 2000, 3, ["sleep0"]

    peer = None
    if installed("persistqueue"):
        version = f"persist-queue {metadata.version('persist-queue')}"
    else:
        peer = "not installed"
        version = "persist-queue is not installed: its rows are left out"
    root = tempfile.mkdtemp(prefix="bench_sqlite_", dir=args.dir)
    try:
        print(
            f"\nSQLite {sqlite3.sqlite_version}, {version}; the queue files on "
            f"{filesystem(root)}, a fresh file per run"
        )
        produced = produce_table(root, args.entries, args.repeat, args.put_threads, peer)
        consumed = consume_table(root, args.entries, args.repeat, args.handler, args.threads, peer)
    except Lost as lost:
        print(f"\n{lost}", flush=True)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    key_ratios(produced, consumed, args.entries, args.threads, peer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
