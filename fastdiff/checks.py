"""Argument checks every public entry point shares: a bad value is refused with its name, the values
accepted, and what it got — never coerced. Numbers must be finite (NaN and ±Inf are refused)."""

from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_number", "check_choice", "check_seed", "MAX_SEED"]

MAX_SEED = 2**63 - 1   # the largest seed a torch.Generator takes


def _bounds(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '≥'} {low}"
    if high is not None:
        return f"{'<' if high_open else '≤'} {high}"
    return ""


def check_int(value, name: str, low: int | None = None, high: int | None = None, *, optional: bool = False):
    """`value` as an int within [low, high] (None passes when `optional`)."""
    if value is None and optional:
        return None
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or (low is not None and value < low) or (high is not None and value > high)):
        what = " ".join(filter(None, ["an integer", _bounds(low, high)]))
        raise ValueError(f"{name} must be {what}{' or None' if optional else ''}, got {value!r}")
    return int(value)


def check_number(value, name: str, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, optional: bool = False):
    """`value` as a finite float within the bounds (open ones with `low_open` / `high_open`)."""
    if value is None and optional:
        return None
    bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
    if not bad:
        bad = ((low is not None and (value < low or (low_open and value == low)))
               or (high is not None and (value > high or (high_open and value == high))))
    if bad:
        what = " ".join(filter(None, ["a finite number", _bounds(low, high, low_open, high_open)]))
        raise ValueError(f"{name} must be {what}{' or None' if optional else ''}, got {value!r}")
    return float(value)


def check_seed(value, name: str = "seed") -> int:
    """`value` as a seed a torch.Generator takes: an integer in [0, MAX_SEED]."""
    return check_int(value, name, 0, MAX_SEED)


def check_choice(value, name: str, choices):
    """`value` if it is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
