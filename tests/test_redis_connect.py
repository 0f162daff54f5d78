"""corral.redis.connect against a real redis-server, on every backend: an
exception raised in the block comes out as itself, not in the ExceptionGroup
that coredis's own client block wraps around it, so that the README's
``except RedisUnavailable`` catches a Redis outage; everything else passes
through as coredis's block lets it.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from typing import Any

import anyio
import coredis
import pytest

import corral
import corral.redis
from corral.redis import Delivery, RedisUnavailable, StreamSource
from redis_server import COREDIS_LEAK, redis_server

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings(COREDIS_LEAK)]


class Server:
    """A redis-server of the test's own, which the test may stop."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack
        self.port: int = stack.enter_context(redis_server())
        self.url = f"redis://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Stop the server and wait until its process has ended."""
        await anyio.to_thread.run_sync(self._stack.close)


@pytest.fixture
def server(redis_port: int, coredis_leaks: None) -> Iterator[Server]:
    """``redis_port`` skips (or, under CI, fails) where redis-server is missing."""
    with contextlib.ExitStack() as stack:
        yield Server(stack)


async def test_a_redis_outage_lands_in_except_redis_unavailable(server: Server) -> None:
    """The README's pattern, as a user writes it: Redis stops mid-run (from
    inside a handler), and the outage comes out of the block as
    RedisUnavailable, which ``except RedisUnavailable`` catches."""
    handled: list[str] = []

    async def charge(delivery: Delivery[str]) -> str:
        handled.append(delivery.fields["order"])
        if len(handled) == 3:
            await server.stop()
        return "charged"

    caught: RedisUnavailable | None = None
    try:
        async with corral.redis.connect(server.url) as client:
            for order in range(20):
                await client.xadd("orders", {"order": str(order)})
            async with (
                StreamSource(
                    client, "orders", "billing", "w1", stop_when_drained=True, timeout=5
                ) as source,
                corral.apply_to_each(
                    charge, source, workers=2, on_outcome=source.settle
                ) as outcomes,
            ):
                async for _ in outcomes:
                    pass
    except RedisUnavailable as error:
        caught = error
    assert caught is not None, "the block ended without an error"
    assert len(handled) >= 3  # the outage came mid-run, from the third handler on


async def test_an_exception_raised_in_the_block_comes_out_as_itself(server: Server) -> None:
    """A plain exception raised in the block is the one that comes out: the
    same object, not a group, its traceback ending where it was raised."""
    raised = ValueError("the block's own")
    with pytest.raises(ValueError, match="the block's own") as info:
        async with corral.redis.connect(server.url) as client:
            await client.set("k", "v")
            raise raised
    assert info.value is raised
    # as it left the block: not extended by the frames of coredis's exit
    frames = traceback.extract_tb(info.value.__traceback__)
    assert [frame.name for frame in frames] == [
        "test_an_exception_raised_in_the_block_comes_out_as_itself"
    ]
    assert frames[-1].line == "raise raised"


async def test_a_group_raised_in_the_block_stays_a_group(server: Server) -> None:
    """A group the block raised itself is not unwrapped: its members come out
    in a group (on trio, coredis's exit nests a copy of it in its nursery's)."""
    leaf = ValueError("one of mine")
    with pytest.RaisesGroup(ValueError, flatten_subgroups=True) as info:
        async with corral.redis.connect(server.url):
            raise ExceptionGroup("the block's own", [leaf])
    assert list(_leaves(info.value)) == [leaf]


def _leaves(group: BaseExceptionGroup[Any]) -> Iterator[BaseException]:
    for member in group.exceptions:
        if isinstance(member, BaseExceptionGroup):
            yield from _leaves(member)
        else:
            yield member


async def test_a_clean_block_gives_an_entered_client(server: Server) -> None:
    """From a URL, the block gets an entered ``coredis.Redis`` that decodes
    responses (``str``) unless told otherwise; options reach coredis."""
    async with corral.redis.connect(server.url) as client:
        assert isinstance(client, coredis.Redis)
        await client.set("k", "v")
        assert await client.get("k") == "v"
    async with corral.redis.connect(server.url, decode_responses=False, db=1) as raw:
        assert await raw.get("k") is None  # another database
        await raw.set("k", b"\xff")
        assert await raw.get("k") == b"\xff"


async def test_a_client_of_ones_own_is_entered_and_given_back(server: Server) -> None:
    """A client the user built is entered for the block and is what the block
    gets; an error in the block comes out as itself here too."""
    mine = coredis.Redis(port=server.port, decode_responses=True)
    async with corral.redis.connect(mine) as client:
        assert client is mine
        assert await client.ping() == "PONG"
    with pytest.raises(KeyError, match="mine"):
        async with corral.redis.connect(coredis.Redis(port=server.port)):
            raise KeyError("mine")


async def test_cancellation_passes_through(server: Server) -> None:
    """A block cancelled by an enclosing scope ends as a cancellation, which
    that scope catches: nothing is turned into an error or swallowed."""
    with anyio.move_on_after(0.05) as scope:
        async with corral.redis.connect(server.url) as client:
            await client.set("k", "v")
            await anyio.sleep_forever()
    assert scope.cancelled_caught


def test_bad_arguments_name_the_parameter() -> None:
    """Something that is neither a URL nor a coredis client, a URL coredis
    would misread, or options given with a client, is an error naming what is
    wrong, at the call."""
    with pytest.raises(TypeError, match="url_or_client must be a Redis URL"):
        corral.redis.connect(6379)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="url_or_client must be a Redis URL"):
        corral.redis.connect(coredis.Redis.from_url)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"options \(db\) apply to a URL only"):
        corral.redis.connect(coredis.Redis(), db=1)  # type: ignore[call-overload]
    for url in ["localhost:6379", "", "http://localhost:6379"]:
        with pytest.raises(ValueError, match="url_or_client must be a URL starting with redis://"):
            corral.redis.connect(url)
