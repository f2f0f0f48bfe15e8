"""The gradient noise scale, measured for free from gradients training computes anyway.

McCandlish et al. (2018), "An Empirical Model of Large-Batch Training", show that the batch size
beyond which larger batches stop paying off tracks the simple noise scale
``B_simple = tr(Σ) / |G|²``: the per-sample gradient variance over the squared norm of the true
gradient. Their Appendix A.1 estimates both without per-sample gradients, from the squared norms
of two mean gradients over batches of ``B_small < B_big`` samples of the same step:

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each estimate is unbiased but very noisy (single steps swing by orders of magnitude), so each
is smoothed with its own bias-corrected exponential moving average, and ``B_simple`` is the ratio
of the averages, never an average of ratios.

Where the two batches come from:

* ``BatchSizeScheduler.train_step`` (one device): ``B_small`` is the first micro-batch, read
  from the gradient after its backward and before the rest is accumulated; ``B_big`` is the
  whole batch. No extra forward or backward pass. A batch that fits in one micro-batch is
  split in two for the measurement, when each half keeps to ``min_batch_size``.
* The plain loop (``loss.backward(); optimizer.step(); scheduler.step(len(x))``): the fallback
  pairs the gradient of this step (``B``) with the mean of it and the previous step's gradient
  (``2B``). The parameters moved between the two steps, so the pair is not two batches at one
  point: the difference between the steps' true gradients counts as noise, and ``tr(Σ)`` (hence
  ``B_simple``) is overestimated, by an amount that grows with the learning rate and the
  curvature. It costs one copy of the gradients, which a checkpoint taken between the two steps
  keeps, so a resumed run measures the same steps.
* Under torch.distributed the per-rank gradient before the all-reduce is ``B_small`` and the
  all-reduced one ``B_big`` (McCandlish et al.: the data-parallel case is free).

The scheduler measures the steps that reach a multiple of ``noise_interval`` samples, the same
steps on every rank and after a resume (:class:`NoiseSampling`). A measurement costs about the
same at any batch size (a small batch trained in two halves takes much longer than in one), so
by default one step per 512 samples is measured, and at most one step in eight: the interval is
``max(512, 8 × batch size)``. Each measurement of a larger batch is the more
precise (the noise in the estimate of ``|G|²`` falls as ``1/B``). The moving averages count
measurements, so at large batches they span more samples: at batch 1,024, the default decay's
twenty-odd measurements are about 160,000 samples.

For Adam-family optimizers the gradients are preconditioned first (divided elementwise by
``√v̂ + eps``, Adam's own second-moment estimate), which measures the noise in the update the
optimizer actually takes.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ._validation import check_fraction, check_positive_int, is_integer

__all__ = ["BiasCorrectedEMA", "GradientNoiseMeter", "NoiseSampling", "NoiseScale", "is_adam_family", "preconditioner"]

#: Default decay of the moving averages of |G|² and tr(Σ).
DEFAULT_EMA_DECAY = 0.95

#: Default samples per measurement (``BatchSizeScheduler(noise_interval=...)``)...
DEFAULT_NOISE_INTERVAL = 512

#: ...and by default at most one step in this many is measured.
MIN_STEPS_PER_MEASUREMENT = 8


class BiasCorrectedEMA:
    """An exponential moving average that is unbiased from its first update (Adam's correction).

    Args:
        decay (float): weight of the past, in ``[0, 1)``. Default: 0.95.
    """

    def __init__(self, decay: float = DEFAULT_EMA_DECAY) -> None:
        self.decay = check_fraction("decay", decay)
        self.biased = 0.0
        self.updates = 0

    def update(self, value: float) -> None:
        self.biased = self.decay * self.biased + (1 - self.decay) * value
        self.updates += 1

    @property
    def value(self) -> float:
        """The average, ``nan`` before the first update."""
        if not self.updates:
            return math.nan
        return self.biased / (1 - self.decay**self.updates)

    def state_dict(self) -> dict[str, Any]:
        return {"biased": self.biased, "updates": self.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.biased = float(state_dict["biased"])
        self.updates = int(state_dict["updates"])


class NoiseScale:
    """Smoothed two-batch estimates of ``|G|²``, ``tr(Σ)`` and the simple noise scale.

    Args:
        decay (float): decay of both moving averages. Default: 0.95.

    Example:
        >>> noise = NoiseScale()
        >>> noise.update(grad_sqr_small=2.0, batch_small=32, grad_sqr_big=1.1, batch_big=256)
        True
        >>> round(noise.noise_scale, 1)
        33.9
    """

    def __init__(self, decay: float = DEFAULT_EMA_DECAY) -> None:
        self._grad_sqr = BiasCorrectedEMA(decay)
        self._grad_var = BiasCorrectedEMA(decay)
        self.last_grad_sqr = math.nan  # the raw per-step estimates, for logging
        self.last_grad_var = math.nan

    def update(self, grad_sqr_small: float, batch_small: int, grad_sqr_big: float, batch_big: int) -> bool:
        """Add one step's pair of squared gradient norms.

        Args:
            grad_sqr_small (float): ``|G_small|²``, squared norm of the mean gradient over
                ``batch_small`` samples.
            batch_small (int): samples behind ``grad_sqr_small``.
            grad_sqr_big (float): ``|G_big|²``, over ``batch_big`` samples, a superset.
            batch_big (int): samples behind ``grad_sqr_big``; larger than ``batch_small``.

        Returns:
            whether the step was counted: a step with a non-finite norm (an overflow, a step a
            GradScaler skips) or without two distinct batch sizes is not.
        """
        if not (math.isfinite(grad_sqr_small) and math.isfinite(grad_sqr_big)) or not 0 < batch_small < batch_big:
            return False
        grad_sqr = (batch_big * grad_sqr_big - batch_small * grad_sqr_small) / (batch_big - batch_small)
        grad_var = (grad_sqr_small - grad_sqr_big) / (1 / batch_small - 1 / batch_big)
        self.last_grad_sqr, self.last_grad_var = grad_sqr, grad_var
        self._grad_sqr.update(grad_sqr)
        self._grad_var.update(grad_var)
        return True

    @property
    def steps(self) -> int:
        """Steps counted so far."""
        return self._grad_sqr.updates

    @property
    def grad_sqr(self) -> float:
        """Smoothed ``|G|²``, the squared norm of the true gradient."""
        return self._grad_sqr.value

    @property
    def grad_var(self) -> float:
        """Smoothed ``tr(Σ)``, the trace of the per-sample gradient covariance."""
        return self._grad_var.value

    @property
    def noise_scale(self) -> float:
        """``B_simple = tr(Σ) / |G|²``; ``nan`` before the first step, ``inf`` while the
        smoothed ``|G|²`` is not positive (the gradient is all noise)."""
        grad_sqr, grad_var = self.grad_sqr, self.grad_var
        if math.isnan(grad_sqr) or math.isnan(grad_var):
            return math.nan
        if grad_sqr <= 0:
            return math.inf
        return max(grad_var, 0.0) / grad_sqr

    def scalars(self) -> dict[str, float]:
        """The smoothed and the last raw estimates, for logging; empty before the first step."""
        if not self.steps:
            return {}
        return {"noise/grad_sqr": self.grad_sqr, "noise/grad_var": self.grad_var, "noise/noise_scale": self.noise_scale,
                "noise/raw_grad_sqr": self.last_grad_sqr, "noise/raw_grad_var": self.last_grad_var}

    def state_dict(self) -> dict[str, Any]:
        return {"grad_sqr": self._grad_sqr.state_dict(), "grad_var": self._grad_var.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._grad_sqr.load_state_dict(state_dict["grad_sqr"])
        self._grad_var.load_state_dict(state_dict["grad_var"])


def is_adam_family(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter group has Adam's ``betas`` and ``eps`` (Adam, AdamW, NAdam,
    RAdam, Adamax...): an optimizer that divides by a second-moment estimate."""
    return all(group.get("betas") is not None and group.get("eps") is not None for group in optimizer.param_groups)


def preconditioner(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, torch.Tensor] | None:
    """``1 / (√v̂ + eps)`` for each parameter with a gradient of an Adam-family optimizer (one
    with an ``exp_avg_sq`` state and ``betas``), or ``None`` for other optimizers and before the
    first step."""
    if not is_adam_family(optimizer):
        return None
    scales: dict[torch.Tensor, torch.Tensor] = {}
    for group in optimizer.param_groups:
        betas, eps = group["betas"], group["eps"]
        # AMSGrad divides by the running maximum of the second moment.
        key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        for parameter in group["params"]:
            if parameter.grad is None:  # never trained (a frozen or unused part): not measured
                continue
            state = optimizer.state.get(parameter, {})
            if key not in state:
                return None
            step = float(state["step"])
            v_hat = state[key] / (1 - betas[1] ** step)
            scales[parameter] = 1 / (v_hat.sqrt() + eps)
    return scales


class GradientNoiseMeter:
    """Reads squared gradient norms off an optimizer's parameters and feeds a :class:`NoiseScale`.

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

    def _gradients(self) -> list[torch.Tensor]:
        return [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _preconditioned(self) -> list[torch.Tensor]:
        grads = self._gradients()
        scales = preconditioner(self.optimizer)
        if scales is None:
            return grads
        parameters = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        return [grad * scales[p] for grad, p in zip(grads, parameters)]

    @staticmethod
    @torch.no_grad()
    def _sqr_norm(grads: list[torch.Tensor]) -> float:
        if not grads:
            return math.nan
        # One kernel for the norms and one transfer; squared and summed in double precision,
        # as tr(Σ) is a difference of two nearly equal squared norms.
        return math.fsum(norm * norm for norm in torch.stack(torch._foreach_norm(grads)).tolist())

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

    def from_consecutive_steps(self, batch_size: int, measure: bool = True, keep: bool = True) -> bool:
        """The plain loop's fallback: pair this step's gradient (``batch_size`` samples) with its
        mean with the previous step's. Biased: see the module's docstring.

        Args:
            batch_size (int): samples behind this step's gradient.
            measure (bool): pair this step with the previous one, if that one was kept.
            keep (bool): keep this step's gradient (one flat copy) for the next step's pair.

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
            if keep:
                self._previous = (row, batch_size)
            if not measure or previous is None:
                return False
            gram = (self._buffer @ self._buffer.T).tolist()
        previous_size = previous[1]
        grad_sqr, previous_sqr, mixed = gram[row][row], gram[1 - row][1 - row], gram[0][1]
        both = batch_size + previous_size
        share, previous_share = batch_size / both, previous_size / both
        mean_sqr = share**2 * grad_sqr + previous_share**2 * previous_sqr + 2 * share * previous_share * mixed
        return self.noise.update(grad_sqr, batch_size, mean_sqr, both)

    def pairing_state(self) -> dict[str, Any] | None:
        """The gradient the plain loop's fallback keeps for the next step's pair (one flat
        double-precision copy, on the gradients' device), or ``None`` when none is kept: a
        checkpoint taken just before a measured step carries it, so the resumed run measures
        that step as the uninterrupted one does."""
        if self._previous is None:
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


class NoiseSampling:
    """Which optimizer steps measure the noise scale, and how a measured step is split.

    A step over the stream's samples ``[start, start + consumed)`` is measured when it reaches
    a multiple of ``interval``: a rule of the stream alone, so every rank measures the same
    steps, and a resumed run the same steps as one that never stopped.

    Args:
        interval (int, optional): samples (global) per measurement. Default:
            ``max(512, 8 × the global batch size)``: one step per 512 samples, and at most one
            step in eight.
    """

    def __init__(self, interval: int | None = None) -> None:
        self.interval = None if interval is None else check_positive_int("noise_interval", interval)

    def due(self, start: int, consumed: int) -> bool:
        """Whether the step over ``[start, start + consumed)`` is measured."""
        interval = self.interval or max(DEFAULT_NOISE_INTERVAL, MIN_STEPS_PER_MEASUREMENT * consumed)
        return (start + consumed) // interval > start // interval

    @staticmethod
    def can_split(sizes: list[int], floor: int) -> bool:
        """Whether a batch trained in one micro-batch can be halved with both halves at the floor."""
        return len(sizes) == 1 and sizes[0] >= 2 * floor

    def split(self, sizes: list[int], floor: int, distributed: bool) -> list[int]:
        """The micro-batches of a measured step: on one process, a batch that fits in one
        micro-batch is halved so the first half serves as the small batch (where both halves
        keep to the floor); across ranks each rank's batch is the small one, unsplit."""
        if distributed or not self.can_split(sizes, floor):
            return sizes
        return [sizes[0] - sizes[0] // 2, sizes[0] // 2]

    def observe_plain_step(self, meter: GradientNoiseMeter, batch_size: int, start: int, consumed: int) -> bool:
        """The plain loop's fallback for a step of ``batch_size`` samples on this rank: pair a
        due step with the one before it, which keeps its gradient only if the next step
        (assumed of the same size) will be due. Returns whether a pair was counted."""
        return meter.from_consecutive_steps(batch_size, measure=self.due(start, consumed),
                                            keep=self.due(start + consumed, consumed))
