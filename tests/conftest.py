"""Every async test runs on asyncio, asyncio+uvloop and trio."""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from collections.abc import Iterator
from typing import Any

import pytest

_HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None

if importlib.util.find_spec("tqdm") is not None:
    import tqdm

    # tqdm's first bar starts a monitor thread that lives as long as the
    # process; it would count as a thread left behind in tests/test_leaks.py
    tqdm.tqdm.monitor_interval = 0

BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(
        ("asyncio", {"use_uvloop": True}),
        id="uvloop",
        marks=pytest.mark.skipif(not _HAVE_UVLOOP, reason="uvloop is not installed"),
    ),
    pytest.param(("trio", {}), id="trio"),
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``untraced`` the tests that check timing on the real clock: those
    that take ``exact`` on a backend without trio's MockClock (a few others, and
    those that measure memory with tracemalloc, are marked where they are
    defined). ``nox -s tests`` runs them outside coverage's tracer, which slows
    every line it measures (by a third or more) and would stretch the intervals
    they bound."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_mock_clock = callspec is not None and "mockclock" in callspec.id
        fixtures = getattr(item, "fixturenames", ())
        if "exact" in fixtures and not on_mock_clock:
            item.add_marker(pytest.mark.untraced)


@pytest.fixture(autouse=True)
def _uninstrumented() -> Iterator[None]:
    """No test leaves corral instrumented for the next (the docs' OpenTelemetry
    blocks instrument it, as a program would at start-up)."""
    yield
    otel = sys.modules.get("corral.otel")
    if otel is not None:
        otel.CorralInstrumentor().uninstrument()


@pytest.fixture
def sqlite_connections_closed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every SQLite connection opened during a test (corral's, in its worker
    threads, and the test's own) is closed when it ends. Since Python 3.13 a
    connection left to the garbage collector warns (ResourceWarning), and
    ``with connection:`` ends a transaction, not the connection."""
    opened: list[sqlite3.Connection] = []
    connect = sqlite3.connect

    def tracked(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection = connect(*args, **kwargs)
        opened.append(connection)
        return connection

    monkeypatch.setattr(sqlite3, "connect", tracked)
    yield
    left_open = [connection for connection in opened if _is_open(connection)]
    for connection in left_open:
        connection.close()
    assert not left_open, f"{len(left_open)} SQLite connection(s) left open"


def _is_open(connection: sqlite3.Connection) -> bool:
    try:
        connection.total_changes  # noqa: B018 (raises once the connection is closed)
    except sqlite3.ProgrammingError:
        return False
    return True


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture
def backend_name(anyio_backend: Any) -> str:
    """'asyncio' or 'trio' (uvloop counts as asyncio)."""
    return str(anyio_backend[0])


def _mock_clock() -> Any:
    from trio.testing import MockClock

    return MockClock(autojump_threshold=0)


# For timing tests: trio runs on a MockClock that jumps to the next deadline as
# soon as every task is blocked, so times are exact and sleeps take no time;
# asyncio and uvloop run in real time and are checked with tolerances.
TIMING_BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(
        ("asyncio", {"use_uvloop": True}),
        id="uvloop",
        marks=pytest.mark.skipif(not _HAVE_UVLOOP, reason="uvloop is not installed"),
    ),
    pytest.param(("trio", {"clock": "mock"}), id="trio-mockclock"),
]


@pytest.fixture
def exact(anyio_backend: Any) -> bool:
    """True when time is virtual (trio MockClock): timing asserts are exact."""
    return bool(anyio_backend[0] == "trio" and "clock" in anyio_backend[1])


def timing_backend(request: pytest.FixtureRequest) -> Any:
    name, options = request.param
    if options.get("clock") == "mock":
        options = {**options, "clock": _mock_clock()}
    return name, options


@pytest.fixture(params=TIMING_BACKENDS)
def timing_anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Use as ``anyio_backend`` in timing test modules (see TIMING_BACKENDS)."""
    return timing_backend(request)


@pytest.fixture(scope="session")
def redis_port() -> Any:
    """The port of a redis-server running for this test session (see redis_server.py)."""
    import os

    from redis_server import RedisMissing, redis_server

    try:
        server = redis_server()
        port = server.__enter__()
    except RedisMissing as missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI must install it", pytrace=False)
        pytest.skip(str(missing))
    try:
        yield port
    finally:
        server.__exit__(None, None, None)


@pytest.fixture
def coredis_leaks(caplog: pytest.LogCaptureFixture) -> Any:
    """For a test that opens coredis clients: coredis's leaked streams (see
    redis_server.COREDIS_LEAK) are collected once the test has returned, where
    their warnings are expected, not in a later test or at the exit of pytest."""
    from redis_server import collect_coredis_leaks

    yield
    # pytest keeps the test's log records until its teardown is over, and a
    # record of a failed connection (coredis's own, or a RedisUnavailable logged
    # by corral) holds a traceback whose frames hold the connection
    for when in ("setup", "call"):
        caplog.get_records(when).clear()
    collect_coredis_leaks()


@pytest.fixture
async def redis(redis_port: int, coredis_leaks: None) -> Any:
    """A coredis client (str responses) on an empty database."""
    import coredis

    async with coredis.Redis(port=redis_port, decode_responses=True) as client:
        await client.flushdb()
        yield client
