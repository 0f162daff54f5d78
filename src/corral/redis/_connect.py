"""connect: a coredis client's block whose errors come out as they were raised.

coredis's client block (``async with client:``) enters the client's connection
pool, whose exit hands the block's exception to the pool's anyio task group;
the task group raises it wrapped in an ``ExceptionGroup`` of one. An ``except
RedisUnavailable`` around the block can then never match: an ``except`` clause
does not look inside a group. ``connect`` undoes exactly that one wrapping.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, overload
from urllib.parse import urlsplit

import coredis
from coredis.client import Client

__all__ = ["connect"]

ClientT = TypeVar("ClientT", bound="Client[Any]")

_SCHEMES = ("redis", "rediss", "unix")  # what coredis.Redis.from_url understands


class connect(Generic[ClientT]):  # a lowercase class, as contextlib.closing
    """Open a coredis client for a block: ``async with connect(url) as client``.

    The block is the client's own (``async with client``), with one
    difference: an exception raised in the block comes out of it as itself.
    coredis's exit wraps it in an ``ExceptionGroup`` of one (the connection
    pool's task group does), so that ``except RedisUnavailable`` around the
    block could never match; here, when the client's exit raises a group whose
    only member is the block's own exception, that exception is re-raised
    instead, with its traceback as it was. Anything else the exit raises (a
    group the block raised itself, or one with other errors of the client's
    in it) comes out unchanged::

        try:
            async with corral.redis.connect("redis://localhost:6379") as client:
                async with StreamSource(client, "orders", "billing", "w1") as source:
                    ...
        except RedisUnavailable:
            ...  # Redis went away: try again later

    Entering and leaving are the client's own (``async with client``: its
    connection pool opens and closes; a checkpoint each).

    :param url_or_client: a Redis URL (``redis://``, ``rediss://`` or
        ``unix://``), for ``coredis.Redis.from_url(url, decode_responses=True,
        **options)``; or a coredis client you made yourself (``coredis.Redis``,
        ``coredis.RedisCluster``, a Sentinel's ``primary_for(...)``, one with
        your own options), which is entered for the block and left after it.
    :param options: for a URL only, passed on to ``coredis.Redis.from_url``.
        ``decode_responses=True`` (the default here) gives a
        ``coredis.Redis[str]``, ``False`` a ``coredis.Redis[bytes]``.
    :raises TypeError: ``url_or_client`` is neither a str nor a coredis
        client, or options come with a client.
    :raises ValueError: the URL's scheme is not one of those above (coredis
        would take ``localhost:6379`` for a URL of the default server).
    """

    @overload
    def __init__(
        self: connect[coredis.Redis[str]],
        url_or_client: str,
        *,
        decode_responses: Literal[True] = ...,
        **options: Any,
    ) -> None: ...

    @overload
    def __init__(
        self: connect[coredis.Redis[bytes]],
        url_or_client: str,
        *,
        decode_responses: Literal[False],
        **options: Any,
    ) -> None: ...

    @overload
    def __init__(self, url_or_client: ClientT) -> None: ...

    def __init__(self, url_or_client: str | ClientT, **options: Any) -> None:
        client: Any
        if isinstance(url_or_client, str):
            if urlsplit(url_or_client).scheme not in _SCHEMES:
                raise ValueError(
                    "url_or_client must be a URL starting with redis://, rediss:// or "
                    f"unix://, got {url_or_client!r}"
                )
            client = coredis.Redis.from_url(url_or_client, **{"decode_responses": True, **options})
        elif isinstance(url_or_client, Client):
            if options:
                raise TypeError(
                    f"options ({', '.join(options)}) apply to a URL only: "
                    f"url_or_client is a client already, made with its own"
                )
            client = url_or_client
        else:
            raise TypeError(
                "url_or_client must be a Redis URL (a str) or a coredis client, "
                f"got {url_or_client!r}"
            )
        self._client: ClientT = client

    async def __aenter__(self) -> ClientT:
        await self._client.__aenter__()
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        try:
            return await self._client.__aexit__(exc_type, exc, traceback)
        except BaseExceptionGroup as group:
            if exc is None or len(group.exceptions) != 1 or group.exceptions[0] is not exc:
                raise
            # the pool's task group wrapped the block's own exception: let
            # `async with` re-raise it as it left the block
            exc.__traceback__ = traceback
            return False
