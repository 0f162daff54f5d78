"""RedisRateLimiter: one GCRA limit shared by every process that names its key.

The whole state of a limit is one Redis string: the theoretical arrival time
(TAT) in microseconds of the Redis server's clock. One Lua script reads it,
reserves the caller's slot and writes it back, atomically, so any number of
processes on any number of machines see one schedule, by one clock (the
server's: the machines' clocks never matter). The key expires as soon as the
limit has refilled completely, so idle limits leave nothing behind.

The script answers with how long the caller must wait for its slot; the caller
sleeps exactly that long and is admitted without a second round trip. Callers
are thereby served in the order their requests reach Redis.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import coredis
from anyio.lowlevel import checkpoint

from .._limits import check_cost
from .._middleware import pause_limiter
from .._retry import read_retry_after
from .._validate import check_int, check_number
from ._common import check_name, check_timeout, round_trip

__all__ = ["RedisRateLimiter"]

T = TypeVar("T")
R = TypeVar("R")

# KEYS[1]: the limit. ARGV: interval (microseconds per token), burst, cost.
# Returns the microseconds to wait before the cost is admitted (0: at once).
# The slot is reserved either way: the caller sleeps, it does not ask again.
_GCRA = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local new_tat = tat + cost * interval
local ttl = math.ceil((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', string.format('%d', ttl))
local admit_at = tat + (cost - burst) * interval
if admit_at <= now then return 0 end
return math.ceil(admit_at - now)
"""

# KEYS[1]: the limit. ARGV: microseconds to pause, (burst - 1) * interval.
# Moves the TAT so that nothing is admitted before the pause ends (a later TAT
# stays).
_PAUSE = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local pause = tonumber(ARGV[1])
local hold = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local new_tat = now + pause + hold
if new_tat > tat then
  local ttl = math.ceil((new_tat - now) / 1000) + 1
  redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', string.format('%d', ttl))
end
return 0
"""


class RedisRateLimiter:
    """A token bucket shared through Redis: at most ``burst + rate * t / per``
    admissions in any interval of length ``t``, counted over every process
    that uses the same ``key`` on the same server.

    The same contract as :class:`corral.TokenBucket`, by the Redis server's
    clock: ``RedisRateLimiter(client, "api", 10)`` admits one call every
    0.1 s across all processes; with ``burst=5``, 5 at once, then one every
    0.1 s. It is a limiter wherever corral takes one (``rate_limit=``,
    ``middleware=[...]``) and can be awaited directly with
    :meth:`acquire`.

    One round trip per admission (a Lua script, O(1), one key). The script
    reserves the caller's slot and tells it how long to wait; the caller then
    sleeps that long, with no polling. A caller cancelled while it sleeps has
    spent its slot: the limit is never exceeded, but that slot goes unused.

    The bound holds for the slots the server hands out. Each caller starts
    when its reply has arrived and its wait has passed, so a reply delayed
    more than the next caller's (network, a busy event loop) can bring two
    admissions closer than their slots by that delay: measured at the
    callers, allow for the spread of the round trip. The limit lives in one
    key: if Redis loses it (a restart without persistence, a failover,
    ``FLUSHDB``, eviction; with a ``volatile-*`` policy the key, which has a
    TTL, goes first), the limit starts again from full. Waits are computed
    from the server's clock (``TIME``), so a clock that steps back delays
    callers by that much.

    **Leasing.** With ``lease=k`` (at most ``burst``), a process reserves
    ``k`` tokens in one round trip and hands them to its own callers for up
    to ``per`` seconds, cutting round trips by up to ``k`` times. The price is
    a bounded overshoot: tokens leased before an interval and spent inside it
    count twice, so in any interval of length ``t`` the admissions are at
    most ``burst + rate * t / per + P * (k - 1)`` for ``P`` processes, and a
    process that stops taking work wastes at most ``k - 1`` tokens. The
    default ``lease=1`` is exact.

    **When Redis is unreachable** each call fails closed: :meth:`acquire`
    raises :class:`~corral.redis.RedisUnavailable` at once on a refused
    connection, or after ``timeout`` seconds without an answer; it never
    hangs and never admits without Redis. Retry it (``Retry(on=...)``) to ride
    out an outage.

    :param client: an entered ``coredis.Redis`` (or cluster) client.
    :param key: the Redis key holding the limit; every process that uses the
        same key shares the limit.
    :param rate: admissions per ``per`` seconds.
    :param per: the period, in seconds.
    :param burst: how many may be admitted at once after an idle spell (and
        the most ``acquire(cost)`` may ask for).
    :param lease: tokens reserved per round trip and handed out locally.
    :param timeout: seconds one round trip may take before
        :class:`~corral.redis.RedisUnavailable`.
    """

    def __init__(
        self,
        client: coredis.Redis[Any] | coredis.RedisCluster[Any],
        key: str,
        rate: float,
        per: float = 1.0,
        *,
        burst: int = 1,
        lease: int = 1,
        timeout: float = 5.0,
    ) -> None:
        if not isinstance(client, (coredis.Redis, coredis.RedisCluster)):
            raise TypeError(f"client must be a coredis.Redis client, got {client!r}")
        self.key: str = check_name("key", key)
        self.rate: float = check_number("rate", rate, positive=True)
        self.per: float = check_number("per", per, positive=True)
        self.burst: int = check_int("burst", burst, minimum=1)
        self.lease: int = check_int("lease", lease, minimum=1)
        if lease > burst:
            raise ValueError(
                f"lease must be <= burst ({burst}), got {lease!r}: a lease is one admission"
            )
        self.timeout: float = check_timeout(timeout)
        self._interval_us = self.per / self.rate * 1e6  # microseconds per token
        if not math.isfinite(self._interval_us * self.burst) or self._interval_us < 1e-3:
            raise ValueError(f"rate must be at most 1e9 per second and finite, got {rate!r}")
        self._script = client.register_script(_GCRA)
        self._pause_script = client.register_script(_PAUSE)
        self._interval_arg = repr(self._interval_us)  # as the script reads it
        self._what = f"RedisRateLimiter(key={key!r})"
        # leasing: tokens in hand, valid until the local clock reads this
        self._tokens = 0
        self._lease_ends = -math.inf
        self._lease_lock = anyio.Lock()

    def __repr__(self) -> str:
        extra = f", lease={self.lease}" if self.lease > 1 else ""
        return (
            f"RedisRateLimiter(key={self.key!r}, rate={self.rate}, per={self.per}, "
            f"burst={self.burst}{extra})"
        )

    async def acquire(self, cost: int = 1) -> None:
        """Wait until ``cost`` units are admitted.

        One round trip to Redis, then a sleep until the slot it reserved comes
        (with ``lease > 1``: no round trip while leased tokens last, and one
        caller of this process at a time fetches the next lease, first come,
        first served). Always a checkpoint. Returning means admitted. If it
        raises, the caller was not admitted; slots Redis already reserved for
        it (it was cancelled in its sleep, or its reply was cut off) stay
        spent, unused: the limit is never exceeded.

        :raises ValueError: ``cost`` is below 1, or more than ``burst``: it
            could never be admitted at once.
        :raises TypeError: ``cost`` is not an int.
        :raises corral.redis.RedisUnavailable: Redis refused the connection or
            did not answer within ``timeout``; nothing was admitted.
        """
        check_cost(cost, self.burst, self, named="burst")
        if self.lease > 1:
            await self._acquire_leased(cost)
            return
        wait = await self._reserve(cost)
        if wait > 0:
            await anyio.sleep(wait)

    async def pause(self, seconds: float) -> None:
        """Admit nothing for ``seconds`` from now, in every process sharing the
        key, as a server's ``Retry-After`` asks (a longer pause already in
        force stays). One round trip. Pools call it for you when an attempt
        fails with an error that carries a Retry-After. Unlike a local
        limiter's pause, it moves the schedule, not the callers already in
        it: a caller that reserved its slot before the pause (it sleeps until
        then) is still admitted at that slot, and tokens this process leased
        are still spent, so up to the reservations in flight go out during
        the pause (with 50 callers at 150 a second: about a third of a
        second's worth).

        :raises ValueError: ``seconds`` is negative, NaN or infinite.
        :raises TypeError: ``seconds`` is not a number.
        :raises corral.redis.RedisUnavailable: Redis did not answer.
        """
        seconds = check_number("seconds", seconds)
        hold = (self.burst - 1) * self._interval_us
        request: Awaitable[Any] = self._pause_script(
            keys=[self.key], args=[repr(seconds * 1e6), repr(hold)]
        )
        await round_trip(request, within=self.timeout, what=self._what)

    async def _reserve(self, cost: int) -> float:
        """Reserve ``cost`` tokens' slot; the seconds until it comes."""
        request: Awaitable[Any] = self._script(
            keys=[self.key], args=[self._interval_arg, self.burst, cost]
        )
        waited: Any = await round_trip(request, within=self.timeout, what=self._what)
        return int(waited) / 1e6

    async def _acquire_leased(self, cost: int) -> None:
        await checkpoint()
        if not self._lease_lock.locked() and self._take(cost):
            return  # nobody is waiting: first come, first served holds
        async with self._lease_lock:  # one round trip at a time for the whole process
            if self._take(cost):
                return  # someone else's lease arrived while we waited for the lock
            wanted = max(self.lease, cost)
            wait = await self._reserve(wanted)
            if wait > 0:
                await anyio.sleep(wait)
            # consumed from here on, with no checkpoint before returning
            self._tokens = wanted - cost
            self._lease_ends = anyio.current_time() + self.per

    def _take(self, cost: int) -> bool:
        if self._tokens >= cost and anyio.current_time() < self._lease_ends:
            self._tokens -= cost
            return True
        return False

    async def __call__(self, item: T, call_next: Callable[[T], Awaitable[R]]) -> R:
        """As :class:`~corral.Middleware`: admit one unit, then run the rest of
        the chain; an error carrying a Retry-After pauses the limit."""
        await self.acquire()
        try:
            return await call_next(item)
        except Exception as error:
            seconds = read_retry_after(error)
            if seconds:
                await pause_limiter(self.pause, seconds)
            raise
