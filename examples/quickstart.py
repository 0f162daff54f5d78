"""corral's quick start: fetch 20 "pages" through a pool of 5 workers.

Some fetches fail on purpose: errors are values, so every item still gets
exactly one outcome. Run it with `python examples/quickstart.py [asyncio|uvloop|trio]`.
"""

from __future__ import annotations

import anyio
from _backends import run_each

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


if __name__ == "__main__":
    run_each(__doc__.partition("\n")[0], main)
