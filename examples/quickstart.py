"""corral's quick start: fetch 20 "pages" through a pool of 5 workers.

Some fetches fail on purpose: errors are values, so every item still gets
exactly one outcome. Run it with `python examples/quickstart.py [asyncio|uvloop|trio]`.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

import anyio

import corral


async def fetch(page: int) -> str:
    await anyio.sleep(0.01 * (page % 4))  # pretend to wait on the network
    if page % 7 == 6:
        raise ConnectionError(f"page {page}: connection reset")
    return f"page {page}: {page * 37 % 101} words"


async def main() -> int:
    outcomes = await corral.apply_to_all(fetch, range(20), workers=5)
    for outcome in outcomes:
        if outcome.ok:
            print(f"ok     {outcome.result}  ({outcome.elapsed * 1000:.0f} ms)")
        else:
            print(f"failed {outcome.item}: {outcome.error!r}")
    failed = sum(not o.ok for o in outcomes)
    print(f"{len(outcomes)} items, {len(outcomes) - failed} ok, {failed} failed")
    # every item has exactly one outcome, in input order
    assert [o.item for o in outcomes] == list(range(20))
    return 0


# A name on the command line -> anyio.run's backend and backend_options.
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}


def backends() -> list[str]:
    """The backends named on the command line, or asyncio and trio (if installed)."""
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument(
        "backend", nargs="*", help="asyncio, uvloop or trio, in turn (default: asyncio, trio)"
    )
    named: list[str] = parser.parse_args().backend
    for name in named:
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r} (choose from asyncio, uvloop, trio)")
    chosen = []
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
            chosen.append(name)
    return chosen


if __name__ == "__main__":
    for name in backends():
        backend, options = BACKENDS[name]
        print(f"--- {name} ---")
        anyio.run(main, backend=backend, backend_options=options)
