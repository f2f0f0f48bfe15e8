"""Grow the batch with the gradient noise scale measured during training."""

from __future__ import annotations

import math
from typing import Any, Mapping

from .._validation import (
    check_bool, check_choice, check_fraction, check_integer, check_non_negative_int, check_non_negative_number,
    check_positive_int, check_positive_number,
)
from .base import Progress, Schedule

__all__ = ["Adaptive", "default_start_batch_size"]

SIGNALS = ("noise_scale", "norm_test")


def default_start_batch_size(dataset_size: int | None) -> int:
    """The common starting point for a dataset of this size: 32 below 100,000 samples, 128
    below 1,000,000, 256 above (the usual guidance: 16–64 for small datasets, 128–256 for
    medium ones, 512–1024 at ImageNet scale, where training ends)."""
    if dataset_size is None or dataset_size < 100_000:
        return 32
    return 128 if dataset_size < 1_000_000 else 256


class Adaptive(Schedule):
    """Grows the batch size towards the gradient noise scale measured while training.

    McCandlish et al. (2018) show that the batch size beyond which larger batches stop paying
    off tracks the simple noise scale ``B_simple = tr(Σ) / |G|²``, which rises as training
    progresses. Growing straight to ``B_simple`` rushes to the largest batch within a few
    epochs, and the per-step estimate swings by orders of magnitude, so this controller moves
    cautiously:

    * **Target.** ``target = start^(1 - exponent) · signal^exponent``: with the default
      exponent 0.25, a quarter of the way from the starting size to the signal in log scale
      (the noise scale rising 100-fold raises the batch about 3-fold). Larger exponents grow
      faster, and cost accuracy where large batches do. The signal is the smoothed
      ``B_simple`` (``signal="noise_scale"``), or ``B_simple / θ²`` (``signal="norm_test"``):
      the smallest batch that passes the norm test of Byrd et al. (2012) and Bollapragada et
      al. (2018), which asks that the variance of the mini-batch gradient be at most ``θ²``
      times its squared norm.
    * **Decisions** are taken every ``interval`` optimizer steps, once ``warmup`` measurements
      have been averaged (by default the scheduler measures one step per 512 samples while
      batches are at most 64: 50 measurements are 25,600 samples), and only when the target
      differs from the current size by more than ``hysteresis`` (AdaptDL uses 5%).
    * **Bounds.** Monotone by default (never shrinks); grows by at most ``growth_per_epoch``
      per epoch (AdaBatch doubles; without a dataset size the whole run counts as one epoch);
      rounded, floored and capped by the scheduler's constraints (``min_batch_size``,
      ``max_batch_size``, ``multiple_of``, the memory cap).
    * **Learning rate.** Unless the scheduler is given another ``lr_scaling``, the learning
      rate follows AdaScale's gain (``lr_scaling="gain"``, Johnson et al. 2020; its square root
      for Adam-family optimizers), as AdaptDL pairs its batch sizes with it. At a constant
      learning rate a larger batch anneals the gradient noise as a learning-rate decay would
      (Smith et al. 2018), and growth on the noise scale's cue comes early in training, so the
      run would anneal early. With the gain, each sample moves training as far as at the
      starting size, and the batch size changes the throughput, not the optimization.

    Unlike a timetable it is not a function of progress alone: its size depends on the noise
    scales it was fed after each step (:meth:`observe`), and its decisions are state, part of
    the scheduler's ``state_dict``. A decision applies to the batches drawn after it: batches
    already prefetched by DataLoader workers (``prefetch_factor × num_workers`` of them at
    most) keep the size they were drawn with.

    Args:
        start (int, optional): the size before the first decision. Default: from the dataset
            size (:func:`default_start_batch_size`).
        signal (str): ``"noise_scale"`` or ``"norm_test"``. Default: ``"noise_scale"``.
        theta (float): the norm test's ``θ``. Default: 0.9.
        exponent (float): in ``(0, 1]``, how far (in log scale) the target goes from ``start``
            towards the signal. Default: 0.25.
        growth_per_epoch (float): largest factor of growth within one epoch. Default: 2.
        hysteresis (float): relative change below which the size is kept. Default: 0.05.
        interval (int): optimizer steps between decisions. Default: 20.
        warmup (int): measurements before the first decision. Default: 50.
        monotone (bool): never shrink. Default: ``True``.

    Example:
        >>> scheduler = BatchSizeScheduler(optimizer, schedules.Adaptive(), min_batch_size=16)
    """

    needs_noise = True
    default_lr_scaling = "gain"

    _SIZE = "size"
    _EPOCH = "epoch"
    _EPOCH_BASE = "epoch_base"
    _STEPS = "steps"

    def __init__(
        self,
        start: int | None = None,
        *,
        signal: str = "noise_scale",
        theta: float = 0.9,
        exponent: float = 0.25,
        growth_per_epoch: float = 2.0,
        hysteresis: float = 0.05,
        interval: int = 20,
        warmup: int = 50,
        monotone: bool = True,
    ) -> None:
        self.start = None if start is None else check_positive_int("start", start)
        self.signal = check_choice("signal", signal, SIGNALS)
        self.theta = check_positive_number("theta", theta)
        self.exponent = check_positive_number("exponent", exponent)
        if self.exponent > 1:
            raise ValueError(f"exponent must be in (0, 1], got {exponent!r}")
        self.growth_per_epoch = check_positive_number("growth_per_epoch", growth_per_epoch)
        if self.growth_per_epoch < 1:
            raise ValueError(f"growth_per_epoch must be at least 1, got {growth_per_epoch!r}")
        self.hysteresis = check_fraction("hysteresis", hysteresis)
        self.interval = check_positive_int("interval", interval)
        self.warmup = check_non_negative_int("warmup", warmup)
        self.monotone = check_bool("monotone", monotone)
        self._size: float | None = None  # the current decision
        self._epoch = -1  # the epoch of the last decision
        self._epoch_base = 0.0  # the size when that epoch began
        self._steps = 0

    def initial_size(self, progress: Progress) -> float:
        """``start``, or the default for the dataset's size: the size before the first decision."""
        return float(self.start if self.start is not None else default_start_batch_size(progress.dataset_size))

    def batch_size_at(self, progress: Progress) -> float:
        if self._size is None:
            return self.initial_size(progress)
        return self._size

    def target(self, noise_scale: float, start: float) -> float:
        """The size the signal asks for, before the controller's bounds."""
        signal = noise_scale if self.signal == "noise_scale" else noise_scale / self.theta**2
        return start ** (1 - self.exponent) * signal**self.exponent

    def observe(self, progress: Progress, noise_scale: float, measured_steps: int, current: int, *,
                largest: float = math.inf) -> None:
        """Take a decision, if one is due, from the smoothed noise scale after a step.

        Args:
            progress (Progress): where training stands.
            noise_scale (float): the smoothed ``B_simple``.
            measured_steps (int): steps the noise statistics have averaged.
            current (int): the batch size trained now, after the constraints.
            largest (float): the largest batch size the constraints allow now; decisions stop
                there. Default: unbounded.
        """
        if self._size is None:
            self._size = self.initial_size(progress)
        self._steps += 1
        epoch = math.floor(progress.epoch) if progress.dataset_size else 0
        if epoch != self._epoch:
            self._epoch, self._epoch_base = epoch, max(float(current), self._size if self.monotone else 0.0)
        if measured_steps < self.warmup or self._steps % self.interval or not math.isfinite(noise_scale) \
                or noise_scale <= 0:
            return
        start = self.initial_size(progress)
        target = min(self.target(noise_scale, start), self._epoch_base * self.growth_per_epoch, largest)
        if self.monotone:
            # Batches drawn before the last decision may still be training at the old size:
            # the bound is the decision itself, not only the size trained now.
            target = max(target, float(current), self._size)
        if abs(target - current) > self.hysteresis * current:
            self._size = target

    def state_dict(self) -> dict[str, Any]:
        """A new dict of the controller's decision and the bounds it keeps (the epoch of the last
        decision, the size that epoch began at, the steps observed)."""
        return {self._SIZE: self._size, self._EPOCH: self._epoch, self._EPOCH_BASE: self._epoch_base,
                self._STEPS: self._steps}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved.

        Raises:
            ValueError: if a key is missing (as in the state of another schedule) or a value is
                not one this controller could have saved.
        """
        for key in (self._SIZE, self._EPOCH, self._EPOCH_BASE, self._STEPS):
            if key not in state_dict:
                raise ValueError(f"Adaptive state_dict is missing {key!r}; was it saved with another schedule?")

        def name(key: str) -> str:
            return f"Adaptive state_dict[{key!r}]"

        size = state_dict[self._SIZE]
        self._size = None if size is None else check_positive_number(name(self._SIZE), size)
        self._epoch = check_integer(name(self._EPOCH), state_dict[self._EPOCH], -1)
        self._epoch_base = check_non_negative_number(name(self._EPOCH_BASE), state_dict[self._EPOCH_BASE])
        self._steps = check_non_negative_int(name(self._STEPS), state_dict[self._STEPS])
