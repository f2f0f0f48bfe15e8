"""GhostBatchNorm: BatchNorm whose training statistics stay over batches of a fixed size; the
suite's ``--ghost-batch-norm``.

BatchNorm normalises each sample by the mean and variance of the batch it arrives in, and the
noise of those statistics regularises the model. When the batch grows, the statistics become
more precise and the regularisation fades: Hoffer et al. (2017), "Train longer, generalize
better", close part of the large-batch generalisation gap by "ghost batch normalisation", taking
the statistics over ghost batches of a fixed, small size while the optimizer steps on the whole
batch. :func:`convert_ghost_batch_norm` turns a model's BatchNorm layers into
:class:`GhostBatchNorm` layers whose ghost batches are the baseline's size, so that the suite can
measure how much of what growth costs a model with BatchNorm comes from its statistics.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from adabatch._validation import check_positive_int

__all__ = ["GhostBatchNorm", "convert_ghost_batch_norm"]


class GhostBatchNorm(_BatchNorm):
    """BatchNorm over ghost batches of at most ``virtual_batch_size`` samples while training.

    A training batch larger than ``virtual_batch_size`` is split along its first dimension into
    the fewest ghost batches of at most that many samples, as equal as can be (their sizes differ
    by at most one, so each has more than half of ``virtual_batch_size``); each is normalised by
    its own statistics and updates the running statistics, as a batch of its size would. A
    batch of at most ``virtual_batch_size`` samples, and every batch in evaluation mode, is
    normalised exactly as by ``nn.BatchNorm``. Inputs of any dimension from 2 on are accepted
    (those of ``BatchNorm1d``, ``2d`` and ``3d``). Under torch.distributed each replica splits its
    own batch.

    Args:
        num_features (int): channels ``C`` of an input of shape ``(N, C, ...)``.
        virtual_batch_size (int): the largest ghost batch; the batch you would train with.
        eps, momentum, affine, track_running_stats, device, dtype: as for ``nn.BatchNorm1d``.

    Example:
        >>> norm = GhostBatchNorm(8, virtual_batch_size=32)
        >>> norm(torch.randn(100, 8)).shape  # ghost batches of 25 samples
        torch.Size([100, 8])
    """

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = check_positive_int("virtual_batch_size", virtual_batch_size)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions, (N, C, ...), got {input.dim()}D input")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        size = input.shape[0]
        if not self.training or size <= self.virtual_batch_size:
            return super().forward(input)
        ghosts = math.ceil(size / self.virtual_batch_size)
        return torch.cat([super(GhostBatchNorm, self).forward(ghost) for ghost in input.tensor_split(ghosts)])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


def convert_ghost_batch_norm(module: nn.Module, virtual_batch_size: int) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` (and ``module`` itself, if it is one) by a
    :class:`GhostBatchNorm` with ghost batches of at most ``virtual_batch_size`` samples.

    As ``nn.SyncBatchNorm.convert_sync_batchnorm`` does, each new layer takes over the old one's
    parameters and buffers, under the same names: the model's ``state_dict`` keeps its keys and
    values, and an optimizer built on the parameters before still holds them. Convert before
    wrapping the model in ``DistributedDataParallel`` or ``torch.compile``. ``SyncBatchNorm``
    layers (statistics over every replica) are left as they are.

    Args:
        module (nn.Module): the model.
        virtual_batch_size (int): the largest ghost batch, per replica: the batch you would
            train with (an ``Adaptive`` schedule's ``start``, divided by the replicas).

    Returns:
        ``module`` with its BatchNorm layers replaced, or the new layer if ``module`` is one.

    Raises:
        ValueError: if ``virtual_batch_size`` is not a positive integer, or if a BatchNorm layer
            is lazy and not yet initialised (run one batch through the model first).

    Example:
        >>> model = convert_ghost_batch_norm(model, virtual_batch_size=32)
    """
    virtual_batch_size = check_positive_int("virtual_batch_size", virtual_batch_size)
    if not isinstance(module, _BatchNorm) or isinstance(module, (GhostBatchNorm, nn.SyncBatchNorm)):
        for name, child in module.named_children():
            module.add_module(name, convert_ghost_batch_norm(child, virtual_batch_size))
        return module
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(f"{type(module).__name__} is not initialised yet: run one batch through the model before "
                         f"convert_ghost_batch_norm")
    converted = GhostBatchNorm(module.num_features, virtual_batch_size, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
    # The same tensors, not copies: the keys of state_dict and an optimizer's references stay.
    for name, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        setattr(converted, name, value)
    converted.train(module.training)
    return converted
