"""The scripts in examples/ run as written, on asyncio and trio, and their own checks pass.

Each example asserts what it demonstrates and exits non-zero when an assertion
fails, so a zero exit code plus its summary lines is the proof.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import sqlite3
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
BACKENDS = ["asyncio", "trio"]


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
def test_metrics_exports_prometheus_text_and_counters(backend: str) -> None:
    """examples/metrics.py turns on_stats snapshots into Prometheus text whose
    final values are the pools' own totals, and feeds counters that agree."""
    out = run_example("metrics.py", backend)
    assert 'corral_succeeded_total{name="fetch"} 480' in out
    assert 'corral_flushed_total{name="sink"} 480' in out
    assert "# TYPE corral_queued gauge" in out
    assert "totals agree" in out
