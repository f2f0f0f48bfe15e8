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
    """Return ``schedule`` itself if it is a :class:`Schedule`, else wrap the callable in :class:`Lambda`."""
    if isinstance(schedule, Schedule):
        return schedule
    return Lambda(schedule)
