"""AdaptiveBatchSize: a Lightning ``Callback`` that grows the batch size of an unchanged
LightningModule and DataModule.

Lightning builds the training DataLoader itself, sizes each epoch from ``len(dataloader)`` and
steps the optimizer in its own loop, so the callback works at three points (docs/lightning.md
lists what Lightning forces and how each is met):

* the DataLoader: the strategy's ``process_dataloader`` hook, through which every training
  DataLoader passes after Lightning has injected its ``DistributedSampler``, is wrapped; the
  user's loader comes out rebuilt on an :class:`~adabatch.AdaptiveBatchSampler`, with the order
  (shuffle, seed, ranks) of the sampler it had and its other settings;
* the epoch: the DataLoader is reloaded at every epoch, because Lightning computes an epoch's
  number of batches, ``val_check_interval`` and the progress bar's total only then; its length
  counts the whole epoch, the batches trained before a restart too, or is unknown when the
  sizes are decided as the epoch goes;
* the step: a :class:`~adabatch.BatchSizeScheduler` on the module's optimizer counts each
  optimizer step (``trainer.global_step`` moving) at the end of its batch. Its state is the
  callback's checkpoint state, the sampler's the DataLoader's.

Importing this module imports Lightning; ``import adabatch`` does not.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Iterator, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch import loggers
from lightning.pytorch.callbacks import Callback
from torch.utils.data import (
    BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler, SequentialSampler,
)

from .._validation import check_choice, check_seed
from ..layout import REMAINDER_POLICIES
from ..sampler import AdaptiveBatchSampler
from ..scheduler import BatchSizeScheduler
from ..schedules import Adaptive, Schedule, ScheduleFn

__all__ = ["AdaptiveBatchSize"]

#: DataLoader settings the rebuilt loader keeps (its dataset, sampler and batch size are replaced).
_LOADER_SETTINGS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                    "generator", "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order")
#: BatchSizeScheduler options the callback sets itself.
_OWN_OPTIONS = {
    "optimizer": "the callback takes the optimizer configure_optimizers returns",
    "schedule": "pass the schedule as the first argument",
    "writer": "the callback writes to the Trainer's TensorBoardLogger",
    "accumulate": "Lightning trains each batch itself; use Trainer(accumulate_grad_batches=k) to accumulate",
}


class AdaptiveBatchSize(Callback):
    """Grows the training batch size of a Lightning fit, and scales the learning rate with it.

    Add it to the Trainer; the LightningModule and the DataModule stay as they are. The
    ``train_dataloader()`` they return (a plain ``DataLoader`` with ``batch_size=`` and
    ``shuffle=``) is rebuilt with an :class:`~adabatch.AdaptiveBatchSampler` whose batches follow
    ``schedule``, keeping its dataset, ``collate_fn``, ``num_workers``, ``pin_memory`` and the
    other worker settings; ``batch_size`` and ``drop_last`` give way to the schedule and
    ``remainder``. A :class:`~adabatch.BatchSizeScheduler` is built on the optimizer of
    ``configure_optimizers``: the learning rate is multiplied by its factor during each
    optimizer step, on top of any ``lr_scheduler`` configured there.

    * The schedule gives the batch of one optimizer step. With
      ``Trainer(accumulate_grad_batches=k)`` each of those batches reaches the model as k
      DataLoader batches of about a k-th of it (within one sample), and ``min_batch_size`` and
      ``multiple_of`` hold for each of these.
    * Every index is used once per epoch (``remainder="balance"``). Under ``strategy="ddp"``
      each rank gets its share of every global batch, with no change to the Trainer: the
      ``DistributedSampler`` Lightning injects only lends its seed, shuffle and ranks.
    * The curves go to the Trainer's ``TensorBoardLogger`` (rank 0), under ``adabatch/``.
    * Checkpoints hold the scheduler's state, so ``fit(ckpt_path=...)`` from a checkpoint
      saved after any optimizer step trains the same remaining batches at the same learning
      rates as a run that never stopped.

    Lightning loads the train DataLoader again at every epoch for this (it computes an epoch's
    number of batches, ``val_check_interval`` and the progress bar's total only then):
    ``reload_dataloaders_every_n_epochs`` is 1 during the fit, so ``train_dataloader()`` and
    ``val_dataloader()`` are called once per epoch. Under ``Adaptive()`` or a memory cap the
    sizes are decided as the epoch goes, and the DataLoader has no length: Lightning then finds
    each epoch's end by drawing a batch ahead (``val_check_interval`` must be 1.0, an int or a time).

    Args:
        schedule (Schedule or callable): the batch size wanted, global and per optimizer step
            (see :mod:`adabatch.schedules`).
        seed (int, optional): seed of the shuffle, the same on every rank. Default: the seed
            of the ``DistributedSampler`` Lightning injected, else the one ``seed_everything``
            set, else 0 (Lightning's own rule for its ``DistributedSampler``).
        remainder (str): how an epoch ends: ``"balance"``, ``"wrap"`` or ``"drop"`` (see
            :class:`~adabatch.AdaptiveBatchSampler`). Default: ``"balance"``.
        **scheduler_options: any keyword option of :class:`~adabatch.BatchSizeScheduler`
            (``min_batch_size``, ``max_batch_size``, ``lr_scaling``, ``warmup_steps``,
            ``memory``, ``log_every``, ...), except ``writer`` and ``accumulate``; they are
            checked here, so a bad one fails before the Trainer starts.

    Raises:
        TypeError: for an option BatchSizeScheduler does not have, or one the callback sets
            itself (``writer``, ``accumulate``).
        ValueError: for an option value BatchSizeScheduler refuses.

    Example:
        >>> from adabatch import schedules
        >>> from adabatch.integrations.lightning import AdaptiveBatchSize
        >>> trainer = pl.Trainer(max_epochs=12, callbacks=[AdaptiveBatchSize(
        ...     schedules.Step(start=32, factor=4, milestones=[4, 8]), min_batch_size=16)])
        >>> trainer.fit(model, datamodule=data)    # model and data unchanged
    """

    def __init__(self, schedule: Schedule | ScheduleFn, *, seed: int | None = None, remainder: str = "balance",
                 **scheduler_options: Any) -> None:
        self.schedule = schedule
        self.seed = None if seed is None else check_seed("seed", seed)
        self.remainder = check_choice("remainder", remainder, REMAINDER_POLICIES)
        self.scheduler_options = _checked_options(schedule, scheduler_options)
        self.scheduler: BatchSizeScheduler | None = None
        self.sampler: AdaptiveBatchSampler | None = None
        self._batches: _LightningBatchSampler | None = None
        self._restored: dict[str, Any] = {}  # checkpoint state waiting for the scheduler
        self._epoch = 0  # Lightning's epoch whose batches _trained counts
        self._trained = 0
        self._global_step = 0  # trainer.global_step after the last batch counted
        self._reload_setting: int | None = None

    # ------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._take_over_train_loader(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build_scheduler(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if loader is not None and not (isinstance(loader, DataLoader) and loader.batch_sampler is self._batches):
            raise RuntimeError(
                f"AdaptiveBatchSize drives one training DataLoader, built from the one train_dataloader() returns; "
                f"the Trainer is training on {type(loader).__name__}. Return a single DataLoader"
            )
        self._global_step = trainer.global_step  # after Lightning restored it from a checkpoint

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._count_batch(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._give_back_train_loader(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._give_back_train_loader(trainer)

    def state_dict(self) -> dict[str, Any]:
        if self.scheduler is None:
            return dict(self._restored)
        return {"scheduler": self.scheduler.state_dict(), "epoch": self._epoch, "trained_batches": self._trained}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a checkpoint's state; the scheduler's part waits for the scheduler, built when
        the fit starts, after Lightning restores callbacks."""
        if not state_dict:
            return
        for key in ("scheduler", "epoch", "trained_batches"):
            if key not in state_dict:
                raise ValueError(f"AdaptiveBatchSize state_dict is missing {key!r}")
        self._restored = dict(state_dict)
        self._epoch, self._trained = int(state_dict["epoch"]), int(state_dict["trained_batches"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(self._restored.pop("scheduler"))

    # --------------------------------------------------------------------- phases
    def _take_over_train_loader(self, trainer: pl.Trainer) -> None:
        """Have every training DataLoader pass through :meth:`_rebuild_loader`, and Lightning
        load it again at every epoch, when its length changes."""
        strategy = trainer.strategy
        if "process_dataloader" in vars(strategy):
            raise RuntimeError("the Trainer's strategy already has its process_dataloader replaced: use one "
                               "AdaptiveBatchSize per Trainer")
        process_dataloader = strategy.process_dataloader

        def rebuild_then_process(dataloader: object) -> object:
            return process_dataloader(self._rebuild_loader(trainer, dataloader) if trainer.training else dataloader)

        strategy.process_dataloader = rebuild_then_process  # type: ignore[method-assign]
        self._reload_setting = trainer.reload_dataloaders_every_n_epochs
        trainer.reload_dataloaders_every_n_epochs = 1

    def _give_back_train_loader(self, trainer: pl.Trainer) -> None:
        vars(trainer.strategy).pop("process_dataloader", None)
        if self._reload_setting is not None:
            trainer.reload_dataloaders_every_n_epochs, self._reload_setting = self._reload_setting, None

    def _build_scheduler(self, trainer: pl.Trainer) -> None:
        """The scheduler on the module's optimizer, writing to the Trainer's TensorBoard logger."""
        if len(trainer.optimizers) != 1:
            raise ValueError(f"AdaptiveBatchSize scales the learning rate of one optimizer; configure_optimizers "
                             f"returned {len(trainer.optimizers)}")
        options = dict(self.scheduler_options)
        # Each of the k DataLoader batches of an optimizer step keeps to the floor and the multiple.
        chunks = trainer.accumulate_grad_batches
        options["min_batch_size"] = options.get("min_batch_size", 1) * chunks
        options["multiple_of"] = options.get("multiple_of", 1) * chunks
        self.scheduler = BatchSizeScheduler(trainer.optimizers[0], self.schedule, writer=_tensorboard_writer(trainer),
                                            **options)
        self.sampler = self._batches = None
        if "scheduler" in self._restored:
            self.scheduler.load_state_dict(self._restored.pop("scheduler"))

    def _rebuild_loader(self, trainer: pl.Trainer, loader: object) -> DataLoader:
        """The user's training DataLoader, rebuilt on the AdaptiveBatchSampler."""
        if self.scheduler is None:
            raise RuntimeError(
                "the train DataLoader was requested before the optimizer exists (trainer.estimated_stepping_batches "
                "in configure_optimizers?); under AdaptiveBatchSize the number of steps depends on the batch-size "
                "schedule: give the LR scheduler an interval in epochs"
            )
        order = _sampling_order(loader)
        seed = order.pop("seed")
        seed = seed if self.seed is None else self.seed
        if self.sampler is None:
            if isinstance(self.scheduler.schedule, Adaptive):
                # Without a start, Adaptive() starts at the batch the user's DataLoader asked for (per step).
                self.scheduler.schedule.set_default_start(
                    loader.batch_size * trainer.accumulate_grad_batches * trainer.world_size)
            self.sampler = AdaptiveBatchSampler(loader.dataset, self.scheduler, seed=seed, remainder=self.remainder,
                                                **order)
            # An adaptive schedule or a memory cap decides sizes as the epoch goes: its length is unknown.
            sized = not (self.scheduler.schedule.needs_noise or self.scheduler.memory.device is not None)
            self._batches = _LightningBatchSampler(self.sampler, trainer.accumulate_grad_batches, sized,
                                                   lambda: trainer.current_epoch, self._trained_in)
        elif (len(loader.dataset), order["shuffle"], seed) != (self.sampler.dataset_size, self.sampler.shuffle,
                                                               self.sampler.seed):
            raise ValueError(
                f"train_dataloader() returned a DataLoader over {len(loader.dataset)} samples (shuffle="
                f"{order['shuffle']}, seed={seed}) after one over {self.sampler.dataset_size} (shuffle="
                f"{self.sampler.shuffle}, seed={self.sampler.seed}); AdaptiveBatchSize needs the same dataset all fit"
            )
        settings = {name: getattr(loader, name) for name in _LOADER_SETTINGS if hasattr(loader, name)}
        return _ResumableDataLoader(loader.dataset, batch_sampler=self._batches, **settings)

    def _trained_in(self, epoch: int) -> int:
        """DataLoader batches trained so far in Lightning's ``epoch``."""
        return self._trained if epoch == self._epoch else 0

    def _count_batch(self, trainer: pl.Trainer) -> None:
        """Count a trained DataLoader batch, and the optimizer step if Lightning took one."""
        if trainer.current_epoch != self._epoch:
            self._epoch, self._trained = trainer.current_epoch, 0
        self._trained += 1
        if trainer.global_step != self._global_step:
            self._global_step = trainer.global_step
            self.scheduler.step()  # the size the sampler planned: all k DataLoader batches of the step


class _LightningBatchSampler(Sampler[list[int]]):
    """The AdaptiveBatchSampler as Lightning's epoch loop reads it.

    The epoch is Lightning's (asked for, not set by Lightning: Lightning asks the length of a
    reloaded DataLoader before it sets the epoch); the length counts the whole epoch, the
    batches trained before a restart too, because Lightning counts an epoch's batches on from
    its checkpoint; and each planned batch is split into the ``chunks`` DataLoader batches of
    one optimizer step. The AdaptiveBatchSampler is not its ``sampler`` attribute: Lightning
    calls ``batch_sampler.sampler.set_epoch`` after it has begun the epoch's iteration.
    """

    def __init__(self, sampler: AdaptiveBatchSampler, chunks: int, sized: bool, epoch: Callable[[], int],
                 trained_in: Callable[[int], int]) -> None:
        super().__init__()
        self.adaptive = sampler
        self.chunks = chunks
        self.sized = sized
        self.epoch = epoch
        self.trained_in = trained_in
        self._epoch_set: int | None = None

    def _begin_epoch(self) -> int:
        epoch = self.epoch()
        if epoch != self._epoch_set:  # once per epoch: set_epoch again would restart the epoch's iteration
            self.adaptive.set_epoch(epoch)
            self._epoch_set = epoch
        return epoch

    def __len__(self) -> int:
        if not self.sized:
            # Lightning then finds the epoch's end by drawing one batch ahead.
            raise TypeError("the batch sizes of this epoch are decided as it goes: its number of batches is unknown")
        epoch = self._begin_epoch()
        return self.trained_in(epoch) + self.chunks * len(self.adaptive)

    def __iter__(self) -> Iterator[list[int]]:
        self._begin_epoch()
        batches = iter(self.adaptive)
        return (chunk for batch in batches for chunk in _split(batch, self.chunks))


class _ResumableDataLoader(DataLoader):
    """The rebuilt training DataLoader. Its state is its sampler's, which Lightning saves with
    its loops and loads before it iterates the DataLoader again; a DataLoader with a state is
    also one Lightning knows to resume mid-epoch (and so does not warn that it cannot)."""

    def state_dict(self) -> dict[str, Any]:
        return self.batch_sampler.adaptive.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.batch_sampler.adaptive.load_state_dict(state_dict)


def _split(indices: list[int], parts: int) -> Iterator[list[int]]:
    """``indices`` in ``parts`` contiguous pieces whose sizes differ by at most one."""
    size, extra = divmod(len(indices), parts)
    start = 0
    for part in range(parts):
        end = start + size + (part < extra)
        yield indices[start:end]
        start = end


def _sampling_order(loader: object) -> dict[str, Any]:
    """How ``loader`` orders its dataset: ``shuffle``, ``seed`` and, for a
    ``DistributedSampler``, its ``num_replicas`` and ``rank``.

    Raises:
        TypeError: if ``loader`` is not a DataLoader of a sized dataset that batches with
            ``batch_size=`` over a sequential, random or distributed sampler.
    """
    if type(loader) is not DataLoader:
        raise TypeError(f"AdaptiveBatchSize rebuilds the train DataLoader on its own batch sampler, so "
                        f"train_dataloader() must return a torch DataLoader; got {type(loader).__name__}")
    if isinstance(loader.dataset, IterableDataset):
        raise TypeError("AdaptiveBatchSize needs a map-style dataset (with __len__ and __getitem__); the train "
                        f"DataLoader has an IterableDataset ({type(loader.dataset).__name__})")
    if loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler:
        raise TypeError("AdaptiveBatchSize replaces the train DataLoader's batching, so the DataLoader must batch "
                        f"with batch_size=; it has batch_sampler={type(loader.batch_sampler).__name__}")
    sampler = loader.sampler
    default_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    if type(sampler) is DistributedSampler:
        return {"shuffle": sampler.shuffle, "seed": sampler.seed, "num_replicas": sampler.num_replicas,
                "rank": sampler.rank}
    if type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == len(loader.dataset):
        return {"shuffle": True, "seed": default_seed}
    if type(sampler) is SequentialSampler:
        return {"shuffle": False, "seed": default_seed}
    raise TypeError(f"AdaptiveBatchSize reads the dataset in order or in a seeded shuffle (shuffle=False or True); "
                    f"the train DataLoader has a {type(sampler).__name__}, which it cannot follow")


def _checked_options(schedule: Schedule | ScheduleFn, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for BatchSizeScheduler, checked by building one on a stand-in optimizer."""
    for name in options:
        if name in _OWN_OPTIONS:
            raise TypeError(f"AdaptiveBatchSize does not take {name}=: {_OWN_OPTIONS[name]}")
        if name not in inspect.signature(BatchSizeScheduler).parameters:
            raise TypeError(f"AdaptiveBatchSize got an unexpected option {name!r}: the options are "
                            f"BatchSizeScheduler's keyword arguments")
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    BatchSizeScheduler(stand_in, schedule, **options)
    return dict(options)


def _tensorboard_writer(trainer: pl.Trainer) -> Any:
    """The SummaryWriter of the Trainer's first TensorBoardLogger, on rank 0; else ``None``."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, loggers.TensorBoardLogger):
            return logger.experiment
    return None
