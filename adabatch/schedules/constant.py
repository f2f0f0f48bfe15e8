"""A batch size that never changes: the baseline every other schedule is compared with."""

from __future__ import annotations

from .._validation import check_positive_int
from .base import Progress, Schedule

__all__ = ["Constant"]


class Constant(Schedule):
    """Keeps the batch size fixed.

    Args:
        batch_size (int): the global batch size.

    Example:
        >>> Constant(128)(Progress(samples=10_000))
        128.0
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = check_positive_int("batch_size", batch_size)

    def batch_size_at(self, progress: Progress) -> float:
        return float(self.batch_size)
