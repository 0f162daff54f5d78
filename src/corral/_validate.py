"""Argument checks shared by every entry point: one message style, parameter named."""

from __future__ import annotations

import math

__all__ = ["check_bool", "check_int", "check_number", "check_optional_str"]


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Return ``value`` if it is an int >= ``minimum``; else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_number(name: str, value: object, *, positive: bool = False, finite: bool = True) -> float:
    """Return ``value`` as a float if it is a (finite) non-negative (or positive)
    real number; else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if math.isnan(number) or number < 0 or (positive and number == 0):
        wanted = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    if finite and math.isinf(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_optional_str(name: str, value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, got {value!r}")
    return value
