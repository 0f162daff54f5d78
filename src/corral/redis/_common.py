"""What the Redis adapters share: one error for an unreachable server, and a
round trip that is bounded in time and turns connection failures into it."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import anyio
from coredis.exceptions import ConnectionError as _RedisConnectionError

from .._errors import CorralError
from .._validate import check_number

__all__ = ["RedisUnavailable", "check_name", "check_timeout", "round_trip"]

T = TypeVar("T")


class RedisUnavailable(CorralError):
    """Redis could not be reached, or did not answer within the adapter's
    ``timeout``. The ``__cause__`` is the client's own error, if there was one.

    Nothing waits forever on a dead server: every round trip is bounded by
    ``timeout``. The error is an ordinary exception, so a :class:`~corral.Retry`
    (``on=RedisUnavailable``) can ride out a short outage.
    """


async def round_trip(request: Awaitable[T], *, within: float, what: str) -> T:
    """Await one Redis request; connection errors and a silence longer than
    ``within`` seconds raise :class:`RedisUnavailable` naming ``what``."""
    with anyio.move_on_after(within):
        try:
            return await request
        except (_RedisConnectionError, OSError) as error:
            raise RedisUnavailable(f"{what}: Redis is unreachable ({error})") from error
    raise RedisUnavailable(f"{what}: Redis did not answer within {within} s")


def check_name(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {value!r}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value


def check_timeout(value: object) -> float:
    return check_number("timeout", value, positive=True)
