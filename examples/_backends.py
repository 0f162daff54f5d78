"""The examples' command line: the event loops to run on, in turn.

`python examples/<name>.py [asyncio|uvloop|trio ...]`: the backends named, or
asyncio and trio (trio only if it is installed) when none is.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

# A name on the command line -> anyio.run's backend and backend_options.
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}


def add_argument(parser: argparse.ArgumentParser) -> None:
    """The positional backend names."""
    parser.add_argument(
        "backend", nargs="*", help="asyncio, uvloop or trio, in turn (default: asyncio, trio)"
    )


def chosen(parser: argparse.ArgumentParser, named: list[str]) -> list[str]:
    """The backends to run on: those ``named`` (an unknown or missing one is a
    usage error), or asyncio and trio, skipping trio if it is not installed."""
    for name in named:
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r} (choose from asyncio, uvloop, trio)")
    found = []
    for name in named or ["asyncio", "trio"]:
        if name != "asyncio" and importlib.util.find_spec(name) is None:
            hint = (
                f"pip install 'corral[{name}]' "
                f"(in a checkout of corral: pip install -e '.[{name}]')"
            )
            if named:  # asked for by name: an error
                parser.error(f"{name} is not installed: {hint}")
            print(f"skipping {name}, which is not installed: {hint}")
        else:
            found.append(name)
    return found


def run_each(description: str, main: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """``main(*args)`` on each backend the command line chooses."""
    parser = argparse.ArgumentParser(description=description)
    add_argument(parser)
    for name in chosen(parser, parser.parse_args().backend):
        run_on(name, main, *args)


def run_on(name: str, main: Callable[..., Awaitable[Any]], *args: Any) -> None:
    backend, options = BACKENDS[name]
    print(f"--- {name} ---")
    anyio.run(main, *args, backend=backend, backend_options=options)
