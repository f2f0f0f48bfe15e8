"""Learning-rate scaling rules, and the optimizer hooks that apply them without compounding.

A rule maps the ratio ``batch_size / reference_batch_size`` to a factor on the learning rate.
:class:`LRFactorHook` multiplies every parameter group's ``lr`` by that factor just before
``optimizer.step()`` runs and puts the original value back as soon as it returns (or raises),
so the user's own LR scheduler only ever reads and writes the unscaled value and keeps working
unchanged (the same approach as pytorch_warmup's dampening).
"""

from __future__ import annotations

import functools
import math
import types
from typing import Any, Callable, Union

import torch

__all__ = ["LR_SCALING_RULES", "LRFactorHook", "LRScaling", "resolve_lr_scaling"]

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


class LRFactorHook:
    """Applies a factor to every parameter group's learning rate for the duration of each
    ``optimizer.step()``.

    The optimizer's ``step`` is wrapped (as ``torch.optim.lr_scheduler`` does to count steps),
    so that the learning rates are restored in a ``finally`` clause: an exception inside the
    step, e.g. from its closure, cannot leave them scaled for an LR scheduler to compound.
    Step pre-hooks registered on the optimizer see the scaled values.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        factor (callable): returns the factor to apply at the coming step.

    After each step, :attr:`last_factor` and :attr:`last_effective_lrs` hold what the step used.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[], float]) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self.last_effective_lrs: list[float] | None = None
        self.last_factor: float | None = None
        self._active = True
        step = optimizer.step

        @functools.wraps(step)
        def scaled_step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            if not self._active:
                return step(*args, **kwargs)
            saved = self._scale()
            try:
                return step(*args, **kwargs)
            finally:
                for group, lr in zip(optimizer.param_groups, saved):
                    group["lr"] = lr

        # A bound method, as torch.optim.lr_scheduler expects when it wraps step() in turn.
        optimizer.step = types.MethodType(scaled_step, optimizer)  # type: ignore[method-assign]

    def _scale(self) -> list:
        factor = self.factor()
        groups = self.optimizer.param_groups
        saved = [group["lr"] for group in groups]
        for group, lr in zip(groups, saved):
            group["lr"] = lr * factor
        self.last_factor = factor
        self.last_effective_lrs = [float(group["lr"]) for group in groups]
        return saved

    def remove(self) -> None:
        """Stop scaling; the optimizer's step then runs as if unwrapped."""
        self._active = False
