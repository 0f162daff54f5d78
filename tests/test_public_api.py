"""The public surface: every name in __all__ exists, is documented, and nothing
public is missing from it."""

from __future__ import annotations

import inspect

import anyio
import pytest

import corral


def test_all_names_exist_and_are_documented() -> None:
    """Every exported name resolves and has a docstring."""
    for name in corral.__all__:
        obj = getattr(corral, name)
        assert inspect.getdoc(obj), f"{name} has no docstring"


def test_all_is_complete() -> None:
    """Every public attribute of the package (not a module) is in __all__."""
    public = {
        name
        for name, value in vars(corral).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(corral.__all__)


def test_error_hierarchy() -> None:
    """The errors subclass what the contract says, so anyio-aware code handles them."""
    assert issubclass(corral.QueueFull, anyio.WouldBlock)
    assert issubclass(corral.QueueFull, corral.CorralError)
    assert issubclass(corral.PoolClosed, anyio.ClosedResourceError)
    assert issubclass(corral.PoolClosed, corral.CorralError)
    assert issubclass(corral.FlushError, corral.CorralError)
    error = corral.FlushError("final flush failed", items=[1, 2])
    assert error.items == [1, 2]
    assert issubclass(corral.CircuitOpen, corral.CorralError)
    assert corral.CircuitOpen("open", retry_after=2.5).retry_after == 2.5
    assert issubclass(corral.RetryError, corral.CorralError)
    gave_up = corral.RetryError("gave up", result="pending", attempts=3)
    assert (gave_up.result, gave_up.attempts) == ("pending", 3)


@pytest.mark.parametrize("name", ["Pool", "Queue", "apply_to_all", "apply_to_each"])
def test_entry_points_have_runnable_examples(name: str) -> None:
    """Each entry point's docstring carries an example (run by the doctest pass)."""
    assert ">>>" in (inspect.getdoc(getattr(corral, name)) or "")
