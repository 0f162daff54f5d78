"""``python -m corral.sqlite PATH``: what a queue file holds.

Prints each queue's counts (queued, in progress, done, dead) and how long its
oldest waiting entry has waited; ``--dead`` lists the dead letters with their
errors. It opens the file read-only and never creates one (SQLite may add
the ``-wal`` and ``-shm`` files every reader of a WAL database uses), so it is
safe to run while workers use it. Exit status 2 if the file cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from ._store import QueueCounts, QueueError, Store


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_counts(counts: dict[str, QueueCounts]) -> str:
    """The table of counts, one row per queue."""
    header = ("queue", "queued", "in progress", "done", "dead", "oldest waiting")
    rows = [header] + [
        (name, str(c.queued), str(c.in_progress), str(c.done), str(c.dead), _age(c.oldest_age))
        for name, c in counts.items()
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m corral.sqlite", description="Show what a corral queue file holds."
    )
    parser.add_argument("path", help="the queue file")
    parser.add_argument("--queue", help="only this queue (default: every queue in the file)")
    parser.add_argument("--dead", action="store_true", help="list the dead letters and errors")
    parser.add_argument("--limit", type=int, default=100, help="dead letters listed per queue")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    if not os.path.exists(options.path):
        print(f"{options.path}: no such file", file=sys.stderr)
        return 2
    if os.path.isdir(options.path):
        print(f"{options.path} is a folder, not a queue file", file=sys.stderr)
        return 2
    try:
        store = Store(options.path, timeout=5.0, read_only=True)
        try:
            queues = [options.queue] if options.queue else store.queues()
            print(options.path)
            if not queues:
                print("(no entries)")
                return 0
            print(format_counts({name: store.counts(name) for name in queues}))
            if options.dead:
                for name in queues:
                    for letter in store.dead(name, options.limit):
                        key = "" if letter.key is None else f" key={letter.key}"
                        print(
                            f"\n[{name}] id={letter.id}{key} deliveries={letter.deliveries}\n"
                            f"  error:  {letter.error}\n"
                            f"  fields: {json.dumps(letter.fields, ensure_ascii=False)}"
                        )
        finally:
            store.close()
    except QueueError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a program
    sys.exit(main())
