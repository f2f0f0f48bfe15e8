"""One training step in micro-batches, retried after an out-of-memory error.

:class:`TrainingStep` runs what ``BatchSizeScheduler.train_step`` promises: forward and backward
in as few micro-batches as the memory cap allows, the gradient averaged over the ranks (when
there are several), ``optimizer.step()``, and on an out-of-memory error a retry of the same
batch in smaller micro-batches, agreed by every rank before any gradient is exchanged. It hands
back a :class:`StepOutcome`, which the scheduler counts.

How the gradients reach every rank depends on the model: a ``DistributedDataParallel`` model's
backward passes run under its ``no_sync`` and the step averages the gradients itself; an FSDP2
model (``fully_shard``) reduce-scatters them in its own backward passes, which the step lets
synchronise only after every rank has finished the forward passes before them
(:class:`~adabatch.fsdp.GatheredStep`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import torch

from .constraints import BatchSizeConstraints
from .distributed import RankAgreement
from .fsdp import GatheredStep, is_fsdp_module, is_sharded
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
        self._gathered: GatheredStep | None = None

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
        model: Any = None,
    ) -> torch.Tensor:
        """Train ``batch`` of ``batch_size`` samples (its ``batch_length``), call ``count``
        with the outcome, and return the batch's mean loss.

        ``model`` is a ``DistributedDataParallel`` model (the same as ``no_sync=model.no_sync``)
        or an FSDP2 root module; see ``BatchSizeScheduler.train_step``.

        An out-of-memory error raised after the optimizer changed the parameters (from a step
        post-hook, say) cannot be retried without applying the batch twice: the step is
        counted and the error propagates.

        Raises:
            TypeError: if ``model`` is neither kind of model.
            ValueError: if ``model`` and ``no_sync`` are both given, if the optimizer's
                parameters are sharded and ``model`` is not their FSDP2 root module, or if a
                ``scaler`` is given with an FSDP2 model.
            RuntimeError: if the batch is sharded over several replicas and there is no
                collective to agree over them.
        """
        no_sync, gathered = self._gradient_sync(model, no_sync, scaler)
        self.sampling.disarm()
        if gathered is not None:
            return self._run_gathered(batch, batch_size, loss_fn, gathered, measure, count)
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
        self._count_and_clear(attempt, count)
        return loss

    def _gradient_sync(self, model: Any, no_sync: Callable[[], Any] | None,
                       scaler: Any) -> tuple[Callable[[], Any] | None, GatheredStep | None]:
        """``(no_sync, gathered)``: DDP's ``no_sync`` to run the backward passes under, or the
        hold on an FSDP2 model; checks that they fit the optimizer and the ranks."""
        if model is not None and no_sync is not None:
            raise ValueError("train_step takes model= or no_sync=, not both: model=ddp_model stands for "
                             "no_sync=ddp_model.no_sync")
        sharded = is_sharded(self.optimizer)
        if model is None:
            if sharded:
                raise ValueError(
                    "the optimizer's parameters are DTensors (a model under FSDP2's fully_shard): pass the root "
                    "module as train_step(..., model=model), so that the step controls FSDP's gradient "
                    "synchronisation" + (" (no_sync= is DistributedDataParallel's)" if no_sync is not None else ""))
            if no_sync is not None:
                self._check_collective("no_sync")
            return no_sync, None
        if is_fsdp_module(model):
            if self._gathered is None or self._gathered.model is not model:
                self._gathered = GatheredStep(model, self.optimizer)
            if scaler is not None:
                raise ValueError("train_step(scaler=...) is not supported with an FSDP2 model: a GradScaler would "
                                 "check each rank's shard of the gradients for infinities alone, and the ranks "
                                 "could disagree on skipping the step")
            self._check_collective("model")
            return None, self._gathered
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            if sharded:
                raise ValueError("the optimizer's parameters are DTensors (FSDP2) but model= is a "
                                 "DistributedDataParallel: pass the module fully_shard was applied to")
            self._check_collective("model")
            return model.no_sync, None
        raise TypeError(f"model must be a DistributedDataParallel or a module fully_shard was applied to (FSDP2), "
                        f"got {type(model).__name__}")

    def _check_collective(self, argument: str) -> None:
        replicas = self.constraints.num_replicas
        if not self.agreement.distributed and replicas > 1:
            raise RuntimeError(
                f"train_step({argument}=...) across {replicas} replicas needs a collective to agree over the ranks, "
                f"and this scheduler has none: initialise the torch.distributed process group before building the "
                f"AdaptiveBatchSampler, or pass collective= to BatchSizeScheduler"
            )

    def _run_gathered(
        self, batch: Batch, batch_size: int, loss_fn: Callable[[Batch], torch.Tensor], gathered: GatheredStep,
        measure: bool, count: Callable[[StepOutcome], None],
    ) -> torch.Tensor:
        """:meth:`run` for an FSDP2 model; FSDP reduce-scatters the gradients in backward."""
        floor = self.constraints.floor_per_replica
        try:
            while True:
                sizes = self.constraints.micro_batch_sizes(batch_size)
                if measure:
                    # The first micro-batches of all the ranks, reduce-scattered, are the small
                    # batch: DDP's, a rank's own gradient, sits in FSDP's gathered parameters, out
                    # of the optimizer's sight, and Adam's second moment to precondition it is sharded.
                    sizes = self.sampling.split(sizes, floor, distributed=False)
                attempt = _Attempt(batch_size, sizes)
                loss, failed = self._accumulate_gathered(batch, attempt, loss_fn, gathered, measure)
                if not failed:
                    break
                gathered.abandon()
                self.optimizer.zero_grad(set_to_none=True)
                self.memory.out_of_memory(failed, floor)
                self.agreement.apply_memory_cap(self.memory, self.constraints)
        except BaseException:
            gathered.abandon()  # FSDP's recovery after an error inside a forward or backward pass
            raise
        finally:
            gathered.release()
        # As under DDP, an out-of-memory error in the optimizer's step cannot be agreed: it propagates.
        self.optimizer.step()
        self._count_and_clear(attempt, count)
        return loss  # type: ignore[return-value]

    def _accumulate_gathered(
        self, batch: Batch, attempt: _Attempt, loss_fn: Callable[[Batch], torch.Tensor], gathered: GatheredStep,
        measure: bool,
    ) -> tuple[torch.Tensor | None, int]:
        """Forward and backward of this rank's micro-batches over the gathered parameters;
        returns the batch's loss and ``0``, or ``None`` and the micro-batch size that failed on
        some rank. The ranks agree before each backward pass that reduce-scatters (the last one,
        and on a measured step the first one too), so none waits alone in a collective."""
        self.optimizer.zero_grad(set_to_none=True)
        self.memory.begin_step()
        sizes, batch_size, last = attempt.sizes, attempt.batch_size, len(attempt.sizes) - 1
        replicas = self.constraints.num_replicas
        meter = self.noise_meter if measure and last > 0 else None
        if self.noise_meter is not None and not measure and (
                last > 0 or self.sampling.can_split(sizes, self.constraints.floor_per_replica)):
            attempt.noise_handled = True  # not this step's turn: no fallback either
        synchronised = {0, last} if meter is not None else {last}
        gathered.gather()
        total = None
        for index, micro_batch in enumerate(split_batch(batch, sizes)):
            share = sizes[index] / batch_size
            with catch_out_of_memory() as out_of_memory:
                loss = loss_fn(micro_batch) * share
                if index not in synchronised:
                    gathered.accumulate_next_backward()
                    loss.backward()
            if out_of_memory.caught or index in synchronised:
                failed = self.agreement.largest(max(sizes) if out_of_memory.caught else 0)
                if failed:
                    return None, failed
                # An out-of-memory error from here on propagates: the other ranks are exchanging.
                gathered.synchronise_next_backward(last=index == last)
                loss.backward()
                if meter is not None and index == 0:
                    meter.after_first_micro_batch(sizes[0] * replicas, share)
            total = loss.detach() if total is None else total + loss.detach()
        if meter is not None:
            meter.after_batch(batch_size * replicas)
            attempt.noise_handled = True
        return total, 0

    def _count_and_clear(self, attempt: _Attempt, count: Callable[[StepOutcome], None]) -> None:
        """Count the step, then clear the gradients. In that order: a step too small to split
        for the noise measurement is measured by the plain loop's fallback, which reads the
        gradients as the plain loop leaves them after ``optimizer.step()``."""
        count(attempt.outcome())
        self.optimizer.zero_grad(set_to_none=True)

    def _count_if_updated(self, attempt: _Attempt, count: Callable[[StepOutcome], None]) -> bool:
        """After an out-of-memory error: whether the optimizer had already updated the
        parameters, in which case the trained batch is counted and the error must propagate."""
        before = attempt.versions_before_update
        if before is None or _versions(self.optimizer) == before:
            return False
        self._count_and_clear(attempt, count)
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
