"""NoiseSampling: which optimizer steps measure the noise scale, and how a measured step is split;
see :mod:`adabatch.noise`."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Callable

import torch

from .._validation import check_positive_int
from .backward_capture import BackwardCapture
from .meter import GradientNoiseMeter

if TYPE_CHECKING:
    from ..plan import PlannedBatch

#: Default samples per measurement (``BatchSizeScheduler(noise_interval=...)``)...
DEFAULT_NOISE_INTERVAL = 512

#: ...and by default at most one step in this many is measured.
MIN_STEPS_PER_MEASUREMENT = 8

# The capture each optimizer's measurement uses: a scheduler built later for the same optimizer
# replaces an earlier one's, as it replaces its learning-rate scaling.
_CAPTURES: weakref.WeakKeyDictionary[torch.optim.Optimizer, BackwardCapture] = weakref.WeakKeyDictionary()


class NoiseSampling:
    """Which optimizer steps measure the noise scale, and how a measured step is split.

    A step over the stream's samples ``[start, start + consumed)`` is measured when it reaches
    a multiple of ``interval``: a rule of the stream alone, so every rank measures the same
    steps, and a resumed run the same steps as one that never stopped.

    Args:
        interval (int, optional): samples (global) per measurement. Default:
            ``max(512, 8 × the global batch size)``: one step per 512 samples, and at most one
            step in eight.
    """

    def __init__(self, interval: int | None = None) -> None:
        self.interval = None if interval is None else check_positive_int("noise_interval", interval)
        self._capture: BackwardCapture | None = None

    def due(self, start: int, consumed: int) -> bool:
        """Whether the step over ``[start, start + consumed)`` is measured."""
        interval = self.interval or max(DEFAULT_NOISE_INTERVAL, MIN_STEPS_PER_MEASUREMENT * consumed)
        return (start + consumed) // interval > start // interval

    @staticmethod
    def can_split(sizes: list[int], floor: int) -> bool:
        """Whether a batch trained in one micro-batch can be halved with both halves at the floor."""
        return len(sizes) == 1 and sizes[0] >= 2 * floor

    def split(self, sizes: list[int], floor: int, distributed: bool) -> list[int]:
        """The micro-batches of a measured step: on one process, a batch that fits in one
        micro-batch is halved so the first half serves as the small batch (where both halves
        keep to the floor); across ranks each rank's batch is the small one, unsplit."""
        if distributed or not self.can_split(sizes, floor):
            return sizes
        return [sizes[0] - sizes[0] // 2, sizes[0] // 2]

    def prepare(self, meter: GradientNoiseMeter, distributed: bool) -> None:
        """Copy the gradients of the steps the plain loop's fallback uses as backward leaves them
        (:class:`BackwardCapture`), so a rescaling by the loop (gradient clipping) is not read;
        not across ranks, where backward's gradient is not yet averaged."""
        for earlier in (self._capture, _CAPTURES.pop(meter.optimizer, None)):
            if earlier is not None:
                earlier.remove()
        self._capture = None if distributed else BackwardCapture(
            [p for group in meter.optimizer.param_groups for p in group["params"]], meter.capture_gradients)
        if self._capture is not None:
            _CAPTURES[meter.optimizer] = self._capture

    def observe_plain_step(self, meter: GradientNoiseMeter, batch_size: int, start: int, consumed: int) -> bool:
        """The plain loop's fallback for a step of ``batch_size`` samples on this rank: pair a
        due step with the one before it, which keeps its gradient only if the next step
        (assumed of the same size) will be due. Returns whether a pair was counted. The
        gradients read are those :meth:`arm` had captured as backward left them, if it did."""
        measure, keep = self.due(start, consumed), self.due(start + consumed, consumed)
        return meter.from_consecutive_steps(batch_size, measure=measure, keep=keep)

    def reads(self, start: int, consumed: int) -> bool:
        """Whether the plain loop's fallback reads the gradient of the step over ``[start, start
        + consumed)``: to measure it, or to keep it for the next step's pair."""
        return self.due(start, consumed) or self.due(start + consumed, consumed)

    def arm(self, batch_at: Callable[[int], PlannedBatch], position: int, consumed: int) -> None:
        """Capture the coming step's gradients as backward leaves them if the fallback will read
        them. The last step ended at stream ``position`` with ``consumed`` samples (global);
        ``batch_at(position)`` is the coming batch as planned once the schedule took its
        decision. A coming step as large as the last is armed for too, for a loop whose
        batches the plan does not know (one without a sampler): capturing a step the fallback
        does not read costs a copy, nothing more."""
        if self._capture is None:
            return
        armed = self.reads(position, consumed)
        if not armed:
            coming = batch_at(position)
            armed = self.reads(coming.start, coming.size)
        self._capture.armed = armed

    def disarm(self) -> None:
        """Capture nothing until the next :meth:`arm`: ``train_step`` runs the backward passes
        and the step itself, so the fallback reads its gradients as the step leaves them
        (averaged, unscaled, never clipped)."""
        if self._capture is not None:
            self._capture.armed = False
