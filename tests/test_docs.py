"""The README's code blocks and the examples run as written."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)


def test_readme_has_python_examples() -> None:
    """The tour exists (so the parametrised test below cannot pass vacuously)."""
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code: str) -> None:
    """Each README block runs without error (its own asserts included)."""
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


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
