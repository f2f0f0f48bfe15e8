"""Learning-rate scaling rules, and the optimizer hooks that apply them without compounding.

A rule maps the ratio ``batch_size / reference_batch_size`` to a factor on the learning rate.
:class:`LRFactorHook` multiplies every parameter group's ``lr`` by that factor just before
``optimizer.step()`` and puts the original value back just after, so the user's own LR
scheduler only ever reads and writes the unscaled value and keeps working unchanged (the same
approach as pytorch_warmup's dampening).
"""

from __future__ import annotations

import math
from typing import Callable, Union

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
        raise ValueError(f"lr_scaling must be one of {tuple(LR_SCALING_RULES)} or a callable, got {lr_scaling!r}")
    return LR_SCALING_RULES[lr_scaling]


class LRFactorHook:
    """Applies a factor to every parameter group's learning rate for the duration of each
    ``optimizer.step()``.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        factor (callable): returns the factor to apply at the coming step.

    After each step, :attr:`last_effective_lrs` holds the learning rates the step used.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[], float]) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self.last_effective_lrs: list[float] | None = None
        self.last_factor: float | None = None
        self._saved_lrs: list | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._scale),
            optimizer.register_step_post_hook(self._restore),
        ]

    def _scale(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        # A step that raised after this hook never ran the post-hook: undo that one first.
        self._restore(optimizer, args, kwargs)
        factor = self.factor()
        self._saved_lrs = [group["lr"] for group in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, self._saved_lrs):
            group["lr"] = lr * factor
        self.last_factor = factor
        self.last_effective_lrs = [float(group["lr"]) for group in optimizer.param_groups]

    def _restore(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._saved_lrs is not None:
            for group, lr in zip(optimizer.param_groups, self._saved_lrs):
                group["lr"] = lr
            self._saved_lrs = None

    def remove(self) -> None:
        """Detach from the optimizer."""
        for handle in self._handles:
            handle.remove()
