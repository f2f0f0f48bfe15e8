"""NoiseSampling: which optimizer steps measure the noise scale, and how a measured step is split;
see :mod:`adabatch.noise`."""

from __future__ import annotations

import weakref

import torch

from .._validation import check_positive_int
from .backward_capture import BackwardCapture
from .meter import GradientNoiseMeter

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
        (assumed of the same size) will be due. Returns whether a pair was counted. Gradients
        are captured as backward leaves them once :meth:`prepare` was called."""
        measure, keep = self.due(start, consumed), self.due(start + consumed, consumed)
        counted = meter.from_consecutive_steps(batch_size, measure=measure, keep=keep)
        if self._capture is not None:  # the next step is captured if it will be measured or kept
            after = start + consumed
            self._capture.armed = self.due(after, consumed) or self.due(after + consumed, consumed)
        return counted
