"""BatchSizeScheduler: decides the batch size, scales the learning rate, counts progress, logs."""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import torch

from .constraints import BatchSizeConstraints
from .layout import EpochLayout
from .loggers import TensorBoardLogger
from .lr_scaling import LRFactorHook, LRScaling, resolve_lr_scaling
from .schedules import Progress, Schedule, ScheduleFn, as_schedule
from .schedules.base import check_positive_int

__all__ = ["BatchSizeScheduler"]


class BatchSizeScheduler:
    """Grows the batch size during training and scales the learning rate with it.

    The scheduler is the single source of the batch size: :class:`~adabatch.AdaptiveBatchSampler`
    asks it what size each batch should have, and the training loop tells it, through
    :meth:`step`, how many samples each optimizer step consumed. Sizes are a function of the
    position in the data stream (samples passed), so a batch drawn ahead of training by
    DataLoader workers gets the same size it would get if drawn just in time.

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
        min_batch_size (int): smallest batch each replica trains on; use
            :func:`~adabatch.bn_safe_min_batch_size` for models with BatchNorm. Default: 1.
        max_batch_size (int, optional): largest global batch. Default: the dataset size.
        multiple_of (int): each replica's batch is a multiple of this. Default: 1.
        lr_scaling (str or callable): how the learning rate follows the batch size, as a
            function of ``batch_size / reference_batch_size``: ``"none"`` (Smith et al. 2018),
            ``"linear"`` (Goyal et al. 2017), ``"sqrt"`` (Krizhevsky 2014; Malladi et al. 2022
            for Adam), or a callable from the ratio to a factor. Default: ``"none"``.
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
    _COUNTERS = (_POSITION, _SAMPLES_SEEN, _STEPS)

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule | ScheduleFn,
        *,
        min_batch_size: int = 1,
        max_batch_size: int | None = None,
        multiple_of: int = 1,
        lr_scaling: LRScaling = "none",
        reference_batch_size: int | None = None,
        warmup_steps: int = 0,
        dataset_size: int | None = None,
        writer: Any = None,
        log_every: int = 1,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not (isinstance(schedule, Schedule) or callable(schedule)):
            raise TypeError(f"schedule must be a Schedule or a callable, got {type(schedule).__name__}")
        self.optimizer = optimizer
        self.schedule = as_schedule(schedule)
        self.constraints = BatchSizeConstraints(min_batch_size, max_batch_size, multiple_of)
        self.lr_scaling = lr_scaling
        self._lr_rule = resolve_lr_scaling(lr_scaling)
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

        self._position = 0
        self._samples_seen = 0
        self._steps = 0
        self._tracking = False  # whether step() or load_state_dict() has given a trained position
        self._last_lrs: list[float] | None = None
        self._warmup_from: float | None = None
        self._warmup_begin = 0
        self._warned_mismatch = False
        self._hook = LRFactorHook(optimizer, lambda: self.lr_factor)

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
        layout = EpochLayout(dataset_size, num_replicas, remainder, self.constraints.min_batch_size)
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
        if remainder == "balance":
            self._check_balance_fits(dataset_size, num_replicas)
        self.layout = layout
        return layout

    def _check_balance_fits(self, dataset_size: int, num_replicas: int) -> None:
        # A tail of up to 2 * floor - 1 samples per replica may have to stay one batch.
        floor = self.constraints.min_batch_size
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
        """``(start, size)`` of the global batch that follows stream ``position``."""
        if self.layout is None:
            return position, self.target_at(position)
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
        return self.target_at(0)

    @property
    def lr_factor(self) -> float:
        """The factor the coming optimizer step multiplies every learning rate by."""
        start, _ = self.next_batch(self._position)
        factor = self._factor_for(self.target_at(start))
        if self._warmup_from is None or not self.warmup_steps:
            return factor
        progress = (self._steps - self._warmup_begin + 1) / self.warmup_steps
        if progress >= 1:
            return factor
        return self._warmup_from + (factor - self._warmup_from) * progress

    def _factor_for(self, target: int) -> float:
        factor = float(self._lr_rule(target / self.reference_batch_size))
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"lr_scaling returned {factor!r} for batch size {target}; it must be positive and finite")
        return factor

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
        start, planned = self.next_batch(self._position)
        target = self.target_at(start)
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
        self._samples_seen += consumed
        self._steps += 1
        self._tracking = True
        self._update_warmup(target, factor_used)
        if self.logger is not None:
            values = {"batch_size": consumed, "target_batch_size": target, "lr_factor": factor_used}
            if self.dataset_size is not None:
                values["epoch"] = start / self.dataset_size
            self.logger.log_step(self._steps - 1, self._samples_seen - consumed, values, lrs)
        self._hook.last_factor = None
        self._hook.last_effective_lrs = None

    def _update_warmup(self, trained_target: int, factor_used: float) -> None:
        if not self.warmup_steps:
            return
        start, _ = self.next_batch(self._position)
        coming = self.target_at(start)
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
        self._tracking = True

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(schedule={self.schedule!r}, {self.constraints!r}, lr_scaling={self.lr_scaling!r}, "
            f"position={self._position}, steps={self._steps})"
        )
