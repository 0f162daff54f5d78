"""``python -m corral.demo``: it runs, stores every record exactly once, and
fails loudly when the database is wrong; with ``--adaptive`` its limiter finds
the API's hidden capacity."""

from __future__ import annotations

import pathlib
import sqlite3
import subprocess
import sys

import anyio
import pytest

from corral import demo


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_demo_runs_and_verifies_its_database(backend: str, tmp_path: pathlib.Path) -> None:
    """The command from the README runs on each backend, prints the stats table,
    exits 0, and leaves one row per record in the SQLite file."""
    db = tmp_path / "demo.sqlite3"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral.demo",
            *("--records", "400", "--rate", "2000"),
            *("--backend", backend, "--db", str(db)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "database check: all 400 records stored exactly once" in out
    for row in ("API calls", "429s honoured", "batches written", "items per second"):
        assert row in out
    assert "concurrency limit" not in out  # --adaptive's rows only with --adaptive
    with sqlite3.connect(db) as connection:
        rows = connection.execute(f"SELECT record_id, status FROM {demo.TABLE}").fetchall()
    connection.close()
    assert sorted(record for record, _ in rows) == list(range(400))
    assert {status for _, status in rows} <= {"ok", "failed"}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_demo_report_adds_up(backend: str, tmp_path: pathlib.Path) -> None:
    """In process: every record has one outcome, every retry is a server call,
    every 429 was honoured (no retry came before its Retry-After), and the
    rows written are the records."""
    report = anyio.run(demo.run, 600, 3000, tmp_path / "demo.sqlite3", 7, backend=backend)
    assert report.problems == []
    assert report.succeeded + report.failed == 600
    assert report.rows == 600
    assert report.server.requests == 600 + report.retries
    server = report.server
    assert server.throttled > 0
    assert server.early_retries == 0
    assert server.not_found == report.failed  # the only final failures: 404s
    assert server.slow > 0  # slow answers were cut off by the timeout and retried


def test_demo_exits_1_when_a_record_is_stored_twice(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database that stores one record twice (a trigger duplicates record 7)
    fails the demo's own check: it says which record and exits 1."""
    db = tmp_path / "demo.sqlite3"
    opened = demo.open_database

    def faulty(path: pathlib.Path) -> sqlite3.Connection:
        connection = opened(path)
        connection.execute(
            f"CREATE TRIGGER twice AFTER INSERT ON {demo.TABLE} "
            f"WHEN NEW.record_id = 7 AND (SELECT COUNT(*) FROM {demo.TABLE} "
            "WHERE record_id = 7) = 1 "
            f"BEGIN INSERT INTO {demo.TABLE} VALUES (7, 'ok', 'again', 1); END"
        )
        return connection

    monkeypatch.setattr(demo, "open_database", faulty)
    assert demo.main(["--records", "50", "--rate", "5000", "--db", str(db)]) == 1
    out = capsys.readouterr().out
    assert "DATABASE CHECK FAILED" in out
    assert "1 records stored more than once: 7 (2x)" in out


def test_verify_reports_missing_and_unknown_records(tmp_path: pathlib.Path) -> None:
    """The check names records that are missing and records that should not be there."""
    db = tmp_path / "demo.sqlite3"
    connection = demo.open_database(db)
    with connection:
        connection.executemany(
            f"INSERT INTO {demo.TABLE} VALUES (?, 'ok', '', 1)", [(0,), (1,), (3,), (99,)]
        )
    connection.close()
    problems = demo.verify(db, 4)
    assert problems == [
        "1 records missing, e.g. [2]",
        "1 unknown records stored, e.g. [99]",
    ]


def test_demo_without_tqdm_prints_status_lines(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without tqdm the demo still shows progress, as status lines from on_stats."""
    monkeypatch.setattr(demo, "_has_tqdm", lambda: False)
    assert demo.main(["--records", "100", "--rate", "5000", "--db", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "100 done" in out


@pytest.mark.untraced  # the limit follows latencies on the real clock
@pytest.mark.anyio
async def test_demo_adaptive_settles_near_the_hidden_capacity(tmp_path: pathlib.Path) -> None:
    """``--adaptive``: 200 workers against an API that serves 32 calls at once
    (and queues 8 more) without saying so. Every record is stored once, the
    503s of an overloaded server are the limiter's drops and are retried (the
    only final failures are 404s), and the limit it settled on is within a
    factor of two of the capacity."""
    report = await demo.run_adaptive(3000, tmp_path / "demo.sqlite3", seed=3)
    assert report.problems == []
    assert report.succeeded + report.failed == 3000
    assert report.rows == 3000
    server = report.server
    assert server.requests == 3000 + report.retries
    assert server.not_found == report.failed
    limit = report.limit
    assert limit is not None
    assert (limit.capacity, limit.backlog) == (32, 8)
    assert limit.statistics.drops == server.overloaded
    assert limit.statistics.algorithm == "vegas"
    assert limit.low <= limit.settled <= limit.high
    assert 16 <= limit.settled <= 64, limit


def test_demo_adaptive_prints_the_limit_it_settled_on(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command line's ``--adaptive --capacity N``: it names the capacity in
    its first line and in the table, next to the limit it settled on."""
    db = tmp_path / "demo.sqlite3"
    argv = ["--adaptive", "--capacity", "12", "--records", "600", "--db", str(db)]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "a simulated API that serves 12 calls at once (the client is not told)" in out
    assert "database check: all 600 records stored exactly once" in out
    capacity = _table_row(out, "  server's capacity")
    assert capacity.startswith("12 calls at once + a queue of 3")
    settled = _table_row(out, "concurrency limit")
    assert settled.startswith("settled at ")
    assert int(settled.split()[2]) >= 1
    assert "503s: server busy" in out
    assert "over the server's limit" not in out  # it has no rate limit here


def _table_row(out: str, name: str) -> str:
    """The value in the row ``name`` of the demo's final table."""
    (value,) = (line[len(name) :] for line in out.splitlines() if line.startswith(name + "  "))
    return value.strip()


def test_demo_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad command-line values get argparse's usage error naming the option."""
    for argv, message in (
        (["--records", "0"], "--records must be >= 1"),
        (["--rate", "0"], "--rate must be >= 1"),
        (["--backend", "curio"], "invalid choice"),
        (["--capacity", "8"], "--capacity needs --adaptive"),
        (["--adaptive", "--capacity", "0"], "--capacity must be between 1 and 100"),
        (["--adaptive", "--capacity", "101"], "--capacity must be between 1 and 100"),
        (["--adaptive", "--rate", "100"], "--rate does not go with --adaptive"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
