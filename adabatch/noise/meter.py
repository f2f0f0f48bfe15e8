"""GradientNoiseMeter: reads squared gradient norms off the optimizer's parameters (Adam-family
gradients preconditioned) and feeds a :class:`~adabatch.noise.NoiseScale`; see :mod:`adabatch.noise`."""

from __future__ import annotations

import functools
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


def _second_moments(optimizer: torch.optim.Optimizer) -> tuple[
        list[torch.Tensor], list[torch.Tensor], list[float], list[float]] | None:
    """``(parameters, v, bias corrections, eps)`` for each parameter with a gradient of an
    Adam-family optimizer (one with an ``exp_avg_sq`` state and ``betas``); ``v`` is this rank's
    slice where the parameter is sharded. ``None`` for other optimizers and before the first step."""
    if not is_adam_family(optimizer):
        return None
    parameters, second_moments, corrections, eps = [], [], [], []
    for group in optimizer.param_groups:
        # AMSGrad divides by the running maximum of the second moment.
        key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        for parameter in group["params"]:
            if parameter.grad is None:  # never trained (a frozen or unused part): not measured
                continue
            state = optimizer.state.get(parameter, {})
            if key not in state:
                return None
            parameters.append(parameter)
            second_moments.append(local_tensor(state[key]))
            corrections.append(1 - group["betas"][1] ** float(state["step"]))
            eps.append(group["eps"])
    return parameters, second_moments, corrections, eps


def preconditioner(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, torch.Tensor] | None:
    """``1 / (√v̂ + eps)`` for each parameter with a gradient of an Adam-family optimizer (one
    with an ``exp_avg_sq`` state and ``betas``), or ``None`` for other optimizers and before the
    first step. For a sharded parameter (a DTensor, under FSDP2) it is this rank's slice, shaped
    as the local slice of the gradient."""
    terms = _second_moments(optimizer)
    if terms is None:
        return None
    parameters, second_moments, corrections, eps = terms
    if not parameters:
        return {}
    # One kernel per operation for all the parameters: on a small model each tensor operation
    # costs more than its arithmetic.
    scales = torch._foreach_div(second_moments, corrections)
    torch._foreach_sqrt_(scales)
    torch._foreach_add_(scales, eps)
    torch._foreach_reciprocal_(scales)
    return dict(zip(parameters, scales))


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
        self._captured: int | None = None  # the row capture_gradients() filled in this step
        self._rows: list[list[torch.Tensor]] = []  # each row's views shaped as the gradients
        self._shapes: list[torch.Size] | None = None
        self._numels: list[int] = []
        self._shards: ShardSum | None = None  # how the last gradients read are summed over the ranks

    def _gradients(self) -> list[torch.Tensor]:
        """The gradients (their local slices, if sharded), in the order of the parameter groups."""
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._shards = shard_sum(grads)
        return grads if self._shards is None else [local_tensor(grad) for grad in grads]

    def _preconditioned(self) -> list[torch.Tensor]:
        """The gradients (their local slices, if sharded), preconditioned for Adam."""
        grads = self._gradients()
        scales = preconditioner(self.optimizer)
        if scales is None or not grads:
            return grads
        # Both walk the parameter groups over the parameters with gradients, in the same order.
        return torch._foreach_mul(grads, list(scales.values()))

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

    @torch.no_grad()
    def capture_gradients(self) -> None:
        """Copy the gradients as they are now into the row the next call of
        :meth:`from_consecutive_steps` fills, which then copies nothing: called as backward
        leaves them (:class:`~adabatch.noise.backward_capture.BackwardCapture`), so a rescaling
        by the loop before the step (a clip) is not read."""
        self._captured = None
        grads = self._gradients()
        # The parameters with gradients may change within a step (with several backward
        # passes): then the step copies its own.
        if not grads or (self._shapes is not None and [g.shape for g in grads] != self._shapes):
            return
        row = self._row(grads)
        _copy(self._rows[row], grads)
        self._captured = row

    def from_consecutive_steps(self, batch_size: int, measure: bool = True, keep: bool = True) -> bool:
        """The plain loop's fallback: pair this step's gradient (``batch_size`` samples) with the
        previous step's, as two independent batches. Biased: see the module's docstring.

        Args:
            batch_size (int): samples behind this step's gradient, which is the one
                :meth:`capture_gradients` copied during this step, if it did, else the one the
                parameters hold now.
            measure (bool): pair this step with the previous one, if that one was kept.
            keep (bool): keep this step's gradient (one flat copy) for the next step's pair.

        Returns:
            whether a pair was counted.
        """
        grads = self._gradients() if measure or keep else []
        if not grads:
            self._previous = self._restored = self._captured = None
            return False
        row = self._row(grads)  # a new buffer for other parameters holds no captured row
        captured, self._captured = self._captured, None
        previous, self._previous = self._previous, None
        # The two steps' gradients take turns in the rows of one flat buffer: a step's gradient
        # is one copy into its row. The pair is preconditioned for Adam once, when it is
        # measured, both gradients by the same second moments, and its two products come back
        # in one transfer. Each tensor operation here costs more than its arithmetic, so there
        # are few of them.
        with torch.no_grad():
            if captured != row:
                _copy(self._rows[row], grads)
            if keep:
                self._previous = (row, batch_size)
            if not measure or previous is None:
                return False
            current, other = self._buffer[row], self._buffer[1 - row]  # type: ignore[index]
            adam, factor = self._adam_denominators(), 1.0
            if adam is not None:
                denominators, factor = adam
                other.div_(denominators)  # this pair is its last use
                # A row kept for the next pair stays as backward left it.
                current = current / denominators if keep else current.div_(denominators)
            mixed = current @ other
            # The difference is taken directly, not as a difference of nearly equal squared norms.
            if keep and adam is None:  # `current` is the kept row itself
                difference = current - other
            else:
                difference = current.sub_(other)
            products = torch.stack([mixed, difference @ difference]).tolist()
        mixed, difference_sqr = (factor * factor * value for value in self._over_ranks(products))
        # Two independent batches give |G|² as the mean of their product, and tr(Σ) from the
        # mean of their squared difference, tr(Σ)(1/B + 1/B_previous). These are McCandlish's
        # two-batch estimates averaged over which of the two is taken as the small batch (with
        # equal sizes exactly): the term each single choice adds, a difference of the two
        # squared norms, has mean zero and roughly doubles the variance of |G|²'s estimate.
        return self.noise.add(mixed, difference_sqr / (1 / batch_size + 1 / previous[1]))

    def _row(self, grads: list[torch.Tensor]) -> int:
        """The buffer's row for this step's gradient, after allocating the buffer for these
        gradients if their shapes changed (a kept gradient of other parameters is dropped: no
        pair) and putting a gradient restored from a checkpoint in its row."""
        shapes = [g.shape for g in grads]
        if shapes != self._shapes:
            self._allocate(grads, shapes)
            self._previous = None
        restored, self._restored = self._restored, None
        if restored is not None and restored[1].numel() == self._buffer.shape[1]:  # type: ignore[union-attr]
            row, gradient, kept_size = restored
            with torch.no_grad():
                self._buffer[row].copy_(gradient)  # type: ignore[index]
            self._previous = (row, kept_size)
        return 0 if self._previous is None else 1 - self._previous[0]

    @torch.no_grad()
    def _adam_denominators(self) -> tuple[torch.Tensor, float] | None:
        """``(denominators, factor)`` such that Adam's preconditioner ``1 / (√v̂ + eps)`` is
        ``factor / denominators``, the denominators one flat row laid out as the buffer's rows;
        or ``None`` when the optimizer preconditions nothing (or its parameters with gradients
        are not those of the buffer)."""
        terms = _second_moments(self.optimizer)
        if terms is None or [v.shape for v in terms[1]] != self._shapes:
            return None
        _, second_moments, corrections, eps = terms
        # In the second moments' precision (at least single), as Adam computes it: a square root
        # in double precision costs several times more on a CPU. Flat, with one kernel per
        # operation: on a small model each tensor operation costs more than its arithmetic.
        dtype = functools.reduce(torch.promote_types, (v.dtype for v in second_moments), torch.float32)
        denominators = torch.cat([v.flatten() for v in second_moments]).to(dtype)
        if len(set(corrections)) == 1 and len(set(eps)) == 1:  # one group, or groups alike
            # 1 / (√(v / c) + eps) = √c / (√v + eps √c): the bias correction becomes a number.
            root = math.sqrt(corrections[0])
            return denominators.sqrt_().add_(eps[0] * root), root
        sizes = torch.tensor(self._numels, device=denominators.device)

        def per_element(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=denominators.device).repeat_interleave(sizes)

        return denominators.div_(per_element(corrections)).sqrt_().add_(per_element(eps)), 1.0

    def pairing_state(self) -> dict[str, Any] | None:
        """The gradient the plain loop's fallback keeps for the next step's pair (one flat copy
        as backward left it, in the gradients' precision, at least single, on their device), or
        ``None`` when none is kept: a checkpoint taken just before a measured step carries it,
        so the resumed run measures that step as the uninterrupted one does. A sharded gradient
        is not kept (each rank holds another slice, and a checkpoint of the scheduler is usually
        one rank's): the resumed run skips that one measurement, on every rank alike."""
        if self._previous is None or self._shards is not None:
            return None
        row, batch_size = self._previous
        return {"row": row, "gradient": self._buffer[row].clone(), "batch_size": batch_size,  # type: ignore[index]
                "preconditioned": False}

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
        # A checkpoint written while the kept gradient was stored preconditioned for Adam has no
        # "preconditioned" key: that gradient is not paired (one measurement is skipped).
        if state.get("preconditioned", is_adam_family(self.optimizer)):
            return
        self._restored = (int(row), gradient, int(batch_size))

    def _allocate(self, grads: list[torch.Tensor], shapes: list[torch.Size]) -> None:
        numels = [g.numel() for g in grads]
        # In the gradients' precision, at least single: the products are accumulated by the
        # reduction kernels, and nothing here subtracts two nearly equal numbers.
        dtype = functools.reduce(torch.promote_types, (g.dtype for g in grads), torch.float32)
        self._buffer = torch.zeros(2, sum(numels), dtype=dtype, device=grads[0].device)
        self._rows = [[chunk.view(shape) for chunk, shape in zip(row.split(numels), shapes)] for row in self._buffer]
        self._shapes, self._numels = shapes, numels
        self._captured = None


def _copy(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``destination.copy_(source)`` for each pair, in one call where this PyTorch has it."""
    foreach_copy = getattr(torch, "_foreach_copy_", None)
    if foreach_copy is not None:
        foreach_copy(destinations, sources)
    else:
        for destination, source in zip(destinations, sources):
            destination.copy_(source)
