"""AdaptiveBatchTrainer: a ``transformers.Trainer`` whose batch grows during ``train()``.

The Trainer draws its batches from an :class:`~adabatch.AdaptiveBatchSampler` and counts each
optimizer step on a :class:`~adabatch.BatchSizeScheduler`. One batch of the sampler is one
optimizer step on this process; with ``gradient_accumulation_steps=k`` it is cut into ``k``
micro-batches of sizes that differ by at most one, so the Trainer's count of the items in the
step (``num_items_in_batch``) covers exactly the batch the schedule chose.

The Trainer's loop assumes a batch of fixed size; each override below replaces one assumption:

- :meth:`~AdaptiveBatchTrainer.get_train_dataloader`: the DataLoader takes the sampler as its
  ``batch_sampler``, and the ``BatchSamplerShard`` that ``accelerator.prepare`` wraps around it
  under several processes passes every batch through: the sampler has already given this
  process its share of each batch, and the wrapper would deal whole batches out again.
- :meth:`~AdaptiveBatchTrainer.set_initial_training_values`: the steps of a run of
  ``num_train_epochs``, and the epochs of a run of ``max_steps``, come from the batches the
  schedule plans, not from the first epoch's length.
- ``_init_training_state`` and ``_run_epoch``: a resumed run starts in the epoch of the sampler's
  next batch, and the Trainer skips nothing (the sampler resumes where training stopped); an
  epoch ends when the sampler's data does (:meth:`~AdaptiveBatchTrainer.get_batch_samples`).
- ``_save_optimizer_and_scheduler``: each checkpoint folder gets :data:`STATE_NAME` next to the
  Trainer's own files.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from functools import partial
from itertools import islice, takewhile
from typing import Any, Iterator

import torch
from accelerate.data_loader import BatchSamplerShard
from accelerate.optimizer import AcceleratedOptimizer
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import get_last_checkpoint, has_length, seed_worker
from transformers.utils import is_datasets_available

from ..micro_batches import Batch, batch_length, split_batch
from ..sampler import AdaptiveBatchSampler
from ..scheduler import BatchSizeScheduler
from ..schedules import Adaptive, Schedule, ScheduleFn

__all__ = ["AdaptiveBatchTrainer", "SCHEDULER_OPTIONS", "STATE_NAME"]

#: The file, in each checkpoint folder, that holds adabatch's state next to the Trainer's own.
STATE_NAME = "adabatch_state.pt"

#: The :class:`~adabatch.BatchSizeScheduler` options the trainer takes as keyword arguments.
SCHEDULER_OPTIONS = (
    "max_batch_size", "multiple_of", "lr_scaling", "reference_batch_size", "warmup_steps", "log_every", "memory",
    "safety_margin", "measure_noise", "noise_decay", "noise_interval", "sync_batch_norm",
)


class AdaptiveBatchTrainer(Trainer):
    """A ``transformers.Trainer`` whose batch size follows an adabatch schedule.

    Every argument but ``schedule``, ``min_batch_size`` and the :data:`SCHEDULER_OPTIONS` is the
    Trainer's own. The schedule gives the global batch of each optimizer step (over all
    processes, accumulation included); ``per_device_train_batch_size`` only gives ``Adaptive()``
    its start when it has none (times the accumulation steps and the processes). ``max_steps``
    counts optimizer steps and ``num_train_epochs`` passes over the data, as in the Trainer.
    The shuffle seed is ``data_seed`` (or ``seed``); ``train_sampling_strategy="sequential"``
    turns shuffling off and ``dataloader_drop_last=True`` drops the end of each epoch that is
    shorter than the scheduled batch (``remainder="drop"``; otherwise ``"balance"``).

    adabatch multiplies the learning rates by its factor only during ``optimizer.step()``, so
    the Trainer's LR scheduler keeps working and logs its own, unscaled, ``learning_rate``.
    With ``report_to`` including ``"tensorboard"``, adabatch's curves go through the
    TensorBoard callback's writer, into the Trainer's run directory. Each checkpoint folder
    holds :data:`STATE_NAME`, and ``train(resume_from_checkpoint=...)`` resumes with the same
    batches and learning rates as a run that never stopped.

    Args:
        schedule (Schedule or callable): the global batch size as a function of progress
            (see :mod:`adabatch.schedules`).
        min_batch_size (int): smallest micro-batch a forward pass sees on each process; each
            process's batch is at least ``min_batch_size × gradient_accumulation_steps``.
            Default: 1.
        **kwargs: the Trainer's arguments, and the :class:`~adabatch.BatchSizeScheduler`
            options ``max_batch_size``, ``multiple_of``, ``lr_scaling``,
            ``reference_batch_size``, ``warmup_steps``, ``log_every``, ``memory``,
            ``safety_margin``, ``measure_noise``, ``noise_decay``, ``noise_interval`` and
            ``sync_batch_norm``, with the scheduler's defaults and meaning.

    Raises:
        ValueError: for training arguments that fix or split the batch themselves
            (``auto_find_batch_size``, a ``train_sampling_strategy`` other than ``"random"``
            or ``"sequential"``, ``split_batches`` or ``dispatch_batches`` in
            ``accelerator_config``), or for DeepSpeed and FSDP; and for a schedule or option
            the scheduler refuses.

    Example:
        >>> trainer = AdaptiveBatchTrainer(
        ...     model=model, args=TrainingArguments("out", num_train_epochs=3, report_to="tensorboard"),
        ...     train_dataset=train_set, schedule=schedules.Step(start=16, milestones=[1, 2]),
        ...     lr_scaling="sqrt", max_batch_size=256)
        >>> trainer.train()
    """

    def __init__(self, *args: Any, schedule: Schedule | ScheduleFn, min_batch_size: int = 1, **kwargs: Any) -> None:
        self.scheduler_options = {name: kwargs.pop(name) for name in SCHEDULER_OPTIONS if name in kwargs}
        super().__init__(*args, **kwargs)
        self._check_training_arguments()
        self.schedule = schedule
        self.min_batch_size = min_batch_size
        # Built once here on a stand-in optimizer, so that a bad schedule or option fails now,
        # not when train() starts.
        self._new_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), None)
        #: The :class:`~adabatch.BatchSizeScheduler` of the current ``train()`` (``None`` before).
        self.batch_size_scheduler: BatchSizeScheduler | None = None
        #: The :class:`~adabatch.AdaptiveBatchSampler` of the current ``train()`` (``None`` before).
        self.batch_sampler: AdaptiveBatchSampler | None = None
        self._resumed: dict[str, Any] | None = None  # adabatch's state in the checkpoint train() resumes from
        self.add_callback(_CountSteps(self))

    def _check_training_arguments(self) -> None:
        args = self.args
        if args.auto_find_batch_size:
            raise ValueError("auto_find_batch_size=True cannot be used with AdaptiveBatchTrainer: the schedule "
                             "chooses the batch size")
        if args.train_sampling_strategy not in ("random", "sequential"):
            raise ValueError(f"train_sampling_strategy={args.train_sampling_strategy!r} cannot be used with "
                             f"AdaptiveBatchTrainer, which samples the batches itself: use 'random' or 'sequential'")
        for name in ("split_batches", "dispatch_batches"):
            if getattr(args.accelerator_config, name, None):
                raise ValueError(f"accelerator_config {name}=True cannot be used with AdaptiveBatchTrainer: its "
                                 f"sampler gives each process its own share of every batch")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("AdaptiveBatchTrainer does not support DeepSpeed or FSDP")

    def _new_scheduler(self, optimizer: torch.optim.Optimizer, writer: Any) -> BatchSizeScheduler:
        return BatchSizeScheduler(
            optimizer, copy.deepcopy(self.schedule),  # fresh decisions for each train()
            min_batch_size=self.min_batch_size * self.args.gradient_accumulation_steps, writer=writer,
            **self.scheduler_options,
        )

    # --------------------------------------------------------------- training
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Train as ``Trainer.train`` does; a checkpoint resumed from must hold :data:`STATE_NAME`.

        Raises:
            ValueError: if the checkpoint has no :data:`STATE_NAME` (it was not saved by an
                AdaptiveBatchTrainer, or with ``save_only_model=True``).
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._resumed = None
        if resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, STATE_NAME)
            if not os.path.isfile(path):
                raise ValueError(f"resume_from_checkpoint={resume_from_checkpoint!r} has no {STATE_NAME}: it was not "
                                 f"saved by an AdaptiveBatchTrainer, or was saved with save_only_model=True")
            self._resumed = torch.load(path, weights_only=True)
        return super().train(resume_from_checkpoint or None, *args, **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        """A DataLoader over the AdaptiveBatchSampler of a new BatchSizeScheduler (restored from
        the checkpoint when resuming), prepared by accelerate without a second sharding."""
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if isinstance(dataset, IterableDataset) or not has_length(dataset):
            raise TypeError(f"train_dataset must be a map-style dataset with a length for AdaptiveBatchTrainer, got "
                            f"{type(dataset).__name__}")
        args = self.args
        collate_fn = self.data_collator
        if _is_datasets_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description="Training")
        else:
            collate_fn = self._get_collator_with_removed_columns(collate_fn, description="Training")
        sampler = self._start_batch_schedule(dataset)
        loader = DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory, persistent_workers=args.dataloader_persistent_workers,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            prefetch_factor=args.dataloader_prefetch_factor, in_order=args.dataloader_in_order,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
        )
        return _without_second_sharding(self.accelerator.prepare(loader), sampler)

    def _start_batch_schedule(self, dataset: Any) -> AdaptiveBatchSampler:
        """Build this run's scheduler and sampler, on the optimizer the Trainer goes on to use."""
        self.create_optimizer()  # the Trainer creates it later, unless it exists
        optimizer = self.optimizer
        while isinstance(optimizer, AcceleratedOptimizer):  # a second train() finds it prepared
            optimizer = optimizer.optimizer
        with warnings.catch_warnings():
            # A second train() replaces the scheduler of the first on the same optimizer, as intended.
            warnings.filterwarnings("ignore", message=".*already had its learning rate scaled", category=UserWarning)
            scheduler = self._new_scheduler(optimizer, self._tensorboard_writer())
        args = self.args
        if isinstance(scheduler.schedule, Adaptive):
            # Without a start, Adaptive() starts at the batch the arguments asked for (per optimizer step).
            scheduler.schedule.set_default_start(
                args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size)
        sampler = AdaptiveBatchSampler(
            dataset, scheduler, shuffle=args.train_sampling_strategy == "random",
            seed=args.seed if args.data_seed is None else args.data_seed,
            remainder="drop" if args.dataloader_drop_last else "balance",
        )
        if self._resumed is not None:
            scheduler.load_state_dict(self._resumed["scheduler"])
            sampler.load_state_dict(self._resumed["sampler"])
        self.batch_size_scheduler, self.batch_sampler = scheduler, sampler
        return sampler

    def _tensorboard_writer(self) -> _CallbackWriter | None:
        if not self.is_world_process_zero():
            return None
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback):
                return _CallbackWriter(callback)
        return None

    def set_initial_training_values(self, args: TrainingArguments, dataloader: DataLoader) -> tuple[int, ...]:
        """The Trainer's run lengths, from the batches the schedule plans.

        ``num_train_epochs`` gives ``max_steps`` as the optimizer steps that reach the end of
        the last epoch; ``max_steps`` gives the epochs that hold that many steps. A schedule
        that decides as it goes (``Adaptive``) is planned at the size it has now: ``max_steps``
        then bounds the steps of a run of epochs from above (the batch only grows), which is
        the horizon of the Trainer's LR scheduler; a run of ``max_steps`` leaves the epochs
        open, and stops at the step. A resumed run keeps the horizon it was started with.
        """
        scheduler = self.batch_size_scheduler
        dataset_size = scheduler.dataset_size
        if args.max_steps > 0:
            max_steps = args.max_steps
            planned = list(islice(self._planned_batches(), max(0, max_steps - scheduler.steps)))
            last_start = planned[-1][0] if planned else scheduler.position
            epochs = sys.maxsize if scheduler.schedule.needs_noise else scheduler.layout.epoch_of(last_start) + 1
            samples = scheduler.samples_seen + sum(size for _, size in planned)
        else:
            epochs = math.ceil(args.num_train_epochs)
            samples = math.ceil(args.num_train_epochs * dataset_size)
            resumed = self._resumed
            if resumed is not None and resumed["num_train_epochs"] == args.num_train_epochs:
                max_steps = resumed["max_steps"]
            else:
                end = args.num_train_epochs * dataset_size
                max_steps = scheduler.steps + sum(1 for _ in takewhile(lambda batch: batch[0] < end,
                                                                       self._planned_batches()))
        steps_per_epoch = max(1, len(self.batch_sampler))  # the coming epoch's, for the Trainer's log
        return (epochs, steps_per_epoch, dataset_size, samples, scheduler.batch_size,
                steps_per_epoch * args.gradient_accumulation_steps, max_steps)

    def _planned_batches(self) -> Iterator[tuple[int, int]]:
        """``(start, size)`` of the batches the schedule plans from where training stands."""
        scheduler = self.batch_size_scheduler
        position = scheduler.position
        while True:
            start, size = scheduler.next_batch(position)
            yield start, size
            position = start + size

    def _init_training_state(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        # The Trainer divides global_step by a fixed number of steps per epoch; here the epoch is
        # the one the sampler's next batch starts in, and nothing in it is to be skipped.
        super()._init_training_state(*args, **kwargs)
        scheduler = self.batch_size_scheduler
        if self.state.global_step != scheduler.steps:
            raise ValueError(f"the checkpoint's {STATE_NAME} counts {scheduler.steps} optimizer steps, but its "
                             f"trainer state {self.state.global_step}: they come from different checkpoints")
        return scheduler.layout.epoch_of(scheduler.next_batch(scheduler.position)[0]), 0

    def _run_epoch(self, **kwargs: Any) -> None:
        # get_batch_samples ends the epoch where the sampler's data ends; the Trainer's count of
        # updates, fixed from the first epoch's length, becomes a bound: a batch per sample left.
        # As one sampler batch is GA micro-batches, the Trainer never meets a short
        # accumulation at the end of an epoch.
        scheduler = self.batch_size_scheduler
        updates = max(1, scheduler.layout.epoch_start(kwargs["epoch"] + 1) - scheduler.position)
        kwargs.update(num_update_steps_per_epoch=updates,
                      steps_in_epoch=updates * self.args.gradient_accumulation_steps)
        super()._run_epoch(**kwargs)

    def get_batch_samples(self, epoch_iterator: Iterator[Batch], num_batches: int,
                          device: torch.device) -> tuple[list[Batch], torch.Tensor | int | None]:
        """The next batch of the sampler, cut into ``num_batches`` micro-batches (the
        gradient accumulation steps) of sizes that differ by at most one, and the number of
        items in all of them; at the end of the sampler's epoch, none, and the epoch stops."""
        batch = next(epoch_iterator, None)
        if batch is None:
            self.control.should_epoch_stop = True
            return [], None
        size, extra = divmod(batch_length(batch), num_batches)
        micro_batches = list(split_batch(batch, [size + 1] * extra + [size] * (num_batches - extra)))
        return micro_batches, self._get_num_items_in_batch(micro_batches, device)

    # ------------------------------------------------------------- checkpoint
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and self.batch_size_scheduler is not None:
            # The scheduler's and sampler's states count the global stream: the same on every process.
            # The horizon is kept for a run of epochs, which planned it.
            epochs = self.args.num_train_epochs if self.args.max_steps <= 0 else None
            torch.save({"scheduler": self.batch_size_scheduler.state_dict(),
                        "sampler": self.batch_sampler.state_dict(),
                        "num_train_epochs": epochs, "max_steps": self.state.max_steps},
                       os.path.join(output_dir, STATE_NAME))


class _CountSteps(TrainerCallback):
    """Counts each optimizer step on the trainer's BatchSizeScheduler, before the Trainer logs
    or saves a checkpoint, and gives the Trainer's ``state.epoch`` the scheduler's exact
    progress (the Trainer's counts batches of a fixed number per epoch)."""

    def __init__(self, trainer: AdaptiveBatchTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.batch_size_scheduler.step()

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        state.epoch = self.trainer.batch_size_scheduler.epoch


class _CallbackWriter:
    """The SummaryWriter of a TensorBoardCallback, which opens it only as training begins (after
    the scheduler is built) and closes it as training ends."""

    def __init__(self, callback: TensorBoardCallback) -> None:
        self.callback = callback

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.callback.tb_writer is not None:
            self.callback.tb_writer.add_scalar(tag, value, step)

    def add_custom_scalars(self, layout: dict) -> None:
        if self.callback.tb_writer is not None:
            self.callback.tb_writer.add_custom_scalars(layout)


def _is_datasets_dataset(dataset: Any) -> bool:
    if not is_datasets_available():
        return False
    import datasets

    return isinstance(dataset, datasets.Dataset)


def _without_second_sharding(loader: DataLoader, sampler: AdaptiveBatchSampler) -> DataLoader:
    """``loader`` as ``accelerator.prepare`` returned it, with the ``BatchSamplerShard`` it wraps
    around ``sampler`` under several processes made to pass every batch through (the Trainer
    does the same for its own rank-aware ``BatchRebalanceSampler``).

    Raises:
        RuntimeError: if accelerate put something else between the loader and the sampler.
    """
    shard = loader.batch_sampler
    if isinstance(shard, BatchSamplerShard) and shard.batch_sampler is sampler:
        shard.num_processes, shard.process_index = 1, 0
    elif shard is not sampler:
        raise RuntimeError(f"accelerator.prepare replaced the AdaptiveBatchSampler by a {type(shard).__name__}; "
                           f"the batches would not be the schedule's")
    return loader
