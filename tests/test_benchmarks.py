"""The benchmark scripts run end to end on tiny inputs (so they cannot rot).

Every contender of a run must report handling every item (the harness checks
that), so this also catches a contender that loses items. Timings are not
looked at: speed goals live in the benchmarks themselves.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"

TINY = {
    "bench_adaptive.py": [
        "--seconds",
        "0.6",
        "--repeat",
        "1",
        "--capacity",
        "4",
        "--service-time",
        "0.01",
        "--fixed",
        "1",
        "--no-peers",
        "--jobs",
        "4",
    ],
    "bench_apply.py": ["--items", "300", "--workers", "4", "--repeat", "1"],
    "bench_batcher.py": [
        "--items",
        "500",
        "--batch",
        "16",
        "--callers",
        "200",
        "--submit-batch",
        "8",
        "--repeat",
        "1",
    ],
    "bench_middleware.py": ["--items", "300", "--repeat", "1", "--admissions", "150"],
    "bench_http.py": ["--items", "60", "--workers", "5", "--limit", "200", "--only", "corral"],
    "bench_memory.py": ["--items", "500"],
    "bench_queue.py": ["--items", "300", "--repeat", "1"],
    "bench_redis.py": ["--acquires", "100", "--entries", "500", "--repeat", "1"],
    "bench_resilience.py": ["--items", "300", "--calls", "300", "--repeat", "1"],
    "bench_scheduling.py": ["--items", "300", "--batch", "50", "--repeat", "1"],
    "bench_sqlite.py": ["--entries", "300", "--repeat", "1", "--handler", "sleep0"],
    "bench_threads.py": ["--items", "200", "--workers", "4", "--repeat", "1"],
}


def test_every_benchmark_is_covered() -> None:
    assert sorted(p.name for p in BENCHMARKS.glob("bench_*.py")) == sorted(TINY)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs(script: str) -> None:
    if script == "bench_redis.py" and shutil.which("redis-server") is None:
        # as the Redis tests (conftest.py): skipped where it is missing, except under CI
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; CI must install it", pytrace=False)
        pytest.skip("redis-server is not installed")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *TINY[script]],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| corral")]
    assert rows or script == "bench_memory.py", result.stdout
    if script == "bench_memory.py":
        assert "| apply_to_each | trio |" in result.stdout
    elif script == "bench_http.py":
        assert "| corral AdaptiveRate(2N) | trio |" in result.stdout
    else:
        assert "- key ratio" in result.stdout


def test_machine_description() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "_harness.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "Python 3." in result.stdout
    assert "corral" in result.stdout


@pytest.mark.parametrize("scenario", ["apply", "apply0", "nowait", "nowait0", "add", "add_nowait"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_per_item_scenario_runs(scenario: str, backend: str) -> None:
    """benchmarks/per_item.py (the scenarios whose instructions BENCHMARKS.md
    counts) runs each scenario, also with no items (the baseline)."""
    for items in ("0", "2000"):
        subprocess.run(
            [sys.executable, str(BENCHMARKS / "per_item.py"), scenario, backend, items],
            timeout=60,
            check=True,
        )
