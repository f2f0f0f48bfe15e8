"""Batch-size schedules: the global batch size to train at each point of training.

The timetables (:class:`Constant`, :class:`Step`, :class:`Linear`, :class:`Geometric`,
:class:`Lambda`) are functions of training progress. :class:`Adaptive` also depends on the
gradient noise scale it is fed, and keeps its decisions as state that the scheduler checkpoints.
"""

from .adaptive import Adaptive
from .base import Progress, Schedule, ScheduleFn
from .constant import Constant
from .geometric import Geometric
from .lambda_schedule import Lambda
from .linear import Linear
from .step import Step

__all__ = ["Adaptive", "Constant", "Geometric", "Lambda", "Linear", "Progress", "Schedule", "ScheduleFn", "Step", "as_schedule"]


def as_schedule(schedule: Schedule | ScheduleFn) -> Schedule:
    """Return ``schedule`` itself if it is a :class:`Schedule`, else wrap the callable in :class:`Lambda`.

    Raises:
        TypeError: if ``schedule`` is neither a :class:`Schedule` nor callable.
    """
    if isinstance(schedule, Schedule):
        return schedule
    if not callable(schedule):
        raise TypeError(f"schedule must be a Schedule or a callable, got {type(schedule).__name__}")
    return Lambda(schedule)
