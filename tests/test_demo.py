"""``python -m corral.demo``: it runs, stores every record exactly once, and
fails loudly when the database is wrong; with ``--adaptive`` its limiter finds
the API's hidden capacity; interrupted (Ctrl-C or killed), it finishes the
rest when run again on the same file, without calling the API for what is
stored."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import sqlite3
import subprocess
import sys
import time

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

    def faulty(path: pathlib.Path, records: int, seed: int) -> sqlite3.Connection:
        connection = opened(path, records, seed)
        connection.execute(
            f"CREATE TRIGGER IF NOT EXISTS twice AFTER INSERT ON {demo.TABLE} "
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
    connection = demo.open_database(db, 4, 1)
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


# ------------------------------------------------------------------ resuming


def _demo_command(db: pathlib.Path, backend: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "corral.demo", "--backend", backend, "--db", str(db), *options]


def _stored(db: pathlib.Path) -> list[int]:
    """The record IDs that have a row, sorted (duplicates kept). A read-write
    connection: after a SIGKILL it rolls back the killed run's open batch."""
    with sqlite3.connect(db, timeout=10) as connection:
        rows = connection.execute(f"SELECT record_id FROM {demo.TABLE}").fetchall()
    connection.close()
    return sorted(record for (record,) in rows)


def _wait_for_rows(db: pathlib.Path, process: subprocess.Popen[str], deadline: float) -> int:
    """Poll ``db`` (read-only: the test must not create or change it) until the
    running demo has committed some rows; their number."""
    uri = db.as_uri() + "?mode=ro"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            connection = sqlite3.connect(uri, uri=True, timeout=1)
            try:
                (count,) = connection.execute(f"SELECT COUNT(*) FROM {demo.TABLE}").fetchone()
            finally:
                connection.close()
        except sqlite3.Error:  # not created yet, or being created
            count = 0
        if count:
            return int(count)
        time.sleep(0.01)
    process.kill()
    out, err = process.communicate(timeout=30)
    pytest.fail(f"no rows stored before the demo ended or 30 s passed: {out}{err}")


def _sigint_by_default() -> None:
    """In the child: Ctrl-C raises KeyboardInterrupt, even where the test runner
    was started with SIGINT ignored (as a shell's background jobs are)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_demo_resumes_where_an_interrupted_run_stopped(
    backend: str, how: signal.Signals, tmp_path: pathlib.Path
) -> None:
    """The demo as a real process, killed (SIGKILL) or interrupted (SIGINT)
    once it has committed a batch, then run again on the same file: the
    second run calls the API only for the records not stored (API calls less
    retries are exactly those), says how many were stored already, and its
    check finds every record stored exactly once. Ctrl-C exits 130 and says
    how far it got and how to finish, without a traceback.

    The first run goes slowly (200 calls/s: two seconds for 400 records) so
    that it is surely still running when the signal comes, the second fast."""
    db = tmp_path / "demo.sqlite3"
    first = subprocess.Popen(
        _demo_command(db, backend, "--records", "400", "--rate", "200"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_by_default,
    )
    try:
        _wait_for_rows(db, first, deadline=time.monotonic() + 30)
        assert first.poll() is None, "the first run ended before it was interrupted"
        first.send_signal(how)
        _, err = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=30)
    stored = _stored(db)
    assert stored == sorted(set(stored)), "a record stored twice"
    assert 0 < len(stored) < 400
    if how == signal.SIGKILL:
        assert first.returncode == -signal.SIGKILL
    else:
        assert first.returncode == 130, err
        assert "Traceback" not in err
        assert (
            f"interrupted: {len(stored)} of 400 records stored in {db}; "
            f"run again with --db {db} --records 400 to finish"
        ) in err

    second = subprocess.run(
        _demo_command(db, backend, "--records", "400", "--rate", "5000"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    out = second.stdout
    assert f"resuming: {len(stored)} already stored, {400 - len(stored)} to go" in out
    assert _table_row(out, "already stored") == f"{len(stored)} (from an earlier run)"
    calls = re.fullmatch(r"(\d+) \((\d+) retries\)", _table_row(out, "API calls"))
    assert calls is not None, out
    requests, retries = int(calls[1]), int(calls[2])
    assert requests - retries == 400 - len(stored)  # one first call per record not stored
    assert requests < 400
    assert "database check: all 400 records stored exactly once" in out
    assert _stored(db) == list(range(400))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_demo_run_again_calls_only_for_the_records_not_stored(
    backend: str, tmp_path: pathlib.Path
) -> None:
    """In process: a finished run less some of its rows (as if its last batches
    never committed) is finished by a second run that calls the API only for
    those; a third run on the finished file calls it for none."""
    db = tmp_path / "demo.sqlite3"
    first = anyio.run(demo.run, 300, 5000, db, 5, backend=backend)
    assert (first.already, first.problems) == (0, [])
    with sqlite3.connect(db) as connection:
        connection.execute(f"DELETE FROM {demo.TABLE} WHERE record_id >= 220")
    connection.close()
    second = anyio.run(demo.run, 300, 5000, db, 5, backend=backend)
    assert second.problems == []
    assert second.already == 220
    assert second.succeeded + second.failed == 80
    assert second.rows == 80
    assert second.server.requests == 80 + second.retries
    third = anyio.run(demo.run, 300, 5000, db, 5, backend=backend)
    assert third.problems == []
    assert (third.already, third.rows, third.server.requests) == (300, 0, 0)
    table = demo.format_report(third, db)
    assert _table_row(table, "already stored") == "300 (from an earlier run)"
    assert _table_row(table, "API calls") == "0 (0 retries)"
    assert _stored(db) == list(range(300))


def test_demo_keeps_failed_records_as_stored(tmp_path: pathlib.Path) -> None:
    """A record stored as failed (a 404) is a final outcome: a second run does
    not call the API for it; deleting its row is how to try it again."""
    db = tmp_path / "demo.sqlite3"
    first = anyio.run(demo.run, 1000, 10000, db, 1)
    assert first.server.not_found >= 1  # the seed has 404s among 1000 records
    with sqlite3.connect(db) as connection:
        failed = connection.execute(
            f"SELECT COUNT(*) FROM {demo.TABLE} WHERE status = 'failed'"
        ).fetchone()[0]
    connection.close()
    assert failed == first.failed >= 1
    again = anyio.run(demo.run, 1000, 10000, db, 1)
    assert (again.already, again.server.requests, again.problems) == (1000, 0, [])
    with sqlite3.connect(db) as connection:
        connection.execute(f"DELETE FROM {demo.TABLE} WHERE status = 'failed'")
    connection.close()
    retried = anyio.run(demo.run, 1000, 10000, db, 1)
    assert retried.already == 1000 - failed
    assert retried.server.requests - retried.retries == failed
    assert retried.problems == []


def test_demo_refuses_a_database_it_cannot_resume(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that is not SQLite, a SQLite file that is not the demo's, and the
    demo's from another --records or --seed are refused with exit status 2
    and a message saying why, and left as they were: never mixed into."""
    made = tmp_path / "demo.sqlite3"
    assert demo.main(["--records", "50", "--rate", "5000", "--seed", "3", "--db", str(made)]) == 0
    foreign = tmp_path / "other.sqlite3"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE customers (id INTEGER)")
    connection.close()
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 10)
    capsys.readouterr()
    for db, options, message in (
        (text, [], f"{text} is not a SQLite database"),
        (foreign, [], f"{foreign} is not a corral demo database (it has the tables customers)"),
        (made, ["--records", "40", "--seed", "3"], "holds a run of --records 50 --seed 3, not "),
        (made, ["--records", "50"], "holds a run of --records 50 --seed 3, not "),
        (
            tmp_path / "no" / "such.sqlite3",
            [],
            f"cannot create {tmp_path / 'no' / 'such.sqlite3'}: {tmp_path / 'no'} does not exist",
        ),
    ):
        before = db.read_bytes() if db.exists() else None
        with pytest.raises(SystemExit) as exit_info:
            demo.main([*options, "--rate", "5000", "--db", str(db)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err
        assert err.startswith("python -m corral.demo: error: ")
        assert (db.read_bytes() if db.exists() else None) == before
    # and what an interrupted run would say of them: it cannot count their records
    assert demo.count_stored(text) is None
    assert demo.count_stored(foreign) is None
    assert demo.count_stored(made) == 50


def test_demo_refuses_another_runs_database_as_a_process(tmp_path: pathlib.Path) -> None:
    """The same, as the command line's exit status: a file made with another
    --records is refused with 2 before any API call."""
    db = tmp_path / "demo.sqlite3"
    assert demo.main(["--records", "30", "--rate", "5000", "--db", str(db)]) == 0
    result = subprocess.run(
        _demo_command(db, "asyncio", "--records", "60"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "holds a run of --records 30 --seed 1, not --records 60 --seed 1" in result.stderr
    assert result.stdout == ""
    assert _stored(db) == list(range(30))


def _demo_error(result: subprocess.CompletedProcess[str], *, usage: bool = False) -> str:
    """The one error line a refused command printed, without its prefix: status
    2, no traceback, nothing on stdout, and nothing else on stderr but (with
    ``usage``) argparse's usage lines before it."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    *before, line = result.stderr.splitlines()
    if usage:
        assert before[0].startswith("usage: python -m corral.demo "), result.stderr
        assert all(more.startswith(" ") for more in before[1:]), result.stderr
    else:
        assert before == [], result.stderr
    prefix = "python -m corral.demo: error: "
    assert line.startswith(prefix), result.stderr
    return line[len(prefix) :]


def _run_demo(*options: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """``python -m corral.demo OPTIONS``; with ``prelude``, run in the process first."""
    command = [sys.executable, "-m", "corral.demo"]
    if prelude:
        main = "import sys\nfrom corral import demo\nsys.exit(demo.main(sys.argv[1:]))"
        command = [sys.executable, "-c", f"{prelude}\n{main}"]
    return subprocess.run([*command, *options], capture_output=True, text=True, timeout=60)


def test_demo_refuses_a_db_path_it_cannot_create(tmp_path: pathlib.Path) -> None:
    """A --db in a directory that does not exist, a --db that is a directory, and
    one under a file: a one-line error saying which (status 2), and nothing made."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("notes\n")
    missing = tmp_path / "no" / "such"
    for db, message in (
        (missing / "x.db", f"cannot create {missing / 'x.db'}: {missing} does not exist"),
        (tmp_path, f"{tmp_path} is a directory: give the path of a file"),
        (a_file / "x.db", f"cannot create {a_file / 'x.db'}: {a_file} is not a directory"),
    ):
        before = sorted(tmp_path.rglob("*"))
        result = _run_demo("--records", "10", "--db", str(db))
        assert _demo_error(result) == message
        assert sorted(tmp_path.rglob("*")) == before


def _half_done(db: pathlib.Path) -> bytes:
    """A demo file of 40 records with 20 of them stored: a run to finish. Its bytes."""
    assert demo.main(["--records", "40", "--rate", "5000", "--db", str(db)]) == 0
    with sqlite3.connect(db) as connection:
        connection.execute(f"DELETE FROM {demo.TABLE} WHERE record_id >= 20")
    connection.close()
    return db.read_bytes()


def test_demo_refuses_a_read_only_database(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run to finish in a file SQLite can only read (here by its header, which
    says the file is for a newer SQLite to write: read-only for every user, root
    included, as a file on a read-only disk) is refused before any API call,
    with a one-line error (status 2), and left as it was."""
    db = tmp_path / "demo.sqlite3"
    data = bytearray(_half_done(db))
    data[18] = 3  # the header's "file format write version": 3 is read-only to SQLite 3
    db.write_bytes(bytes(data))
    capsys.readouterr()
    result = _run_demo("--records", "40", "--rate", "5000", "--db", str(db))
    assert _demo_error(result) == f"cannot write to {db}: attempt to write a readonly database"
    assert db.read_bytes() == data


def test_demo_refuses_a_new_file_it_cannot_write(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In process: a new --db whose tables cannot be created (its connection is
    made read-only, as a read-only disk would) is a usage error, not a traceback."""
    db = tmp_path / "demo.sqlite3"
    connect = sqlite3.connect

    def read_only(database: object, *args: object, **kwargs: object) -> sqlite3.Connection:
        connection = connect(database, *args, **kwargs)  # type: ignore[arg-type]
        connection.execute("PRAGMA query_only = ON")
        return connection

    monkeypatch.setattr(demo.sqlite3, "connect", read_only)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--records", "10", "--db", str(db)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    prefix = "python -m corral.demo: error: "
    assert err == f"{prefix}cannot write to {db}: attempt to write a readonly database\n"


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="permissions do not stop root"
)
def test_demo_refuses_a_db_without_write_permission(tmp_path: pathlib.Path) -> None:
    """A read-only --db file, and a new --db in a read-only directory (SQLite
    also writes a journal next to the file): one-line errors, status 2."""
    db = tmp_path / "demo.sqlite3"
    data = _half_done(db)
    db.chmod(0o444)
    result = _run_demo("--records", "40", "--db", str(db))
    assert _demo_error(result) == f"cannot write to {db}: the file is read-only"
    assert db.read_bytes() == data
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = _run_demo("--records", "40", "--db", str(locked / "new.sqlite3"))
    message = f"cannot write to {locked / 'new.sqlite3'}: the directory {locked} is read-only"
    assert _demo_error(result) == message
    assert list(locked.iterdir()) == []


def test_demo_help_names_every_backend_and_the_seed_default() -> None:
    """``--help`` says what --backend takes (and what uvloop and trio need) and
    what --seed is when not given."""
    result = subprocess.run(
        [sys.executable, "-m", "corral.demo", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps the help to the terminal
    assert (
        "the event loop: asyncio (default), uvloop (needs the extra corral[uvloop]) "
        "or trio (needs the extra corral[trio])"
    ) in text
    assert f"--seed SEED seed of the simulated API's dice (default {demo.SEED})" in text


@pytest.mark.parametrize("backend", ["uvloop", "trio"])
def test_demo_says_how_to_install_a_missing_backend(backend: str) -> None:
    """``--backend uvloop`` or ``trio`` without it installed: a usage error with
    the command that installs it, from the index and from a checkout."""
    result = _run_demo("--backend", backend, prelude=f"import sys; sys.modules[{backend!r}] = None")
    assert _demo_error(result, usage=True) == (
        f"--backend {backend} needs {backend}: pip install 'corral[{backend}]' "
        f"(in a checkout of corral: pip install -e '.[{backend}]')"
    )


def test_open_database_refuses_records_outside_the_range(tmp_path: pathlib.Path) -> None:
    """A demo file holding a record its --records does not have is refused."""
    db = tmp_path / "demo.sqlite3"
    connection = demo.open_database(db, 10, 1)
    with connection:
        connection.execute(f"INSERT INTO {demo.TABLE} VALUES (12, 'ok', '', 1)")
    connection.close()
    with pytest.raises(demo.DemoDatabaseError, match=r"holds 1 records outside 0\.\.9"):
        demo.open_database(db, 10, 1)


@pytest.mark.parametrize("with_db", [True, False], ids=["db", "temporary"])
def test_demo_ctrl_c_exits_130_and_says_how_to_finish(
    with_db: bool,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In process: a KeyboardInterrupt in the middle of the run (here from the
    loop that takes the outcomes) ends ``main`` with 130 and a message that
    counts the records stored; with the default temporary file it says that
    it cannot be resumed. The rows written stay and a second run finishes."""
    db = tmp_path / "demo.sqlite3"
    row = demo._row
    taken = 0

    def interrupted(outcome: demo.Outcome[int, dict[str, object]]) -> tuple[int, str, str, int]:
        nonlocal taken
        taken += 1
        if taken > 260:
            raise KeyboardInterrupt
        return row(outcome)  # type: ignore[arg-type]

    monkeypatch.setattr(demo, "_row", interrupted)
    monkeypatch.setattr(demo, "_has_tqdm", lambda: False)
    argv = ["--records", "500", "--rate", "5000", "--seed", "2"]
    assert demo.main([*argv, "--db", str(db)] if with_db else argv) == 130
    err = capsys.readouterr().err
    if not with_db:
        assert re.search(
            r"interrupted: \d+ of 500 records were stored, in a temporary file that is now "
            r"deleted; give --db PATH to be able to resume",
            err,
        ), err
        return
    stored = _stored(db)
    assert 250 <= len(stored) <= 260
    assert (
        f"interrupted: {len(stored)} of 500 records stored in {db}; "
        f"run again with --db {db} --records 500 --seed 2 to finish"
    ) in err
    monkeypatch.setattr(demo, "_row", row)
    assert demo.main([*argv, "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert f"{len(stored)} (from an earlier run)" in out
    assert "database check: all 500 records stored exactly once" in out


def test_an_interrupt_out_of_a_task_group_is_an_interrupt() -> None:
    """A KeyboardInterrupt wrapped in exception groups counts; one next to
    another error does not (that error is not hidden)."""
    interrupt = KeyboardInterrupt()
    assert demo._is_interrupt(interrupt)
    assert demo._is_interrupt(BaseExceptionGroup("", [BaseExceptionGroup("", [interrupt])]))
    assert not demo._is_interrupt(BaseExceptionGroup("", [interrupt, ValueError()]))
    assert not demo._is_interrupt(ValueError())
