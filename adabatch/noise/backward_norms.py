"""BackwardNorms: the gradient's squared norm as backward left it, before the loop rescaled it.

In the plain loop the scheduler reads the gradients after ``optimizer.step()``, and by then the
loop may have rescaled them as a whole: ``clip_grad_norm_`` multiplies every gradient by
``max_norm / |g|`` when the norm is above it, ``GradScaler.unscale_`` divides by the loss scale.
Pairing two such steps mixes two unknown factors into the noise estimate (clipping lowered the
measured noise scale by about a fifth in a regression where every step was clipped). A hook
records the gradients' squared norm as each backward pass leaves them; the ratio to the norm at
the step is the factor to undo, so the noise statistics are those of the gradients backward
computed.

Only steps the noise measurement uses are recorded: the hook is registered a step ahead and
removed after. One hook suffices, since it only asks for every gradient's norm once the backward
pass has ended; it goes on a parameter the last step trained, and a step that gives that
parameter no gradient is read as it is. Under torch.distributed the hook would see each rank's
gradient before it is averaged, so it is not used there; nor does it fire on a parameter whose
gradient is assigned rather than accumulated (FSDP's sharded parameters): those steps are read
as they are.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["BackwardNorms"]


class BackwardNorms:
    """Records the gradients' squared norm as each backward pass leaves them, while armed.

    Args:
        parameters (iterable of Tensor): the parameters whose gradients are measured.
    """

    def __init__(self, parameters: Any) -> None:
        self._parameters = [p for p in parameters if p.requires_grad]
        self._recorded: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # parameters, their norms
        self._queued = False
        self._handle: Any = None
        self.armed = True  # the first step, whose turn is not known yet, is recorded

    @property
    def armed(self) -> bool:
        """Whether the coming backward passes are recorded: the hook exists only while armed."""
        return self._handle is not None

    @armed.setter
    def armed(self, armed: bool) -> None:
        if armed and self._handle is None and self._parameters:
            # Registering a hook costs more than the norms it leads to: one, on a parameter
            # that has a gradient now (the last step trained it), rather than one on each.
            watched = next((p for p in self._parameters if p.grad is not None), self._parameters[0])
            self._handle = watched.register_post_accumulate_grad_hook(self._record)
        elif not armed:
            self.remove()

    def _record(self, parameter: torch.Tensor) -> None:
        # Ask for the norms once the pass has ended: one kernel for all of them. With several
        # passes per step, the last holds the sum.
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._at_end_of_backward)

    @torch.no_grad()
    def _at_end_of_backward(self) -> None:
        self._queued = False
        parameters = [p for p in self._parameters if p.grad is not None]
        if parameters:
            self._recorded = (parameters, torch._foreach_norm([p.grad for p in parameters]))

    @torch.no_grad()
    def unclip_factor(self) -> float:
        """``|g as accumulated| / |g now|`` over the parameters recorded since the last call
        (1.0 when none was, or a norm is zero or not finite); forgets the records."""
        recorded, self._recorded = self._recorded, None
        if recorded is None:
            return 1.0
        parameters, before = recorded
        grads = [p.grad for p in parameters if p.grad is not None]
        if len(grads) != len(parameters):
            return 1.0
        # One kernel for the norms now, and one reduction and one transfer for both sums.
        norms = torch.stack(before + torch._foreach_norm(grads)).double()
        before, now = norms.square().view(2, -1).sum(dim=1).tolist()
        if not (math.isfinite(before) and math.isfinite(now)) or before <= 0 or now <= 0:
            return 1.0
        return math.sqrt(before / now)

    def forget(self) -> float:
        """Drop the records of a step the measurement does not use; returns 1.0 (no factor)."""
        self._recorded = None
        return 1.0

    def remove(self) -> None:
        """Detach the hook (disarm)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
