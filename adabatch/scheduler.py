"""BatchSizeScheduler: decides the batch size, scales the learning rate, counts progress, logs."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Mapping

import torch

from .constraints import BatchSizeConstraints
from .distributed import Collective, default_collective
from .layout import EpochLayout
from .loggers import TensorBoardLogger
from .lr_scaling import LRFactorHook, LRScaling, resolve_lr_scaling
from .memory import DEFAULT_SAFETY_MARGIN, MemoryCap, MemoryDevice, default_memory_device, is_out_of_memory
from .micro_batches import Batch, batch_length, reset_grad_scaler_step, split_batch
from .noise import (DEFAULT_EMA_DECAY, DEFAULT_NOISE_INTERVAL, MIN_STEPS_PER_MEASUREMENT, GradientNoiseMeter,
                    is_adam_family)
from .schedules import Progress, Schedule, ScheduleFn, as_schedule
from .schedules.base import check_positive_int

__all__ = ["BatchSizeScheduler"]


class BatchSizeScheduler:
    """Grows the batch size during training and scales the learning rate with it.

    The scheduler is the single source of the batch size: :class:`~adabatch.AdaptiveBatchSampler`
    asks it what size each batch should have, and the training loop tells it, through
    :meth:`step`, how many samples each optimizer step consumed. A timetable's sizes are a
    function of the position in the data stream (samples passed), so a batch drawn ahead of
    training by DataLoader workers gets the same size it would get if drawn just in time; what
    changes during training (an adaptive schedule's decisions, the memory cap) is recorded
    with each batch as it is drawn (:meth:`draw`), so the loop, the learning-rate factor and a
    resumed run all see the size the batch was drawn with.

    The learning rate of every parameter group is multiplied by :attr:`lr_factor` for the
    duration of each ``optimizer.step()`` and restored right after, so any
    ``torch.optim.lr_scheduler`` attached to the same optimizer keeps working: it never sees
    the factor, and the effective learning rate is its learning rate times the factor. The
    factor follows the scheduled (target) batch size: the one or two balanced batches that end
    an epoch, a little smaller than the target, keep the target's factor.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        schedule (Schedule or callable): the batch size wanted as a function of
            :class:`~adabatch.schedules.Progress` (see :mod:`adabatch.schedules`).
        min_batch_size (int): smallest batch each replica (and each micro-batch) trains on; use
            :func:`~adabatch.bn_safe_min_batch_size` for models with BatchNorm. Default: 1.
        max_batch_size (int, optional): largest global batch. Default: the dataset size.
        multiple_of (int): each replica's batch is a multiple of this. Default: 1.
        lr_scaling (str or callable): how the learning rate follows the batch size, as a
            function of ``batch_size / reference_batch_size``: ``"none"`` (Smith et al. 2018),
            ``"linear"`` (Goyal et al. 2017), ``"sqrt"`` (Krizhevsky 2014; Malladi et al. 2022
            for Adam), ``"gain"`` (AdaScale, Johnson et al. 2020: the factor is
            ``(B_simple/B_0 + 1) / (B_simple/B + 1)`` from the measured noise scale, between 1
            and the ratio; its square root for Adam-family optimizers, as ``"sqrt"`` is to
            ``"linear"``), or a callable from the ratio to a factor. Default: the schedule's
            :attr:`~adabatch.schedules.Schedule.default_lr_scaling`: ``"gain"`` for
            :class:`~adabatch.schedules.Adaptive`, ``"none"`` for timetables and callables.
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
            reach a multiple of it in the sample stream are measured (every step once the batch
            is this large). A measurement costs about the same at any batch size: on one
            process it splits a batch that fits in one micro-batch in two passes (on the
            MNIST-1D CNN on a CPU, +69% on a step of 32, nothing at 256); in the plain loop it
            copies the gradients. The default measures one step per 512 samples (as many
            samples per measurement at any size) and, once batches pass 64, one step in eight.
            Default: ``max(512, 8 × the global batch size)``.
        collective (Collective or str, optional): how ranks agree under torch.distributed
            (see :mod:`adabatch.distributed`): memory caps are reduced by MIN, out-of-memory
            flags by MAX, noise statistics summed, so every rank takes the same decisions.
            ``"auto"``: the default process group when it has several ranks. Default: ``"auto"``.
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

    _POSITION = "position"
    _SAMPLES_SEEN = "samples_seen"
    _STEPS = "steps"
    _WARMUP_FROM = "warmup_from"
    _WARMUP_BEGIN = "warmup_begin"
    _DATASET_SIZE = "dataset_size"
    _PLAN = "plan"
    _MEMORY = "memory"
    _NOISE = "noise"
    _SCHEDULE = "schedule"
    _COUNTERS = (_POSITION, _SAMPLES_SEEN, _STEPS)
    #: Most batches remembered between being drawn and being trained (far above any prefetch depth).
    _PLAN_LIMIT = 4096

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
        if not (isinstance(schedule, Schedule) or callable(schedule)):
            raise TypeError(f"schedule must be a Schedule or a callable, got {type(schedule).__name__}")
        self.optimizer = optimizer
        self.schedule = as_schedule(schedule)
        self.constraints = BatchSizeConstraints(min_batch_size, max_batch_size, multiple_of, accumulate,
                                                global_floor=sync_batch_norm)
        if lr_scaling is None:
            lr_scaling = getattr(self.schedule, "default_lr_scaling", "none")
        self.lr_scaling = lr_scaling
        self._lr_rule = None if lr_scaling == "gain" else resolve_lr_scaling(lr_scaling)
        if reference_batch_size is not None:
            check_positive_int("reference_batch_size", reference_batch_size)
        self._reference_batch_size = reference_batch_size
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.layout: EpochLayout | None = None
        self._expected_dataset_size: int | None = None
        self.constraints.bind(dataset_size)
        self.logger = TensorBoardLogger(writer, log_every) if writer is not None else None
        if isinstance(memory, str) and memory != "auto":
            raise ValueError(f"memory must be a MemoryDevice, 'auto' or None, got {memory!r}")
        self.memory = MemoryCap(default_memory_device(optimizer) if memory == "auto" else memory, safety_margin)
        self._step_micro_batch_size: int | None = None  # set by train_step for the coming step()
        self._versions_before_update: list[int] | None = None
        if measure_noise is None:
            measure_noise = getattr(self.schedule, "needs_noise", False) or lr_scaling == "gain"
        noise_meter = GradientNoiseMeter(optimizer, noise_decay)  # validates noise_decay either way
        self.noise_interval = None if noise_interval is None else check_positive_int("noise_interval", noise_interval)
        self.noise_meter = noise_meter if measure_noise else None
        self._noise_reported = False  # train_step has seen to this step's measurement (taken, or not due)
        if isinstance(collective, str) and collective != "auto":
            raise ValueError(f"collective must be a Collective, 'auto' or None, got {collective!r}")
        self._collective_auto = collective == "auto"
        self.collective = default_collective() if collective == "auto" else collective

        self._position = 0
        self._samples_seen = 0
        self._steps = 0
        self._tracking = False  # whether step() or load_state_dict() has given a trained position
        self._last_lrs: list[float] | None = None
        self._warmup_from: float | None = None
        self._warmup_begin = 0
        self._warned_mismatch = False
        self._plan: dict[int, tuple[int, int, int]] = {}  # position -> (start, size, target) drawn there
        self._reference: tuple[tuple[int | None, int], int] | None = None  # cached: (bound to, size)
        self._hooked: tuple[int, tuple[int, int, int]] | None = None  # (position, planned) the hook scaled for
        self._hook = LRFactorHook(optimizer, self._hook_factor)

    # ----------------------------------------------------------------- binding
    @property
    def dataset_size(self) -> int | None:
        return self.constraints.dataset_size

    @property
    def num_replicas(self) -> int:
        return self.constraints.num_replicas

    def bind(self, dataset_size: int, num_replicas: int = 1, remainder: str = "balance") -> EpochLayout:
        """Learn the dataset and how it is cut into batches; called by :class:`~adabatch.AdaptiveBatchSampler`.

        Binding again with the same arguments is allowed (a new sampler over the same data).

        Raises:
            ValueError: if a different dataset size was given or bound before, or if the
                constraints cannot hold for this dataset and policy.
        """
        layout = EpochLayout(dataset_size, num_replicas, remainder, self.constraints.floor_for(num_replicas))
        if self.layout is not None:
            same = (self.layout.dataset_size, self.layout.num_replicas, self.layout.remainder)
            if same != (dataset_size, num_replicas, remainder):
                raise ValueError(
                    f"this scheduler already drives a sampler with dataset_size={same[0]}, num_replicas="
                    f"{same[1]}, remainder={same[2]!r}; got dataset_size={dataset_size}, num_replicas="
                    f"{num_replicas}, remainder={remainder!r}. Use one scheduler per training dataset."
                )
            return self.layout
        for name, expected in (("dataset_size", self.dataset_size), ("the state_dict's dataset_size",
                                                                     self._expected_dataset_size)):
            if expected is not None and expected != dataset_size:
                raise ValueError(f"{name} is {expected}, but the sampler's dataset has {dataset_size} samples")
        self.constraints.bind(dataset_size, num_replicas)
        if self._collective_auto and self.collective is None and num_replicas > 1:
            # Built before the process group was: look again now that the sampler shards.
            self.collective = default_collective()
        if remainder == "balance":
            self._check_balance_fits(dataset_size, num_replicas)
        self.layout = layout
        return layout

    def _check_balance_fits(self, dataset_size: int, num_replicas: int) -> None:
        # A tail of up to 2 * floor - 1 samples per replica may have to stay one batch.
        floor = self.constraints.floor_per_replica
        cap = self.constraints.per_replica_cap
        if cap < min(2 * floor - 1, dataset_size // num_replicas):
            raise ValueError(
                f"remainder='balance' needs max_batch_size of at least 2 * min_batch_size - 1 per replica "
                f"({2 * floor - 1} x {num_replicas} replica(s)) so that the end of an epoch can always be "
                f"split without a batch below min_batch_size={floor}; got max_batch_size="
                f"{self.constraints.max_batch_size}. Raise max_batch_size, or use remainder='wrap' or 'drop'"
            )

    # ------------------------------------------------------------ batch sizes
    def target_at(self, position: int) -> int:
        """The constrained global batch size the schedule wants at stream ``position``."""
        progress = Progress(samples=position, dataset_size=self.dataset_size)
        return self.constraints.apply(self.schedule(progress))

    def next_batch(self, position: int) -> tuple[int, int]:
        """``(start, size)`` of the global batch that follows stream ``position``: the one the
        sampler drew there, if it did, else the one it would draw now."""
        return self._planned(position)[:2]

    def draw(self, position: int) -> tuple[int, int]:
        """Decide the batch that follows ``position`` and remember it; called by the sampler.

        Batches are drawn ahead of training (DataLoader workers prefetch), and what decides a
        size (the memory cap, an adaptive schedule) may change in between. The decision is
        therefore recorded when the batch is drawn, and :meth:`step` and :attr:`lr_factor` use
        the recorded size and target for that batch. The record is part of :meth:`state_dict`,
        so batches drawn but not trained before a checkpoint get the same sizes after it.
        """
        planned = self._plan.get(position)
        if planned is None or planned[1] % self.num_replicas:
            planned = self._decide(position)
            self._plan[position] = planned
            if len(self._plan) > self._PLAN_LIMIT:
                del self._plan[next(iter(self._plan))]
        return planned[:2]

    def _planned(self, position: int) -> tuple[int, int, int]:
        """``(start, size, target)`` of the batch after ``position``, recorded or decided now."""
        planned = self._plan.get(position)
        # A record from a run on another number of replicas may not split evenly here.
        if planned is None or planned[1] % self.num_replicas:
            return self._decide(position)
        return planned

    def _decide(self, position: int) -> tuple[int, int, int]:
        if self.layout is None:
            target = self.target_at(position)
            return position, target, target
        return self.layout.next_batch(position, self.target_at)

    @property
    def batch_size(self) -> int:
        """Global size of the coming batch."""
        return self.next_batch(self._position)[1]

    @property
    def reference_batch_size(self) -> int:
        """The batch size at which the learning-rate factor is 1."""
        if self._reference_batch_size is not None:
            return self._reference_batch_size
        # The schedule's start under the static bounds: a memory cap that falls below it later,
        # or an adaptive schedule's later decisions, must not move the reference (and with it
        # every learning rate). It depends on nothing else a bind can change, so it is computed
        # once per binding.
        bound_to = (self.dataset_size, self.num_replicas)
        if self._reference is None or self._reference[0] != bound_to:
            start = Progress(samples=0, dataset_size=self.dataset_size)
            initial_size = getattr(self.schedule, "initial_size", self.schedule)
            self._reference = (bound_to, self.constraints.apply(initial_size(start), memory=False))
        return self._reference[1]

    @property
    def lr_factor(self) -> float:
        """The factor the coming optimizer step multiplies every learning rate by."""
        return self._lr_factor_for(self._planned(self._position))

    def _hook_factor(self) -> float:
        """:attr:`lr_factor`, remembering the batch it was computed for, which :meth:`step`
        then counts without deciding it again."""
        planned = self._planned(self._position)
        self._hooked = (self._position, planned)
        return self._lr_factor_for(planned)

    def _lr_factor_for(self, planned: tuple[int, int, int]) -> float:
        factor = self._factor_for(planned[2])
        if self._warmup_from is None or not self.warmup_steps:
            return factor
        progress = (self._steps - self._warmup_begin + 1) / self.warmup_steps
        if progress >= 1:
            return factor
        return self._warmup_from + (factor - self._warmup_from) * progress

    def _factor_for(self, target: int) -> float:
        if self._lr_rule is None:
            return self._gain(target)
        factor = float(self._lr_rule(target / self.reference_batch_size))
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"lr_scaling returned {factor!r} for batch size {target}; it must be positive and finite")
        return factor

    def _gain(self, target: int) -> float:
        """AdaScale's gain (Johnson et al. 2020): how much further a step on ``target`` samples
        may go than one on the reference batch ``B_0``, ``(B_simple/B_0 + 1) / (B_simple/B + 1)``:
        1 without gradient noise (a larger batch changes nothing), ``B/B_0`` when it is all noise
        (linear scaling); 1 until the noise scale is measured. For an Adam-family optimizer, whose
        step does not grow with the gradient's norm, its square root (the square-root rule of
        Malladi et al. 2022 where the noise dominates)."""
        noise_scale = self.noise_meter.noise.noise_scale if self.noise_meter is not None else math.nan
        if math.isnan(noise_scale):
            return 1.0
        if math.isinf(noise_scale):
            gain = target / self.reference_batch_size
        else:
            gain = (noise_scale / self.reference_batch_size + 1) / (noise_scale / target + 1)
        return math.sqrt(gain) if is_adam_family(self.optimizer) else gain

    # ---------------------------------------------------------------- progress
    @property
    def samples_seen(self) -> int:
        """Samples trained on so far (global)."""
        return self._samples_seen

    @property
    def steps(self) -> int:
        """Optimizer steps counted by :meth:`step`."""
        return self._steps

    @property
    def position(self) -> int:
        """Stream position after the last trained batch."""
        return self._position

    @property
    def epoch(self) -> float:
        """Epochs passed, as a float; ``nan`` while the dataset size is unknown."""
        if self.dataset_size is None:
            return math.nan
        return self._position / self.dataset_size

    def skip_to(self, position: int) -> None:
        """Move the trained position forward to ``position`` without training, as when the
        sampler jumps to the start of a later epoch (``set_epoch``). Never moves backward."""
        if position > self._position:
            self._position = position
        self._tracking = True

    def trained_position(self) -> int | None:
        """Where training stands in the stream, or ``None`` before the first :meth:`step`
        (and before :meth:`load_state_dict`); the sampler resumes from here."""
        return self._position if self._tracking else None

    def get_last_lr(self) -> list[float]:
        """Effective learning rate of each parameter group in the last counted step (before
        the first: the current learning rates times :attr:`lr_factor`)."""
        if self._last_lrs is not None:
            return list(self._last_lrs)
        return self._coming_lrs()

    def _coming_lrs(self) -> list[float]:
        factor = self.lr_factor
        return [float(group["lr"]) * factor for group in self.optimizer.param_groups]

    def step(self, batch_size: int | None = None) -> None:
        """Count one optimizer step.

        Call it after ``optimizer.step()``, once per batch.

        Args:
            batch_size (int, optional): samples this process trained on in the step,
                ``len(x)``; under ``num_replicas > 1`` the global count is ``batch_size *
                num_replicas``. Default: the size the sampler planned for this step.
        """
        hooked, self._hooked = self._hooked, None
        if hooked is not None and hooked[0] == self._position:
            start, planned, target = hooked[1]
        else:
            start, planned, target = self._planned(self._position)
        if batch_size is None:
            consumed = planned
        else:
            check_positive_int("batch_size", batch_size)
            consumed = batch_size * self.num_replicas
            if consumed != planned and self.layout is not None and not self._warned_mismatch:
                self._warned_mismatch = True
                warnings.warn(
                    f"scheduler.step() was told {consumed} samples (global) but the sampler planned {planned} "
                    f"for this step; progress follows the count given. Call step() once per batch from the "
                    f"AdaptiveBatchSampler, with len(x) (this warning is shown once)",
                    UserWarning,
                    stacklevel=2,
                )
        # A step skipped by the optimizer (e.g. by a GradScaler) never ran the hook.
        ran = self._hook.last_factor is not None
        factor_used = self._hook.last_factor if ran else self.lr_factor
        lrs = self._hook.last_effective_lrs if ran else self._coming_lrs()
        self._last_lrs = lrs
        self._position = start + consumed
        self._plan = {p: planned_batch for p, planned_batch in self._plan.items() if p >= self._position}
        self._samples_seen += consumed
        self._steps += 1
        self._tracking = True
        micro_batch_size = self._step_micro_batch_size or consumed // self.num_replicas
        self._step_micro_batch_size = None
        self.constraints.set_memory_cap(self._agreed_cap(self.memory.end_step(micro_batch_size)))
        self._observe_noise(consumed // self.num_replicas, target, start, consumed)
        self._update_warmup(target, factor_used)
        if self.logger is not None:
            values = {"batch_size": consumed, "target_batch_size": target, "lr_factor": factor_used}
            if self.dataset_size is not None:
                values["epoch"] = start / self.dataset_size
            values.update(self._memory_values())
            values.update(self._noise_values())
            self.logger.log_step(self._steps - 1, self._samples_seen - consumed, values, lrs)
        self._hook.last_factor = None
        self._hook.last_effective_lrs = None

    #: Stands for "no memory cap" in a MIN reduction over ranks.
    _NO_CAP = 2**62

    def _agreed_cap(self, cap: int | None) -> int | None:
        """The smallest of the ranks' memory caps (every rank must cut batches alike)."""
        if self.collective is None or (self.memory.device is None and self.memory.ceiling is None):
            return cap  # nothing measured on any rank (the device setting is the same on all)
        agreed = self.collective.min(self._NO_CAP if cap is None else cap)
        return None if agreed == self._NO_CAP else agreed

    def add_memory_measurements(self, peaks: Mapping[int, int]) -> int | None:
        """Learn the memory cap from peaks measured before training (``{micro_batch_size:
        peak_bytes}``, e.g. :attr:`ProbeResult.peaks <adabatch.memory.ProbeResult>`), so that
        the first batches drawn are already capped; returns the cap."""
        cap = self._agreed_cap(self.memory.add_measurements(dict(peaks)))
        self.constraints.set_memory_cap(cap)
        return cap

    # -------------------------------------------------------------- train_step
    def train_step(
        self, batch: Batch, loss_fn: Callable[[Batch], torch.Tensor], *, scaler: Any = None,
        no_sync: Callable[[], Any] | None = None,
    ) -> torch.Tensor:
        """Train one batch: forward and backward in micro-batches, ``optimizer.step()``,
        ``zero_grad()`` and :meth:`step`.

        The batch is split into as few micro-batches as the memory cap allows
        (:meth:`BatchSizeConstraints.micro_batch_sizes`), none below ``min_batch_size``. Each
        micro-batch's loss is weighted by its share of the batch before ``backward()``, so the
        accumulated gradient equals the full batch's mean gradient even for unequal
        micro-batches. BatchNorm layers in training mode see each micro-batch's own statistics
        (ghost batch norm, Hoffer et al. 2017), which is why micro-batches keep to the floor.

        If a micro-batch runs out of memory, what the attempt held is freed (gradients set to
        ``None``, the GradScaler's per-step state reset, the device's cache emptied), the memory
        cap is lowered and the SAME batch is tried again in smaller micro-batches: the optimizer
        steps exactly once per batch and no sample is skipped or counted twice. An
        out-of-memory error raised after the optimizer changed the parameters (from a step
        post-hook, say) cannot be retried without applying the batch twice: the step is counted
        and the error propagates. Other errors propagate untouched.

        Args:
            batch: what the DataLoader yields: a tensor, or a tuple, list or dict of tensors
                whose first dimension is the batch.
            loss_fn (callable): ``loss_fn(micro_batch)`` returns the MEAN loss over the
                micro-batch (the usual ``reduction="mean"``), a scalar tensor.
            scaler (torch.amp.GradScaler, optional): scales the loss for mixed precision and
                steps the optimizer. Default: none.
            no_sync (callable, optional): under torch.distributed with a
                ``DistributedDataParallel`` model, its ``no_sync`` method. The micro-batches'
                backward passes then run without DDP's gradient all-reduce; once every rank
                has finished (or said it ran out of memory, reduced by MAX so all retry
                together), train_step averages the gradients itself. A DDP model without it
                all-reduces inside backward, where a rank that ran out of memory in its forward
                pass would leave the others waiting. Default: none.

        Returns:
            the batch's mean loss (detached, on the loss's device).

        Raises:
            BatchSizeFloorError: if a micro-batch of ``min_batch_size`` samples runs out of memory.

        Example:
            >>> for x, y in loader:
            ...     scheduler.train_step((x, y), lambda b: F.cross_entropy(model(b[0]), b[1]))
        """
        if no_sync is not None and self.collective is None and self.num_replicas > 1:
            raise RuntimeError(
                f"train_step(no_sync=...) across {self.num_replicas} replicas needs a collective to average the "
                f"gradients, and this scheduler has none: initialise the torch.distributed process group before "
                f"building the AdaptiveBatchSampler, or pass collective= to BatchSizeScheduler"
            )
        batch_size = batch_length(batch)
        measure = self.noise_meter is not None and self._noise_due(self._position, batch_size * self.num_replicas)
        while True:
            sizes = self.constraints.micro_batch_sizes(batch_size)
            if measure:
                sizes = self._measurement_split(sizes)
            failed = 0
            self._versions_before_update = None
            try:
                loss = self._accumulate(batch, batch_size, sizes, loss_fn, scaler, no_sync, measure)
                if self.collective is None:
                    self._synchronise_and_step(batch_size, scaler, measure)
            except Exception as error:  # noqa: BLE001 - re-raised unless it is an out-of-memory error
                if not is_out_of_memory(error):
                    raise
                if self._parameters_changed():
                    # The optimizer had already updated the parameters (the error came from a
                    # step post-hook, say): a retry would apply this batch twice. The batch is
                    # trained, so it is counted before the error propagates.
                    self.optimizer.zero_grad(set_to_none=True)
                    self._step_micro_batch_size = max(sizes)
                    self.step(batch_size)
                    raise
                failed = max(sizes)
            if self.collective is not None:
                # Every rank learns whether any ran out of memory before any gradient is
                # exchanged, so all retry together and none waits alone in a collective.
                failed = self.collective.max(failed)
            if not failed:
                break
            # Outside the except clause: the error's traceback no longer pins the attempt's tensors.
            self.optimizer.zero_grad(set_to_none=True)
            self._hooked = None  # the retry decides under the lowered cap
            if scaler is not None:
                reset_grad_scaler_step(scaler, self.optimizer)
            lowered = self.memory.out_of_memory(failed, self.constraints.floor_per_replica)
            self.constraints.set_memory_cap(self._agreed_cap(lowered))
        if self.collective is not None:
            self._synchronise_and_step(batch_size, scaler, measure)
        self.optimizer.zero_grad(set_to_none=True)
        self._step_micro_batch_size = max(sizes)
        self.step(batch_size)
        return loss

    def _accumulate(
        self, batch: Batch, batch_size: int, sizes: list[int], loss_fn: Callable[[Batch], torch.Tensor], scaler: Any,
        no_sync: Callable[[], Any] | None, measure: bool,
    ) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches; no collective runs here."""
        self.optimizer.zero_grad(set_to_none=True)
        self.memory.begin_step()
        meter = self.noise_meter if measure and len(sizes) > 1 and self.collective is None else None
        if self.noise_meter is not None and not measure and (len(sizes) > 1 or self._can_split(sizes)):
            self._noise_reported = True  # not this step's turn: no fallback either
        grad_scale = self._grad_scale(scaler)
        total = None
        with no_sync() if no_sync is not None else contextlib.nullcontext():
            for index, micro_batch in enumerate(split_batch(batch, sizes)):
                loss = loss_fn(micro_batch) * (batch_length(micro_batch) / batch_size)
                (loss if scaler is None else scaler.scale(loss)).backward()
                total = loss.detach() if total is None else total + loss.detach()
                if meter is not None and index == 0:
                    meter.after_first_micro_batch(sizes[0], sizes[0] / batch_size, grad_scale)
        if meter is not None:
            meter.after_batch(batch_size, grad_scale)
            self._noise_reported = True
        return total  # type: ignore[return-value]

    @staticmethod
    def _grad_scale(scaler: Any) -> float:
        return 1.0 if scaler is None else float(scaler.get_scale())

    def _synchronise_and_step(self, batch_size: int, scaler: Any, measure: bool) -> None:
        """Average the gradients over the ranks (if any; the per-rank gradient before and the
        averaged one after are the data-parallel noise pair), then step the optimizer."""
        if self.collective is not None:
            meter = self.noise_meter if measure else None
            self._noise_reported = self.noise_meter is not None
            if meter is not None:
                meter.before_all_reduce(self._grad_scale(scaler))
            self.collective.all_reduce_mean_(
                [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None])
            if meter is not None:
                meter.after_all_reduce(batch_size, batch_size * self.collective.world_size, self.collective,
                                       self._grad_scale(scaler))
        # In-place updates bump a tensor's version counter: how an error after this point
        # tells whether the parameters were already changed.
        self._versions_before_update = [p._version for group in self.optimizer.param_groups for p in group["params"]]
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)
            scaler.update()

    def _measurement_split(self, sizes: list[int]) -> list[int]:
        """Split a batch that fits in one micro-batch in two halves when the noise scale is
        measured on one process, so the first half serves as the small batch (if the halves keep
        to the floor); across ranks each rank's batch is the small one."""
        if self.collective is not None or not self._can_split(sizes):
            return sizes
        return [sizes[0] - sizes[0] // 2, sizes[0] // 2]

    def _can_split(self, sizes: list[int]) -> bool:
        return len(sizes) == 1 and sizes[0] >= 2 * self.constraints.floor_per_replica

    def _noise_due(self, start: int, consumed: int) -> bool:
        """Whether the step over the stream's samples ``[start, start + consumed)`` is measured:
        whether it reaches a multiple of ``noise_interval`` (by default, of
        ``max(512, 8 × consumed)``)."""
        interval = self.noise_interval or max(DEFAULT_NOISE_INTERVAL, MIN_STEPS_PER_MEASUREMENT * consumed)
        return (start + consumed) // interval > start // interval

    def _parameters_changed(self) -> bool:
        before = self._versions_before_update
        if before is None:
            return False
        now = [p._version for group in self.optimizer.param_groups for p in group["params"]]
        return now != before

    def _observe_noise(self, local_batch_size: int, target: int, start: int, consumed: int) -> None:
        if self.noise_meter is None:
            return
        if not self._noise_reported:
            # The plain loop pairs a due step with the one before it, which keeps its gradient
            # only if the next step (assumed of the same size) will be due.
            self.noise_meter.from_consecutive_steps(local_batch_size, measure=self._noise_due(start, consumed),
                                                    keep=self._noise_due(start + consumed, consumed))
        self._noise_reported = False
        observe = getattr(self.schedule, "observe", None)
        if observe is not None:
            noise = self.noise_meter.noise
            observe(Progress(samples=self._position, dataset_size=self.dataset_size), noise.noise_scale, noise.steps,
                    target, largest=self.constraints.largest())

    def _noise_values(self) -> dict[str, float]:
        if self.noise_meter is None or not self.noise_meter.noise.steps:
            return {}
        noise = self.noise_meter.noise
        return {"noise/grad_sqr": noise.grad_sqr, "noise/grad_var": noise.grad_var,
                "noise/noise_scale": noise.noise_scale, "noise/raw_grad_sqr": noise.last_grad_sqr,
                "noise/raw_grad_var": noise.last_grad_var}

    def _memory_values(self) -> dict[str, float]:
        if self.memory.device is None:
            return {}
        values = {"memory/peak_bytes": float(self.memory.last_peak_bytes)}
        if self.memory.cap is not None:
            values["memory/cap"] = float(self.memory.cap)
        fitted = self.memory.fit()
        if fitted is not None:
            values["memory/fixed_bytes"], values["memory/per_sample_bytes"] = fitted
        return values

    def _update_warmup(self, trained_target: int, factor_used: float) -> None:
        if not self.warmup_steps:
            return
        coming = self._planned(self._position)[2]
        if coming != trained_target:
            self._warmup_from = factor_used
            self._warmup_begin = self._steps

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The scheduler's own numbers, as a new dict (no optimizer, schedule or writer inside)."""
        return {
            self._POSITION: self._position,
            self._SAMPLES_SEEN: self._samples_seen,
            self._STEPS: self._steps,
            self._WARMUP_FROM: self._warmup_from,
            self._WARMUP_BEGIN: self._warmup_begin,
            self._DATASET_SIZE: self.dataset_size,
            self._PLAN: [[position, *planned] for position, planned in self._plan.items()],
            self._MEMORY: self.memory.state_dict(),
            self._NOISE: None if self.noise_meter is None else self.noise_meter.noise.state_dict(),
            self._SCHEDULE: self.schedule.state_dict() if hasattr(self.schedule, "state_dict") else None,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the numbers saved by :meth:`state_dict`.

        Raises:
            ValueError: if a key is missing, a counter is negative, or the state was saved for
                a dataset of another size.
        """
        for key in self._COUNTERS + (self._WARMUP_FROM, self._WARMUP_BEGIN, self._DATASET_SIZE):
            if key not in state_dict:
                raise ValueError(f"scheduler state_dict is missing {key!r}")
        for key in self._COUNTERS + (self._WARMUP_BEGIN,):
            value = state_dict[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"scheduler state_dict[{key!r}] must be a non-negative integer, got {value!r}")
        saved_size = state_dict[self._DATASET_SIZE]
        if saved_size is not None and self.dataset_size is not None and saved_size != self.dataset_size:
            raise ValueError(
                f"scheduler state_dict was saved for dataset_size={saved_size}, but this scheduler's dataset "
                f"has {self.dataset_size} samples"
            )
        self._expected_dataset_size = saved_size
        self._position = state_dict[self._POSITION]
        self._samples_seen = state_dict[self._SAMPLES_SEEN]
        self._steps = state_dict[self._STEPS]
        self._warmup_from = state_dict[self._WARMUP_FROM]
        self._warmup_begin = state_dict[self._WARMUP_BEGIN]
        self._plan = {int(p): (int(start), int(size), int(target)) for p, start, size, target in
                      state_dict.get(self._PLAN, [])}
        self._hooked = None
        if state_dict.get(self._NOISE) is not None and self.noise_meter is not None:
            self.noise_meter.noise.load_state_dict(state_dict[self._NOISE])
        if state_dict.get(self._SCHEDULE) is not None and hasattr(self.schedule, "load_state_dict"):
            self.schedule.load_state_dict(state_dict[self._SCHEDULE])
        if self._MEMORY in state_dict:
            self.memory.load_state_dict(state_dict[self._MEMORY])
            self.constraints.set_memory_cap(self.memory.cap)
        self._tracking = True

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(schedule={self.schedule!r}, {self.constraints!r}, lr_scaling={self.lr_scaling!r}, "
            f"position={self._position}, steps={self._steps})"
        )
