"""The schedule interface: the global batch size at a point of training.

A schedule answers one question: how large should the global batch be at this point of
training? A timetable answers from :class:`Progress` alone, in closed form, never by
multiplying the previous value: given the same progress it returns the same size, so a run
that is stopped and resumed sees the same sizes as one that was not. An adaptive schedule
also depends on the signals it was fed (:meth:`Schedule.observe`); what it learned from them
is its state, which the scheduler's checkpoint carries (:meth:`Schedule.state_dict`), so a
resumed run continues from the same decisions.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

# Re-exported: adabatch.scheduler imports it from here.
from .._validation import check_positive_int

__all__ = ["Progress", "Schedule", "ScheduleFn", "UNITS", "check_positive_int"]

#: Units in which a schedule's milestones and lengths may be given.
UNITS = ("epoch", "sample")


@dataclass(frozen=True)
class Progress:
    """Where training stands, in samples of the data stream.

    Args:
        samples (int): samples of the data stream passed so far (global, over all replicas).
            Under ``remainder="drop"`` the dropped tail of an epoch counts as passed, so that
            epoch ``e`` always begins at ``e * dataset_size``.
        dataset_size (int, optional): samples in one epoch; needed for epoch units.
    """

    samples: int
    dataset_size: int | None = None

    @property
    def epoch(self) -> float:
        """Epochs passed, as a float (``samples / dataset_size``)."""
        if self.samples == 0:
            return 0.0
        if self.dataset_size is None:
            raise ValueError(
                "this schedule is given in epochs, so it needs the dataset size: pass "
                "dataset_size= to BatchSizeScheduler or build an AdaptiveBatchSampler on it"
            )
        return self.samples / self.dataset_size

    def in_unit(self, unit: str) -> float:
        """Progress measured in ``unit`` (``"epoch"`` or ``"sample"``)."""
        return self.epoch if unit == "epoch" else float(self.samples)


#: Any callable from progress to a (possibly fractional) batch size is a schedule.
ScheduleFn = Callable[[Progress], float]


class Schedule(abc.ABC):
    """Base class of the built-in schedules.

    Subclasses implement :meth:`batch_size_at`; the result may be fractional, and is rounded
    and bounded by :class:`~adabatch.constraints.BatchSizeConstraints`, never here.

    A scheduler calls the rest of the interface on every schedule, and the defaults here are a
    timetable's: it needs no measurement of the gradient noise (:attr:`needs_noise`), ignores the
    signals (:meth:`observe`), starts at its own size (:meth:`initial_size`) and has nothing to
    checkpoint (:meth:`state_dict`, :meth:`load_state_dict`). An adaptive schedule overrides them.

    :attr:`default_lr_scaling` is the learning-rate rule a
    :class:`~adabatch.BatchSizeScheduler` uses with this schedule when its ``lr_scaling`` is
    not given: ``"none"`` for timetables (growing the batch anneals the gradient noise, as
    decaying the learning rate would; Smith et al. 2018).
    """

    #: The ``lr_scaling`` a scheduler uses with this schedule by default.
    default_lr_scaling = "none"
    #: Whether the scheduler must measure the gradient noise scale for :meth:`observe`.
    needs_noise: bool = False

    @abc.abstractmethod
    def batch_size_at(self, progress: Progress) -> float:
        """The global batch size this schedule asks for at ``progress``."""

    def __call__(self, progress: Progress) -> float:
        return self.batch_size_at(progress)

    def initial_size(self, progress: Progress) -> float:
        """The size asked for before training has fed the schedule any signal: the reference
        for the learning-rate rules. A timetable's size at ``progress``."""
        return self(progress)

    def observe(self, progress: Progress, noise_scale: float, measured_steps: int, current: int, *,
                largest: float = math.inf, step_times: Any = None, preconditioned: bool = False,
                noise: Any = None) -> None:
        """Take in the signals measured after an optimizer step; the scheduler calls it after
        every step of a schedule that :attr:`needs_noise`. A timetable ignores them.

        Args:
            progress (Progress): where training stands.
            noise_scale (float): the smoothed gradient noise scale ``B_simple``.
            measured_steps (int): steps the noise statistics have averaged.
            current (int): the batch size trained now, after the constraints.
            largest (float): the largest batch size the constraints allow now. Default: unbounded.
            step_times (StepTimes, optional): seconds per step at each batch size trained so
                far (:class:`~adabatch.throughput.StepTimes`), the same on every rank. Default: none.
            preconditioned (bool): the noise scale was measured on gradients preconditioned by
                an Adam-family optimizer. Default: ``False``.
            noise (NoiseScale, optional): the noise statistics behind ``noise_scale``, with their
                standard errors (:class:`~adabatch.noise.NoiseScale`). Default: none.
        """

    def state_dict(self) -> dict[str, Any]:
        """A new dict of what the schedule learned from the signals it observed, for the
        scheduler's checkpoint: empty for a timetable, whose sizes follow from progress alone."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; a timetable has nothing to restore.

        Raises:
            ValueError: if ``state_dict`` holds anything (it was saved with another schedule).
        """
        if not isinstance(state_dict, Mapping) or state_dict:
            raise ValueError(f"{type(self).__name__} keeps no state, but its state_dict is {state_dict!r}; was it "
                             f"saved with another schedule?")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"

