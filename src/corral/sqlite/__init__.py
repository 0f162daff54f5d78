"""corral on SQLite: a durable work queue in one file, for one machine.

Needs nothing beyond the standard library's ``sqlite3`` (run in worker
threads, so everything here works on asyncio, uvloop and trio).

* :class:`QueueSink` -- entries into the queue, in batches, one transaction
  per batch; with ``key=``, an entry the queue already holds is not added
  again.
* :class:`QueueSource` -- the queue as the input of a :class:`~corral.Pool`
  or :func:`~corral.apply_to_each`: at-least-once delivery under leases
  renewed while the handler runs, done after success only, failures handed
  out again, dead letters. The same interface as
  :class:`corral.redis.StreamSource`: moving to Redis later is one line.
* ``python -m corral.sqlite PATH`` prints a queue file's counts; ``--dead``
  lists its dead letters.

The exceptions: :class:`QueueError` (the file cannot be used: not a SQLite
database, corrupt, another program's, read-only, the disk full, or locked
for longer than ``timeout``), a :class:`~corral.CorralError`.
"""

from __future__ import annotations

from .._delivery import Delivery as Delivery
from ._queue import QueueSink as QueueSink
from ._queue import QueueSource as QueueSource
from ._queue import QueueStats as QueueStats
from ._store import QueueCounts as QueueCounts
from ._store import QueueError as QueueError

__all__ = ["Delivery", "QueueCounts", "QueueError", "QueueSink", "QueueSource", "QueueStats"]
