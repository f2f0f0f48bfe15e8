"""Learning-rate scaling: the rules, the factor of a batch, and the hook that applies it.

A rule maps the ratio ``batch_size / reference_batch_size`` to a factor on the learning rate;
:class:`LRFactor` adds AdaScale's gain and the warm-up after a change of batch size.
:class:`LRFactorHook` multiplies every parameter group's ``lr`` by the factor just before
``optimizer.step()`` runs and puts the original value back as soon as it returns (or raises),
so the user's own LR scheduler only ever reads and writes the unscaled value and keeps working
unchanged (the same approach as pytorch_warmup's dampening). :class:`PlannedFactor` joins the
two to the plan of batches: each step runs with the factor of the batch coming in the plan.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Union

import torch

from ._validation import check_non_negative_int, check_positive_int, is_integer, is_real
from .noise import is_adam_family
from .plan import BatchPlan, PlannedBatch
from .schedules.base import Progress

__all__ = ["LR_SCALING_RULES", "AppliedFactor", "LRFactor", "LRFactorHook", "LRScaling", "PlannedFactor",
           "resolve_lr_scaling"]

#: A rule: a callable from the batch-size ratio to a learning-rate factor.
LRScalingFn = Callable[[float], float]
LRScaling = Union[str, LRScalingFn]


def no_scaling(ratio: float) -> float:
    """Keep the learning rate: growing the batch then anneals the gradient noise
    (Smith et al. 2018, "Don't Decay the Learning Rate, Increase the Batch Size")."""
    return 1.0


def linear_scaling(ratio: float) -> float:
    """Scale the learning rate with the batch (Goyal et al. 2017, "Accurate, Large Minibatch SGD")."""
    return ratio


def sqrt_scaling(ratio: float) -> float:
    """Scale the learning rate with the square root of the batch (Krizhevsky 2014, "One weird
    trick"; Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
    Algorithms", for Adam)."""
    return math.sqrt(ratio)


LR_SCALING_RULES: dict[str, LRScalingFn] = {"none": no_scaling, "linear": linear_scaling, "sqrt": sqrt_scaling}


def resolve_lr_scaling(lr_scaling: LRScaling) -> LRScalingFn:
    """Return the rule named by ``lr_scaling``, or ``lr_scaling`` itself if it is callable."""
    if callable(lr_scaling):
        return lr_scaling
    if lr_scaling not in LR_SCALING_RULES:
        names = (*LR_SCALING_RULES, "gain")
        raise ValueError(f"lr_scaling must be one of {names} or a callable, got {lr_scaling!r}")
    return LR_SCALING_RULES[lr_scaling]


class LRFactor:
    """The factor on the learning rate for a batch of a given target size.

    A rule's factor is ``rule(target / reference_batch_size)``; ``"gain"`` is AdaScale's gain
    (Johnson et al. 2020), ``(B_simple/B_0 + 1) / (B_simple/B + 1)`` from the measured noise
    scale ``B_simple``: 1 without gradient noise (a larger batch changes nothing), ``B/B_0``
    when it is all noise (linear scaling), and 1 until the noise scale is measured. For an
    Adam-family optimizer, whose step does not grow with the gradient's norm, its square root
    (the square-root rule of Malladi et al. 2022 where the noise dominates).

    After each change of batch size the factor moves linearly from the one last used to the
    new one over ``warmup_steps`` optimizer steps (Goyal et al. 2017 warm up after a batch
    increase).

    Args:
        lr_scaling (str or callable): ``"none"``, ``"linear"``, ``"sqrt"``, ``"gain"`` or a
            callable from the ratio to a factor.
        optimizer (Optimizer): whose family (Adam's or not) ``"gain"`` depends on.
        schedule (Schedule): whose initial size, after the constraints, is the reference
            unless ``reference_batch_size`` is given.
        constraints (BatchSizeConstraints): the static bounds the reference keeps to.
        noise_meter (GradientNoiseMeter, optional): the measured noise scale, for ``"gain"``.
        reference_batch_size (int, optional): the batch size at which the factor is 1.
        warmup_steps (int): steps over which the factor moves after a change. Default: 0.
    """

    WARMUP_FROM = "warmup_from"
    WARMUP_BEGIN = "warmup_begin"

    def __init__(
        self,
        lr_scaling: LRScaling,
        optimizer: torch.optim.Optimizer,
        schedule: Any,
        constraints: Any,
        noise_meter: Any = None,
        *,
        reference_batch_size: int | None = None,
        warmup_steps: int = 0,
    ) -> None:
        self.lr_scaling = lr_scaling
        self._rule = None if lr_scaling == "gain" else resolve_lr_scaling(lr_scaling)
        self.optimizer = optimizer
        self.schedule = schedule
        self.constraints = constraints
        self.noise_meter = noise_meter
        self._given_reference = None if reference_batch_size is None else check_positive_int(
            "reference_batch_size", reference_batch_size)
        self._reference: int | None = None
        self.warmup_steps = check_non_negative_int("warmup_steps", warmup_steps)
        self.warmup_from: float | None = None
        self.warmup_begin = 0

    @property
    def reference_batch_size(self) -> int:
        """The batch size at which the factor is 1."""
        if self._given_reference is not None:
            return self._given_reference
        if self._reference is None:
            # The schedule's start under the static bounds: a memory cap that falls below it
            # later, or an adaptive schedule's later decisions, must not move the reference (and
            # with it every learning rate).
            start = Progress(samples=0, dataset_size=self.constraints.dataset_size)
            self._reference = self.constraints.apply(self.schedule.initial_size(start), memory=False)
        return self._reference

    def forget_reference(self) -> None:
        """Work the reference out again at its next use (the dataset it depends on was bound)."""
        self._reference = None

    def __call__(self, target: int, steps: int) -> float:
        """The factor for a batch of ``target`` samples after ``steps`` optimizer steps."""
        factor = self.scaled(target)
        if self.warmup_from is None or not self.warmup_steps:
            return factor
        progress = (steps - self.warmup_begin + 1) / self.warmup_steps
        if progress >= 1:
            return factor
        return self.warmup_from + (factor - self.warmup_from) * progress

    def scaled(self, target: int) -> float:
        """The factor for ``target`` without warm-up."""
        if self._rule is None:
            return self._gain(target)
        factor = self._rule(target / self.reference_batch_size)
        # Checked at every step: a plain float skips the slower abstract-type test.
        if (type(factor) is not float and not is_real(factor)) or not math.isfinite(factor) or factor <= 0:
            shown = float(factor) if is_real(factor) else factor
            raise ValueError(f"lr_scaling returned {shown!r} for batch size {target}; it must be positive and finite "
                             f"(a real number)")
        return float(factor)

    def _gain(self, target: int) -> float:
        noise_scale = math.nan if self.noise_meter is None else self.noise_meter.noise.noise_scale
        if math.isnan(noise_scale):
            return 1.0
        reference = self.reference_batch_size
        if math.isinf(noise_scale):
            gain = target / reference
        else:
            gain = (noise_scale / reference + 1) / (noise_scale / target + 1)
        return math.sqrt(gain) if is_adam_family(self.optimizer) else gain

    def after_step(self, trained_target: int, coming_target: int, factor_used: float, steps: int) -> None:
        """Start a warm-up when the coming batch's target differs from the one just trained."""
        if self.warmup_steps and coming_target != trained_target:
            self.warmup_from = factor_used
            self.warmup_begin = steps

    def state_dict(self) -> dict[str, Any]:
        return {self.WARMUP_FROM: self.warmup_from, self.WARMUP_BEGIN: self.warmup_begin}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        warmup_from, warmup_begin = state_dict[self.WARMUP_FROM], state_dict[self.WARMUP_BEGIN]
        if warmup_from is not None and (not is_real(warmup_from) or not math.isfinite(warmup_from)
                                        or warmup_from <= 0):
            raise ValueError(f"scheduler state_dict[{self.WARMUP_FROM!r}] must be a positive number or None, "
                             f"got {warmup_from!r}")
        if not is_integer(warmup_begin) or warmup_begin < 0:
            raise ValueError(f"scheduler state_dict[{self.WARMUP_BEGIN!r}] must be a non-negative integer, "
                             f"got {warmup_begin!r}")
        self.warmup_from = None if warmup_from is None else float(warmup_from)
        self.warmup_begin = int(warmup_begin)


class AppliedFactor(NamedTuple):
    """What one ``optimizer.step()`` ran with."""

    factor: float
    effective_lrs: list[float]
    #: What the factor was computed for, as handed back by the factor callable.
    context: Any


class LRFactorHook:
    """Applies a factor to every parameter group's learning rate for the duration of each
    ``optimizer.step()``.

    The optimizer's ``step`` is wrapped (as ``torch.optim.lr_scheduler`` does to count steps),
    so that the learning rates are restored in a ``finally`` clause: an exception inside the
    step, e.g. from its closure, cannot leave them scaled for an LR scheduler to compound.
    Step pre-hooks registered on the optimizer see the scaled values.

    An optimizer is wrapped once, whatever the number of hooks built on it: the optimizer
    points to its hook, and a new hook on the same optimizer replaces the old one (with a
    warning), which then applies nothing. So rebuilding a scheduler (re-running a notebook
    cell, resuming in the same process) never compounds the factors. A copy of the hook
    (``copy.deepcopy`` or a pickle round trip, which copy the optimizer without its wrapper)
    wraps its own copy of the optimizer.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        factor (callable): returns ``(factor, context)`` for the coming step; the context
            comes back with :meth:`take_applied`.
    """

    #: The attribute by which an optimizer points to the hook that scales it.
    ATTRIBUTE = "_adabatch_lr_factor_hook"

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[], tuple[float, Any]]) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self._applied: AppliedFactor | None = None
        self._install()

    def _install(self) -> None:
        optimizer = self.optimizer
        previous = optimizer.__dict__.get(self.ATTRIBUTE)
        if previous is not None and previous is not self:
            warnings.warn(
                f"{type(optimizer).__name__} already had its learning rate scaled by another BatchSizeScheduler; "
                f"the new scheduler replaces it, and the old one no longer scales anything", UserWarning,
                stacklevel=5)  # the user's BatchSizeScheduler(...), through PlannedFactor and __init__
        if previous is None:
            _wrap_step(optimizer)
        optimizer.__dict__[self.ATTRIBUTE] = self

    def take_applied(self) -> AppliedFactor | None:
        """What the last ``optimizer.step()`` ran with, or ``None`` if it has not run since the
        last call (a step a GradScaler skipped); forgets it."""
        applied, self._applied = self._applied, None
        return applied

    def scale(self) -> list[Any]:
        """Multiply every learning rate by the coming factor; returns the unscaled values."""
        factor, context = self.factor()
        groups = self.optimizer.param_groups
        saved = [group["lr"] for group in groups]
        for group, lr in zip(groups, saved):
            group["lr"] = lr * factor
        self._applied = AppliedFactor(factor, [float(group["lr"]) for group in groups], context)
        return saved

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_applied": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._install()


class PlannedFactor:
    """The learning-rate factor of the plan's batches: applied to each ``optimizer.step()``,
    taken back when the step is counted, and warmed up after a change of batch size.

    A step runs with the factor of the batch the plan has coming when ``optimizer.step()`` is
    called, applied by an :class:`LRFactorHook`. The hook hands the factor back with the batch
    it was computed for, so the step is counted as the batch it trained, not one decided again.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        lr (LRFactor): the factor of a batch.
        plan (BatchPlan): the batches drawn, and the steps counted.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: LRFactor, plan: BatchPlan) -> None:
        self.optimizer = optimizer
        self.lr = lr
        self.plan = plan
        self._last_lrs: list[float] | None = None
        self._hook = LRFactorHook(optimizer, self.coming)

    def coming(self) -> tuple[float, tuple[int, PlannedBatch]]:
        """The factor of the coming step, with the position it follows and the batch there."""
        position = self.plan.position
        batch = self.plan.batch_at(position)
        return self.lr(batch.target, self.plan.steps), (position, batch)

    def coming_lrs(self, factor: float | None = None) -> list[float]:
        """Every parameter group's learning rate times ``factor`` (default: the coming factor)."""
        if factor is None:
            factor = self.coming()[0]
        return [float(group["lr"]) * factor for group in self.optimizer.param_groups]

    def last_lrs(self) -> list[float]:
        """The effective learning rates of the last counted step (before the first:
        :meth:`coming_lrs`)."""
        return list(self._last_lrs) if self._last_lrs is not None else self.coming_lrs()

    def take_step(self) -> tuple[PlannedBatch, float]:
        """The batch the step being counted trained and the factor it ran with; call it before
        the plan advances. A step the optimizer skipped (a GradScaler's) is counted as the
        coming batch, with the coming factor."""
        position = self.plan.position
        applied = self._hook.take_applied()
        if applied is not None and applied.context[0] == position:
            batch = applied.context[1]
        else:
            batch = self.plan.batch_at(position)
        if applied is None:
            factor = self.lr(batch.target, self.plan.steps)  # the coming factor, of this batch
            self._last_lrs = self.coming_lrs(factor)
        else:
            factor, self._last_lrs = applied.factor, applied.effective_lrs
        return batch, factor

    def after_step(self, trained: PlannedBatch, factor_used: float) -> None:
        """Start a warm-up if the batch coming after ``trained`` has another target
        (:meth:`LRFactor.after_step`); call it once the plan has advanced."""
        if self.lr.warmup_steps:
            self.lr.after_step(trained.target, self.plan.batch_at(self.plan.position).target, factor_used,
                               self.plan.steps)


def _wrap_step(optimizer: torch.optim.Optimizer) -> None:
    """Wrap ``optimizer.step`` to apply the factor of the hook the optimizer points to."""
    step = optimizer.step

    @functools.wraps(step)
    def scaled_step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        hook = optimizer.__dict__.get(LRFactorHook.ATTRIBUTE)
        if hook is None:
            return step(*args, **kwargs)
        saved = hook.scale()
        try:
            return step(*args, **kwargs)
        finally:
            for group, lr in zip(optimizer.param_groups, saved):
                group["lr"] = lr

    # A bound method, as torch.optim.lr_scheduler expects when it wraps step() in turn.
    optimizer.step = types.MethodType(scaled_step, optimizer)  # type: ignore[method-assign]
