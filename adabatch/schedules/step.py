"""Grow the batch by a factor at milestones: the batch-size analogue of step LR decay."""

from __future__ import annotations

import bisect
from typing import Sequence

from .._validation import check_choice, check_milestones, check_positive_int, check_positive_number
from .base import UNITS, Progress, Schedule

__all__ = ["Step"]


class Step(Schedule):
    """Multiplies the batch size by ``factor`` at each milestone.

    Smith et al. (2018), "Don't Decay the Learning Rate, Increase the Batch Size", show that
    multiplying the batch by ``k`` where a step schedule would divide the learning rate by ``k``
    reaches the same accuracy in fewer optimizer steps.

    Args:
        start (int): batch size before the first milestone.
        factor (float): multiplier applied at each milestone. Default: 2.
        milestones (sequence of float): strictly increasing points at which to grow.
        unit (str): ``"epoch"`` or ``"sample"``, the unit of ``milestones``. Default: ``"epoch"``.

    Example:
        >>> schedule = Step(start=32, factor=5, milestones=[10, 15])  # 32, 160, 800
        >>> schedule(Progress(samples=12 * 1000, dataset_size=1000))
        160.0
    """

    def __init__(self, start: int, factor: float = 2, milestones: Sequence[float] = (), unit: str = "epoch") -> None:
        self.start = check_positive_int("start", start)
        self.factor = check_positive_number("factor", factor)
        self.milestones = check_milestones(milestones)
        self.unit = check_choice("unit", unit, UNITS)

    def batch_size_at(self, progress: Progress) -> float:
        passed = bisect.bisect_right(self.milestones, progress.in_unit(self.unit))
        return self.start * self.factor**passed
