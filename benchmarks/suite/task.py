"""What a task of the suite is: data, model, optimizer, loss, metric and recipe.

Each task module (``mnist1d``, ``gpt``, ``regression``) builds :class:`Task` objects; the runner
trains every policy on them through one loop (:mod:`.training`). A task's learning-rate
recipe is a function of the fraction of its training samples seen (by samples, not by
steps: a schedule in steps would stretch or shrink with the batch size), applied by the
user's own ``LambdaLR`` next to adabatch's factor.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .ghost_batch_norm import convert_ghost_batch_norm
from .quality import Metric

__all__ = ["Task", "cosine", "step_decay"]

#: ``loss(model, x, y)``: the mean training loss of a batch.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``evaluate(model, test_set)``: the held-out quality, in the metric's units.
EvaluateFn = Callable[[nn.Module, TensorDataset], float]


@dataclass(frozen=True)
class Task:
    """One training task of the suite.

    Args:
        name (str): the name ``--task`` selects.
        description (str): one line for the report.
        data (callable): ``data(quick)``: ``(train_set, test_set)``, generated locally and
            deterministically (no seed of the run changes them); ``quick`` builds tiny ones.
        model (callable): a new model, initialised from torch's global seed.
        optimizer (callable): the optimizer over the given parameters.
        loss (callable): ``loss(model, x, y)``, the mean loss of a batch.
        evaluate (callable): ``evaluate(model, test_set)``, the quality on held-out data.
        metric (Metric): what ``evaluate`` returns and when a value reaches a target.
        baseline_batch_size (int): the small fixed batch a practitioner would pick.
        epochs (int): passes over the training set.
        lr_multiplier (callable): the factor on the optimizer's learning rate at a fraction
            ``[0, 1]`` of the training samples.
        clip_grad_norm (float, optional): clip the gradients' total norm to this before each
            step. Default: no clipping.
        evals_per_epoch (int): evaluations per epoch, at equal intervals of samples. Default: 4.
        quick_epochs (int): epochs under ``--quick``. Default: 1.
    """

    name: str
    description: str
    data: Callable[[bool], tuple[TensorDataset, TensorDataset]]
    model: Callable[[], nn.Module]
    optimizer: Callable[[object], torch.optim.Optimizer]
    loss: LossFn
    evaluate: EvaluateFn
    metric: Metric
    baseline_batch_size: int
    epochs: int
    lr_multiplier: Callable[[float], float]
    clip_grad_norm: float | None = None
    evals_per_epoch: int = 4
    quick_epochs: int = 1

    def with_ghost_batch_norm(self) -> Task:
        """This task, named ``<name>+ghost-bn``, with its model's BatchNorm layers normalising
        ghost batches of at most the baseline's size (:func:`.ghost_batch_norm.convert_ghost_batch_norm`,
        the suite's own): the baseline trains exactly as before, a grown batch keeps its
        BatchNorm statistics."""
        build, size = self.model, self.baseline_batch_size
        return dataclasses.replace(self, name=f"{self.name}+ghost-bn",
                                   model=lambda: convert_ghost_batch_norm(build(), size))

    def epochs_for(self, quick: bool) -> int:
        return self.quick_epochs if quick else self.epochs


def step_decay(milestones: tuple[float, ...], gamma: float) -> Callable[[float], float]:
    """``gamma`` to the number of ``milestones`` (fractions of training) passed."""

    def multiplier(fraction: float) -> float:
        return gamma ** sum(fraction >= milestone for milestone in milestones)

    return multiplier


def cosine(warmup: float = 0.0, final: float = 0.0) -> Callable[[float], float]:
    """A linear warm-up over the first ``warmup`` of training, then a cosine from 1 to ``final``."""

    def multiplier(fraction: float) -> float:
        if fraction < warmup:
            return (fraction + 1e-3) / (warmup + 1e-3)
        progress = min(1.0, (fraction - warmup) / (1 - warmup))
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
