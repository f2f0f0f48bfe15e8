"""BackwardNorms: the gradient's squared norm as backward left it, before the loop rescaled it.

In the plain loop the scheduler reads the gradients after ``optimizer.step()``, and by then the
loop may have rescaled them as a whole: ``clip_grad_norm_`` multiplies every gradient by
``max_norm / |g|`` when the norm is above it, ``GradScaler.unscale_`` divides by the loss scale.
Pairing two such steps mixes two unknown factors into the noise estimate (clipping lowered the
measured noise scale by about a fifth in a regression where every step was clipped). A hook on
each parameter records the squared norm each gradient had when backward accumulated it; the
ratio to the norm at the step is the factor to undo, so the noise statistics are those of the
gradients backward computed.

Only steps the noise measurement uses are recorded (the meter arms the hooks a step ahead). Under
torch.distributed the hooks would see each rank's gradient before it is averaged, so they are
not used there; nor do they fire on parameters whose gradient is assigned rather than
accumulated (FSDP's sharded parameters): those steps are read as they are.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["BackwardNorms"]


class BackwardNorms:
    """Records each parameter's squared gradient norm as backward accumulates it, while armed.

    Args:
        parameters (iterable of Tensor): the parameters whose gradients are measured.
    """

    def __init__(self, parameters: Any) -> None:
        self.armed = True  # the first step, whose turn is not known yet, is recorded
        self._recorded: dict[torch.Tensor, torch.Tensor] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._record) for p in parameters if p.requires_grad]

    def _record(self, parameter: torch.Tensor) -> None:
        if self.armed and parameter.grad is not None:
            # The latest accumulation wins: with several backward passes per step, the last holds the sum.
            with torch.no_grad():
                self._recorded[parameter] = parameter.grad.detach().double().square().sum()

    def unclip_factor(self) -> float:
        """``|g as accumulated| / |g now|`` over the parameters recorded since the last call
        (1.0 when none was, or a norm is zero or not finite); forgets the records."""
        recorded, self._recorded = self._recorded, {}
        grads = [p.grad for p in recorded if p.grad is not None]
        if len(grads) != len(recorded) or not grads:
            return 1.0
        before = torch.stack(list(recorded.values())).sum()
        now = torch.stack([g.detach().double().square().sum() for g in grads]).sum()
        before, now = before.item(), now.item()
        if not (math.isfinite(before) and math.isfinite(now)) or before <= 0 or now <= 0:
            return 1.0
        return math.sqrt(before / now)

    def forget(self) -> float:
        """Drop the records of a step the measurement does not use; returns 1.0 (no factor)."""
        self._recorded = {}
        return 1.0

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
