"""Argument checks shared by every module: each names the parameter, the value and the range.

Integers are accepted in one way everywhere: any ``numbers.Integral`` (Python's ``int``,
NumPy's integer scalars) except ``bool``, returned as a plain ``int``. Real numbers are any
``numbers.Real`` except ``bool``, returned as a ``float``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Sequence

import numpy as np

#: The seeds ``torch.Generator.manual_seed`` takes; it counts a negative one modulo 2**64.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

__all__ = [
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_integer",
    "check_milestones",
    "check_non_negative_int",
    "check_non_negative_number",
    "check_positive_int",
    "check_positive_number",
    "check_seed",
    "is_integer",
    "is_real",
]


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer (NumPy's included), and not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number (NumPy's included), and not a ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_integer(name: str, value: object, minimum: int | None = None, maximum: int | None = None,
                  *, what: str | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer in ``[minimum, maximum]``, else raise a
    ``ValueError`` naming ``name``; ``what`` describes the allowed values in the message."""
    if not is_integer(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if what is None:
            if minimum is not None and maximum is not None:
                what = f"an integer in [{minimum}, {maximum}]"
            elif minimum is not None:
                what = f"an integer of at least {minimum}"
            else:
                what = "an integer"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer, else raise a ``ValueError``."""
    return check_integer(name, value, 1, what="a positive integer")


def check_non_negative_int(name: str, value: object) -> int:
    """Return ``value`` as an ``int`` if it is a non-negative integer, else raise a ``ValueError``."""
    return check_integer(name, value, 0, what="a non-negative integer")


def check_positive_number(name: str, value: object) -> float:
    """Return ``value`` as a ``float`` if it is a positive finite real number, else raise a ``ValueError``."""
    if not is_real(value) or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_non_negative_number(name: str, value: object) -> float:
    """Return ``value`` as a ``float`` if it is a non-negative finite real number, else raise a ``ValueError``."""
    if not is_real(value) or not math.isfinite(value) or value < 0:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_fraction(name: str, value: object, *, what: str = "in [0, 1)") -> float:
    """Return ``value`` as a ``float`` if it is a real number in ``[0, 1)``, else raise a ``ValueError``."""
    if not is_real(value) or not 0 <= value < 1:  # type: ignore[operator]
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a ``bool`` (NumPy's included), else raise a ``ValueError``."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_seed(name: str, value: object) -> int:
    """Return ``value`` as an ``int`` if it is an integer that ``torch.Generator.manual_seed``
    takes, else raise a ``ValueError``."""
    seed = check_integer(name, value)
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"{name} must be in [-2**63, 2**64 - 1], the range torch.Generator.manual_seed takes, "
                         f"got {value!r}")
    return seed


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_milestones(milestones: Iterable[object]) -> list[float]:
    """Return ``milestones`` as a list of floats if they are positive, finite and strictly
    increasing, else raise a ``ValueError``."""
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
        raise ValueError(f"milestones must be a sequence of numbers, got {milestones!r}")
    values = list(milestones)
    for value in values:
        check_positive_number("each milestone", value)
    for earlier, later in zip(values, values[1:]):
        if later <= earlier:  # type: ignore[operator]
            raise ValueError(f"milestones must be strictly increasing, got {values!r}")
    return [float(value) for value in values]  # type: ignore[arg-type]
