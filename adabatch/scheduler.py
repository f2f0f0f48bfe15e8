"""BatchSizeScheduler: the front that wires the plan of batches, the learning-rate factor, the
training step, the memory cap, the noise scale and the logging together.

Each idea lives in its own module: :mod:`~adabatch.plan` (which batch follows which position,
and progress), :mod:`~adabatch.lr_scaling` (each step's factor and its optimizer hook),
:mod:`~adabatch.training_step` (micro-batches and out-of-memory retry), :mod:`~adabatch.noise`
(the noise scale and which steps measure it), :mod:`~adabatch.throughput` (step times),
:mod:`~adabatch.signals` (what is measured after each step, and the schedule fed with it),
:mod:`~adabatch.distributed` (what the ranks agree on), :mod:`~adabatch.memory` (the memory
cap) and :mod:`~adabatch.loggers` (TensorBoard).
"""

from __future__ import annotations

import math
from operator import attrgetter
from typing import Any, Callable, Mapping

import torch

from ._validation import check_positive_int
from .constraints import BatchSizeConstraints
from .distributed import Collective, RankAgreement
from .layout import EpochLayout
from .loggers import TensorBoardLogger
from . import checkpoint
from .lr_scaling import LRFactor, LRScaling, PlannedFactor
from .memory import DEFAULT_SAFETY_MARGIN, MemoryCap, MemoryDevice, memory_device
from .micro_batches import Batch, batch_length
from .noise import DEFAULT_EMA_DECAY
from .plan import BatchPlan
from .schedules import Progress, Schedule, ScheduleFn, as_schedule
from .signals import StepSignals
from .training_step import StepOutcome, TrainingStep

__all__ = ["BatchSizeScheduler"]


class BatchSizeScheduler:
    """Grows the batch size during training and scales the learning rate with it.

    The scheduler is the single source of the batch size: :class:`~adabatch.AdaptiveBatchSampler`
    asks it what size each batch should have (:meth:`draw`), and the loop tells it, through
    :meth:`step`, how many samples each optimizer step consumed. Each batch is recorded as it is
    drawn (:mod:`adabatch.plan`), so a batch prefetched by DataLoader workers, the learning-rate
    factor and a resumed run all see the size it was drawn with.

    Every learning rate is multiplied by :attr:`lr_factor` only during ``optimizer.step()``, so
    a ``torch.optim.lr_scheduler`` on the same optimizer keeps working: the effective learning
    rate is its learning rate times the factor (:mod:`adabatch.lr_scaling`). The factor follows
    the scheduled size, which the balanced batches that end an epoch, a little smaller, keep.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        schedule (Schedule or callable): the batch size wanted as a function of
            :class:`~adabatch.schedules.Progress` (see :mod:`adabatch.schedules`).
        min_batch_size (int): smallest batch each replica (and each micro-batch) trains on; use
            :func:`~adabatch.bn_safe_min_batch_size` for models with BatchNorm. Default: 1.
        max_batch_size (int, optional): largest global batch. Default: the dataset size.
        multiple_of (int): each replica's batch is a multiple of this, except where
            ``remainder="balance"`` ends an epoch (the rule is in :mod:`adabatch.layout`). Default: 1.
        lr_scaling (str or callable): how the learning rate follows ``batch_size /
            reference_batch_size``: ``"none"`` (Smith et al. 2018), ``"linear"`` (Goyal et al.
            2017), ``"sqrt"`` (Krizhevsky 2014), ``"gain"`` (AdaScale, Johnson et al. 2020; see
            :class:`~adabatch.lr_scaling.LRFactor`) or a callable from the ratio to a factor.
            Default: the schedule's ``default_lr_scaling`` (``"gain"`` for ``Adaptive``).
        reference_batch_size (int, optional): the batch size at which the factor is 1.
            Default: the size the schedule starts at, after the constraints.
        warmup_steps (int): after each change of batch size, move the factor linearly from
            its old to its new value over this many optimizer steps (Goyal et al. 2017 warm up
            after a batch increase). Default: 0 (jump at once).
        dataset_size (int, optional): samples per epoch, for schedules in epochs. Default:
            taken from the :class:`~adabatch.AdaptiveBatchSampler` built on this scheduler.
        writer (SummaryWriter, optional): where to write TensorBoard curves. Default: none.
        log_every (int): write the curves every this many steps (and at every batch-size
            change). Default: 1.
        memory (MemoryDevice or str, optional): where step peaks are measured to cap the batch
            by memory (see :mod:`adabatch.memory`). ``"auto"``: the CUDA device the parameters
            are on, or no memory cap if they are not on one. Default: ``"auto"``.
        safety_margin (float): fraction of the memory above the fixed cost that the cap keeps
            free. Default: 0.1.
        accumulate (bool): let the batch grow past the memory cap, :meth:`train_step` training
            it in micro-batches; if ``False`` the memory cap caps the batch. Default: ``False``.
        measure_noise (bool, optional): measure the gradient noise scale (see
            :mod:`adabatch.noise`). Default: when the schedule or ``lr_scaling="gain"`` needs it.
        noise_decay (float): decay of the noise statistics' moving averages. Default: 0.95.
        noise_interval (int, optional): samples (global) per noise measurement: the steps that
            reach a multiple of it are measured (see :class:`~adabatch.noise.NoiseSampling`).
            Default: ``max(512, 8 × the global batch size)``.
        collective (Collective or str, optional): how ranks agree under torch.distributed (see
            :mod:`adabatch.distributed`). ``"auto"``: the default process group when it has
            several ranks. Default: ``"auto"``.
        sync_batch_norm (bool): the model's BatchNorm layers are ``SyncBatchNorm``, so
            ``min_batch_size`` bounds the global batch, not each replica's. Default: ``False``.

    Example:
        >>> scheduler = BatchSizeScheduler(
        ...     optimizer, schedules.Step(start=32, factor=5, milestones=[10, 15]),
        ...     min_batch_size=16, max_batch_size=2048, lr_scaling="none")
        >>> sampler = AdaptiveBatchSampler(train_set, scheduler, shuffle=True, seed=0)
        >>> loader = DataLoader(train_set, batch_sampler=sampler, num_workers=2)
        >>> for epoch in range(20):
        ...     sampler.set_epoch(epoch)
        ...     for x, y in loader:
        ...         optimizer.zero_grad()
        ...         F.cross_entropy(model(x), y).backward()
        ...         optimizer.step()
        ...         scheduler.step(len(x))
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule | ScheduleFn,
        *,
        min_batch_size: int = 1,
        max_batch_size: int | None = None,
        multiple_of: int = 1,
        lr_scaling: LRScaling | None = None,
        reference_batch_size: int | None = None,
        warmup_steps: int = 0,
        dataset_size: int | None = None,
        writer: Any = None,
        log_every: int = 1,
        memory: MemoryDevice | str | None = "auto",
        safety_margin: float = DEFAULT_SAFETY_MARGIN,
        accumulate: bool = False,
        measure_noise: bool | None = None,
        noise_decay: float = DEFAULT_EMA_DECAY,
        noise_interval: int | None = None,
        collective: Collective | str | None = "auto",
        sync_batch_norm: bool = False,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.schedule = as_schedule(schedule)
        self.constraints = BatchSizeConstraints(min_batch_size, max_batch_size, multiple_of, accumulate,
                                                global_floor=sync_batch_norm)
        self.constraints.bind(dataset_size)
        if lr_scaling is None:
            lr_scaling = self.schedule.default_lr_scaling
        self._expected_dataset_size: int | None = None
        self.logger = TensorBoardLogger(writer, log_every) if writer is not None else None
        self.memory = MemoryCap(memory_device(memory, optimizer), safety_margin)
        self.agreement = RankAgreement(collective)
        if measure_noise is None:
            measure_noise = self.schedule.needs_noise or lr_scaling == "gain"
        self.signals = StepSignals(optimizer, self.schedule, self.constraints, self.agreement,
                                   measure_noise=measure_noise, noise_decay=noise_decay, noise_interval=noise_interval)
        self.lr = LRFactor(lr_scaling, optimizer, self.schedule, self.constraints, self.noise_meter,
                           reference_batch_size=reference_batch_size, warmup_steps=warmup_steps)
        self.plan = BatchPlan(self.target_at)
        self._training_step = TrainingStep(optimizer, self.constraints, self.memory, self.agreement,
                                           self.noise_meter, self.noise_sampling)
        self._factor = PlannedFactor(optimizer, self.lr, self.plan)

    # ----------------------------------------------------------------- binding
    dataset_size = property(attrgetter("constraints.dataset_size"), doc="Samples per epoch (``None`` until known).")
    num_replicas = property(attrgetter("constraints.num_replicas"), doc="Replicas each global batch is split over.")
    lr_scaling = property(attrgetter("lr.lr_scaling"), doc="The rule the learning-rate factor follows.")
    collective = property(attrgetter("agreement.collective"), doc="How the ranks agree (``None`` on one process).")
    layout = property(attrgetter("plan.layout"), doc="How the epochs are cut into batches (``None`` until bound).")
    noise_meter = property(attrgetter("signals.noise_meter"), doc="The noise scale's meter (``None`` if unmeasured).")
    noise_sampling = property(attrgetter("signals.noise_sampling"), doc="Which steps measure the noise scale.")
    step_times = property(attrgetter("signals.step_times"), doc="Seconds per step by size (``None`` if unneeded).")

    def bind(self, dataset_size: int, num_replicas: int = 1, remainder: str = "balance") -> EpochLayout:
        """Learn the dataset and how it is cut into batches; called by :class:`~adabatch.AdaptiveBatchSampler`.

        Binding again with the same arguments is allowed (a new sampler over the same data).

        Raises:
            ValueError: if a different dataset size was given or bound before, or if the
                constraints cannot hold for this dataset and policy.
        """
        layout = EpochLayout(dataset_size, num_replicas, remainder, self.constraints.floor_for(num_replicas),
                             self.constraints.multiple_of)
        if self.plan.layout is not None:
            return self.plan.bind(layout)
        for name, expected in (("dataset_size", self.dataset_size), ("the state_dict's dataset_size",
                                                                     self._expected_dataset_size)):
            if expected is not None and expected != dataset_size:
                raise ValueError(f"{name} is {expected}, but the sampler's dataset has {dataset_size} samples")
        self.constraints.bind(dataset_size, num_replicas)
        self.agreement.bind(num_replicas)
        self.signals.prepare()
        if remainder == "balance":
            self.constraints.check_balance_fits()
        self.lr.forget_reference()
        return self.plan.bind(layout)

    # ------------------------------------------------------------ batch sizes
    def target_at(self, position: int) -> int:
        """The constrained global batch size the schedule wants at stream ``position``."""
        return self.constraints.apply(self.schedule(Progress(samples=position, dataset_size=self.dataset_size)))

    def next_batch(self, position: int) -> tuple[int, int]:
        """``(start, size)`` of the global batch after stream ``position``: the one the sampler
        drew there, or else the one it would draw now."""
        return self.plan.batch_at(position)[:2]

    def draw(self, position: int) -> tuple[int, int]:
        """Decide the batch that follows ``position`` and record it, for :meth:`step`, the
        learning-rate factor and a resumed run to use (see :mod:`adabatch.plan`); called by the sampler."""
        return self.plan.draw(position)[:2]

    @property
    def batch_size(self) -> int:
        """Global size of the coming batch."""
        return self.plan.batch_at(self.plan.position).size

    reference_batch_size = property(attrgetter("lr.reference_batch_size"), doc="Where the LR factor is 1.")
    warmup_steps = property(attrgetter("lr.warmup_steps"), doc="Steps the factor takes to move after a change.")

    @property
    def lr_factor(self) -> float:
        """The factor the coming optimizer step multiplies every learning rate by."""
        return self._factor.coming()[0]

    # ---------------------------------------------------------------- progress
    samples_seen = property(attrgetter("plan.samples_seen"), doc="Samples trained on so far (global).")
    steps = property(attrgetter("plan.steps"), doc="Optimizer steps counted by :meth:`step`.")
    position = property(attrgetter("plan.position"), doc="Stream position after the last trained batch.")

    @property
    def epoch(self) -> float:
        """Epochs passed, as a float; ``nan`` while the dataset size is unknown."""
        return math.nan if self.dataset_size is None else self.plan.position / self.dataset_size

    def skip_to(self, position: int) -> None:
        """Move the trained position forward to ``position`` without training, as when the
        sampler jumps to the start of a later epoch (``set_epoch``). Never moves backward."""
        self.plan.skip_to(position)

    def trained_position(self) -> int | None:
        """Where training stands in the stream, or ``None`` before the first :meth:`step`
        (and before :meth:`load_state_dict`); the sampler resumes from here."""
        return self.plan.position if self.plan.tracking else None

    def get_last_lr(self) -> list[float]:
        """Effective learning rate of each parameter group in the last counted step (before
        the first: the current learning rates times :attr:`lr_factor`)."""
        return self._factor.last_lrs()

    def step(self, batch_size: int | None = None) -> None:
        """Count one optimizer step; call it after ``optimizer.step()``, once per batch.

        Args:
            batch_size (int, optional): samples this process trained on in the step,
                ``len(x)``; under ``num_replicas > 1`` the global count is ``batch_size *
                num_replicas``. Default: the size the sampler planned for this step.
        """
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        self._count(batch_size, None)

    def _count(self, batch_size: int | None, outcome: StepOutcome | None) -> None:
        """Count a trained batch of ``batch_size`` samples on this rank (default: as planned),
        with what :meth:`train_step` did, if it trained it."""
        batch, factor_used = self._factor.take_step()
        consumed = batch.size if batch_size is None else batch_size * self.num_replicas
        self.plan.advance(batch.start, consumed, planned=batch.size)
        local = consumed // self.num_replicas
        self.memory.end_step(local if outcome is None else outcome.micro_batch_size)
        self.agreement.apply_memory_cap(self.memory, self.constraints)
        self.signals.after_step(batch, consumed, local, self.plan.position, self.plan.batch_at,
                                noise_handled=outcome is not None and outcome.noise_handled)
        self._factor.after_step(batch, factor_used)
        if self.logger is not None:
            self.logger.log_batch(self.plan.steps - 1, self.plan.samples_seen - consumed, batch, consumed, factor_used,
                                  self._factor.last_lrs(), self.dataset_size, (self.memory, self.signals))

    def add_memory_measurements(self, peaks: Mapping[int, int]) -> int | None:
        """Learn the memory cap from peaks measured before training (``{micro_batch_size:
        peak_bytes}``, e.g. :attr:`ProbeResult.peaks <adabatch.memory.ProbeResult>`), so that
        the first batches drawn are already capped; returns the cap."""
        self.memory.add_measurements(dict(peaks))
        return self.agreement.apply_memory_cap(self.memory, self.constraints)

    # -------------------------------------------------------------- train_step
    def train_step(
        self, batch: Batch, loss_fn: Callable[[Batch], torch.Tensor], *, scaler: Any = None,
        no_sync: Callable[[], Any] | None = None, model: Any = None,
    ) -> torch.Tensor:
        """Train one batch: forward and backward in micro-batches, ``optimizer.step()``,
        ``zero_grad()`` and :meth:`step`.

        The batch is split into as few micro-batches as the memory cap allows, none below
        ``min_batch_size``, each loss weighted by its share so the accumulated gradient is the
        batch's mean gradient (BatchNorm sees each micro-batch's own statistics). After an
        out-of-memory error the cap is lowered and the SAME batch is tried again in smaller
        micro-batches: the optimizer steps once per batch and no sample is skipped or counted
        twice (:class:`~adabatch.training_step.TrainingStep`).

        Args:
            batch: what the DataLoader yields: a tensor, or tuples, lists, named tuples and
                dicts of tensors nested to any depth, whose first dimension is the batch.
            loss_fn (callable): ``loss_fn(micro_batch)`` returns the MEAN loss over the
                micro-batch (the usual ``reduction="mean"``), a scalar tensor.
            scaler (torch.amp.GradScaler, optional): scales the loss for mixed precision and
                steps the optimizer. Default: none.
            no_sync (callable, optional): a ``DistributedDataParallel`` model's ``no_sync``:
                backward runs without DDP's all-reduce and, once every rank has finished (or
                ran out of memory, so all retry together), the gradients are averaged. Default: none.
            model (DistributedDataParallel or FSDPModule, optional): the wrapped model whose
                gradient synchronisation the step takes over: a DDP model stands for
                ``no_sync=model.no_sync``; the FSDP2 root module is required when the
                optimizer's parameters are sharded (docs/distributed.md). Default: none.

        Returns:
            the batch's mean loss (detached, on the loss's device).

        Raises:
            BatchSizeFloorError: if a micro-batch of ``min_batch_size`` samples runs out of memory.
            ValueError: if the batch's tensors disagree on the number of samples, or if
                ``model`` does not fit the optimizer or the other arguments (before anything trains).
            TypeError: if ``model`` is neither a DDP nor an FSDP2 model.
            RuntimeError: if the batch is split over ranks without a collective to agree over them.
        """
        batch_size = batch_length(batch)  # refuses a batch whose tensors disagree, before anything trains
        measure = self.signals.measures(self.plan.position, batch_size * self.num_replicas)
        return self._training_step.run(batch, batch_size, loss_fn, scaler=scaler, no_sync=no_sync, measure=measure,
                                       count=lambda outcome: self._count(outcome.batch_size, outcome), model=model)

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The scheduler's own numbers, as a new dict (no optimizer, schedule or writer inside)."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the numbers saved by :meth:`state_dict`.

        Raises:
            ValueError: if a key is missing or holds a value out of range, if the state was
                saved for a dataset of another size or with another kind of schedule, or if it
                plans a batch this scheduler could not have drawn. Nothing is restored then.
        """
        self._expected_dataset_size = checkpoint.load_state_dict(self, state_dict)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(schedule={self.schedule!r}, {self.constraints!r}, lr_scaling={self.lr_scaling!r}, "
            f"position={self.plan.position}, steps={self.plan.steps})"
        )
