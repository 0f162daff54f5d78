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
the same atomic step that copies it to the dead-letter stream. Everything else
(a crash, a cancellation, a failure with deliveries left) leaves it pending,
and any consumer of the group claims it once it has been idle ``min_idle``
seconds. That is at-least-once delivery: an entry may be handled twice (its
consumer died after handling it, before the acknowledgement), never lost.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Any, AnyStr, Generic, TypeVar

import anyio
import attrs
import coredis
from anyio.lowlevel import checkpoint
from coredis.commands.script import Script
from coredis.exceptions import StreamDuplicateConsumerGroupError

from .._batcher import Batcher, BatcherStats
from .._delivery import Delivery
from .._errors import FlushError, PoolClosed
from .._outcome import Outcome
from .._retry import ExceptionFilter, Retry, check_on, matches
from .._validate import check_bool, check_int, check_number
from ._common import RedisUnavailable, check_name, check_timeout, round_trip

__all__ = ["Delivery", "StreamSink", "StreamSource", "StreamStats"]

R = TypeVar("R")

_ACK_WAIT = 0.01  # seconds a success's XACK may wait for others to share it

# Lua shared by the scripts: copy an entry to the dead-letter stream with
# where it came from and why, and acknowledge it (in the calling script's one
# atomic step).
_BURY_FUNCTION = """
local function bury(stream, dead, group, consumer, id, fields, deliveries, reason)
  local copy = {}
  for _, value in ipairs(fields) do table.insert(copy, value) end
  for _, value in ipairs({'corral:stream', stream, 'corral:id', id, 'corral:group', group,
                          'corral:consumer', consumer, 'corral:deliveries', deliveries,
                          'corral:error', reason}) do
    table.insert(copy, value)
  end
  redis.call('XADD', dead, '*', unpack(copy))
  redis.call('XACK', stream, group, id)
end
"""

# KEYS: stream, dead-letter stream.
# ARGV: group, consumer, min_idle_ms, cursor, count, max_deliveries.
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
             'never settled: its consumers died or stalled')
        buried = buried + 1
      else
        table.insert(out, {id, fields, deliveries})
      end
    end
  end
  for _, id in ipairs(claimed[3] or {}) do
    bury(stream, dead, group, consumer, id, {}, 'unknown',
         'deleted from the stream while pending')
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
_RELEASE = """
local stream, group, consumer, idle = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local released = 0
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local pending = redis.call('XPENDING', stream, group, id, id, 1)
  if #pending > 0 and pending[1][2] == consumer
     and #redis.call('XRANGE', stream, id, id) > 0 then
    redis.call('XCLAIM', stream, group, consumer, 0, id, 'IDLE', idle,
               'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
    released = released + 1
  end
end
return released
"""

# KEYS: stream, dead-letter stream. ARGV: group, consumer, id, deliveries, error.
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
bury(stream, dead, group, consumer, id, fields, ARGV[4], ARGV[5])
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


class StreamSource(Generic[AnyStr]):
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
    * **Dead consumers.** Entries pending to a consumer that died are claimed
      once idle ``min_idle`` seconds, so set it above your longest handling
      time (retries included), or a slow success is delivered twice. An entry
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
    :param min_idle: seconds an entry must be pending untouched before another
        consumer may claim it: how long a dead consumer's entries wait.
    :param redeliver_after: seconds before a failed entry may be delivered
        again, at most ``min_idle`` (the default). Claims are tried every
        ``min(min_idle, redeliver_after) / 2`` seconds.
    :param block: the longest one ``XREADGROUP`` waits for new entries, in seconds.
    :param group_start: the entry ID a new group starts after.
    :param stop_when_drained: end iteration once the group has no work left.
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
        self.timeout: float = check_timeout(timeout)
        self._client: coredis.Redis[AnyStr] = client
        self._claim_script: Script[AnyStr] = client.register_script(_CLAIM)
        self._settle_failure_script: Script[AnyStr] = client.register_script(_SETTLE_FAILURE)
        self._release_script: Script[AnyStr] = client.register_script(_RELEASE)
        self._what = f"StreamSource(stream={stream!r}, group={group!r}, consumer={consumer!r})"
        self._buffer: deque[Delivery[AnyStr]] = deque()
        self._in_flight: dict[str, int] = {}  # id -> deliveries of it handed out, unsettled
        self._in_flight_count = 0
        self._room: anyio.Event | None = None  # set when settle frees room
        self._stopping = False
        self._running = False
        self._reading = False  # one task iterates at a time
        self._claim_cursor: str = "0-0"
        self._next_claim = -float("inf")
        self._acks: Batcher[str, None] = self._ack_batcher()
        self._delivered = self._claimed = self._acked = self._failed = self._buried = 0

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
        self._in_flight.clear()
        self._in_flight_count = 0
        failed: FlushError | None = None
        try:
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

    async def _clean_up(self) -> int:
        """Once, shielded, within ``timeout``: acknowledge the successes the
        ack batcher did not send (it does not flush when cancelled), and hand
        back the entries read but never handed out, with their delivery count
        as it was, claimable at once. Whatever fails here stays pending and
        runs again elsewhere after ``min_idle``: at least once, still. Returns
        how many acknowledgements could not be sent."""
        acks = self._acks.unflushed
        unread = [(delivery.id, delivery.deliveries - 1) for delivery in self._buffer]
        self._buffer.clear()
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

    def stop(self) -> None:
        """End the iteration: the next ``__anext__`` (or the one waiting now,
        within ``block`` seconds) raises ``StopAsyncIteration``. Deliveries
        already handed out can still be settled until the block ends. Never
        waits."""
        self._stopping = True
        if self._room is not None:
            self._room.set()

    def __aiter__(self) -> StreamSource[AnyStr]:
        return self

    async def __anext__(self) -> Delivery[AnyStr]:
        if not self._running:
            raise PoolClosed(f"{self!r} is not running: iterate it inside `async with source:`")
        if self._reading:
            raise anyio.BusyResourceError("reading from")
        self._reading = True
        try:
            return await self._next()
        finally:
            self._reading = False

    async def _next(self) -> Delivery[AnyStr]:
        while True:
            if self._stopping:
                await checkpoint()  # the last step is a checkpoint too
                raise StopAsyncIteration
            if self._buffer:
                await checkpoint()  # a checkpoint on the fast path too, before taking it
                if self._stopping or not self._buffer:
                    continue
                delivery = self._buffer.popleft()
                self._in_flight[delivery.id] = self._in_flight.get(delivery.id, 0) + 1
                self._in_flight_count += 1
                self._delivered += 1
                return delivery
            room = self.max_in_flight - self._in_flight_count
            if room <= 0:
                self._room = anyio.Event()
                await self._room.wait()
                continue
            now = anyio.current_time()
            if now >= self._next_claim:
                if await self._claim(room):
                    continue
                # scanned to the end of the pending list: rest before the next scan
                self._next_claim = (now + self._claim_every) if self._claim_cursor == "0-0" else now
            if await self._read(room, min(self.block, self._next_claim - now)):
                continue
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
        if not self._running:
            raise PoolClosed(
                f"{self!r} is not running: settle outcomes inside its block "
                "(enter the pool inside `async with source:`)"
            )
        delivery = outcome.item
        if not isinstance(delivery, Delivery):
            raise TypeError(f"settle takes the Outcome of a Delivery, got item {delivery!r}")
        count = self._in_flight.get(delivery.id) if delivery.stream == self.stream else None
        if not count:
            raise ValueError(f"{delivery!r} was not handed out by {self!r}, or already settled")
        if count == 1:
            del self._in_flight[delivery.id]
        else:
            self._in_flight[delivery.id] = count - 1
        self._in_flight_count -= 1
        room, self._room = self._room, None
        if room is not None:
            room.set()
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
                        ],
                    ),
                    within=self.timeout,
                    what=self._what,
                )
                if moved:
                    self._buried += 1
                    return
            elif self.redeliver_after < self.min_idle:
                await self._release(
                    [(delivery.id, delivery.deliveries)], idle=self.min_idle - self.redeliver_after
                )
        self._failed += 1
        await checkpoint()  # also when it left the failure pending without a round trip

    async def _ack(self, ids: list[str]) -> None:
        acked = await round_trip(
            self._client.xack(self.stream, self.group, ids), within=self.timeout, what=self._what
        )
        self._acked += acked


class StreamSink(Generic[AnyStr]):
    """Entries to a Redis stream, added in batches: each batch is one pipelined
    round trip of ``XADD``\\ s, through a :class:`~corral.Batcher` (natural
    batching by default: a batch goes as soon as the last one is written, so
    batches grow under load and latency stays low when idle).

    ::

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

    :param client: an entered ``coredis.Redis`` client.
    :param stream: the stream's key.
    :param max_size: the most entries in one round trip.
    :param max_wait: seconds the oldest entry may wait for its batch to fill;
        None (the default) for natural batching.
    :param max_pending: how many queued entries make :meth:`add` wait; at
        least ``max_size``; default ``2 * max_size``.
    :param maxlen: trim the stream to about this many entries (``MAXLEN ~``).
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
        retry: Retry | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not isinstance(client, coredis.Redis):
            raise TypeError(f"client must be a coredis.Redis client, got {client!r}")
        self.stream: str = check_name("stream", stream)
        self.maxlen: int | None = None if maxlen is None else check_int("maxlen", maxlen, minimum=1)
        self.timeout: float = check_timeout(timeout)
        self._client: coredis.Redis[AnyStr] = client
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
        async def write() -> list[str]:
            async with self._client.pipeline(transaction=False) as pipe:
                requests = [pipe.xadd(self.stream, fields, **self._trim) for fields in batch]
            ids: list[Any] = [await request for request in requests]
            return [_text(entry_id) for entry_id in ids]

        return await round_trip(write(), within=self.timeout, what=self._what)


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
