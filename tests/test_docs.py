"""The README's and the documentation's code blocks and the examples run as written."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from redis_server import COREDIS_LEAK

ROOT = pathlib.Path(__file__).parent.parent
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
BLOCKS = PYTHON_BLOCK.findall((ROOT / "README.md").read_text())

# The documentation's ```python blocks, each run as written; ```py blocks (they
# need a Redis server, or show another library's code) are not run.
DOCS = sorted((ROOT / "docs").glob("*.md"))
DOC_BLOCKS = [
    pytest.param(code, id=f"docs/{page.name}-block{number}")
    for page in DOCS
    for number, code in enumerate(PYTHON_BLOCK.findall(page.read_text()))
]


# users copy these blocks: every SQLite connection a block opens, it closes
pytestmark = pytest.mark.usefixtures("sqlite_connections_closed")


def test_readme_has_python_examples() -> None:
    """The tour exists (so the parametrised test below cannot pass vacuously)."""
    assert len(BLOCKS) >= 3


def needs_redis(code: str) -> bool:
    """A block that talks to Redis reads the server's address from REDIS_URL."""
    return "REDIS_URL" in code


def blocks_of(blocks: list[str], *, redis: bool) -> list[Any]:
    return [
        pytest.param(code, id=f"block{number}")
        for number, code in enumerate(blocks)
        if needs_redis(code) == redis
    ]


@pytest.mark.parametrize("code", blocks_of(BLOCKS, redis=False))
def test_readme_block_runs(
    code: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each README block runs without error (its own asserts included), in an
    empty folder of its own (where a queue file goes)."""
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


@pytest.mark.filterwarnings(COREDIS_LEAK)
@pytest.mark.parametrize("code", blocks_of(BLOCKS, redis=True))
def test_readme_redis_block_runs(
    code: str, redis_port: int, coredis_leaks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each README block that uses corral.redis runs as written against a real
    redis-server (an empty database), whose address it reads from REDIS_URL."""
    run_with_redis(code, "README.md", redis_port, monkeypatch)


def run_with_redis(code: str, name: str, port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``code`` with REDIS_URL pointing at the test server, emptied first."""
    import anyio
    import coredis

    async def flush() -> None:
        async with coredis.Redis(port=port) as client:
            await client.flushdb()

    anyio.run(flush)
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}")
    exec(compile(code, name, "exec"), {"__name__": "docs"})


def test_readme_shows_corral_redis_running() -> None:
    """The Scaling out section's examples are among the blocks that run."""
    assert len(blocks_of(BLOCKS, redis=True)) >= 2


def test_docs_have_python_examples() -> None:
    """The documentation's examples exist, on every guide page that teaches an
    API (so the parametrised test below cannot pass vacuously)."""
    assert len(DOC_BLOCKS) >= 25
    pages = {block.id.split("-block")[0] for block in DOC_BLOCKS}
    for page in ("index", "pools-and-helpers", "retries-and-limits", "batching", "guarantees"):
        assert f"docs/{page}.md" in pages
    assert "docs/migrating.md" in pages
    # standalone: each runs its own event loop (trio's or asyncio's own where a
    # block shows corral inside a trio or an asyncio program)
    runs = ("anyio.run(main)", "trio.run(main)", "asyncio.run(main())")
    for block in DOC_BLOCKS:
        assert block.values[0].rstrip().endswith(runs), block.id


def needs_api(code: str) -> bool:
    """A block that calls the rate-limited HTTP API reads its address from API_URL."""
    return "API_URL" in code


@pytest.fixture(scope="module")
def quota_api() -> Iterator[str]:
    """benchmarks/quota_server.py in a subprocess: 50 requests in any second,
    429 with Retry-After beyond (needs uvicorn, in the test group)."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "quota_server.py"), "--limit", "50"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("listening on "), line
        yield line.split()[-1]
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stdout is not None:
            server.stdout.close()


@pytest.mark.parametrize("code", [b for b in DOC_BLOCKS if needs_api(b.values[0])])
def test_docs_http_block_runs(
    code: str, quota_api: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """The HTTP recipe runs as written against a real server with a quota, and
    the server answered no 429."""
    import httpx

    httpx.post(f"{quota_api}/reset")
    monkeypatch.setenv("API_URL", quota_api)
    exec(compile(code, request.node.callspec.id, "exec"), {"__name__": "docs"})
    stats = httpx.get(f"{quota_api}/stats").json()
    assert stats["accepted"] >= 120
    assert stats["rejected"] == 0
    assert stats["busiest"] <= 50


def test_docs_have_an_http_recipe() -> None:
    assert [b for b in DOC_BLOCKS if needs_api(b.values[0])]


@pytest.mark.parametrize(
    "code",
    [b for b in DOC_BLOCKS if not needs_redis(b.values[0]) and not needs_api(b.values[0])],
)
def test_docs_block_runs(
    code: str,
    request: pytest.FixtureRequest,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each ```python block of docs/*.md runs without error (its own asserts
    included), in an empty folder of its own (where the durable-work page's
    queue files go)."""
    monkeypatch.chdir(tmp_path)
    exec(compile(code, request.node.callspec.id, "exec"), {"__name__": "docs"})


@pytest.mark.filterwarnings(COREDIS_LEAK)
@pytest.mark.parametrize("code", [b for b in DOC_BLOCKS if needs_redis(b.values[0])])
def test_docs_redis_block_runs(
    code: str,
    redis_port: int,
    coredis_leaks: None,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """Each docs block that uses corral.redis runs as written against a real
    redis-server (an empty database), whose address it reads from REDIS_URL."""
    run_with_redis(code, request.node.callspec.id, redis_port, monkeypatch)


def test_api_reference_lists_every_public_name() -> None:
    """docs/api.md documents exactly the names in ``corral.__all__``,
    ``corral.redis.__all__``, ``corral.sqlite.__all__`` and
    ``corral.otel.__all__``, so a new public name cannot be left out of it."""
    pytest.importorskip("coredis")
    pytest.importorskip("opentelemetry")
    import corral
    import corral.otel
    import corral.redis
    import corral.sqlite

    text = (ROOT / "docs" / "api.md").read_text()
    for module in (corral, corral.redis, corral.sqlite, corral.otel):
        directive = re.search(
            rf"^::: {re.escape(module.__name__)}\n(.*?)(?=^:::|\Z)", text, re.DOTALL | re.MULTILINE
        )
        assert directive is not None, f"no `::: {module.__name__}` in docs/api.md"
        listed = re.findall(r"^ +- (\w+)$", directive.group(1), re.MULTILINE)
        assert sorted(listed) == sorted(module.__all__)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_quickstart_example_runs(backend: str) -> None:
    """examples/quickstart.py runs and reports one outcome per item."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "20 items, 18 ok, 2 failed" in result.stdout


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs exactly the test command the README gives."""
    readme = (ROOT / "README.md").read_text()
    command = next(
        line.split("#")[0].strip() for line in readme.splitlines() if "nox -s tests" in line
    )
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines
