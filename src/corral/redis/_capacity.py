"""RedisCapacityLimiter: one concurrency cap shared by every process that names its key.

The state of a cap is three sorted sets, changed only by Lua scripts (each one
atomic step, timed by the Redis server's clock, so the machines' clocks never
matter)::

    key              the holders: slot token -> the time its lease ends
    key:waiting      the line: ticket -> its place (arrival order)
    key:deadlines    ticket -> the time it leaves the line unless polled again;
                     "x:" + token -> a token given back, never admitted again

A process's waiting tasks wait together: one of them (the poller) runs one
script for all of them, every 5 to 50 ms (at once when one of them arrives or
a slot of this process comes free). The script forgets holders whose lease
ended and waiters that stopped polling, puts new tickets at the back of the
line, keeps the others' places, and admits those of the process's tickets
that are among the first ``total - holders`` of the line: a caller is admitted
only when every caller before it, in any process, has been, so none starves.
A ticket is also its slot token, and admission is idempotent: a ticket found
among the holders is reported admitted again, so a reply lost to a cancelled
poller is made good by the next poll.

A slot is held under a lease that its holder renews every ``lease / 3``
seconds (a task of a task group the holder opens), so a process that dies, or
is killed, stops renewing and its slots come free when their leases end.
Giving a slot back (or a place in line, when a waiter is cancelled) removes
it and leaves a tombstone for a while, so that a poll still on its way to
Redis cannot admit that ticket again.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc
import attrs
import coredis
from coredis.commands.script import Script

from .._threads import Holds, holds_of_attempt
from .._validate import check_int, check_number
from ._common import RedisUnavailable, check_name, check_timeout, round_trip

__all__ = ["RedisCapacityLimiter", "RedisCapacityStatistics"]

T = TypeVar("T")
Call = Callable[[Any], Awaitable[Any]]

_log = logging.getLogger("corral.redis")

_POLL_FIRST = 0.005  # seconds between polls at first, and after anything changed
_POLL_MAX = 0.05  # ... doubling up to this while nothing changes
# seconds a ticket keeps its place in line without being polled (its process
# died, or stalled: it goes to the back when it polls again), and a tombstone lives
_PATIENCE = 1.0

# Lua shared by the scripts: the server's clock in microseconds, an integer
# as Redis reads one, a key's TTL extended, and the dead forgotten.
_PRELUDE = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local function now_us()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
local function int(x) return string.format('%d', x) end
local function keep(key, us)
  local ms = math.ceil(us / 1000) + 1
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
local function forget_the_dead(holders, line, deadlines, now)
  redis.call('ZREMRANGEBYSCORE', holders, '-inf', int(now))
  for _, ticket in ipairs(redis.call('ZRANGEBYSCORE', deadlines, '-inf', int(now))) do
    redis.call('ZREM', line, ticket)
  end
  redis.call('ZREMRANGEBYSCORE', deadlines, '-inf', int(now))
end
local holders, line, deadlines = KEYS[1], KEYS[2], KEYS[3]
"""

# KEYS: holders, line, deadlines. ARGV: total, lease_us, patience_us, then this
# process's tickets in the order its callers came.
# Returns {tickets admitted, holders, waiting}: each ticket already holding a
# slot (admitted by a poll whose reply was lost), and each one among the first
# total - holders of the line, now holding a slot until lease_us from now.
_ACQUIRE = (
    _PRELUDE
    + """
local total, lease, patience = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_us()
forget_the_dead(holders, line, deadlines, now)
local tail = redis.call('ZRANGE', line, -1, -1, 'WITHSCORES')
local place = now  -- the next place: after the last one, even if the clock stepped back
if #tail > 0 then place = math.max(now, tonumber(tail[2]) + 1) end
local ours, admitted = {}, {}
for i = 4, #ARGV do
  local ticket = ARGV[i]
  if redis.call('ZSCORE', holders, ticket) then
    table.insert(admitted, ticket)
  elseif not redis.call('ZSCORE', deadlines, 'x:' .. ticket) then
    ours[ticket] = true
    if not redis.call('ZSCORE', line, ticket) then
      redis.call('ZADD', line, int(place), ticket)
      place = place + 1
    end
    redis.call('ZADD', deadlines, int(now + patience), ticket)
  end
end
local free = total - redis.call('ZCARD', holders)
if free > 0 then
  for _, ticket in ipairs(redis.call('ZRANGE', line, 0, free - 1)) do
    if ours[ticket] then
      redis.call('ZREM', line, ticket)
      redis.call('ZREM', deadlines, ticket)
      redis.call('ZADD', holders, int(now + lease), ticket)
      table.insert(admitted, ticket)
    end
  end
end
keep(holders, lease)
keep(line, patience)
keep(deadlines, patience)
return {admitted, redis.call('ZCARD', holders), redis.call('ZCARD', line)}
"""
)

# KEYS: holders, line, deadlines. ARGV: lease_us, token.
# Extends the lease of a slot still held to lease_us from now. Returns 0 if the
# token holds no slot (its lease ran out and it was taken: it is not taken back).
_RENEW = (
    _PRELUDE
    + """
local lease, token = tonumber(ARGV[1]), ARGV[2]
if not redis.call('ZSCORE', holders, token) then return 0 end
redis.call('ZADD', holders, int(now_us() + lease), token)
keep(holders, lease)
return 1
"""
)

# KEYS: holders, line, deadlines. ARGV: token, patience_us.
# Gives a slot, or a place in line, back, and leaves a tombstone for the token
# so that a poll still on its way cannot admit it again.
_RELEASE = (
    _PRELUDE
    + """
local token, patience = ARGV[1], tonumber(ARGV[2])
redis.call('ZREM', holders, token)
redis.call('ZREM', line, token)
redis.call('ZREM', deadlines, token)
redis.call('ZADD', deadlines, int(now_us() + patience), 'x:' .. token)
keep(deadlines, patience)
return 1
"""
)

# KEYS: holders, line, deadlines. Returns {holders, waiting}, the dead forgotten.
_COUNT = (
    _PRELUDE
    + """
forget_the_dead(holders, line, deadlines, now_us())
return {redis.call('ZCARD', holders), redis.call('ZCARD', line)}
"""
)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _has_hash_tag(key: str) -> bool:
    """Does ``key`` carry a Redis Cluster hash tag (``{...}``, not empty)?"""
    start = key.find("{")
    return start != -1 and key.find("}", start + 1) > start + 1


@attrs.frozen
class RedisCapacityStatistics:
    """A snapshot of a :class:`RedisCapacityLimiter`: the shared counts, read
    from Redis, and this limiter object's own."""

    total: int  #: slots, for every process together
    holders: int  #: slots held now, in every process (leases that ran out not counted)
    waiting: int  #: callers waiting in line, in every process
    held_here: int  #: slots this limiter object holds
    waiting_here: int  #: callers of this limiter object waiting for a slot


class _Waiter:
    """One caller waiting for a slot; its ticket is also its slot's token."""

    __slots__ = ("admitted", "error", "sent", "ticket", "wake")

    def __init__(self, ticket: str) -> None:
        self.ticket = ticket
        self.sent = False  # a poll carried its ticket: Redis may know it
        self.admitted = False
        self.error: Exception | None = None  # the poll that included it failed
        self.wake = anyio.Event()  # admitted, failed, or it is its turn to poll

    def raise_failure(self) -> None:
        """Raise the error of the poll that included it, if it failed: a
        fresh RedisUnavailable (one exception object is not raised in two
        tasks)."""
        error = self.error
        if error is None:
            return
        if isinstance(error, RedisUnavailable):
            raise RedisUnavailable(*error.args) from error.__cause__
        raise error


class _Renewal:
    """Renews one held slot's lease every ``lease / 3`` seconds, as a task of
    a task group its holder opened, until :meth:`stop`."""

    __slots__ = ("done", "limiter", "renewing", "token")

    def __init__(self, limiter: RedisCapacityLimiter, token: str) -> None:
        self.limiter, self.token = limiter, token
        self.done = anyio.Event()
        self.renewing = False

    async def run(self) -> None:
        limiter = self.limiter
        every = limiter.lease / 3
        while True:
            with anyio.move_on_after(every):
                await self.done.wait()
            if self.done.is_set():
                return
            self.renewing = True
            try:
                held = await limiter._renew(self.token)
            except RedisUnavailable as error:
                _log.warning("%r could not renew a slot's lease, trying again: %s", limiter, error)
                continue
            except Exception:  # noqa: BLE001 - logged; the holder goes on, renewing next time
                _log.warning(
                    "%r could not renew a slot's lease, trying again", limiter, exc_info=True
                )
                continue
            finally:
                self.renewing = False
            if not held:
                _log.warning(
                    "%r: a slot's lease ran out before it could be renewed; its holder runs "
                    "on without it, and another caller may take the slot meanwhile",
                    limiter,
                )
                return

    def stop(self, scope: anyio.CancelScope) -> None:
        """Stop renewing: at once if waiting, by cancelling a round trip under way."""
        self.done.set()
        if self.renewing:
            scope.cancel()


class RedisCapacityLimiter:
    """A concurrency cap shared through Redis: at most ``total`` slots held at
    once by every process that uses the same ``key`` on the same server.

    It is a ``limiter=`` wherever corral takes one (:class:`~corral.Pool`,
    :func:`~corral.apply_to_all`, :func:`~corral.apply_to_each`,
    :class:`~corral.Batcher`: a slot per attempt, not held during a retry's
    backoff), and an async context manager holding a slot for a block::

        api = RedisCapacityLimiter(client, "reports-api", 8)
        outcomes = await apply_to_all(fetch, reports, workers=50, limiter=api)
        async with api:
            ...  # one of the 8 slots, wherever the other 7 are held

    * **Slots expire with their holder.** A slot is held under a lease of
      ``lease`` seconds (by the Redis server's clock), renewed every
      ``lease / 3`` seconds while it is held, by a task of a task group the
      holder opens (per attempt in a pool; inside ``async with``, around its
      block). A process that dies (even by ``SIGKILL``) stops renewing: its
      slots come free once their leases end, so nobody waits forever for
      them. A holder that cannot renew for ``lease`` seconds (Redis out of
      its reach, a blocked event loop) loses its slot, and one caller more
      than ``total`` may then run: each failed renewal is logged at WARNING
      on the ``corral.redis`` logger.
    * **First come, first served, across processes.** Callers queue in one
      line in Redis in the order they arrive; a caller is admitted only when
      every caller before it has been, so no process starves. A process's
      waiting callers poll Redis together, in one round trip every 5 to 50 ms
      (at once when one of its own slots comes free): a slot given back in
      another process is taken within that time. A waiter that stops polling
      (its process died) leaves the line after a second.
    * **Cancellation.** A caller cancelled while waiting leaves the line, and
      one cancelled at any point of ``__aenter__`` holds nothing: it gives back
      whatever Redis may have granted it, shielded, within ``timeout``. Leaving
      the block (or the attempt) gives the slot back the same way, also when
      cancelled; if Redis cannot be reached then, the slot comes free when
      its lease ends (logged at WARNING).
    * **When Redis is unreachable**, waiting fails closed: the callers raise
      :class:`~corral.redis.RedisUnavailable` at once on a refused
      connection, or after ``timeout`` seconds without an answer (then within
      another ``timeout`` while they give their places back); nothing is
      admitted without Redis, and nothing hangs.

    One task holds at most one slot of a limiter through ``async with`` at a
    time (a second ``async with`` raises ``RuntimeError``, as
    :class:`anyio.CapacityLimiter` does; so does an ``async with`` in a
    handler of a pool whose ``limiter=`` it is, which would wait for a slot
    while holding one). A plain handler's slot stays held while its thread
    runs, also when a timeout abandons the thread: it is given back at this
    limiter's next acquisition after the thread ends, and no longer renewed
    meanwhile (a thread that outlives ``lease`` loses it). The state
    lives in the keys ``key``, ``key:waiting`` and ``key:deadlines``, which
    expire once unused; against a Redis Cluster, give ``key`` a hash tag
    (``"{reports-api}"``) so that they share a slot. If Redis loses them (a
    restart without persistence, a failover), the slots held are forgotten
    and up to ``total`` more callers may be admitted.

    :param client: an entered ``coredis.Redis`` (or cluster) client.
    :param key: the Redis key of the cap; every process that uses the same key
        shares it.
    :param total: how many slots, in every process together.
    :param lease: seconds a slot stays held after its holder's last renewal.
    :param timeout: seconds one round trip may take before
        :class:`~corral.redis.RedisUnavailable`.
    """

    def __init__(
        self,
        client: coredis.Redis[Any] | coredis.RedisCluster[Any],
        key: str,
        total: int,
        *,
        lease: float = 30.0,
        timeout: float = 5.0,
    ) -> None:
        if not isinstance(client, (coredis.Redis, coredis.RedisCluster)):
            raise TypeError(f"client must be a coredis.Redis client, got {client!r}")
        self.key: str = check_name("key", key)
        if isinstance(client, coredis.RedisCluster) and not _has_hash_tag(key):
            raise ValueError(
                f"key must carry a hash tag with a cluster client, such as '{{{key}}}', "
                f"got {key!r}: the cap's three keys must live on one node"
            )
        self.total: int = check_int("total", total, minimum=1)
        self.lease: float = check_number("lease", lease, positive=True)
        self.timeout: float = check_timeout(timeout)
        self._keys = [key, f"{key}:waiting", f"{key}:deadlines"]
        self._lease_us = max(1, round(self.lease * 1e6))
        self._patience_us = round(_PATIENCE * 1e6)
        self._acquire_script: Script[Any] = client.register_script(_ACQUIRE)
        self._renew_script: Script[Any] = client.register_script(_RENEW)
        self._release_script: Script[Any] = client.register_script(_RELEASE)
        self._count_script: Script[Any] = client.register_script(_COUNT)
        self._what = f"RedisCapacityLimiter(key={key!r})"
        self._waiting: dict[str, _Waiter] = {}  # by ticket, in the order they came
        self._polling = False  # one waiting task polls for all of them
        self._kicked: anyio.Event | None = None  # set: the poller polls now
        self._held = 0  # slots this object holds
        # ``async with`` blocks, per task: the token, its renewal and its task group
        self._blocks: dict[int, tuple[str, _Renewal, anyio.abc.TaskGroup]] = {}
        self._attempts: dict[int, int] = {}  # tasks holding a slot for a pool's attempt
        # slots of threads a timeout abandoned, given back once the thread ends
        self._abandoned: dict[str, anyio.Event] = {}

    def __repr__(self) -> str:
        return f"RedisCapacityLimiter(key={self.key!r}, total={self.total}, lease={self.lease})"

    async def statistics(self) -> RedisCapacityStatistics:
        """How many slots are held and how many callers wait, in every process
        (one round trip) and in this limiter object.

        :raises corral.redis.RedisUnavailable: Redis did not answer.
        """
        request: Awaitable[Any] = self._count_script(keys=self._keys, args=[])
        holders, waiting = await round_trip(request, within=self.timeout, what=self._what)
        return RedisCapacityStatistics(
            total=self.total,
            holders=int(holders),
            waiting=int(waiting),
            held_here=self._held,
            waiting_here=len(self._waiting),
        )

    # -- holding a slot ------------------------------------------------------

    async def __aenter__(self) -> None:
        """Wait for a slot (first come, first served, across processes) and
        hold it for the block, its lease renewed until the block ends.

        Always a checkpoint (a round trip). If it raises, the caller holds
        nothing.

        :raises RuntimeError: this task holds a slot of it already from an
            ``async with``.
        :raises corral.redis.RedisUnavailable: Redis refused the connection or
            did not answer within ``timeout``.
        """
        task = anyio.get_current_task().id
        if task in self._blocks or task in self._attempts:
            # it would wait for a slot while holding one: with total=1, forever
            raise RuntimeError(f"this task already holds a slot of {self!r}")
        token = await self._acquire()
        renewal = _Renewal(self, token)
        group = anyio.create_task_group()
        try:
            await group.__aenter__()
        except BaseException:  # pragma: no cover - entering a task group does not wait
            await self._release(token)
            raise
        group.start_soon(renewal.run, name=f"lease renewal of {self._what}")
        self._blocks[task] = (token, renewal, group)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop renewing and give the slot back (shielded, within ``timeout``)."""
        token, renewal, group = self._blocks.pop(anyio.get_current_task().id)
        try:
            # a cancellation of the block must not cut this short: the renewal
            # task ends at once, and the slot is given back below either way
            group.cancel_scope.shield = True
            renewal.stop(group.cancel_scope)
            await group.__aexit__(None, None, None)
        finally:
            await self._release(token)

    def _layer(self, call_next: Call, clock: Callable[[], float], threaded: bool) -> Call:
        """The pool's limiter layer: a slot per attempt, renewed while it runs
        (``threaded``: until the attempt's thread ends, if a timeout abandons
        it)."""
        hold = self._hold

        async def redis_capacity_limited(item: Any) -> Any:
            return await hold(call_next, item, threaded)

        return redis_capacity_limited

    async def _hold(self, call_next: Call, item: Any, threaded: bool) -> Any:
        """``call_next(item)`` holding a slot, in a task group with its renewal
        task. The call's error is raised after the group (not in a group).
        For a plain handler, the slot's :class:`Holds` goes with the call to
        its thread: if the thread outlives the attempt, the slot stays held
        (no longer renewed) until the thread ends."""
        token = await self._acquire()
        task = anyio.get_current_task().id
        self._attempts[task] = self._attempts.get(task, 0) + 1
        holds, ended = Holds(), anyio.Event()
        holds.releases.append(ended.set)
        holds.releases.append(self._kick)  # a waiter's poll gives the slot back now
        context = holds_of_attempt.set(holds) if threaded else None
        try:
            return await self._call_renewed(token, call_next, item)
        finally:
            if context is not None:
                holds_of_attempt.reset(context)
            if not holds.taken:
                holds.release()
            self._attempts[task] -= 1
            if not self._attempts[task]:
                del self._attempts[task]
            if ended.is_set():
                await self._release(token)
            else:  # its thread runs on; the next _acquire gives the slot back after it
                self._abandoned[token] = ended

    async def _call_renewed(self, token: str, call_next: Call, item: Any) -> Any:
        renewal = _Renewal(self, token)
        failure: Exception | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(renewal.run, name=f"lease renewal of {self._what}")
            try:
                result = await call_next(item)
            except Exception as error:  # noqa: BLE001 - raised below, outside the group
                failure = error
            finally:
                renewal.stop(group.cancel_scope)
        if failure is not None:
            raise failure
        return result

    async def _release_abandoned(self) -> None:
        """Give back the slots of abandoned threads that have ended since."""
        for token, ended in list(self._abandoned.items()):
            if ended.is_set():
                del self._abandoned[token]
                await self._release(token)

    # -- waiting in line -----------------------------------------------------

    async def _acquire(self) -> str:
        """Wait in line until admitted; the slot's token. If it raises, nothing
        is held: whatever Redis may have granted is given back."""
        if self._abandoned:
            await self._release_abandoned()
        waiter = _Waiter(secrets.token_hex(8))
        self._waiting[waiter.ticket] = waiter
        try:
            if self._polling:
                self._kick()  # so that it takes its place in line now
            while not waiter.admitted:
                waiter.raise_failure()
                if self._polling:
                    await waiter.wake.wait()
                    waiter.wake = anyio.Event()
                else:
                    await self._poll_for(waiter)
        except BaseException:
            self._waiting.pop(waiter.ticket, None)
            self._hand_off()
            if waiter.sent:
                await self._release(waiter.ticket, quiet=True)
            raise
        self._held += 1
        return waiter.ticket

    async def _poll_for(self, waiter: _Waiter) -> None:
        """Poll for every waiter of this object until ``waiter`` is admitted,
        then hand the polling on to the next one."""
        self._polling = True
        delay, seen = _POLL_FIRST, (-1, -1)
        try:
            while True:
                kicked = self._kicked = anyio.Event()
                if self._abandoned:  # a slot an ended thread held frees a place
                    await self._release_abandoned()
                counts = await self._poll(waiter)
                if waiter.admitted:
                    return
                # poll sooner while the line moves, less often while it does not
                delay = _POLL_FIRST if counts != seen else min(delay * 2, _POLL_MAX)
                seen = counts
                with anyio.move_on_after(delay):
                    await kicked.wait()
        finally:
            self._polling, self._kicked = False, None
            self._hand_off()

    async def _poll(self, poller: _Waiter) -> tuple[int, int]:
        """One round trip for every waiter of this object: those admitted are
        woken; (holders, waiting) in Redis. If it fails, the others polled are
        woken to raise the error too (the poller raises it here)."""
        tickets = list(self._waiting)
        for waiter in self._waiting.values():
            waiter.sent = True
        request: Awaitable[Any] = self._acquire_script(
            keys=self._keys, args=[self.total, self._lease_us, self._patience_us, *tickets]
        )
        try:
            admitted, holders, waiting = await round_trip(
                request, within=self.timeout, what=self._what
            )
        except Exception as error:
            for ticket in tickets:
                other = self._waiting.get(ticket)
                if other is not None and other is not poller:
                    other.error = error
                    other.wake.set()
            raise
        for ticket in admitted:
            # not found: cancelled meanwhile, and giving its ticket back itself
            admitted_waiter = self._waiting.pop(_text(ticket), None)
            if admitted_waiter is not None:
                admitted_waiter.admitted = True
                admitted_waiter.wake.set()
        return int(holders), int(waiting)

    def _hand_off(self) -> None:
        """With nobody polling, wake the first waiter: it polls next."""
        if not self._polling:
            for waiter in self._waiting.values():
                waiter.wake.set()
                break

    def _kick(self) -> None:
        if self._kicked is not None:
            self._kicked.set()

    # -- round trips ---------------------------------------------------------

    async def _renew(self, token: str) -> bool:
        request: Awaitable[Any] = self._renew_script(keys=self._keys, args=[self._lease_us, token])
        return bool(await round_trip(request, within=self.timeout, what=self._what))

    async def _release(self, token: str, *, quiet: bool = False) -> None:
        """Give a slot (``quiet``: a waiter's place in line, and whatever Redis
        may have granted it) back: shielded, within ``timeout``. If Redis
        cannot be reached, it comes free when its lease (its place, after a
        second) runs out."""
        if not quiet:
            self._held -= 1
        request: Awaitable[Any] = self._release_script(
            keys=self._keys, args=[token, self._patience_us]
        )
        with anyio.CancelScope(shield=True):
            try:
                await round_trip(request, within=self.timeout, what=self._what)
            except Exception as error:  # noqa: BLE001 - the lease ends it; logged
                _log.log(
                    logging.DEBUG if quiet else logging.WARNING,
                    "%r could not give a slot back (%s): it comes free when its lease ends",
                    self,
                    error,
                )
        self._kick()  # a slot of ours came free: our waiters poll now
