"""The plan of batches: which batch follows each stream position, and how far training has come.

A batch's size is decided when the sampler draws it, which may be well before it is trained
(DataLoader workers prefetch), and what decides a size (an adaptive schedule, the memory cap)
may change in between. :class:`BatchPlan` therefore records each batch as it is drawn, and the
scheduler, the learning-rate factor and a resumed run all read the recorded batch. The same
object counts what was trained: the stream position, the samples seen and the optimizer steps.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, NamedTuple

from ._validation import is_integer
from .layout import EpochLayout

__all__ = ["BatchPlan", "PlannedBatch"]


class PlannedBatch(NamedTuple):
    """The global batch that follows a stream position."""

    #: Stream position of its first sample (past the position when an epoch's tail is dropped).
    start: int
    #: Samples in it, over all replicas.
    size: int
    #: The size the schedule wanted, after the constraints; the balanced batches that end an
    #: epoch are a little smaller than their target.
    target: int


class BatchPlan:
    """Records the batches drawn ahead of training and counts the ones trained.

    Args:
        target_at (callable): the constrained global batch size wanted at a stream position.
    """

    POSITION = "position"
    SAMPLES_SEEN = "samples_seen"
    STEPS = "steps"
    PLAN = "plan"
    COUNTERS = (POSITION, SAMPLES_SEEN, STEPS)
    #: Most batches remembered between being drawn and being trained (far above any prefetch depth).
    LIMIT = 4096

    def __init__(self, target_at: Callable[[int], int]) -> None:
        self.target_at = target_at
        self.layout: EpochLayout | None = None
        self.position = 0  # stream position after the last trained batch
        self.samples_seen = 0
        self.steps = 0
        self.tracking = False  # whether a step or a loaded state has given a trained position
        self._drawn: dict[int, PlannedBatch] = {}  # position -> the batch drawn there
        self._warned_mismatch = False

    @property
    def num_replicas(self) -> int:
        return 1 if self.layout is None else self.layout.num_replicas

    def bind(self, layout: EpochLayout) -> EpochLayout:
        """Cut batches with ``layout`` from now on; binding again to the same cut is allowed.

        Raises:
            ValueError: if the plan already follows another layout.
        """
        if self.layout is None:
            self.layout = layout
            return layout
        same = (self.layout.dataset_size, self.layout.num_replicas, self.layout.remainder)
        if same != (layout.dataset_size, layout.num_replicas, layout.remainder):
            raise ValueError(
                f"this scheduler already drives a sampler with dataset_size={same[0]}, num_replicas={same[1]}, "
                f"remainder={same[2]!r}; got dataset_size={layout.dataset_size}, num_replicas="
                f"{layout.num_replicas}, remainder={layout.remainder!r}. Use one scheduler per training dataset."
            )
        return self.layout

    def batch_at(self, position: int) -> PlannedBatch:
        """The batch after ``position``: the one drawn there, if any, else the one drawn now would be."""
        drawn = self._drawn.get(position)
        # A record from a run on another number of replicas may not split evenly here.
        if drawn is None or drawn.size % self.num_replicas:
            return self._decide(position)
        return drawn

    def draw(self, position: int) -> PlannedBatch:
        """Decide the batch after ``position`` and record it (the sampler's call)."""
        drawn = self._drawn.get(position)
        if drawn is None or drawn.size % self.num_replicas:
            drawn = self._decide(position)
            self._drawn[position] = drawn
            if len(self._drawn) > self.LIMIT:
                del self._drawn[next(iter(self._drawn))]
        return drawn

    def _decide(self, position: int) -> PlannedBatch:
        if self.layout is None:
            target = self.target_at(position)
            return PlannedBatch(position, target, target)
        return PlannedBatch(*self.layout.next_batch(position, self.target_at))

    def advance(self, start: int, consumed: int, planned: int | None = None) -> None:
        """Count a trained batch of ``consumed`` samples (global) that began at ``start``.

        If a sampler cut the batch as ``planned`` samples and the count differs, progress
        follows the count, with a warning (once): the loop miscounts or skips batches.
        """
        if planned is not None and consumed != planned and self.layout is not None and not self._warned_mismatch:
            self._warned_mismatch = True
            warnings.warn(
                f"scheduler.step() was told {consumed} samples (global) but the sampler planned {planned} "
                f"for this step; progress follows the count given. Call step() once per batch from the "
                f"AdaptiveBatchSampler, with len(x) (this warning is shown once)",
                UserWarning,
                stacklevel=4,  # the user's call of scheduler.step()
            )
        self.position = start + consumed
        self._drawn = {p: batch for p, batch in self._drawn.items() if p >= self.position}
        self.samples_seen += consumed
        self.steps += 1
        self.tracking = True

    def skip_to(self, position: int) -> None:
        """Move the trained position forward to ``position`` without training; never backward."""
        if position > self.position:
            self.position = position
        self.tracking = True

    def state_dict(self) -> dict[str, Any]:
        return {
            self.POSITION: self.position,
            self.SAMPLES_SEEN: self.samples_seen,
            self.STEPS: self.steps,
            self.PLAN: [[position, *batch] for position, batch in self._drawn.items()],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any],
                        highest_target: Callable[[int], float] | None = None) -> None:
        """Restore the counters and the batches drawn but not trained.

        Args:
            state_dict (dict): what :meth:`state_dict` returned.
            highest_target (callable, optional): the largest target a batch starting at a position
                may have been given (a timetable's own size there, an adaptive schedule's
                largest); each drawn batch is checked against it and the layout. Default: no
                check (a state this plan saved itself).

        Raises:
            ValueError: if a key is missing, a counter is negative, or a drawn batch is not one
                this plan could have drawn; nothing is restored then.
        """
        for key in (*self.COUNTERS, self.PLAN):
            if key not in state_dict:
                raise ValueError(f"scheduler state_dict is missing {key!r}")
        for key in self.COUNTERS:
            value = state_dict[key]
            if not is_integer(value) or value < 0:
                raise ValueError(f"scheduler state_dict[{key!r}] must be a non-negative integer, got {value!r}")
        drawn = {}
        entries = state_dict[self.PLAN]
        if not isinstance(entries, (list, tuple)):
            raise ValueError(f"scheduler state_dict['plan'] must be a list, got {entries!r}")
        for entry in entries:
            if highest_target is not None and not self._could_draw(entry, highest_target):
                raise ValueError(f"scheduler state_dict['plan'] holds {entry!r}, which is not a batch this scheduler "
                                 f"could have drawn: [position, start, size, target], position <= start, and size and "
                                 f"target within the schedule and the constraints")
            drawn[int(entry[0])] = PlannedBatch(*(int(value) for value in entry[1:]))
        self.position = int(state_dict[self.POSITION])
        self.samples_seen = int(state_dict[self.SAMPLES_SEEN])
        self.steps = int(state_dict[self.STEPS])
        self._drawn = drawn
        self.tracking = True

    def _could_draw(self, entry: Any, highest_target: Callable[[int], float]) -> bool:
        if not isinstance(entry, (list, tuple)) or len(entry) != 4 or not all(is_integer(v) for v in entry):
            return False
        position, start, size, target = entry
        if not (0 <= position <= start and 1 <= size and 1 <= target <= highest_target(start)):
            return False
        if self.layout is None:
            return True
        # A record from another number of replicas is decided again (batch_at), not checked here.
        return size % self.num_replicas != 0 or tuple(self.layout.next_batch(position, lambda _: target)) == (
            start, size, target)
