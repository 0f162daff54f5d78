"""Delivery: one entry of a durable queue handed to a consumer.

Shared by the queue sources (``corral.redis.StreamSource``,
``corral.sqlite.QueueSource``), so that a handler written for one takes the
other unchanged. It needs nothing beyond attrs, so importing it never needs
an optional extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import AnyStr, Generic

import attrs

__all__ = ["Delivery"]


@attrs.frozen
class Delivery(Generic[AnyStr]):
    """One queue entry handed to this consumer.

    ``stream`` is the name of the queue it came from (a Redis stream's key, or
    a SQLite queue's name), ``id`` its ID there. ``fields`` are the entry's
    field/value pairs, as ``str`` (or ``bytes``, as a Redis client decodes
    them). ``deliveries`` counts how many times the entry has been handed
    out, this time included: more than 1 means an earlier attempt failed or
    its consumer died, so the handler may be running it a second time (make it
    idempotent).
    """

    stream: str
    id: str
    fields: Mapping[AnyStr, AnyStr]
    deliveries: int
