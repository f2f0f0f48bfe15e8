"""BackwardCapture: the gradients as backward left them, before the loop rescaled them.

In the plain loop the scheduler reads the gradients after ``optimizer.step()``, and by then the
loop may have rescaled them as a whole: ``clip_grad_norm_`` multiplies every gradient by
``max_norm / |g|`` when the norm is above it, ``GradScaler.unscale_`` divides by the loss scale.
Pairing two such steps mixes two unknown factors into the noise estimate (clipping lowered the
measured noise scale by about a fifth in a regression where every step was clipped). So the
gradients of a step the measurement uses are copied as each backward pass leaves them (with
several passes per step, the last copy holds the sum): the noise statistics are those of the
gradients backward computed, and the step itself copies nothing more.

Only steps the noise measurement uses are captured: the hook is registered a step ahead, for
the batch the plan holds once the schedule has decided (:meth:`NoiseSampling.arm
<adabatch.noise.NoiseSampling.arm>`), and removed after; ``train_step``, which never lets the loop
rescale, disarms it. One hook suffices, since it only asks for the copy once the backward pass has
ended; it goes on a parameter the last step trained, and a step that gives that parameter no
gradient is read as it is at the step. Under torch.distributed the hook would see each rank's
gradient before it is averaged, so it is not used there; nor does it fire on a parameter whose
gradient is assigned rather than accumulated (FSDP's sharded parameters): those steps are read
as they are.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["BackwardCapture"]


class BackwardCapture:
    """Calls ``capture`` each time a backward pass has ended, while armed.

    Args:
        parameters (iterable of Tensor): the parameters whose gradients are captured.
        capture (callable): copies the gradients; called with no argument.
    """

    def __init__(self, parameters: Any, capture: Callable[[], None]) -> None:
        self._parameters = [p for p in parameters if p.requires_grad]
        self._capture = capture
        self._queued = False
        self._handle: Any = None
        self.armed = True  # the first step, whose turn is not known yet, is captured

    @property
    def armed(self) -> bool:
        """Whether the coming backward passes are captured: the hook exists only while armed."""
        return self._handle is not None

    @armed.setter
    def armed(self, armed: bool) -> None:
        if armed and self._handle is None and self._parameters:
            # Registering a hook costs more than the copy it leads to: one, on a parameter that
            # has a gradient now (the last step trained it), rather than one on each.
            watched = next((p for p in self._parameters if p.grad is not None), self._parameters[0])
            self._handle = watched.register_post_accumulate_grad_hook(self._record)
        elif not armed:
            self.remove()

    def _record(self, parameter: torch.Tensor) -> None:
        # Copy once the pass has ended, when every gradient is complete.
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._at_end_of_backward)

    def _at_end_of_backward(self) -> None:
        self._queued = False
        self._capture()

    def remove(self) -> None:
        """Detach the hook (disarm)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
