"""GradientNoiseMeter: reads squared gradient norms off the optimizer's parameters (Adam-family
gradients preconditioned) and feeds a :class:`~adabatch.noise.NoiseScale`; see :mod:`adabatch.noise`."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .._validation import is_integer
from ..fsdp import ShardSum, local_tensor, shard_sum
from .scale import DEFAULT_EMA_DECAY, NoiseScale


def is_adam_family(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter group has Adam's ``betas`` and ``eps`` (Adam, AdamW, NAdam,
    RAdam, Adamax...): an optimizer that divides by a second-moment estimate."""
    return all(group.get("betas") is not None and group.get("eps") is not None for group in optimizer.param_groups)


def preconditioner(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, torch.Tensor] | None:
    """``1 / (√v̂ + eps)`` for each parameter with a gradient of an Adam-family optimizer (one
    with an ``exp_avg_sq`` state and ``betas``), or ``None`` for other optimizers and before the
    first step. For a sharded parameter (a DTensor, under FSDP2) it is this rank's slice, shaped
    as the local slice of the gradient."""
    if not is_adam_family(optimizer):
        return None
    scales: dict[torch.Tensor, torch.Tensor] = {}
    for group in optimizer.param_groups:
        # AMSGrad divides by the running maximum of the second moment.
        key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        parameters, second_moments, corrections = [], [], []
        for parameter in group["params"]:
            if parameter.grad is None:  # never trained (a frozen or unused part): not measured
                continue
            state = optimizer.state.get(parameter, {})
            if key not in state:
                return None
            parameters.append(parameter)
            second_moments.append(local_tensor(state[key]))
            corrections.append(1 - group["betas"][1] ** float(state["step"]))
        if not parameters:
            continue
        # One kernel per operation for the whole group: on a small model each tensor operation
        # costs more than its arithmetic.
        group_scales = torch._foreach_div(second_moments, corrections)
        torch._foreach_sqrt_(group_scales)
        torch._foreach_add_(group_scales, group["eps"])
        torch._foreach_reciprocal_(group_scales)
        scales.update(zip(parameters, group_scales))
    return scales


class GradientNoiseMeter:
    """Reads squared gradient norms off an optimizer's parameters and feeds a :class:`NoiseScale`.

    Sharded gradients (DTensors, under FSDP2) are read as their local slices, and each statistic
    is summed over the ranks (one all-reduce of at most three numbers), so it equals that of the
    whole gradients.

    Args:
        optimizer (Optimizer): whose parameters' ``.grad`` are read; an Adam-family optimizer's
            second-moment estimate preconditions them.
        decay (float): decay of the moving averages. Default: 0.95.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, decay: float = DEFAULT_EMA_DECAY) -> None:
        self.optimizer = optimizer
        self.noise = NoiseScale(decay)
        self._small: tuple[float, int] | None = None
        self._previous: tuple[int, int] | None = None  # the kept gradient's row in the buffer, its batch size
        self._restored: tuple[int, torch.Tensor, int] | None = None  # a kept gradient loaded from a checkpoint
        self._buffer: torch.Tensor | None = None  # the plain loop's two flat gradients (2 × parameters)
        self._rows: list[list[torch.Tensor]] = []  # each row's views shaped as the gradients
        self._shapes: list[torch.Size] | None = None
        self._shards: ShardSum | None = None  # how the last gradients read are summed over the ranks

    def _preconditioned(self) -> list[torch.Tensor]:
        """The gradients (their local slices, if sharded), preconditioned for Adam."""
        parameters = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in parameters]
        self._shards = shard_sum(grads)
        if self._shards is not None:
            grads = [local_tensor(grad) for grad in grads]
        scales = preconditioner(self.optimizer)
        if scales is None:
            return grads
        return torch._foreach_mul(grads, [scales[p] for p in parameters])

    def _over_ranks(self, values: list[float]) -> list[float]:
        """Statistics of the local slices summed into those of the whole gradients."""
        return values if self._shards is None else self._shards(values)

    @torch.no_grad()
    def _sqr_norm(self, grads: list[torch.Tensor]) -> float:
        if not grads:
            return math.nan
        # One kernel for the norms and one transfer; squared and summed in double precision,
        # as tr(Σ) is a difference of two nearly equal squared norms.
        local = math.fsum(norm * norm for norm in torch.stack(torch._foreach_norm(grads)).tolist())
        return self._over_ranks([local])[0]

    def after_first_micro_batch(self, batch_small: int, share: float, grad_scale: float = 1.0) -> None:
        """Record ``|G_small|²`` from the gradients accumulated so far: the first micro-batch's
        mean gradient times its ``share`` of the batch (times a GradScaler's ``grad_scale``)."""
        self._small = (self._sqr_norm(self._preconditioned()) / (share * grad_scale) ** 2, batch_small)

    def after_batch(self, batch_big: int, grad_scale: float = 1.0) -> bool:
        """Pair the whole batch's gradient with the first micro-batch's; returns whether counted."""
        small, self._small = self._small, None
        if small is None:
            return False
        grad_sqr_big = self._sqr_norm(self._preconditioned()) / grad_scale**2
        return self.noise.update(small[0], small[1], grad_sqr_big, batch_big)

    def before_all_reduce(self, grad_scale: float = 1.0) -> None:
        """Record this rank's ``|G_small|²``: its whole batch's gradient before the ranks average it."""
        self._small = (self._sqr_norm(self._preconditioned()) / grad_scale**2, 0)

    def after_all_reduce(self, batch_small: int, batch_big: int, collective: Any, grad_scale: float = 1.0) -> bool:
        """Pair the ranks' mean ``|G_small|²`` (summed over the ranks) with the averaged gradient's
        ``|G_big|²`` over ``batch_big`` samples; returns whether counted."""
        small, self._small = self._small, None
        if small is None:
            return False
        grad_sqr_small = collective.sum([small[0]])[0] / collective.world_size
        grad_sqr_big = self._sqr_norm(self._preconditioned()) / grad_scale**2
        return self.noise.update(grad_sqr_small, batch_small, grad_sqr_big, batch_big)

    def from_consecutive_steps(self, batch_size: int, measure: bool = True, keep: bool = True,
                               rescale: float = 1.0) -> bool:
        """The plain loop's fallback: pair this step's gradient (``batch_size`` samples) with the
        previous step's, as two independent batches. Biased: see the module's docstring.

        Args:
            batch_size (int): samples behind this step's gradient.
            measure (bool): pair this step with the previous one, if that one was kept.
            keep (bool): keep this step's gradient (one flat copy) for the next step's pair.
            rescale (float): the factor that undoes the loop's rescaling of this step's
                gradient (see :class:`~adabatch.noise.backward_norms.BackwardNorms`). Default: 1.

        Returns:
            whether a pair was counted.
        """
        previous, self._previous = self._previous, None
        restored, self._restored = self._restored, None
        if not (measure or keep):
            return False
        grads = self._preconditioned()
        if not grads:
            return False
        shapes = [g.shape for g in grads]
        if shapes != self._shapes:
            self._allocate(grads, shapes)
            previous = None  # kept for other parameters: no pair
        if restored is not None and restored[1].numel() == self._buffer.shape[1]:  # type: ignore[union-attr]
            row, gradient, kept_size = restored
            with torch.no_grad():
                self._buffer[row].copy_(gradient)  # type: ignore[index]
            previous = (row, kept_size)
        # The two steps' gradients take turns in the rows of one flat double-precision buffer:
        # a step's gradient is one copy into its row, and a pair's three products
        # (|g|², |g_previous|², g·g_previous) are one Gram product. Each tensor operation here
        # costs more than its arithmetic, so there are few of them.
        row = 0 if previous is None else 1 - previous[0]
        with torch.no_grad():
            _copy(self._rows[row], grads)
            if rescale != 1.0:
                self._buffer[row].mul_(rescale)  # type: ignore[index]
            if keep:
                self._previous = (row, batch_size)
            if not measure or previous is None:
                return False
            gram = (self._buffer @ self._buffer.T).tolist()
        grad_sqr, previous_sqr, mixed = self._over_ranks([gram[row][row], gram[1 - row][1 - row], gram[0][1]])
        # Two independent batches give |G|² as the mean of their product, and tr(Σ) from the
        # mean of their squared difference, tr(Σ)(1/B + 1/B_previous). These are McCandlish's
        # two-batch estimates averaged over which of the two is taken as the small batch (with
        # equal sizes exactly): the term each single choice adds, a difference of the two
        # squared norms, has mean zero and roughly doubles the variance of |G|²'s estimate.
        difference_sqr = grad_sqr + previous_sqr - 2 * mixed
        return self.noise.add(mixed, difference_sqr / (1 / batch_size + 1 / previous[1]))

    def pairing_state(self) -> dict[str, Any] | None:
        """The gradient the plain loop's fallback keeps for the next step's pair (one flat
        double-precision copy, on the gradients' device), or ``None`` when none is kept: a
        checkpoint taken just before a measured step carries it, so the resumed run measures
        that step as the uninterrupted one does. A sharded gradient is not kept (each rank holds
        another slice, and a checkpoint of the scheduler is usually one rank's): the resumed run
        skips that one measurement, on every rank alike."""
        if self._previous is None or self._shards is not None:
            return None
        row, batch_size = self._previous
        return {"row": row, "gradient": self._buffer[row].clone(), "batch_size": batch_size}  # type: ignore[index]

    def load_pairing_state(self, state: Mapping[str, Any] | None) -> None:
        """Restore what :meth:`pairing_state` returned; the gradient is paired with the next
        step's if the parameters with gradients are then the same.

        Raises:
            ValueError: if ``state`` is not such a record.
        """
        self._previous = None
        self._restored = None
        if state is None:
            return
        row, gradient, batch_size = state.get("row"), state.get("gradient"), state.get("batch_size")
        if row not in (0, 1) or not isinstance(gradient, torch.Tensor) or gradient.dim() != 1 \
                or not is_integer(batch_size) or batch_size < 1:
            raise ValueError(f"scheduler state_dict['noise_pair'] must be None or hold a row (0 or 1), a flat "
                             f"gradient tensor and a positive batch_size, got {state!r}")
        self._restored = (int(row), gradient, int(batch_size))

    def _allocate(self, grads: list[torch.Tensor], shapes: list[torch.Size]) -> None:
        numels = [g.numel() for g in grads]
        self._buffer = torch.zeros(2, sum(numels), dtype=torch.float64, device=grads[0].device)
        self._rows = [[chunk.view(shape) for chunk, shape in zip(row.split(numels), shapes)] for row in self._buffer]
        self._shapes = shapes


def _copy(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``destination.copy_(source)`` for each pair, in one call where this PyTorch has it."""
    foreach_copy = getattr(torch, "_foreach_copy_", None)
    if foreach_copy is not None:
        foreach_copy(destinations, sources)
    else:
        for destination, source in zip(destinations, sources):
            destination.copy_(source)
