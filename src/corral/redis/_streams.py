"""StreamSource and StreamSink: a Redis Streams consumer group in and out of corral.

The source's life of an entry::

    XADD ──► stream ──XREADGROUP (COUNT = free room)──► Delivery ──► your pool
                ▲                                                      │ outcome
                │ XAUTOCLAIM (idle >= min_idle:                        ▼
                │ its consumer died or failed it)          source.settle(outcome)
                │                                          ok ──► XACK (batched)
                └──────── failed, deliveries < max ◄───────┤
                                                           failed, deliveries >= max
                                                           └──► dead-letter + XACK

An entry leaves the group's pending list only by XACK: after a success, or in
the same atomic step that copies it to the dead-letter stream (with
``delete_acked``, the same step also deletes it from the stream). Everything
else (a crash, a cancellation, a failure with deliveries left) leaves it
pending, and any consumer of the group claims it once it has been idle
``min_idle`` seconds. While its consumer lives, the source's renewal task
resets the idle time of every entry it holds (read, or handed out and not
settled) every ``min_idle / 3`` seconds, so only a dead (or cut off)
consumer's entries go idle. That is at-least-once delivery: an entry may be
handled twice (its consumer died after handling it, before the
acknowledgement), never lost.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Mapping
from types import TracebackType
from typing import Any, AnyStr, Generic, TypeVar

import anyio
import anyio.abc
import attrs
import coredis
from anyio.lowlevel import checkpoint
from coredis.commands.script import Script
from coredis.exceptions import NoScriptError, StreamDuplicateConsumerGroupError

from .._batcher import Batcher, BatcherStats
from .._delivery import Deliveries, Delivery
from .._errors import FlushError
from .._outcome import Outcome
from .._retry import ExceptionFilter, Retry, check_on, matches
from .._validate import check_bool, check_int, check_number
from ._common import RedisUnavailable, check_name, check_timeout, round_trip

__all__ = ["Delivery", "StreamSink", "StreamSource", "StreamStats"]

R = TypeVar("R")

_log = logging.getLogger("corral.redis")

_ACK_WAIT = 0.01  # seconds a success's XACK may wait for others to share it
_RENEW_CHUNK = 1000  # the most entries one renewal script touches (a longer list takes more)

# Lua shared by the scripts: copy an entry to the dead-letter stream with
# where it came from and why, and acknowledge it (and, if delete is '1',
# delete it from the stream), in the calling script's one atomic step.
_BURY_FUNCTION = """
local function bury(stream, dead, group, consumer, id, fields, deliveries, reason, delete)
  local copy = {}
  for _, value in ipairs(fields) do table.insert(copy, value) end
  for _, value in ipairs({'corral:stream', stream, 'corral:id', id, 'corral:group', group,
                          'corral:consumer', consumer, 'corral:deliveries', deliveries,
                          'corral:error', reason}) do
    table.insert(copy, value)
  end
  redis.call('XADD', dead, '*', unpack(copy))
  redis.call('XACK', stream, group, id)
  if delete == '1' then redis.call('XDEL', stream, id) end
end
"""

# Lua shared by the scripts: is the entry still pending to this consumer (no
# other consumer claimed it meanwhile, nobody acknowledged it) and still in the
# stream? XCLAIM of an entry deleted from the stream would drop it from the
# pending list, where a claim dead-letters it by its ID instead.
_MINE_FUNCTION = """
local function mine(stream, group, consumer, id)
  local pending = redis.call('XPENDING', stream, group, id, id, 1)
  return #pending > 0 and pending[1][2] == consumer
         and #redis.call('XRANGE', stream, id, id) > 0
end
"""

# KEYS: stream, dead-letter stream.
# ARGV: group, consumer, min_idle_ms, cursor, count, max_deliveries, delete ('1' or '0').
# Claims up to count entries idle for min_idle_ms from any consumer, scanning
# the pending list from cursor (XAUTOCLAIM scans 10 * COUNT entries a call: up
# to 16 calls here, so a long list of busy entries does not hide an idle one
# for many rounds). An entry already delivered more than max_deliveries times
# without being settled (it killed or stalled every consumer it reached) goes
# to the dead-letter stream, and so does the ID of one deleted from the stream
# while pending (Redis 7 drops those from the pending list and reports them).
# Returns {next cursor, {{id, fields, deliveries}, ...}, how many dead-lettered}.
_CLAIM = (
    _BURY_FUNCTION
    + """
local stream, dead, group, consumer = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local cursor, count, max_deliveries = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local delete = ARGV[7]
local out, buried = {}, 0
for _ = 1, 16 do
  local claimed = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[3], cursor,
                             'COUNT', count - #out)
  cursor = claimed[1]
  for _, entry in ipairs(claimed[2]) do
    if entry then  -- Redis 6.2 answers false for an entry deleted while pending
      local id, fields = entry[1], entry[2]
      local deliveries = redis.call('XPENDING', stream, group, id, id, 1)[1][4]
      if deliveries > max_deliveries then
        bury(stream, dead, group, consumer, id, fields, deliveries,
             'never settled: its consumers died or stalled', delete)
        buried = buried + 1
      else
        table.insert(out, {id, fields, deliveries})
      end
    end
  end
  for _, id in ipairs(claimed[3] or {}) do
    bury(stream, dead, group, consumer, id, {}, 'unknown',
         'deleted from the stream while pending', delete)
    buried = buried + 1
  end
  if #out >= count or cursor == '0-0' then break end
end
return {cursor, out, buried}
"""
)

# KEYS: stream. ARGV: group, consumer, idle_ms, then id, delivery count pairs.
# Hands entries back to the group: each one still pending to this consumer
# (and still in the stream) gets the idle time idle_ms and the delivery count
# given (XCLAIM ... IDLE, RETRYCOUNT, JUSTID), so that any consumer may claim
# it once idle for min_idle. Used for a failure to come back after
# redeliver_after, and at exit for entries read but never handed out (which
# get their delivery back). Returns how many were handed back.
_RELEASE = (
    _MINE_FUNCTION
    + """
local stream, group, consumer, idle = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local released = 0
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  if mine(stream, group, consumer, id) then
    redis.call('XCLAIM', stream, group, consumer, 0, id, 'IDLE', idle,
               'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
    released = released + 1
  end
end
return released
"""
)

# KEYS: stream. ARGV: group, consumer, then ids.
# Renews this consumer's claim on entries it still works on: each one still
# pending to it (and still in the stream) gets its idle time reset to 0
# (XCLAIM ... JUSTID, which leaves the delivery count as it is), so that no
# other consumer claims it after min_idle. An entry acknowledged or claimed by
# another consumer meanwhile is left alone. Returns how many were renewed.
_RENEW = (
    _MINE_FUNCTION
    + """
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local renewed = 0
for i = 3, #ARGV do
  if mine(stream, group, consumer, ARGV[i]) then
    redis.call('XCLAIM', stream, group, consumer, 0, ARGV[i], 'JUSTID')
    renewed = renewed + 1
  end
end
return renewed
"""
)

# KEYS: stream. ARGV: group, then ids.
# Acknowledges the entries and deletes them from the stream, in one atomic
# step (delete_acked). Returns how many were acknowledged.
_ACK_DELETE = """
local stream, group = KEYS[1], ARGV[1]
local acked = 0
for i = 2, #ARGV do
  acked = acked + redis.call('XACK', stream, group, ARGV[i])
  redis.call('XDEL', stream, ARGV[i])
end
return acked
"""

# KEYS: stream. ARGV: group.
# Trims from the stream the entries every consumer group is done with: every
# entry below, for each group, both its oldest pending entry and the entry
# after its last-delivered ID (XTRIM MINID), so that no entry pending in, or
# not yet delivered to, any group goes. Nothing if the stream or the named
# group does not exist. Returns how many entries were trimmed.
_TRIM_ACKED = """
local stream, group = KEYS[1], ARGV[1]
if redis.call('EXISTS', stream) == 0 then return 0 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local a_ms, a_seq = parse(a)
  local b_ms, b_seq = parse(b)
  return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq)
end
-- the ID after this one: every entry below it was delivered (a sequence
-- number beyond 2^53, where Lua's numbers end, keeps the ID itself)
local function after(id)
  local _, seq = parse(id)
  if seq >= 9007199254740991 then return id end
  return string.match(id, '^%d+') .. '-' .. string.format('%d', seq + 1)
end
local below, named = nil, false
for _, fields in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local info = {}
  for i = 1, #fields, 2 do info[fields[i]] = fields[i + 1] end
  if info['name'] == group then named = true end
  local limit = after(info['last-delivered-id'])
  if info['pending'] > 0 then
    local oldest = redis.call('XPENDING', stream, info['name'], '-', '+', 1)[1][1]
    if less(oldest, limit) then limit = oldest end
  end
  if below == nil or less(limit, below) then below = limit end
end
if not named then return 0 end
return redis.call('XTRIM', stream, 'MINID', below)
"""

# KEYS: stream, dead-letter stream. ARGV: group, consumer, id, deliveries, error, delete.
# Copies the entry to the dead-letter stream and acknowledges it, atomically,
# if it is still pending to this consumer (else another consumer claimed it
# meanwhile and owns it now). Returns 1 if it was moved.
_SETTLE_FAILURE = (
    _BURY_FUNCTION
    + """
local stream, dead, group, consumer, id = KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]
local pending = redis.call('XPENDING', stream, group, id, id, 1)
if #pending == 0 or pending[1][2] ~= consumer then return 0 end
local entry = redis.call('XRANGE', stream, id, id)
local fields = {}
if #entry > 0 then fields = entry[1][2] end
bury(stream, dead, group, consumer, id, fields, ARGV[4], ARGV[5], ARGV[6])
return 1
"""
)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@attrs.frozen
class StreamStats:
    """A snapshot of a :class:`StreamSource`'s counters (this process only)."""

    delivered: int  #: entries handed out, claimed ones included
    claimed: int  #: entries taken over after ``min_idle`` (included in ``delivered``)
    acked: int  #: successes acknowledged
    failed: int  #: failures left pending for another delivery
    dead_lettered: int  #: entries this consumer moved to the dead-letter stream
    in_flight: int  #: handed out and not yet settled


class StreamSource(Deliveries[AnyStr]):
    """A Redis Streams consumer group as corral's input: an async iterable of
    :class:`Delivery`, with at-least-once delivery.

    Feed it to :func:`~corral.apply_to_each` or a :class:`~corral.Pool` and
    pass :meth:`settle` as ``on_outcome``, so that each outcome is settled::

        async with coredis.Redis() as client, StreamSource(
            client, "orders", group="billing", consumer="worker-1"
        ) as source:
            async with apply_to_each(
                charge, source, workers=20, retry=Retry(3), on_outcome=source.settle
            ) as outcomes:
                async for outcome in outcomes:
                    ...

    * **Backpressure reaches Redis.** It reads (``XREADGROUP``) at most as many
      entries as it has room for: ``max_in_flight`` minus the deliveries handed
      out and not yet settled. A slow pool leaves the entries in Redis, for
      other consumers to take.
    * **Acknowledged after success.** :meth:`settle` acknowledges a success
      (``XACK``, batched through a :class:`~corral.Batcher`: within 10 ms,
      or when the source's block ends). A failure stays pending: after
      ``redeliver_after`` seconds (default ``min_idle``) any consumer of the
      group claims it (``XAUTOCLAIM``) and it is delivered again. A failure on
      its ``max_deliveries``-th delivery, or one that matches
      ``dead_letter_on`` (an error retrying cannot mend), is copied to the
      ``dead_letter`` stream and acknowledged, in one atomic step, with the
      fields ``corral:stream``, ``corral:id``, ``corral:group``,
      ``corral:consumer`` (the consumer that moved it), ``corral:deliveries``
      and ``corral:error`` added. An entry deleted from the stream (``XDEL``,
      trimming) while pending is dead-lettered by its ID alone when claimed.
      With ``delete_acked=True``, the step that acknowledges an entry (a
      success, or a failure it dead-letters) also deletes it from the stream
      (``XACK`` and ``XDEL`` in one script), so a drained stream holds nothing:
      use it only when this group is the stream's only reader.
    * **Claims renewed while handled.** Every ``min_idle / 3`` seconds a task
      of the source's block resets the idle time of the entries the source
      holds (read and not handed out yet, or handed out and not settled), in
      one round trip that touches only those still pending to this consumer
      (``XCLAIM ... JUSTID``: the delivery count stays). So a handler may run
      for longer than ``min_idle`` without another consumer claiming its
      entry. A renewal that fails (Redis unreachable) is logged at WARNING on
      the ``corral.redis`` logger and tried again at the next interval.
    * **Dead consumers.** Entries pending to a consumer that died (its
      process, or its block, ended without settling them) are no longer
      renewed: any consumer of the group claims them once idle ``min_idle``
      seconds. So ``min_idle`` bounds how long a dead consumer's entries
      wait, not how long a handler may take; but a consumer that cannot
      renew for ``min_idle`` seconds (Redis out of its reach, a blocked event
      loop) loses its entries to the others, and they may run twice. An entry
      delivered more than ``max_deliveries`` times without ever being settled
      (it crashed every consumer it reached) goes to the dead-letter stream
      when it is claimed, without being handed out again.
    * **Leaving the block** sends the acknowledgements of everything settled,
      and hands back the entries read but never handed out (claimable at
      once, their delivery undone), also when the block is cancelled
      (shielded, within ``timeout``). Deliveries handed out and not settled
      by then stay pending and are claimed after ``min_idle``, by any
      consumer, this one included when it comes back. If the
      acknowledgements cannot be sent even on a last try, those successes
      stay pending too (and run again): a block that ends with an exception
      raises that exception all the same; a block that ends cleanly raises
      :class:`~corral.redis.RedisUnavailable` saying how many.

    The group is created (with the stream, if missing) when the block is
    entered (:class:`~corral.redis.RedisUnavailable` if Redis cannot be
    reached; ``RuntimeError`` if the source is running already);
    ``group_start`` says where a new group begins: ``"0"``, the whole stream,
    or ``"$"``, only entries added from now on.

    Iteration runs until :meth:`stop` is called or, with
    ``stop_when_drained=True``, until the group has nothing left: no entry
    undelivered and none pending anywhere (all acknowledged or dead-lettered;
    so an empty stream counts as drained). If Redis cannot be reached while
    reading, iteration ends with :class:`~corral.redis.RedisUnavailable`;
    nothing is lost, and a new source picks up where this one stopped.

    Every step of the iteration is a checkpoint. One that has a delivery
    read earlier at hand returns it at once. Otherwise it waits: for room while
    ``max_in_flight`` deliveries are unsettled, then for entries (each read
    waits up to ``block`` seconds, and reads repeat until entries come). It
    is cancel-safe: entries read but not handed out stay in the source for
    the next step (or are handed back at exit), and entries whose reply a
    cancellation cut off stay pending, claimed after ``min_idle``. One task
    iterates at a time (another gets :class:`anyio.BusyResourceError`);
    iterating outside the block raises :class:`~corral.PoolClosed`.

    Needs Redis 7.0 or newer (``XAUTOCLAIM`` reporting deleted entries).

    :param client: an entered ``coredis.Redis`` client.
    :param stream: the stream's key.
    :param group: the consumer group's name.
    :param consumer: this consumer's name, unique within the group (a restarted
        worker may reuse its name).
    :param max_in_flight: the most deliveries handed out and not settled.
    :param max_deliveries: deliveries before a failing entry is dead-lettered.
    :param dead_letter_on: errors that dead-letter an entry at once, whatever
        its deliveries: an exception type, a tuple of them, or a predicate
        (as ``Retry(on=...)``); None: only ``max_deliveries`` does.
    :param dead_letter: the dead-letter stream's key; default ``stream + ":dead"``.
    :param min_idle: seconds an entry must be pending untouched (not renewed)
        before another consumer may claim it: how long a dead consumer's
        entries wait. Claims are renewed every ``min_idle / 3`` seconds.
    :param redeliver_after: seconds before a failed entry may be delivered
        again, at most ``min_idle`` (the default). Claims are tried every
        ``min(min_idle, redeliver_after) / 2`` seconds.
    :param block: the longest one ``XREADGROUP`` waits for new entries, in seconds.
    :param group_start: the entry ID a new group starts after.
    :param stop_when_drained: end iteration once the group has no work left.
    :param delete_acked: also delete from the stream every entry this source
        acknowledges (or dead-letters), in the same atomic step.
    :param timeout: seconds a round trip may take, beyond ``block``, before
        :class:`~corral.redis.RedisUnavailable`.
    """

    def __init__(
        self,
        client: coredis.Redis[AnyStr],
        stream: str,
        group: str,
        consumer: str,
        *,
        max_in_flight: int = 100,
        max_deliveries: int = 5,
        dead_letter_on: ExceptionFilter | None = None,
        dead_letter: str | None = None,
        min_idle: float = 60.0,
        redeliver_after: float | None = None,
        block: float = 1.0,
        group_start: str = "0",
        stop_when_drained: bool = False,
        delete_acked: bool = False,
        timeout: float = 10.0,
    ) -> None:
        if not isinstance(client, coredis.Redis):
            raise TypeError(f"client must be a coredis.Redis client, got {client!r}")
        self.stream: str = check_name("stream", stream)
        self.group: str = check_name("group", group)
        self.consumer: str = check_name("consumer", consumer)
        self.max_in_flight: int = check_int("max_in_flight", max_in_flight, minimum=1)
        self.max_deliveries: int = check_int("max_deliveries", max_deliveries, minimum=1)
        self.dead_letter: str = _check_dead_letter(stream, dead_letter)
        if dead_letter_on is not None:
            check_on(dead_letter_on, "dead_letter_on")
        self.dead_letter_on = dead_letter_on
        self.min_idle: float
        self.redeliver_after: float
        self.min_idle, self.redeliver_after = _check_redelivery(min_idle, redeliver_after)
        self._claim_every = max(min(self.min_idle, self.redeliver_after) / 2, 0.001)
        self._min_idle_ms = max(1, round(self.min_idle * 1000))
        self.block: float = check_number("block", block, positive=True)
        self.group_start: str = check_name("group_start", group_start)
        self.stop_when_drained: bool = check_bool("stop_when_drained", stop_when_drained)
        self.delete_acked: bool = check_bool("delete_acked", delete_acked)
        self.timeout: float = check_timeout(timeout)
        self._client: coredis.Redis[AnyStr] = client
        self._claim_script: Script[AnyStr] = client.register_script(_CLAIM)
        self._settle_failure_script: Script[AnyStr] = client.register_script(_SETTLE_FAILURE)
        self._release_script: Script[AnyStr] = client.register_script(_RELEASE)
        self._renew_script: Script[AnyStr] = client.register_script(_RENEW)
        self._ack_delete_script: Script[AnyStr] = client.register_script(_ACK_DELETE)
        self._renewal_lock = anyio.Lock()  # see _renew_claims
        self._renewals: anyio.abc.TaskGroup | None = None  # the renewal task's, per block
        self._what = f"StreamSource(stream={stream!r}, group={group!r}, consumer={consumer!r})"
        self._init_deliveries(self.stream)
        self._running = False
        self._claim_cursor: str = "0-0"
        self._next_claim = -float("inf")
        self._acks: Batcher[str, None] = self._ack_batcher()
        self._claimed = self._acked = self._failed = self._buried = 0

    def __repr__(self) -> str:
        return self._what

    def _ack_batcher(self) -> Batcher[str, None]:
        """Acknowledgements wait up to 10 ms to share one XACK: with natural
        batching a fast pool sent one XACK per ~6 entries, and the round trips
        halved its throughput. A late XACK only widens the window in which a
        crash makes an entry run twice."""
        size = max(100, self.max_in_flight)
        return Batcher(self._ack, max_size=size, max_wait=_ACK_WAIT, name=f"acks for {self._what}")

    @property
    def stats(self) -> StreamStats:
        """A snapshot of this source's counters (:class:`StreamStats`)."""
        return StreamStats(
            delivered=self._delivered,
            claimed=self._claimed,
            acked=self._acked,
            failed=self._failed,
            dead_lettered=self._buried,
            in_flight=self._in_flight_count,
        )

    async def __aenter__(self) -> StreamSource[AnyStr]:
        if self._running:
            raise RuntimeError(f"{self!r} is already running")
        with contextlib.suppress(StreamDuplicateConsumerGroupError):  # it exists: join it
            await round_trip(
                self._client.xgroup_create(
                    self.stream, self.group, self.group_start, mkstream=True
                ),
                within=self.timeout,
                what=self._what,
            )
        await self._acks.__aenter__()
        # the renewal task lives in a task group of this block, entered last
        # (no checkpoint after it) and left first
        renewals = self._renewals = anyio.create_task_group()
        await renewals.__aenter__()
        renewals.start_soon(self._renew_claims, name=f"claim renewal of {self._what}")
        self._running, self._stopping = True, False
        self._next_claim = -float("inf")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._running = False
        self._stopping = True
        failed: FlushError | None = None
        try:
            await self._stop_renewing()
            suppress = await self._acks.__aexit__(exc_type, exc, tb)
        except FlushError as error:
            # _clean_up tries these acknowledgements once more; whether or not
            # that works, the block's own exception goes on, not one about them
            failed, suppress = error, None
        finally:
            unacked = await self._clean_up()
        if failed is not None and exc is None and unacked:
            raise RedisUnavailable(
                f"{self._what}: {unacked} successful entr{'y' if unacked == 1 else 'ies'} could "
                f"not be acknowledged ({failed.__cause__!r}); they stay pending and run "
                f"again after min_idle"
            ) from failed
        return suppress

    async def _stop_renewing(self) -> None:
        """Cancel the renewal task and leave its task group (before the
        entries read ahead are handed back: a renewal must not come after).
        The group's scope is shielded first, so that a cancellation of the
        block does not cut this short: the task ends at once, and the rest
        of the exit runs as it would without the group."""
        renewals, self._renewals = self._renewals, None
        if renewals is not None:
            renewals.cancel_scope.shield = True
            renewals.cancel_scope.cancel()
            await renewals.__aexit__(None, None, None)

    async def _renew_claims(self) -> None:
        """The renewal task: every ``min_idle / 3`` seconds, reset the idle
        time of the entries this source holds. A failure is logged and
        tried again at the next interval. A renewal and the release of a
        failure (redeliver_after) never cross in Redis, or the renewal could
        undo the release's idle time: both take ``_renewal_lock``."""
        while True:
            await anyio.sleep(self.min_idle / 3)
            if not self._in_flight and not self._buffer:
                continue
            try:
                async with self._renewal_lock:
                    # taken under the lock: a failure's release waits for it
                    held = [*self._in_flight, *(delivery.id for delivery in self._buffer)]
                    for start in range(0, len(held), _RENEW_CHUNK):
                        await self._renew(held[start : start + _RENEW_CHUNK])
            except RedisUnavailable as error:
                _log.warning("%s could not renew its claims, trying again: %s", self._what, error)
            except Exception:  # noqa: BLE001 - logged; the source goes on, renewing next time
                _log.warning(
                    "%s could not renew its claims, trying again", self._what, exc_info=True
                )

    async def _renew(self, ids: list[str]) -> None:
        await round_trip(
            self._renew_script(keys=[self.stream], args=[self.group, self.consumer, *ids]),
            within=self.timeout,
            what=self._what,
        )

    async def _clean_up(self) -> int:
        """Once, shielded, within ``timeout``: acknowledge the successes the
        ack batcher did not send (it does not flush when cancelled), and hand
        back the entries read but never handed out, with their delivery count
        as it was, claimable at once. Whatever fails here stays pending and
        runs again elsewhere after ``min_idle``: at least once, still. Returns
        how many acknowledgements could not be sent."""
        acks = self._acks.unflushed
        unread = [(delivery.id, delivery.deliveries - 1) for delivery in self._forget_deliveries()]
        unacked = len(acks)
        if not acks and not unread:
            return unacked
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout):
            # not even a Redis error may replace the exception leaving the block
            with contextlib.suppress(Exception):
                if acks:
                    await self._ack(acks)
                    unacked = 0
            with contextlib.suppress(Exception):
                if unread:
                    await self._release(unread, idle=self.min_idle)
        return unacked

    async def _release(self, entries: list[tuple[str, int]], idle: float) -> None:
        """Hand entries back to the group (see _RELEASE), as (id, delivery count)."""
        args: list[Any] = [self.group, self.consumer, round(idle * 1000)]
        for entry_id, deliveries in entries:
            args += [entry_id, deliveries]
        await round_trip(
            self._release_script(keys=[self.stream], args=args),
            within=self.timeout,
            what=self._what,
        )

    def _is_open(self) -> bool:
        return self._running

    async def _fetch(self) -> None:
        room = self._room()
        if room <= 0:
            await self._wait(None)
            return
        now = anyio.current_time()
        if now >= self._next_claim:
            if await self._claim(room):
                return
            # scanned to the end of the pending list: rest before the next scan
            self._next_claim = (now + self._claim_every) if self._claim_cursor == "0-0" else now
        if await self._read(room, min(self.block, self._next_claim - now)):
            return
        if self.stop_when_drained and self._in_flight_count == 0 and await self._drained():
            self._stopping = True

    async def _read(self, count: int, block: float) -> bool:
        block_ms = max(1, round(block * 1000))  # 0 would block forever
        reply = await round_trip(
            self._client.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms
            ),
            within=self.timeout + block_ms / 1000,
            what=self._what,
        )
        if not reply:
            return False
        for entries in reply.values():
            for entry in entries:
                fields: Any = entry.field_values
                self._buffer.append(Delivery(self.stream, _text(entry.identifier), fields, 1))
        return bool(self._buffer)

    async def _claim(self, count: int) -> bool:
        reply: Any = await round_trip(
            self._claim_script(
                keys=[self.stream, self.dead_letter],
                args=[
                    self.group,
                    self.consumer,
                    self._min_idle_ms,
                    self._claim_cursor,
                    count,
                    self.max_deliveries,
                    "1" if self.delete_acked else "0",
                ],
            ),
            within=self.timeout,
            what=self._what,
        )
        cursor, entries, buried = reply
        self._claim_cursor = _text(cursor)
        self._buried += int(buried)
        for entry_id, flat, deliveries in entries:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            self._buffer.append(Delivery(self.stream, _text(entry_id), fields, int(deliveries)))
            self._claimed += 1
        return bool(self._buffer)

    async def _drained(self) -> bool:
        groups: Any = await round_trip(
            self._client.xinfo_groups(self.stream), within=self.timeout, what=self._what
        )
        for raw in groups:
            info = {_text(key): value for key, value in raw.items()}  # bytes keys, or str
            if _text(info["name"]) == self.group:
                # lag: entries not yet delivered to the group; None after
                # deletions (or no such field before Redis 7): then the empty
                # read that preceded this call is the answer
                return bool(info["pending"] == 0 and info.get("lag") in (0, None))
        return False

    async def settle(self, outcome: Outcome[Delivery[AnyStr], R]) -> None:
        """Settle one delivery by its outcome: pass it as ``on_outcome``.

        A success is acknowledged: queued for a batched ``XACK``, a
        checkpoint that waits only while acknowledgements back up. A failure
        stays pending for another delivery after ``redeliver_after``; on its
        ``max_deliveries``-th delivery, or if it matches ``dead_letter_on``,
        it goes to the dead-letter stream. A failure takes one round trip
        when it is dead-lettered or ``redeliver_after`` is below
        ``min_idle``, and none otherwise; if Redis cannot be reached, it stays
        pending all the same, and no error is raised. Always a checkpoint.

        Once the checks pass, the delivery counts as settled here (its room
        in ``max_in_flight`` is freed) before anything is awaited. If the
        call is cancelled after that, the entry may stay pending in Redis
        instead of being acknowledged or dead-lettered: it is delivered again
        after ``min_idle`` (at least once, still).

        :raises PoolClosed: the source's block is not running.
        :raises TypeError: the outcome's item is not a :class:`Delivery`.
        :raises ValueError: it is not one this source handed out and has not
            settled yet.
        """
        delivery = await self._settling(outcome)
        error = outcome.error
        if error is None:
            await self._acks.add(delivery.id)
            return
        # A failure. If Redis cannot be reached to dead-letter it or to hurry
        # its redelivery, it stays pending all the same: claimed after
        # min_idle, and dead-lettered then if its deliveries are spent.
        with contextlib.suppress(RedisUnavailable):
            if delivery.deliveries >= self.max_deliveries or (
                self.dead_letter_on is not None and matches(self.dead_letter_on, error)
            ):
                moved: Any = await round_trip(
                    self._settle_failure_script(
                        keys=[self.stream, self.dead_letter],
                        args=[
                            self.group,
                            self.consumer,
                            delivery.id,
                            delivery.deliveries,
                            repr(error),
                            "1" if self.delete_acked else "0",
                        ],
                    ),
                    within=self.timeout,
                    what=self._what,
                )
                if moved:
                    self._buried += 1
                    return
            elif self.redeliver_after < self.min_idle:
                async with self._renewal_lock:  # not undone by a renewal already under way
                    await self._release(
                        [(delivery.id, delivery.deliveries)],
                        idle=self.min_idle - self.redeliver_after,
                    )
        self._failed += 1
        await checkpoint()  # also when it left the failure pending without a round trip

    async def _ack(self, ids: list[str]) -> None:
        request: Awaitable[Any] = (
            self._ack_delete_script(keys=[self.stream], args=[self.group, *ids])
            if self.delete_acked
            else self._client.xack(self.stream, self.group, ids)
        )
        acked = await round_trip(request, within=self.timeout, what=self._what)
        self._acked += int(acked)


class StreamSink(Generic[AnyStr]):
    """Entries to a Redis stream, added in batches: each batch is one pipelined
    round trip of ``XADD``\\ s, through a :class:`~corral.Batcher` (natural
    batching by default: a batch goes as soon as the last one is written, so
    batches grow under load and latency stays low when idle). For example::

        async with StreamSink(client, "results") as sink:
            await sink.add({"order": "42", "status": "charged"})

    Leaving the block writes everything added and waits for it (see
    :class:`~corral.Batcher`): if a write that starts after the block ended
    fails, :class:`~corral.FlushError` is raised and the entries not written
    are in :attr:`unflushed`. :meth:`submit` waits for its own entry and
    returns its ID.

    Writes are at least once: a batch whose round trip failed or timed out
    part way is written again whole, so an entry can appear twice. Readers of
    the stream should tolerate that (key on a field of the entry).

    **Trimming what the groups have done.** With ``trim_acked_by="billing"``,
    each batch's round trip also trims the stream (``XTRIM MINID``, in a
    script) of the entries every consumer group of the stream is done with:
    every entry below, for each group, both its oldest pending entry and the
    entry after its last-delivered ID, so an entry still pending in, or not
    yet delivered to, any group is never dropped. A drained stream then stays
    short without a ``maxlen`` guess. Nothing is trimmed until the named
    group exists (so that entries written before their readers' group was
    made stay). A trim that fails is logged (``corral.redis``, WARNING) and does not
    fail the batch: its entries are written.

    :param client: an entered ``coredis.Redis`` client.
    :param stream: the stream's key.
    :param max_size: the most entries in one round trip.
    :param max_wait: seconds the oldest entry may wait for its batch to fill;
        None (the default) for natural batching.
    :param max_pending: how many queued entries make :meth:`add` wait; at
        least ``max_size``; default ``2 * max_size``.
    :param maxlen: trim the stream to about this many entries (``MAXLEN ~``).
    :param trim_acked_by: a consumer group's name: after each batch, trim the
        entries every group is done with, once this group exists (see above);
        None: no such trimming.
    :param retry: a :class:`~corral.Retry` policy per batch.
    :param timeout: seconds one round trip may take before
        :class:`~corral.redis.RedisUnavailable`.
    """

    def __init__(
        self,
        client: coredis.Redis[AnyStr],
        stream: str,
        *,
        max_size: int = 100,
        max_wait: float | None = None,
        max_pending: int | None = None,
        maxlen: int | None = None,
        trim_acked_by: str | None = None,
        retry: Retry | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not isinstance(client, coredis.Redis):
            raise TypeError(f"client must be a coredis.Redis client, got {client!r}")
        self.stream: str = check_name("stream", stream)
        self.maxlen: int | None = None if maxlen is None else check_int("maxlen", maxlen, minimum=1)
        self.trim_acked_by: str | None = (
            None if trim_acked_by is None else check_name("trim_acked_by", trim_acked_by)
        )
        self.timeout: float = check_timeout(timeout)
        self._client: coredis.Redis[AnyStr] = client
        self._trim_acked_script: Script[AnyStr] = client.register_script(_TRIM_ACKED)
        self._trim: dict[str, Any] = {}  # XADD's options, the same for every entry
        if self.maxlen is not None:
            self._trim = {
                "trim_strategy": coredis.PureToken.MAXLEN,
                "threshold": self.maxlen,
                "trim_operator": coredis.PureToken.APPROXIMATELY,
            }
        self._what = f"StreamSink(stream={stream!r})"
        self._batcher: Batcher[Mapping[Any, Any], str] = Batcher(
            self._write, max_size=max_size, max_wait=max_wait, max_pending=max_pending,
            retry=retry, name=self._what,
        )  # fmt: skip

    def __repr__(self) -> str:
        return self._what

    @property
    def stats(self) -> BatcherStats:
        """The underlying :class:`~corral.Batcher`'s counters: ``flushes`` are
        round trips, ``flushed`` entries written."""
        return self._batcher.stats

    @property
    def unflushed(self) -> list[Mapping[Any, Any]]:
        """Entries not written when the block ended (cancelled, or the final
        write failed), in the order they were added."""
        return self._batcher.unflushed

    async def __aenter__(self) -> StreamSink[AnyStr]:
        await self._batcher.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._batcher.__aexit__(exc_type, exc, tb)

    def _check(self, fields: object) -> Mapping[Any, Any]:
        if not isinstance(fields, Mapping):
            raise TypeError(f"fields must be a mapping of field to value, got {fields!r}")
        if not fields:
            raise ValueError("fields must not be empty: a stream entry needs a field")
        return fields

    async def add(self, fields: Mapping[Any, Any]) -> None:
        """Queue one entry; waits while ``max_pending`` entries are queued.

        A checkpoint once ``fields`` is accepted. Cancel-safe: if it raises,
        the entry was not queued; if it returns, it was.

        :raises TypeError: ``fields`` is not a mapping.
        :raises ValueError: ``fields`` is empty.
        :raises PoolClosed: the sink's block is not running.
        """
        await self._batcher.add(self._check(fields))

    def add_nowait(self, fields: Mapping[Any, Any]) -> None:
        """Queue one entry without waiting, or raise. Never waits and is not a
        checkpoint.

        :raises corral.QueueFull: ``max_pending`` entries are queued.
        :raises TypeError: ``fields`` is not a mapping.
        :raises ValueError: ``fields`` is empty.
        :raises PoolClosed: the sink's block is not running.
        """
        self._batcher.add_nowait(self._check(fields))

    async def submit(self, fields: Mapping[Any, Any]) -> str:
        """Queue one entry and wait until it is written; its stream ID.

        Waits for room like :meth:`add`, then for its batch's round trip.
        Always a checkpoint once ``fields`` is accepted. If it raises while
        waiting for room, the entry was not queued; once queued, it is
        written even if the caller is cancelled (or listed in
        :attr:`unflushed`).

        :raises corral.redis.RedisUnavailable: its batch's write failed
            (after ``retry``) because Redis could not be reached; any other
            error of the write is raised as it is. The entry may have been
            written or not; it is not written again.
        :raises TypeError: ``fields`` is not a mapping.
        :raises ValueError: ``fields`` is empty.
        :raises PoolClosed: the sink's block is not running, or it stopped
            before the entry was written.
        """
        return await self._batcher.submit(self._check(fields))

    async def _write(self, batch: list[Mapping[Any, Any]]) -> list[str]:
        group = self.trim_acked_by
        trim_again = False  # the trim script was not loaded: run it once more, loading it

        async def write() -> list[str]:
            nonlocal trim_again
            # errors come back per command (raise_on_error=False): a trim that
            # fails must not fail the batch, or its entries would be written twice
            async with self._client.pipeline(transaction=False, raise_on_error=False) as pipe:
                requests = [pipe.xadd(self.stream, fields, **self._trim) for fields in batch]
                # EVALSHA itself, not the Script: a pipeline that runs a Script
                # first asks Redis whether it is loaded, a round trip more
                trim = None if group is None else pipe.evalsha(
                    self._trim_acked_script.sha, keys=[self.stream], args=[group]
                )  # fmt: skip
            ids: list[Any] = [await request for request in requests]
            if trim is not None:
                try:
                    await trim
                except NoScriptError:  # the first time, or after a SCRIPT FLUSH
                    trim_again = True
                except Exception:  # noqa: BLE001 - logged; the batch is written all the same
                    _log.warning("%s could not trim the stream", self._what, exc_info=True)
            return [_text(entry_id) for entry_id in ids]

        ids = await round_trip(write(), within=self.timeout, what=self._what)
        if trim_again and group is not None:
            await self._trim_acked(group)
        return ids

    async def _trim_acked(self, group: str) -> None:
        """Trim with the script, loading it (the batch is written: a failure
        here is only logged)."""
        try:
            await round_trip(
                self._trim_acked_script(keys=[self.stream], args=[group]),
                within=self.timeout,
                what=self._what,
            )
        except Exception:  # noqa: BLE001 - logged; the batch was written all the same
            _log.warning("%s could not trim the stream", self._what, exc_info=True)


def _check_dead_letter(stream: str, dead_letter: str | None) -> str:
    """The dead-letter stream's name: ``<stream>:dead`` by default."""
    name = f"{stream}:dead" if dead_letter is None else check_name("dead_letter", dead_letter)
    if name == stream:
        raise ValueError(f"dead_letter must differ from stream, got {dead_letter!r}")
    return name


def _check_redelivery(min_idle: float, redeliver_after: float | None) -> tuple[float, float]:
    """``min_idle`` and ``redeliver_after`` (default ``min_idle``), checked."""
    idle = check_number("min_idle", min_idle, positive=True)
    after = idle if redeliver_after is None else check_number("redeliver_after", redeliver_after)
    if after > idle:
        raise ValueError(
            f"redeliver_after must be <= min_idle ({min_idle!r}), got {redeliver_after!r}: "
            "after min_idle any consumer may claim the entry anyway"
        )
    return idle, after
