"""Wrap any user callable as a schedule."""

from __future__ import annotations

from .base import Progress, Schedule, ScheduleFn

__all__ = ["Lambda"]


class Lambda(Schedule):
    """A schedule given by a function of :class:`Progress`.

    The function must be pure: the same progress must give the same size, or a resumed run
    would train on other batch sizes than the original.

    Args:
        fn (callable): ``fn(progress) -> float``, the global batch size wanted.

    Example:
        >>> schedule = Lambda(lambda p: 64 if p.epoch < 3 else 256)
        >>> schedule(Progress(samples=4000, dataset_size=1000))
        256
    """

    def __init__(self, fn: ScheduleFn) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    def batch_size_at(self, progress: Progress) -> float:
        return self.fn(progress)
