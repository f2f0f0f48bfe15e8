"""One training step in micro-batches, retried after an out-of-memory error.

:class:`TrainingStep` runs what ``BatchSizeScheduler.train_step`` promises: forward and backward
in as few micro-batches as the memory cap allows, the gradient averaged over the ranks (when
there are several), ``optimizer.step()``, and on an out-of-memory error a retry of the same
batch in smaller micro-batches, agreed by every rank before any gradient is exchanged. It hands
back a :class:`StepOutcome`, which the scheduler counts.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import torch

from .constraints import BatchSizeConstraints
from .distributed import RankAgreement
from .memory import MemoryCap, catch_out_of_memory
from .micro_batches import Batch, reset_grad_scaler_step, split_batch
from .noise import GradientNoiseMeter, NoiseSampling

__all__ = ["StepOutcome", "TrainingStep"]


class StepOutcome(NamedTuple):
    """What a training step did, for the scheduler to count."""

    #: Samples this rank trained on.
    batch_size: int
    #: Samples in its largest micro-batch, whose peak memory the step measured.
    micro_batch_size: int
    #: Whether the step saw to its noise measurement (taken, or not due), so that the plain
    #: loop's fallback is not run for it.
    noise_handled: bool


class _Attempt:
    """One try at a batch: its micro-batches, and what the try learned as it went."""

    def __init__(self, batch_size: int, sizes: list[int]) -> None:
        self.batch_size = batch_size
        self.sizes = sizes
        self.noise_handled = False
        self.versions_before_update: list[int] | None = None

    def outcome(self) -> StepOutcome:
        return StepOutcome(self.batch_size, max(self.sizes), self.noise_handled)


class TrainingStep:
    """Trains one batch in micro-batches, with out-of-memory retry agreed over the ranks.

    After an out-of-memory error, what the attempt held is freed (gradients set to ``None``,
    the GradScaler's per-step state reset, the device's cache emptied), the memory cap is
    lowered below the micro-batch that failed, and the same batch is tried again.

    Args:
        optimizer (Optimizer): steps once per batch.
        constraints (BatchSizeConstraints): cut the batch into micro-batches; their memory cap
            is lowered after an out-of-memory error.
        memory (MemoryCap): measures each step's peak and learns from the sizes that failed.
        agreement (RankAgreement): the out-of-memory flags and caps of the ranks, and the
            gradient average.
        noise_meter (GradientNoiseMeter, optional): reads the noise pair of a measured step.
        sampling (NoiseSampling): how a measured step is split.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        constraints: BatchSizeConstraints,
        memory: MemoryCap,
        agreement: RankAgreement,
        noise_meter: GradientNoiseMeter | None,
        sampling: NoiseSampling,
    ) -> None:
        self.optimizer = optimizer
        self.constraints = constraints
        self.memory = memory
        self.agreement = agreement
        self.noise_meter = noise_meter
        self.sampling = sampling

    def run(
        self,
        batch: Batch,
        batch_size: int,
        loss_fn: Callable[[Batch], torch.Tensor],
        *,
        scaler: Any,
        no_sync: Callable[[], Any] | None,
        measure: bool,
        count: Callable[[StepOutcome], None],
    ) -> torch.Tensor:
        """Train ``batch`` of ``batch_size`` samples (its ``batch_length``), call ``count``
        with the outcome, and return the batch's mean loss.

        An out-of-memory error raised after the optimizer changed the parameters (from a step
        post-hook, say) cannot be retried without applying the batch twice: the step is
        counted and the error propagates.
        """
        floor = self.constraints.floor_per_replica
        while True:
            sizes = self.constraints.micro_batch_sizes(batch_size)
            if measure:
                sizes = self.sampling.split(sizes, floor, self.agreement.distributed)
            attempt = _Attempt(batch_size, sizes)
            with catch_out_of_memory(propagate=lambda: self._count_if_updated(attempt, count)) as out_of_memory:
                loss = self._accumulate(batch, attempt, loss_fn, scaler, no_sync, measure)
                if not self.agreement.distributed:
                    self._synchronise_and_step(attempt, scaler, measure)
            # Every rank learns whether any ran out of memory before any gradient is exchanged,
            # so all retry together and none waits alone in a collective.
            failed = self.agreement.largest(max(sizes) if out_of_memory.caught else 0)
            if not failed:
                break
            self.optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                reset_grad_scaler_step(scaler, self.optimizer)
            self.memory.out_of_memory(failed, floor)
            self.agreement.apply_memory_cap(self.memory, self.constraints)
        if self.agreement.distributed:
            self._synchronise_and_step(attempt, scaler, measure)
        self.optimizer.zero_grad(set_to_none=True)
        count(attempt.outcome())
        return loss

    def _count_if_updated(self, attempt: _Attempt, count: Callable[[StepOutcome], None]) -> bool:
        """After an out-of-memory error: whether the optimizer had already updated the
        parameters, in which case the trained batch is counted and the error must propagate."""
        before = attempt.versions_before_update
        if before is None or _versions(self.optimizer) == before:
            return False
        self.optimizer.zero_grad(set_to_none=True)
        count(attempt.outcome())
        return True

    def _accumulate(
        self, batch: Batch, attempt: _Attempt, loss_fn: Callable[[Batch], torch.Tensor], scaler: Any,
        no_sync: Callable[[], Any] | None, measure: bool,
    ) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches; no collective runs here."""
        self.optimizer.zero_grad(set_to_none=True)
        self.memory.begin_step()
        sizes, batch_size = attempt.sizes, attempt.batch_size
        splits = len(sizes) > 1
        meter = self.noise_meter if measure and splits and not self.agreement.distributed else None
        if self.noise_meter is not None and not measure and (
                splits or self.sampling.can_split(sizes, self.constraints.floor_per_replica)):
            attempt.noise_handled = True  # not this step's turn: no fallback either
        grad_scale = _grad_scale(scaler)
        total = None
        with no_sync() if no_sync is not None else contextlib.nullcontext():
            for index, micro_batch in enumerate(split_batch(batch, sizes)):
                loss = loss_fn(micro_batch) * (sizes[index] / batch_size)
                (loss if scaler is None else scaler.scale(loss)).backward()
                total = loss.detach() if total is None else total + loss.detach()
                if meter is not None and index == 0:
                    meter.after_first_micro_batch(sizes[0], sizes[0] / batch_size, grad_scale)
        if meter is not None:
            meter.after_batch(batch_size, grad_scale)
            attempt.noise_handled = True
        return total  # type: ignore[return-value]

    def _synchronise_and_step(self, attempt: _Attempt, scaler: Any, measure: bool) -> None:
        """Average the gradients over the ranks (if any; the per-rank gradient before and the
        averaged one after are the data-parallel noise pair), then step the optimizer."""
        collective = self.agreement.collective
        if collective is not None:
            meter = self.noise_meter if measure else None
            attempt.noise_handled = self.noise_meter is not None
            if meter is not None:
                meter.before_all_reduce(_grad_scale(scaler))
            self.agreement.average_gradients(self.optimizer)
            if meter is not None:
                meter.after_all_reduce(attempt.batch_size, attempt.batch_size * collective.world_size, collective,
                                       _grad_scale(scaler))
        # In-place updates bump a tensor's version counter: how an error after this point
        # tells whether the parameters were already changed.
        attempt.versions_before_update = _versions(self.optimizer)
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)
            scaler.update()


def _grad_scale(scaler: Any) -> float:
    return 1.0 if scaler is None else float(scaler.get_scale())


def _versions(optimizer: torch.optim.Optimizer) -> list[int]:
    return [p._version for group in optimizer.param_groups for p in group["params"]]
