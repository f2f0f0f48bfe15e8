"""Ramp the batch size linearly from a start to an end value."""

from __future__ import annotations

from .._validation import check_choice, check_non_negative_number, check_positive_int, check_positive_number
from .base import UNITS, Progress, Schedule

__all__ = ["Linear"]


class Linear(Schedule):
    """Grows the batch linearly from ``start`` to ``end`` over ``length``, then holds ``end``.

    This is the batch-size ramp-up of large language model training (Megatron-LM's
    ``--rampup-batch-size``; Brown et al. 2020 grow GPT-3's batch linearly over the first
    billions of tokens). Combine with ``multiple_of`` in the constraints to grow in fixed
    increments.

    Args:
        start (int): batch size at the beginning of the ramp.
        end (int): batch size at and after the end of the ramp; at least ``start``.
        length (float): length of the ramp.
        unit (str): ``"epoch"`` or ``"sample"``, the unit of ``length`` and ``begin``.
            Default: ``"epoch"``.
        begin (float): where the ramp begins; ``start`` is held until then. Default: 0.

    Example:
        >>> schedule = Linear(start=32, end=512, length=10)
        >>> schedule(Progress(samples=5 * 1000, dataset_size=1000))
        272.0
    """

    def __init__(self, start: int, end: int, length: float, unit: str = "epoch", begin: float = 0.0) -> None:
        self.start = check_positive_int("start", start)
        self.end = check_positive_int("end", end)
        if self.end < self.start:
            raise ValueError(f"end must be at least start ({start}), got {end}")
        self.length = check_positive_number("length", length)
        self.unit = check_choice("unit", unit, UNITS)
        self.begin = check_non_negative_number("begin", begin)

    def batch_size_at(self, progress: Progress) -> float:
        fraction = (progress.in_unit(self.unit) - self.begin) / self.length
        fraction = min(1.0, max(0.0, fraction))
        return self.start + (self.end - self.start) * fraction
