"""The scripts in examples/ run as written, on asyncio, uvloop and trio, and their
own checks pass; they refuse arguments they do not take, and say what to install
when what they need is missing.

Each example asserts what it demonstrates and exits non-zero when an assertion
fails, so a zero exit code plus its summary lines is the proof.
"""

from __future__ import annotations

import contextlib
import importlib.util
import pathlib
import re
import sqlite3
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
BACKENDS = [
    "asyncio",
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"
        ),
    ),
    "trio",
]
# the examples that take a backend on their command line (crawler_trio.py is trio's own)
TAKE_A_BACKEND = ["quickstart.py", "crawler.py", "inference.py", "metrics.py", "batch_insert.py"]


def run_example(name: str, *args: str) -> str:
    """Run examples/<name> in a fresh interpreter; its stdout, after checking it exited 0."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def run_without(
    modules: list[str], script: pathlib.Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """``python SCRIPT ARGS`` in a fresh interpreter where ``modules`` cannot be
    imported (None in sys.modules: ``import`` raises ImportError and
    ``importlib.util.find_spec`` finds nothing), as if they were not installed."""
    code = (
        "import os, runpy, sys\n"
        f"sys.modules.update(dict.fromkeys({modules!r}))\n"
        "sys.argv = sys.argv[1:]\n"
        "sys.path[0] = os.path.dirname(sys.argv[0])  # as `python SCRIPT` puts it\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def install_hint(extra: str) -> str:
    """What a missing extra's message says to run: from the index, or in a checkout."""
    return f"pip install 'corral[{extra}]' (in a checkout of corral: pip install -e '.[{extra}]')"


def number(pattern: str, out: str) -> float:
    """The number that `pattern`'s one group matches in `out`."""
    match = re.search(pattern, out)
    assert match, f"no {pattern!r} in:\n{out}"
    return float(match.group(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_crawler_crawls_everything_politely(backend: str) -> None:
    """The crawler's handler feeds its own pool until every reachable URL has one
    outcome (dead links and a page that always fails included, retries counted),
    and no host got more than 5 requests in any 1 s window of its request log."""
    out = run_example("crawler.py", backend)
    assert f"--- {backend} ---" in out
    # b.example got 10 requests: the second 5 had to wait for the first second to pass
    elapsed = number(
        r"crawled 23 URLs on 4 hosts in ([\d.]+) s: 20 fetched, 3 failed, 4 retries", out
    )
    assert 1.0 <= elapsed < 5.0
    assert "failed https://b.example/products/3 after 3 attempt(s): HTTP 500" in out
    assert "politeness held: at most 5 requests per host in any 1 s window" in out


def test_crawler_trio_runs_in_a_trio_program() -> None:
    """corral's pool runs unchanged under trio.run, next to a trio nursery task,
    and the per-host bound holds there too."""
    out = run_example("crawler_trio.py")
    assert "14 pages fetched, 1 failed, 2 retries" in out
    assert "politeness held: at most 4 requests per host in any 1 s window" in out


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_insert_stores_every_event_exactly_once(backend: str, tmp_path: pathlib.Path) -> None:
    """5,000 events from 5 producers reach the SQLite file given with --db exactly
    once each, in batches of at most 250, flushed by a worker thread; the file is
    checked here again, from outside the example."""
    db = tmp_path / "events.db"
    out = run_example("batch_insert.py", backend, "--db", str(db))
    assert "every flush ran in a worker thread" in out
    assert "verified with SQL: 5000 rows, every event stored exactly once" in out
    assert 20 <= number(r"in [\d.]+ s: (\d+) batches", out) < 5000 / 10
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT producer || ':' || seq) FROM events"
        ).fetchone()
    assert rows == distinct == 5000


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_shares_model_calls_between_requests(backend: str) -> None:
    """256 concurrent requests share a few model calls of at most 32 inputs, each
    gets its own correct result, and that beats one call per request."""
    out = run_example("inference.py", backend)
    assert "every request got its own, correct result" in out
    assert 8 <= number(r"256 requests -> (\d+) model calls", out) < 64
    assert number(r"model calls, mean batch [\d.]+, largest (\d+)", out) <= 32
    assert number(r"speed-up ([\d.]+)x", out) > 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_exports_prometheus_text_and_a_real_metrics_page(backend: str) -> None:
    """examples/metrics.py turns on_stats snapshots into Prometheus text whose
    final values are the pools' own totals, and serves corral's OpenTelemetry
    metrics on a /metrics page it scrapes, whose totals agree."""
    pytest.importorskip("opentelemetry.exporter.prometheus")
    out = run_example("metrics.py", backend)
    assert f'corral_succeeded_total{{name="fetch-{backend}"}} 480' in out
    assert f'corral_flushed_total{{name="sink-{backend}"}} 480' in out
    assert "# TYPE corral_queued gauge" in out
    fetch = f'corral_kind="pool",corral_name="fetch-{backend}"'
    assert f'corral_items_total{{{fetch},corral_outcome="ok"}} 480' in out
    failed = f'{fetch},corral_outcome="failed",error_type="ConnectionError"'
    assert f"corral_items_total{{{failed}}} 20" in out
    assert f"corral_attempt_duration_seconds_count{{{fetch}}} 480" in out
    sink = f'corral_kind="batcher",corral_name="sink-{backend}"'
    assert f'corral_items_total{{{sink},corral_outcome="ok"}} 480' in out
    assert f"corral_batch_size_sum{{{sink}}} 480" in out
    assert "/metrics: the same totals as on_stats" in out


@pytest.mark.parametrize("name", TAKE_A_BACKEND)
def test_examples_refuse_an_unknown_backend(name: str) -> None:
    """A backend an example does not know: a usage error naming the ones it
    does, status 2, and nothing run."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "curio"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    error = result.stderr.splitlines()[-1]
    assert error.startswith(f"{name}: error: "), result.stderr
    assert "'curio'" in error
    for backend in ("asyncio", "uvloop", "trio"):
        assert backend in error


@pytest.mark.parametrize("name", TAKE_A_BACKEND)
@pytest.mark.parametrize("backend", ["uvloop", "trio"])
def test_examples_say_how_to_install_a_backend_asked_for(name: str, backend: str) -> None:
    """An example asked to run on uvloop or trio without it installed says how to
    install it (from the index, and in a checkout) and exits 2 without running."""
    result = run_without([backend], EXAMPLES / name, backend)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"{name}: error: {backend} is not installed: {install_hint(backend)}"
    )


def test_quickstart_without_trio_runs_on_asyncio_and_says_how_to_install_it() -> None:
    """With no backend named and trio not installed, an example runs on asyncio
    and says that it skipped trio and how to install it."""
    result = run_without(["trio"], EXAMPLES / "quickstart.py")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("20 items, 18 ok, 2 failed") == 1
    assert "--- asyncio ---" in out
    assert f"skipping trio, which is not installed: {install_hint('trio')}" in out


@pytest.mark.parametrize("args", [["asyncio"], ["trio"], ["--backend", "trio"]])
def test_crawler_trio_refuses_arguments(args: list[str]) -> None:
    """crawler_trio.py is a trio program that takes no arguments: a backend (or
    anything else) is refused with status 2, saying so, rather than ignored."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "crawler_trio.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    error = result.stderr.splitlines()[-1]
    assert error.startswith(f"crawler_trio.py: error: unexpected arguments {' '.join(args)!r}: ")
    assert "this example runs on trio only and takes none" in error


def test_crawler_trio_without_trio_says_how_to_install_it() -> None:
    result = run_without(["trio"], EXAMPLES / "crawler_trio.py")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == f"this example needs trio: {install_hint('trio')}\n"


@pytest.mark.parametrize(
    "args", [["run.py"], ["producer.py", "6379"], ["worker.py", "6379", "alice"]]
)
def test_distributed_example_without_coredis_says_how_to_install_it(args: list[str]) -> None:
    """examples/distributed/ without the redis extra: each script says what to
    install (from the index, and in a checkout) and exits 1, before it looks
    for a server."""
    script, *rest = args
    result = run_without(["coredis"], EXAMPLES / "distributed" / script, *rest)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr == (
        f"this example needs coredis, the extra corral[redis]: {install_hint('redis')}\n"
    )


def test_corral_says_how_to_install_its_extras() -> None:
    """corral's own messages for a missing extra, progress=True without tqdm and
    corral.redis without coredis, give both commands too."""
    code = (
        "import sys\n"
        "sys.modules.update(dict.fromkeys(['tqdm', 'coredis']))\n"
        "import corral\n"
        "for attempt in (lambda: corral.Pool(print, progress=True),\n"
        "                lambda: __import__('corral.redis')):\n"
        "    try:\n"
        "        attempt()\n"
        "    except ImportError as error:\n"
        "        print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "progress=True draws its bar with tqdm, which is not installed: "
        f"{install_hint('progress')}; or pass a tqdm-compatible bar object",
        f"corral.redis needs coredis, which is not installed: {install_hint('redis')}",
    ]
