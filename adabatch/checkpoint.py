"""The scheduler's checkpoint: what :meth:`BatchSizeScheduler.state_dict` holds, and a load
that checks every key and value first and restores nothing from a state it refuses.

Each part of the scheduler keeps its own numbers (the plan of batches and the progress
counters, the learning-rate warm-up, the memory cap, the noise statistics and the kept
gradient, the schedule's decisions); the state is their union, flat for the counters and
nested under a key for the others, in the format checkpoints have always had. Keys added
since (``noise_pair``, ``step_times``) may be missing from an older checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from ._validation import is_integer
from .lr_scaling import LRFactor
from .plan import BatchPlan
from .schedules import Lambda, Progress
from .throughput import StepTimes

if TYPE_CHECKING:
    from .scheduler import BatchSizeScheduler

__all__ = ["load_state_dict", "state_dict"]

DATASET_SIZE = "dataset_size"
MEMORY = "memory"
NOISE = "noise"
NOISE_PAIR = "noise_pair"
SCHEDULE = "schedule"
STEP_TIMES = "step_times"
REQUIRED = (*BatchPlan.COUNTERS, BatchPlan.PLAN, LRFactor.WARMUP_FROM, LRFactor.WARMUP_BEGIN, DATASET_SIZE, MEMORY,
            NOISE, SCHEDULE)


def state_dict(scheduler: BatchSizeScheduler) -> dict[str, Any]:
    """The scheduler's own numbers, as a new dict."""
    meter = scheduler.noise_meter
    return {
        **scheduler.plan.state_dict(),
        **scheduler.lr.state_dict(),
        DATASET_SIZE: scheduler.dataset_size,
        MEMORY: scheduler.memory.state_dict(),
        NOISE: None if meter is None else meter.noise.state_dict(),
        NOISE_PAIR: None if meter is None else meter.pairing_state(),
        SCHEDULE: scheduler.schedule.state_dict(),
        STEP_TIMES: None if scheduler.step_times is None else scheduler.step_times.state_dict(),
    }


def load_state_dict(scheduler: BatchSizeScheduler, state: Mapping[str, Any]) -> int | None:
    """Restore ``state`` into ``scheduler``'s parts and return the dataset size it was saved for.

    Raises:
        ValueError: see :meth:`BatchSizeScheduler.load_state_dict`; the scheduler is then as it was.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"scheduler state_dict must be a dict, got {type(state).__name__}")
    for key in REQUIRED:
        if key not in state:
            raise ValueError(f"scheduler state_dict is missing {key!r}")
    saved_size = state[DATASET_SIZE]
    if saved_size is not None and (not is_integer(saved_size) or saved_size < 1):
        raise ValueError(f"scheduler state_dict['dataset_size'] must be a positive integer or None, got {saved_size!r}")
    if saved_size is not None and scheduler.dataset_size is not None and saved_size != scheduler.dataset_size:
        raise ValueError(
            f"scheduler state_dict was saved for dataset_size={saved_size}, but this scheduler's dataset has "
            f"{scheduler.dataset_size} samples"
        )
    before, tracking = state_dict(scheduler), scheduler.plan.tracking
    try:
        _load(scheduler, state, lambda position: _highest_target(scheduler, position))
    except Exception:
        _load(scheduler, before, None)  # its own state: nothing to check
        scheduler.plan.tracking = tracking
        raise
    return None if saved_size is None else int(saved_size)


def _load(scheduler: BatchSizeScheduler, state: Mapping[str, Any],
          highest_target: Callable[[int], float] | None) -> None:
    scheduler.plan.load_state_dict(state, highest_target)
    scheduler.lr.load_state_dict(state)
    meter = scheduler.noise_meter
    if meter is not None:
        if state[NOISE] is not None:
            meter.noise.load_state_dict(state[NOISE])
        meter.load_pairing_state(state.get(NOISE_PAIR))
    if state[SCHEDULE] is not None:  # None: a timetable's, saved before schedules kept state
        scheduler.schedule.load_state_dict(state[SCHEDULE])
    if scheduler.step_times is not None:
        step_times = state.get(STEP_TIMES)
        scheduler.step_times.load_state_dict(step_times if step_times is not None else {StepTimes.TABLE: []})
    scheduler.memory.load_state_dict(state[MEMORY])
    scheduler.constraints.set_memory_cap(scheduler.memory.cap)


def _highest_target(scheduler: BatchSizeScheduler, position: int) -> float:
    """The largest target a batch drawn at ``position`` may have been given: a timetable's own
    size there (a memory cap may have lowered it); an adaptive schedule's or a callable's
    largest, as their sizes do not follow from progress alone, and the largest while the dataset
    is unknown."""
    schedule, constraints = scheduler.schedule, scheduler.constraints
    # Before a sampler binds, a timetable in epochs cannot be read: only the bounds are known.
    if schedule.needs_noise or isinstance(schedule, Lambda) or scheduler.dataset_size is None:
        return constraints.largest(memory=False)
    return constraints.apply(schedule(Progress(samples=position, dataset_size=scheduler.dataset_size)), memory=False)
