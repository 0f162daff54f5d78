"""corral on Redis: a rate limit, a concurrency cap and a work queue shared by
many processes.

Needs the extra ``corral[redis]`` (it installs ``coredis``, an anyio-based
Redis client, so everything here runs on asyncio, uvloop and trio).

* :class:`RedisRateLimiter` -- one limit for every process on every machine:
  GCRA in one atomic Lua script, usable wherever corral takes a limiter.
* :class:`RedisCapacityLimiter` -- one concurrency cap for every process
  (``limiter=``, or ``async with``): slots under a renewed lease, which come
  free when their holder dies, handed out first come, first served.
* :class:`StreamSource` -- a Redis Streams consumer group as the input of a
  :class:`~corral.Pool` or :func:`~corral.apply_to_each`: at-least-once
  delivery, acknowledgement after success, reclaim of entries from dead
  consumers, and a dead-letter stream.
* :class:`StreamSink` -- results to a stream, ``XADD`` in batches.
* :class:`connect` -- a client's block, ``async with connect(url) as client``,
  out of which an exception raised inside comes as itself (coredis's own
  block wraps it in an ``ExceptionGroup``).

Pass each a client you have entered, with :class:`connect` (or with
``async with coredis.Redis(...) as client``, coredis's own block).
"""

from __future__ import annotations

from .._extras import install_hint as _install_hint

try:
    import coredis as _coredis  # noqa: F401
except ImportError as _error:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"corral.redis needs coredis, which is not installed: {_install_hint('redis')}"
    ) from _error

from ._capacity import RedisCapacityLimiter as RedisCapacityLimiter
from ._capacity import RedisCapacityStatistics as RedisCapacityStatistics
from ._common import RedisUnavailable as RedisUnavailable
from ._connect import connect as connect
from ._limiter import RedisRateLimiter as RedisRateLimiter
from ._streams import Delivery as Delivery
from ._streams import StreamSink as StreamSink
from ._streams import StreamSource as StreamSource
from ._streams import StreamStats as StreamStats

__all__ = [
    "Delivery",
    "RedisCapacityLimiter",
    "RedisCapacityStatistics",
    "RedisRateLimiter",
    "RedisUnavailable",
    "StreamSink",
    "StreamSource",
    "StreamStats",
    "connect",
]
