"""The batch-size policies the suite compares, built for a task.

* ``baseline``: the task's small fixed batch (``Task.baseline_batch_size``).
* ``adaptive``: ``schedules.Adaptive(start=baseline)`` with every other default, as the README
  wires it: started at the batch the user would train with, the schedule's own learning-rate
  rule (AdaScale's gain) with the factor 1 at that start.
* ``timetable``: ``Step(start=baseline, factor=4)`` at 1/4 and 1/2 of the epochs, with the
  timetables' default rule (the learning rate kept: Smith et al. 2018).

``--adaptive-options KEY=VALUE ...`` gives both ``Adaptive`` policies those keyword arguments
and names them after them, as ``adaptive[extra_samples=0.05]``, so their runs are not mistaken
for the defaults' in a report.

``--sweep`` adds ``adaptive-16``, ``schedules.Adaptive()`` without a start (so at its default,
16), and the oracle's candidates: fixed 16 … 512 with the learning rate scaled by the square
root of the batch over the baseline's (for SGD too: the linear rule takes SGD at 0.05 to 0.8 at
512, where it diverges); fixed 64, 128 and 256 once more with the learning rate scaled linearly
(``fixed-128-linear``: Goyal et al. 2017's rule, which keeps SGD's ratio of learning rate to
batch, so its gradient noise, as the baseline's); and three more timetables:

* ``step-x2-late``: ×2 at 1/2 and 3/4 of the epochs, learning rate kept;
* ``geometric``: ×2 every 1/8 of the epochs up to the cap, learning rate kept;
* ``doubling-sqrt``: ×2 at 1/4, 1/2 and 3/4 with the learning rate ×√2 at each doubling, the
  schedule of Merrill et al. 2025.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from adabatch import schedules

from .task import Task

__all__ = ["DEFAULT_POLICIES", "LINEAR_SWEEP_BATCH_SIZES", "MAX_BATCH_SIZE", "SWEEP_BATCH_SIZES", "Policy", "base_name",
           "policies"]

#: The cap of every policy's batch.
MAX_BATCH_SIZE = 1024
SWEEP_BATCH_SIZES = (16, 32, 64, 128, 256, 512)
#: The fixed sizes the sweep also runs with the linear rule.
LINEAR_SWEEP_BATCH_SIZES = (64, 128, 256)
DEFAULT_POLICIES = ("baseline", "adaptive", "timetable")


@dataclass(frozen=True)
class Policy:
    """How one run sets its batch size and its learning-rate factor.

    Args:
        name (str): the name in the tables.
        schedule (callable): ``schedule(epochs)``, a new schedule for a run of ``epochs``.
        lr_scaling (str, optional): the scheduler's ``lr_scaling``. Default: the schedule's own.
        reference_batch_size (int, optional): where the factor is 1. Default: the schedule's start.
    """

    name: str
    schedule: Callable[[int], schedules.Schedule]
    lr_scaling: str | None = None
    reference_batch_size: int | None = None


def _fractions(epochs: int, *fractions: float) -> list[float]:
    return [epochs * fraction for fraction in fractions]


def base_name(name: str) -> str:
    """A policy's name without the options it was run with: ``adaptive`` for ``adaptive[...]``."""
    return name.split("[", 1)[0]


def policies(task: Task, sweep: bool = False, adaptive_options: Mapping[str, Any] | None = None) -> list[Policy]:
    """The policies to run on ``task``: the default three, and the sweep's if ``sweep``; the
    ``Adaptive`` ones with ``adaptive_options`` (and named after them) if given."""
    start = task.baseline_batch_size
    options = dict(adaptive_options or {})
    suffix = f"[{','.join(f'{key}={value!r}' for key, value in options.items())}]" if options else ""
    chosen = [
        Policy("baseline", lambda epochs: schedules.Constant(start)),
        Policy(f"adaptive{suffix}", lambda epochs: schedules.Adaptive(start=start, **options)),
        Policy("timetable", lambda epochs: schedules.Step(start, 4, _fractions(epochs, 1 / 4, 1 / 2))),
    ]
    if not sweep:
        return chosen
    chosen.append(Policy(f"adaptive-16{suffix}", lambda epochs: schedules.Adaptive(**options)))
    for sizes, rule, suffix in ((SWEEP_BATCH_SIZES, "sqrt", ""), (LINEAR_SWEEP_BATCH_SIZES, "linear", "-linear")):
        for size in sizes:
            if size != start:  # the baseline itself
                chosen.append(Policy(f"fixed-{size}{suffix}", lambda epochs, size=size: schedules.Constant(size),
                                     lr_scaling=rule, reference_batch_size=start))
    chosen += [
        Policy("step-x2-late", lambda epochs: schedules.Step(start, 2, _fractions(epochs, 1 / 2, 3 / 4))),
        Policy("geometric", lambda epochs: schedules.Geometric(start, 2, every=epochs / 8, end=MAX_BATCH_SIZE)),
        Policy("doubling-sqrt", lambda epochs: schedules.Step(start, 2, _fractions(epochs, 1 / 4, 1 / 2, 3 / 4)),
               lr_scaling="sqrt"),
    ]
    return chosen
