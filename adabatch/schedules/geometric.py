"""Multiply the batch size by a fixed factor every so many epochs."""

from __future__ import annotations

import math

from .._validation import check_choice, check_positive_int, check_positive_number
from .base import UNITS, Progress, Schedule

__all__ = ["Geometric"]

# Without ``end``, growth stops here; the scheduler's max_batch_size or the dataset caps it long before.
_NO_LIMIT = 2.0**62


class Geometric(Schedule):
    """Multiplies the batch size by ``factor`` every ``every`` units, up to ``end``.

    AdaBatch (Devarakonda et al. 2017, "AdaBatch: Adaptive Batch Sizes for Training Deep
    Neural Networks") doubles the batch size at fixed epoch intervals.

    Args:
        start (int): the initial batch size.
        factor (float): multiplier applied at each interval; greater than 1. Default: 2.
        every (float): length of an interval. Default: 1.
        unit (str): ``"epoch"`` or ``"sample"``, the unit of ``every``. Default: ``"epoch"``.
        end (int, optional): the largest batch size this schedule asks for. Default: no limit
            here (the scheduler's ``max_batch_size`` still applies).

    Example:
        >>> schedule = Geometric(start=32, factor=2, every=5, end=256)
        >>> [schedule(Progress(samples=e * 1000, dataset_size=1000)) for e in (0, 5, 10, 20)]
        [32.0, 64.0, 128.0, 256.0]
    """

    def __init__(
        self, start: int, factor: float = 2, every: float = 1, unit: str = "epoch", end: int | None = None
    ) -> None:
        self.start = check_positive_int("start", start)
        self.factor = check_positive_number("factor", factor)
        if self.factor <= 1:
            raise ValueError(f"factor must be greater than 1, got {factor!r}")
        self.every = check_positive_number("every", every)
        self.unit = check_choice("unit", unit, UNITS)
        if end is not None:
            end = check_positive_int("end", end)
            if end < self.start:
                raise ValueError(f"end must be at least start ({start}), got {end}")
        self.end = end

    def batch_size_at(self, progress: Progress) -> float:
        intervals = math.floor(progress.in_unit(self.unit) / self.every)
        limit = _NO_LIMIT if self.end is None else self.end
        # Compare in log space so that a long run cannot overflow factor**intervals.
        if intervals * math.log(self.factor) >= math.log(limit / self.start):
            return float(limit)
        return self.start * self.factor**intervals
