"""How a run's quality is judged: the metric, and the time and steps to reach a target.

A run is evaluated on held-out data at regular intervals of samples; each evaluation is an
:class:`Evaluation`. A policy reaches the baseline's quality at the first evaluation within the
metric's tolerance of the baseline's final quality: 0.1 points of accuracy, or 1% of a loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

__all__ = ["ACCURACY", "Evaluation", "Metric", "first_reaching"]


@dataclass(frozen=True)
class Metric:
    """What a task's quality is and when a value counts as reaching a target.

    Args:
        name (str): the quality's name and unit, as the tables show it (``"accuracy %"``).
        higher_is_better (bool): ``True`` for an accuracy, ``False`` for a loss.
        tolerance (float): how far short of the target still counts as reaching it: in the
            metric's own units when ``higher_is_better`` (0.1 points of accuracy), else as a
            fraction of the target (0.01: within 1% of a loss).
    """

    name: str
    higher_is_better: bool
    tolerance: float

    def __post_init__(self) -> None:
        if not self.tolerance >= 0:
            raise ValueError(f"tolerance must be a non-negative number, got {self.tolerance!r}")

    def threshold(self, target: float) -> float:
        """The worst value that still reaches ``target``."""
        if self.higher_is_better:
            return target - self.tolerance
        return target * (1 + self.tolerance) if target >= 0 else target * (1 - self.tolerance)

    def reaches(self, value: float, target: float) -> bool:
        """Whether ``value`` is within the tolerance of ``target``, or better."""
        threshold = self.threshold(target)
        return value >= threshold if self.higher_is_better else value <= threshold


ACCURACY = Metric("accuracy %", higher_is_better=True, tolerance=0.1)


class Evaluation(NamedTuple):
    """One evaluation on held-out data, with where training stood when it was taken."""

    samples: int  # training samples seen
    wall_s: float  # training wall time so far, evaluations excluded
    cpu_s: float  # this process's CPU time in the same spans (under load, closer to an idle machine's wall time)
    steps: int  # optimizer steps so far
    quality: float


def first_reaching(curve: Sequence[Evaluation], target: float, metric: Metric) -> Evaluation | None:
    """The first evaluation of ``curve`` that reaches ``target`` under ``metric``, or ``None``.

    Example:
        >>> curve = [Evaluation(100, 1.0, 0.9, 10, 90.0), Evaluation(200, 2.0, 1.8, 20, 98.95)]
        >>> first_reaching(curve, 99.0, ACCURACY).wall_s
        2.0
    """
    return next((evaluation for evaluation in curve if metric.reaches(evaluation.quality, target)), None)
