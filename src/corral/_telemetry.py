"""The seam where an instrumentation watches pools and batchers.

``corral.otel`` installs an :class:`Instrumentation` here; the engine asks it
for a :class:`Probe` once per entry into a block (``Block.__aenter__``) and
calls the probe only at places that exist for it: a layer around each attempt,
the record step's sinks, a failed flush, the end of the block. With nothing
installed, a block's probe is None and the per-item path is the same code as
without this module, but for one test in ``Pool.submit`` (``run.on_submit``,
set for a traced pool).

This module imports nothing of OpenTelemetry: the engine stays on anyio and
attrs alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

__all__ = ["Instrumentation", "Probe", "install", "installed", "probe_for"]

Call = Callable[[Any], Awaitable[Any]]


class Probe(Protocol):
    """One entry into one block, as an instrumentation sees it."""

    # a span per item (a pool) or per flush (a batcher): then a pool says when
    # each item is submitted (``submitted``) and wraps its chain in ``item``
    traced: bool

    def attempt(self, call_next: Call) -> Call:
        """The innermost layer of the chain: one call of the handler or flush."""
        ...

    def flush(self, call_next: Call) -> Call:
        """A batcher's layer around each flush (with its retries)."""
        ...

    def submitted(self, index: int) -> None:
        """Item ``index`` was submitted (called in the submitter's task)."""
        ...

    def item(self, call_next: Call, index_of: Callable[[], int]) -> Call:
        """The outermost layer of a traced pool's chain: one item, whose index
        ``index_of()`` tells."""
        ...

    def outcome(self, outcome: Any) -> None:
        """A pool's record step: an item's Outcome."""
        ...

    def failed(self, count: int, error: Exception) -> None:
        """``count`` of a batcher's items failed with ``error``: a job whose
        flush failed or that was cancelled while queued, or a ``submit`` item
        whose caller saw its flush's error."""
        ...

    def ended(self, unfinished: int) -> None:
        """The block's tasks ended; ``unfinished`` items got no outcome (called
        again for an item that came back after the end)."""
        ...


class Instrumentation(Protocol):
    def probe(self, block: Any, kind: str, clock: Callable[[], float]) -> Probe:
        """The probe of one entry into ``block`` (``kind``: pool or batcher;
        ``clock``: the running loop's, which times attempts)."""
        ...


_installed: Instrumentation | None = None


def install(instrumentation: Instrumentation | None) -> None:
    """Make ``instrumentation`` watch every block entered from now on (None: stop)."""
    global _installed
    _installed = instrumentation


def installed() -> Instrumentation | None:
    return _installed


def probe_for(block: Any, kind: str, clock: Callable[[], float]) -> Probe | None:
    """The probe of a block being entered, if an instrumentation is installed."""
    return None if _installed is None else _installed.probe(block, kind, clock)
