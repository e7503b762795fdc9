"""Argument checks every stage shares: a finite real number in range, a whole number in range.

Each raises a ValueError that names the argument and says what to pass, before anything changes. A bool
is refused where a number is wanted (``True`` is an int in Python, never a count the user meant).
"""
from __future__ import annotations

import math
import numbers


def check_real(name: str, value, low: float, inclusive: bool = True, extra: str = "") -> None:
    """A ValueError naming ``name`` unless ``value`` is a finite real number ``>= low`` (``> low``)."""
    bound = f"{'>=' if inclusive else '>'} {low:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number {bound}{' ' + extra if extra else ''}, "
                         f"got {value!r} ({type(value).__name__}); pass a number such as {name}=0.001")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {bound}, got {value}: a NaN or infinite {name} turns "
                         f"every trained value into NaN after one step; pass a finite {name}")
    if value < low or (value == low and not inclusive):
        raise ValueError(f"{name} must be {bound}{' ' + extra if extra else ''}, got {value}")


def check_count(name: str, value, low: int, extra: str = "") -> None:
    """A ValueError naming ``name`` unless ``value`` is a whole number ``>= low`` (a bool or float is refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number >= {low}{' ' + extra if extra else ''}, "
                         f"got {value!r} ({type(value).__name__}); pass an int")
    if value < low:
        raise ValueError(f"{name} must be >= {low}{' ' + extra if extra else ''}, got {value}")
