"""The glue to FSDP2 (``torch.distributed.fsdp.fully_shard``): the local shards of DTensors, and a
``train_step``'s hold on FSDP's parameter gathering and gradient synchronisation.

``fully_shard`` turns a module's parameters, their gradients and an optimizer's state of them
into DTensors sharded over a device mesh: each rank holds one slice. A statistic of the whole
gradient (a squared norm, a dot product) is then the sum over the ranks of the same statistic of
the local slices: :func:`shard_sum` finds how to add them up (one all-reduce of a few scalars).

FSDP exchanges data inside the forward pass (it all-gathers each module's parameters) and the
backward pass (it reduce-scatters each module's gradients). A rank that runs out of memory in a
forward pass would leave the others waiting in the next all-gather, so :class:`GatheredStep`
gathers every parameter once, at the start of a step, keeps them gathered through the step's
micro-batches and turns FSDP's gradient synchronisation off until the backward passes that must
reduce-scatter: between two such backward passes no rank runs a collective, which is where the
ranks agree on out-of-memory errors.

This module imports neither ``torch.distributed.tensor`` nor ``torch.distributed.fsdp``: a tensor
can only be a DTensor, and a module only an FSDP module, once the program has imported them.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Sequence

import torch

__all__ = ["GatheredStep", "ShardSum", "is_fsdp_module", "is_sharded", "local_tensor", "shard_sum"]


def _dtensor_type() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _fsdp_module_type() -> type | None:
    module = sys.modules.get("torch.distributed.fsdp")
    return None if module is None else getattr(module, "FSDPModule", None)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a DTensor (a view, no copy); any other tensor as it is."""
    dtensor = _dtensor_type()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def is_sharded(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's parameters are DTensors (a model under ``fully_shard``)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(
        isinstance(p, dtensor) for group in optimizer.param_groups for p in group["params"])


def is_fsdp_module(module: Any) -> bool:
    """Whether ``module`` is a module ``fully_shard`` was applied to."""
    fsdp_module = _fsdp_module_type()
    return fsdp_module is not None and isinstance(module, fsdp_module)


class ShardSum:
    """Sums per-rank statistics of local shards into the statistic of the whole tensors.

    Each rank holds one slice of a tensor sharded over a mesh dimension, and the same copy over a
    replicated one; the whole tensor's squared norm is the sum over the ranks of the local slices'
    squared norms, divided by the number of copies.

    Args:
        mesh (DeviceMesh): the mesh the tensors are distributed over.
        copies (int): how many ranks hold each slice (the sizes of the replicated mesh dimensions).
    """

    def __init__(self, mesh: Any, copies: int) -> None:
        self.mesh = mesh
        self.copies = copies

    def __call__(self, values: Sequence[float]) -> list[float]:
        """The sums over the mesh of each rank's ``values`` (one all-reduce per mesh dimension)."""
        import torch.distributed as dist

        total = torch.tensor(list(values), dtype=torch.float64, device=self.mesh.device_type)
        for dim in range(self.mesh.ndim):
            dist.all_reduce(total, group=self.mesh.get_group(dim))
        return [value / self.copies for value in total.tolist()]


def shard_sum(tensors: Sequence[torch.Tensor]) -> ShardSum | None:
    """How to sum statistics of the local slices of ``tensors`` over the ranks, or ``None`` when
    none of them is a DTensor (each rank then holds the whole tensors).

    Raises:
        ValueError: if DTensors and plain tensors are mixed, if the DTensors lie on different
            meshes or are replicated over different dimensions, or if one is a partial sum.
    """
    dtensor = _dtensor_type()
    if dtensor is None or not tensors:
        return None
    kinds = {isinstance(t, dtensor) for t in tensors}
    if kinds == {False}:
        return None
    if len(kinds) > 1:
        raise ValueError("the gradients mix DTensors and plain tensors: the noise statistics need every gradient "
                         "sharded (fully_shard the whole model) or none")
    mesh, layout = tensors[0].device_mesh, _replicated_dims(tensors[0])
    for tensor in tensors[1:]:
        if tensor.device_mesh != mesh or _replicated_dims(tensor) != layout:
            raise ValueError(f"the gradients are distributed differently ({tensors[0].placements} on "
                             f"{tensors[0].device_mesh} and {tensor.placements} on {tensor.device_mesh}): the noise "
                             f"statistics need every gradient on one mesh, replicated over the same dimensions")
    return ShardSum(mesh, math.prod(mesh.size(dim) for dim in layout))


def _replicated_dims(tensor: Any) -> tuple[int, ...]:
    dims = []
    for dim, placement in enumerate(tensor.placements):
        if placement.is_partial():
            raise ValueError(f"a gradient is a partial sum over the mesh ({tensor.placements}): the noise statistics "
                             f"need it reduced (sharded or replicated)")
        if placement.is_replicate():
            dims.append(dim)
    return tuple(dims)


class GatheredStep:
    """A ``train_step``'s hold on an FSDP2 model: its parameters gathered for the whole step, its
    gradients reduce-scattered only in the backward passes the step chooses.

    :meth:`gather` all-gathers every FSDP module's parameters (the step's only all-gather) and
    keeps them gathered through the forward and backward passes that follow (FSDP's
    ``reshard_after_forward=False`` and ``set_reshard_after_backward(False)``), with gradient
    synchronisation off (``set_requires_gradient_sync(False)``): those passes run no collective.
    :meth:`synchronise_next_backward` turns synchronisation on for one backward pass, which
    reduce-scatters the gradients accumulated so far into the sharded ``.grad`` (FSDP adds them to
    what an earlier synchronised pass left there); after the last one FSDP frees the gathered
    parameters as it goes. :meth:`abandon` drops what a failed attempt accumulated;
    :meth:`release` gives the model back with the settings it had.

    Args:
        model (FSDPModule): the root module ``fully_shard`` was applied to last.
        optimizer (Optimizer, optional): steps the model's parameters; checked to hold none
            other. Default: none (no check).

    Raises:
        ValueError: if the optimizer steps a parameter the model does not hold (``model`` is a
            sharded layer, not the root).
    """

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self.modules = [module for module in model.modules() if is_fsdp_module(module)]
        self._settings: list[tuple[Any, bool, bool, bool]] | None = None
        if optimizer is not None:
            # Between steps a module may hold its gathered parameters (reshard_after_backward
            # off); its registered parameters are the optimizer's shards once resharded.
            for module in self.modules:
                module.reshard()
            held = {id(p) for p in model.parameters()}
            if any(id(p) not in held for group in optimizer.param_groups for p in group["params"]):
                raise ValueError("train_step(model=...) must be the root module fully_shard was applied to last, "
                                 "holding every parameter the optimizer steps; this module lacks some of them")

    def gather(self) -> None:
        """All-gather every FSDP module's parameters, to keep through the step; gradient
        synchronisation off. A collective: every rank calls it at the same point."""
        if self._settings is None:
            # FSDP settles which module is the root, and the root's defaults, on the first
            # forward pass; the settings to give back are read after that.
            self.model._get_fsdp_state()._lazy_init()
            self._settings = self.settings()
        self.model.set_reshard_after_forward(False)
        self.model.set_reshard_after_backward(False)
        self.model.set_requires_gradient_sync(False)
        for module in self.modules:
            module.unshard()

    def synchronise_next_backward(self, last: bool) -> None:
        """Reduce-scatter the gradients in the next backward pass; after the ``last`` one of the
        step, free the gathered parameters."""
        self.model.set_requires_gradient_sync(True)
        self.model.set_reshard_after_backward(last)

    def accumulate_next_backward(self) -> None:
        """Keep the next backward pass's gradients on this rank, gathered, with no collective."""
        self.model.set_requires_gradient_sync(False)
        self.model.set_reshard_after_backward(False)

    def abandon(self) -> None:
        """Drop what a failed attempt left: the gathered gradients (the parameters registered on
        the modules are the gathered ones while they are gathered) and FSDP's state of the
        interrupted pass (``reset_iter_state``, which also reshards the parameters)."""
        self.model.zero_grad(set_to_none=True)
        # Under a MixedPrecisionPolicy whose reduce_dtype differs from param_dtype, FSDP moves
        # the gradients accumulated without synchronisation to a buffer of its own, which
        # torch 2.13's reset_iter_state keeps: the retried step would add the failed one's.
        for module in self.modules:
            group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
            for parameter in getattr(group, "fsdp_params", ()):
                parameter.unsharded_accumulated_grad = None
        self.model.reset_iter_state()

    def release(self) -> None:
        """Reshard whatever is still gathered and give FSDP back the settings found by :meth:`gather`."""
        if self._settings is None:
            return
        for module in self.modules:
            module.reshard()
        for module, reshard_after_forward, reshard_after_backward, synchronise in self._settings:
            module.set_reshard_after_forward(reshard_after_forward, recurse=False)
            module.set_reshard_after_backward(reshard_after_backward, recurse=False)
            module.set_requires_gradient_sync(synchronise, recurse=False)
        self._settings = None

    def settings(self) -> list[tuple[Any, bool, bool, bool]]:
        """Each FSDP module's ``(module, reshard_after_forward, reshard_after_backward,
        requires_gradient_sync)``. FSDP has setters for them and no getters, so they are read off
        its parameter groups (torch 2.13's names; FSDP's defaults where a version lacks them). A
        ``reshard_after_forward`` given as a number of ranks comes back as ``True``."""
        settings = []
        for module in self.modules:
            group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
            if group is None:  # a module with no parameters of its own: its settings do nothing
                settings.append((module, True, True, True))
                continue
            settings.append((module, bool(getattr(group, "_reshard_after_forward", True)),
                             bool(getattr(group, "reshard_after_backward", True)),
                             bool(getattr(group, "reduce_grads", True))))
        return settings
