"""examples/distributed/ runs as written: a producer and three worker processes
against the session's redis-server settle every order, on asyncio, uvloop and trio."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

import anyio
import coredis
import pytest

RUN = pathlib.Path(__file__).parent.parent / "examples" / "distributed" / "run.py"


async def flush(port: int) -> None:
    async with coredis.Redis(port=port) as client:
        await client.flushdb()


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "backend",
    [
        "asyncio",
        pytest.param(
            "uvloop",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"
            ),
        ),
        "trio",
    ],
)
def test_distributed_example_settles_every_order(redis_port: int, backend: str) -> None:
    anyio.run(flush, redis_port)  # run.py wants a database without an earlier run's keys
    result = subprocess.run(
        [sys.executable, str(RUN), "--port", str(redis_port), "--workers", "3",
         "--orders", "600", "--backend", backend],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # 600 orders, one in 250 declined (orders 125 and 375): 598 charged, 2 dead-lettered
    assert "every order settled: 598 receipts + 2 dead-lettered = 600 orders; pending 0" in (
        result.stdout
    ), output
    assert re.search(r"^charged: +598 ", result.stdout, re.MULTILINE), output
    assert len(re.findall(r"^worker-\d: delivered", result.stdout, re.MULTILINE)) == 3, output
