"""Outcome: a frozen value with ok / unwrap; generic over item and result."""

from __future__ import annotations

import attrs
import pytest

from corral import Outcome


def test_success_outcome() -> None:
    """A success has ok True, unwrap() gives the result."""
    outcome: Outcome[str, int] = Outcome(item="a", index=0, id=0, result=1, elapsed=0.5)
    assert outcome.ok
    assert outcome.unwrap() == 1
    assert outcome.attempts == 1
    assert outcome.error is None


def test_failure_outcome_unwrap_raises_the_error() -> None:
    """A failure has ok False and unwrap() raises the very exception."""
    error = ValueError("nope")
    outcome: Outcome[str, int] = Outcome(item="a", index=3, id="x", error=error, attempts=2)
    assert not outcome.ok
    with pytest.raises(ValueError, match="nope") as info:
        outcome.unwrap()
    assert info.value is error


def test_outcome_is_frozen_and_comparable() -> None:
    """Outcomes cannot be changed and compare by value."""
    a: Outcome[int, int] = Outcome(item=1, index=0, id=0, result=2)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        a.result = 3  # type: ignore[misc]
    assert a == Outcome(item=1, index=0, id=0, result=2)
    assert attrs.evolve(a, result=3).result == 3


def test_fast_constructor_makes_the_same_outcome() -> None:
    """The workers' private constructor makes a real, frozen Outcome with every
    field set: equal, same hash, same repr and fields as ``Outcome(...)``."""
    from corral._outcome import _make_outcome

    error = ValueError("x")
    made: Outcome[str, int] = _make_outcome("a", 3, "id", 7, error, 2, 0.25)
    expected: Outcome[str, int] = Outcome("a", 3, "id", 7, error, 2, 0.25)
    assert type(made) is Outcome
    assert made == expected
    assert hash(made) == hash(expected)
    assert repr(made) == repr(expected)
    assert attrs.asdict(made, recurse=False) == attrs.asdict(expected, recurse=False)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        made.result = 3  # type: ignore[misc]
