"""Grow the batch while the measured gradient noise scale and step times say growth pays."""

from __future__ import annotations

import math
from typing import Any, Mapping

from .._validation import (
    check_bool, check_choice, check_fraction, check_integer, check_non_negative_int, check_non_negative_number,
    check_positive_int, check_positive_number,
)
from ..noise import NoiseScale
from ..throughput import StepTimes
from .base import Progress, Schedule

__all__ = ["Adaptive", "DEFAULT_START"]

SIGNALS = ("noise_scale", "norm_test")

#: The size before the first decision, unless told: the small batch a practitioner would pick
#: (16–32); a larger ``min_batch_size`` raises it.
DEFAULT_START = 16


class Adaptive(Schedule):
    """Grows the batch while the measured gradient noise and step times say growth pays.

    McCandlish et al. (2018) model training to a given loss at batch size ``B`` with a critical
    batch size ``B_crit`` (the gradient noise scale): it takes ``S = S_min (1 + B_crit/B)``
    steps and ``E = E_min (1 + B/B_crit)`` samples. A step of ``B`` samples takes ``t(B)``
    seconds, so the wall time is ``S · t(B)``; Pollux (Qiao et al. 2021) calls its inverse
    goodput. The controller takes every decision from these two terms:

    * **Samples.** Growth may cost at most ``extra_samples`` more samples than training at the
      starting size ``B_0`` would: ``(B_crit + B) / (B_crit + B_0) ≤ 1 + extra_samples``. A run
      of a fixed number of epochs then ends where the small batch would, within that fraction.
    * **Time and samples.** Among the sizes the samples allow, the one with the least product of
      wall time and samples to a given loss, ``S·t(B) · E ∝ (B + B_crit)² (a + b·B) / B``,
      with the step times measured while training (:class:`~adabatch.throughput.StepTimes`)
      on the line ``t(B) = a + b·B``. Goodput (Pollux) weighs the time alone, which suits a
      run to a target loss; a run of a fixed number of epochs also pays for the samples, in
      its final quality. The size is ``B_crit`` where a larger step costs no more (a GPU far
      from full), small where the time grows with the batch (a busy CPU), and always below
      ``B_crit``: a noise scale no larger than the start asks for no growth. The line goes
      through the sizes timed recently, its slope taken ``confidence`` standard errors low, so
      that neither the drift of a shared machine nor the noise between two close sizes reads as
      a cost of growing. Before two sizes are timed, half of a step is taken to be fixed cost,
      and the batch grows at most to twice the largest size timed, so each growth is measured
      before the next. A size that turns out not to pay is left again.
    * **The critical batch size** is the smoothed noise scale ``B_simple`` (``signal=
      "noise_scale"``), or ``B_simple / θ²`` (``signal="norm_test"``, the smallest batch that
      passes the norm test of Byrd et al. 2012), at the lower end of what the measurements
      support: ``tr(Σ)`` taken ``confidence`` standard errors low over ``|G|²`` taken as many
      high (:meth:`NoiseScale.lower_bound <adabatch.noise.NoiseScale.lower_bound>`). A noise
      scale is a ratio whose denominator, the squared true gradient, is often lost in its own
      noise: the smoothed ratio then runs to thousands on chance alone, and the plain loop's
      pairs of consecutive steps bias it upwards the more the learning rate grows with the
      batch. The bound goes no higher than the measurements can resolve, so the batch grows on
      evidence, not on an estimate that is all noise. For Adam-family optimizers the noise scale
      underestimates the critical batch size by orders of magnitude (Merrill et al. 2025), so
      it is read as a relative signal: the starting size is taken as critical at the first
      decision, and ``B_crit`` grows in proportion to the noise scale from there.
    * **Decisions** come every ``interval`` optimizer steps, once ``warmup`` measurements have
      been averaged, and only when the size would change by more than ``hysteresis`` (AdaptDL
      uses 5%). The batch grows by at most ``growth_per_epoch`` per epoch (AdaBatch doubles;
      without a dataset size the whole run counts as one epoch), and the scheduler's
      constraints (``min_batch_size``, ``max_batch_size``, ``multiple_of``, the memory cap)
      round, floor and cap it. ``monotone`` keeps every size that was timed and paid.
    * **Learning rate.** Unless the scheduler is given another ``lr_scaling``, the learning
      rate follows AdaScale's gain (``lr_scaling="gain"``, Johnson et al. 2020; its square root
      for Adam-family optimizers, the rule Seesaw (Meterez et al. 2025) pairs with a doubled
      batch), as AdaptDL pairs its batch sizes with it.

    Unlike a timetable it is not a function of progress alone: its size depends on the signals
    it was fed after each step (:meth:`observe`), and its decisions are state, part of the
    scheduler's ``state_dict``. A decision applies to the batches drawn after it: batches
    already prefetched by DataLoader workers keep the size they were drawn with.

    Args:
        start (int, optional): the size before the first decision, and the least the
            controller decides: the batch you would train with. Default: :data:`DEFAULT_START`
            (16), or the batch the trainer integrations find.
        signal (str): ``"noise_scale"`` or ``"norm_test"``. Default: ``"noise_scale"``.
        theta (float): the norm test's ``θ``. Default: 0.9.
        confidence (float): standard errors the noise scale is taken below its smoothed
            estimate, and the step times' cost per sample below its fitted one; 0 takes the
            estimates as they are. Default: 1.
        extra_samples (float): in ``[0, 1)``, the largest fraction of samples growth may cost
            over the starting size. Default: 0.02.
        throughput (bool): weigh the measured step times; if ``False`` the batch grows as far as
            ``extra_samples`` allows. Default: ``True``.
        growth_per_epoch (float): largest factor of growth within one epoch. Default: 2.
        hysteresis (float): relative change below which the size is kept. Default: 0.05.
        interval (int): optimizer steps between decisions. Default: 20.
        warmup (int): measurements before the first decision. Default: 50.
        monotone (bool): never shrink below a size that was timed and paid. Default: ``True``.

    Example:
        >>> scheduler = BatchSizeScheduler(optimizer, schedules.Adaptive(start=32), min_batch_size=16)
    """

    needs_noise = True
    default_lr_scaling = "gain"

    _SIZE = "size"
    _EPOCH = "epoch"
    _EPOCH_BASE = "epoch_base"
    _STEPS = "steps"
    _KEPT = "kept"
    _BASE = "base"
    _REFERENCE_NOISE = "reference_noise"

    def __init__(
        self,
        start: int | None = None,
        *,
        signal: str = "noise_scale",
        theta: float = 0.9,
        confidence: float = 1.0,
        extra_samples: float = 0.02,
        throughput: bool = True,
        growth_per_epoch: float = 2.0,
        hysteresis: float = 0.05,
        interval: int = 20,
        warmup: int = 50,
        monotone: bool = True,
    ) -> None:
        self.start = None if start is None else check_positive_int("start", start)
        self.signal = check_choice("signal", signal, SIGNALS)
        self.theta = check_positive_number("theta", theta)
        self.confidence = check_non_negative_number("confidence", confidence)
        self.extra_samples = check_fraction("extra_samples", extra_samples)
        self.throughput = check_bool("throughput", throughput)
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
        self._base = 0.0  # B_0: the size first trained, the start after the constraints
        self._kept = 0.0  # the largest size timed and found to pay (the floor when monotone)
        self._reference_noise: float | None = None  # the noise scale taken as B_0's, under Adam

    def set_default_start(self, batch_size: int) -> None:
        """Start at ``batch_size`` unless a ``start`` was given: the trainer integrations pass
        the batch the user's DataLoader or arguments asked for."""
        if self.start is None:
            self.start = check_positive_int("start", batch_size)

    def initial_size(self, progress: Progress) -> float:
        """``start`` (default :data:`DEFAULT_START`): the size before the first decision."""
        return float(self.start if self.start is not None else DEFAULT_START)

    def batch_size_at(self, progress: Progress) -> float:
        if self._size is None:
            return self.initial_size(progress)
        return self._size

    def _critical(self, noise_scale: float, start: float, preconditioned: bool) -> float:
        """``B_crit`` from the smoothed noise scale: the signal itself, or under Adam the signal
        relative to the one at the first decision, times the starting size."""
        signal = noise_scale if self.signal == "noise_scale" else noise_scale / self.theta**2
        if not preconditioned:
            return signal
        if self._reference_noise is None:
            self._reference_noise = signal
        return start * signal / self._reference_noise

    def target(self, critical: float, start: float, step_times: StepTimes | None = None,
               current: float | None = None) -> float:
        """The size the two terms ask for, before the controller's bounds: the largest the
        samples allow, lowered to the one of least time and samples when step times are
        weighed."""
        by_samples = (1 + self.extra_samples) * (critical + start) - critical
        if not self.throughput or step_times is None:
            return by_samples
        timed = step_times.sizes
        largest_timed = max(timed, default=current if current is not None else start)
        line = step_times.line(self.confidence)
        if line is None:  # one size timed: half of its step taken as fixed cost, so a / b = B
            fixed_per_sample = largest_timed
        else:
            fixed, per_sample = line
            fixed_per_sample = math.inf if per_sample == 0 else fixed / per_sample
        return min(by_samples, _least_time_and_samples(fixed_per_sample, critical), 2 * largest_timed)

    def observe(self, progress: Progress, noise_scale: float, measured_steps: int, current: int, *,
                largest: float = math.inf, step_times: StepTimes | None = None,
                preconditioned: bool = False, noise: NoiseScale | None = None) -> None:
        """Take a decision, if one is due, from the signals after a step.

        Args:
            progress (Progress): where training stands.
            noise_scale (float): the smoothed ``B_simple``.
            measured_steps (int): steps the noise statistics have averaged.
            current (int): the batch size trained now, after the constraints.
            largest (float): the largest batch size the constraints allow now; decisions stop
                there. Default: unbounded.
            step_times (StepTimes, optional): seconds per step at each size trained. Default:
                none (the time is not weighed).
            preconditioned (bool): the noise scale is Adam-preconditioned. Default: ``False``.
            noise (NoiseScale, optional): the statistics behind ``noise_scale``; given, the
                decision takes their lower bound at ``confidence`` standard errors instead.
                Default: none (``noise_scale`` as it is).
        """
        if self._size is None:
            self._size = self.initial_size(progress)
        if self._base == 0.0:
            self._base = self._kept = float(current)
        self._steps += 1
        epoch = math.floor(progress.epoch) if progress.dataset_size else 0
        if epoch != self._epoch:
            self._epoch, self._epoch_base = epoch, max(float(current), self._kept if self.monotone else 0.0)
        if measured_steps < self.warmup or self._steps % self.interval:
            return
        if noise is not None:
            noise_scale = noise.lower_bound(self.confidence)
        if not math.isfinite(noise_scale) or noise_scale <= 0:
            return
        critical = self._critical(noise_scale, self._base, preconditioned)
        target = min(self.target(critical, self._base, step_times, current),
                     self._epoch_base * self.growth_per_epoch, largest)
        target = max(target, min(self._base, largest))  # never below the start
        if self.monotone:
            target = max(target, self._kept)
        if abs(target - current) > self.hysteresis * current:
            self._size = target
        if self.monotone:
            # A size decided is kept from now on once its own step time confirmed it (or at once
            # when the time is not weighed).
            timed = self.throughput and step_times is not None
            self._kept = max(self._kept, min(self._size, max(step_times.sizes, default=0)) if timed else self._size)

    def state_dict(self) -> dict[str, Any]:
        """A new dict of the controller's decision and the bounds it keeps (the epoch of the last
        decision, the size that epoch began at, the steps observed)."""
        return {self._SIZE: self._size, self._EPOCH: self._epoch, self._EPOCH_BASE: self._epoch_base,
                self._STEPS: self._steps, self._BASE: self._base, self._KEPT: self._kept,
                self._REFERENCE_NOISE: self._reference_noise}

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
        # Saved since the controller weighs step times; a state from before keeps its decision.
        self._base = check_non_negative_number(name(self._BASE), state_dict.get(self._BASE, self._size or 0.0))
        self._kept = check_non_negative_number(name(self._KEPT), state_dict.get(self._KEPT, self._size or 0.0))
        reference = state_dict.get(self._REFERENCE_NOISE)
        self._reference_noise = None if reference is None else check_positive_number(name(self._REFERENCE_NOISE),
                                                                                      reference)


def _least_time_and_samples(fixed_per_sample: float, critical: float) -> float:
    """The size with the least product of wall time and samples to a given loss,
    ``S·t(B) · E ∝ (B + B_crit)² (a + b·B) / B``, where ``a / b = fixed_per_sample``: the root of
    ``2b·B² + a·B - a·B_crit = 0``. ``B_crit`` where a larger step costs nothing more, and always
    below it, so a noise scale no larger than the batch asks for no growth."""
    if critical <= 0 or fixed_per_sample <= 0:  # no fixed cost: a larger step never pays
        return 0.0
    if math.isinf(fixed_per_sample):
        return critical
    # (r/4)(√(1 + 8·B_crit/r) - 1), written so that a large r = a/b loses no precision.
    return 2 * critical / (1 + math.sqrt(1 + 8 * critical / fixed_per_sample))

