"""AdaptiveBatchSampler: batches of the size the scheduler wants, with no ragged tail and no lost data."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sized

import numpy as np
import torch
from torch.utils.data import Sampler

from .distributed import world
from .layout import EpochLayout
from .scheduler import BatchSizeScheduler
from ._validation import (
    check_bool, check_integer, check_non_negative_int, check_positive_int, check_seed, is_integer,
)

__all__ = ["AdaptiveBatchSampler"]


class AdaptiveBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices whose sizes follow a :class:`~adabatch.BatchSizeScheduler`.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)``. The sampler reads one shuffled
    permutation of the dataset per epoch (seeded with ``seed + epoch``, as
    ``DistributedSampler`` does) and slices it into batches; the size of each batch comes from
    the scheduler at the batch's position in the stream, so it does not depend on how far ahead
    DataLoader workers prefetch.

    How the end of an epoch is handled is set by ``remainder`` (exact bounds in
    :mod:`adabatch.layout`):

    * ``"balance"`` (default): the last one or two batches of an epoch share the remaining
      samples evenly, none below ``min_batch_size`` and none above the cap; every index is
      used exactly once per epoch.
    * ``"wrap"``: every batch has exactly the scheduled size; the end of an epoch is completed
      from the start of the next one, so nothing is lost.
    * ``"drop"``: every batch has exactly the scheduled size and a short tail is skipped, like
      ``drop_last=True``.

    With ``num_replicas > 1`` every replica gets an equal, disjoint share of each global batch
    (contiguous in the global batch, ordered by rank). If the dataset size is not a multiple of
    ``num_replicas``, ``"balance"`` leaves out the last ``dataset_size % num_replicas`` samples
    of each epoch's permutation (a different few each epoch when shuffling); ``"wrap"`` loses
    none.

    An iteration yields the rest of an epoch, from where training stands (the scheduler's
    trained position; see :meth:`_resume_position`) to the end of the epoch. After
    :meth:`set_epoch` it is the rest of that epoch, for every iteration until one has drawn
    the epoch's last batch: a DataLoader calls ``iter()`` on its batch sampler once or several
    times per epoch (twice when it starts workers, more when a ``StatefulDataLoader``
    restores the sampler), and each call starts at the same place. Without ``set_epoch``, an
    iteration begun after that continues with the epoch the stream is in, so forgetting
    ``set_epoch`` does not replay the same order.

    Args:
        data_source (Sized or int): the dataset, or its size.
        scheduler (BatchSizeScheduler): decides the batch sizes.
        shuffle (bool): shuffle each epoch. Default: ``True``.
        seed (int): seed of the shuffle, the same on every replica. Default: 0.
        remainder (str): ``"balance"``, ``"wrap"`` or ``"drop"``. Default: ``"balance"``.
        num_replicas (int, optional): processes sharing each batch. Default: the world size of
            torch.distributed's default process group, or 1 outside one.
        rank (int, optional): this process's rank in ``[0, num_replicas)``. Default: its rank
            in the default process group, or 0.

    Example:
        >>> sampler = AdaptiveBatchSampler(train_set, scheduler, shuffle=True, seed=0)
        >>> loader = DataLoader(train_set, batch_sampler=sampler, num_workers=2)
        >>> for epoch in range(20):
        ...     sampler.set_epoch(epoch)
        ...     for x, y in loader:
        ...         ...
    """

    _EPOCH = "epoch"
    _POSITION = "position"
    _SEED = "seed"
    _SHUFFLE = "shuffle"
    _DATASET_SIZE = "dataset_size"
    _REMAINDER = "remainder"
    _NUM_REPLICAS = "num_replicas"

    def __init__(
        self,
        data_source: Sized | int,
        scheduler: BatchSizeScheduler,
        *,
        shuffle: bool = True,
        seed: int = 0,
        remainder: str = "balance",
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        if is_integer(data_source):
            dataset_size = int(data_source)
        elif isinstance(data_source, Sized):
            dataset_size = len(data_source)
        else:
            raise TypeError(f"data_source must be a sized dataset or an int, got {type(data_source).__name__}")
        if not isinstance(scheduler, BatchSizeScheduler):
            raise TypeError(f"scheduler must be a BatchSizeScheduler, got {type(scheduler).__name__}")
        self.shuffle = check_bool("shuffle", shuffle)
        self.seed = check_seed("seed", seed)
        group_size, group_rank = world()
        num_replicas = group_size if num_replicas is None else check_positive_int("num_replicas", num_replicas)
        rank = (group_rank if num_replicas == group_size else 0) if rank is None else rank
        self.scheduler = scheduler
        self.num_replicas = num_replicas
        self.rank = check_integer("rank", rank, 0, num_replicas - 1)
        self.layout: EpochLayout = scheduler.bind(dataset_size, num_replicas, remainder)
        self.dataset_size = dataset_size
        self.remainder = remainder
        self._epoch = 0
        # Iterations cover the rest of self._epoch: set_epoch chose it, or an iteration began in
        # it, and no iteration has drawn its last batch since.
        self._in_epoch = False
        self._epoch_chosen = False  # by set_epoch, and no batch drawn since: a restored snapshot keeps it
        self._iteration: _BatchIterator | None = None  # the latest, the one that moves the epoch on
        self._cursor = 0  # stream position after the last batch this sampler drew
        self._cursor_known = False  # drawn from, or restored
        self._permutations: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ epochs
    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the coming iterations cover the rest of ``epoch``.

        A later epoch moves the stream forward to its start (and the scheduler with it). The
        epoch training is in, or the one just finished, gives the rest of that epoch (possibly
        nothing), so a loop resumed from a checkpoint can call ``set_epoch`` with the epoch
        counter it saved. Every iteration begun before one draws the epoch's last batch covers
        the same rest, however often the DataLoader calls ``iter()``; an epoch with nothing
        left gives nothing until the next ``set_epoch``. The epoch set here also outlasts a
        snapshot that a ``StatefulDataLoader`` restores into the sampler afterwards (the
        snapshot's position still counts).

        Raises:
            ValueError: if ``epoch`` is negative or already over, other than the one just
                finished (epochs only move forward; load an earlier ``state_dict`` to replay one).
        """
        epoch = check_non_negative_int("epoch", epoch)
        current = self.layout.epoch_of(self._resume_position())
        # One epoch back is the epoch just finished, unless an iteration of a later one began.
        if epoch < current - 1 or (epoch == current - 1 and epoch < self._epoch):
            raise ValueError(
                f"set_epoch({epoch}): epoch {epoch} is already over, training is in epoch {current}. Epochs "
                f"only move forward; load an earlier state_dict to replay one"
            )
        self._epoch = epoch
        self._in_epoch = self._epoch_chosen = True
        self._iteration = None  # one begun before no longer moves the epoch on

    def _resume_position(self) -> int:
        """Stream position of the next batch.

        The scheduler's trained position and the sampler's own drawn position normally agree.
        A plain DataLoader draws ahead of training, so after a restart the drawn position is
        ahead and the trained one is right; a StatefulDataLoader may restore an older snapshot
        of the sampler and replay the batches since, so the drawn position is behind and is
        right. Hence the smaller of the two, where both are known.
        """
        trained = self.scheduler.trained_position()
        known = [p for p in (trained, self._cursor if self._cursor_known else None) if p is not None]
        return min(known, default=0)

    # --------------------------------------------------------------- iteration
    def _coming_epoch(self) -> tuple[int, int, int]:
        """``(epoch, start, end)`` of the coming iteration: batches starting in ``[start, end)``."""
        start = self._resume_position()
        if self._in_epoch:
            start = max(start, self.layout.epoch_start(self._epoch))
        start = self.scheduler.next_batch(start)[0]
        epoch = self._epoch if self._in_epoch else self.layout.epoch_of(start)
        return epoch, start, self.layout.epoch_start(epoch + 1)

    def __iter__(self) -> Iterator[list[int]]:
        self._epoch, start, end = self._coming_epoch()
        self._in_epoch = True
        # set_epoch may have moved the stream past what the scheduler counted as trained.
        self.scheduler.skip_to(start)
        self._cursor, self._cursor_known = start, True
        self._iteration = _BatchIterator(self, start, end)
        return self._iteration

    def _drew(self, iteration: _BatchIterator) -> None:
        """``iteration`` drew a batch that ends at its position."""
        if iteration is self._iteration:  # not one the DataLoader replaced by a later iter() call
            self._cursor = iteration.position
            self._epoch_chosen = False

    def _ran_out(self, iteration: _BatchIterator, position: int) -> None:
        """``iteration`` has no batch left in its epoch; the next would start at ``position``."""
        if iteration is self._iteration:
            self._cursor = max(self._cursor, position)
            # An iteration that drew nothing found the epoch over already: a restored
            # StatefulDataLoader replays and then replaces such an iteration within one iter() call.
            if iteration.drew:
                self._in_epoch = False

    def __len__(self) -> int:
        """Batches in the coming iteration (exact for schedules that depend on progress only)."""
        _, start, end = self._coming_epoch()
        return 0 if start >= end else self.layout.batches_until_epoch_end(start, self.scheduler.target_at)

    def _permutation(self, epoch: int) -> np.ndarray:
        permutation = self._permutations.get(epoch)
        if permutation is None:
            if self.shuffle:
                generator = torch.Generator()
                # Wrapped as the generator wraps a negative seed, so that no epoch runs out of seeds.
                generator.manual_seed((self.seed + epoch) % 2**64)
                permutation = torch.randperm(self.dataset_size, generator=generator).numpy()
            else:
                permutation = np.arange(self.dataset_size)
            # A batch may straddle two epochs (under "wrap"); older ones are not read again.
            self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1}
            self._permutations[epoch] = permutation
        return permutation

    def indices(self, start: int, size: int) -> list[int]:
        """This replica's share of the global batch ``[start, start + size)`` of the stream."""
        share = size // self.num_replicas
        first = start + self.rank * share
        last = first + share
        epoch, offset = divmod(first, self.dataset_size)
        permutation = self._permutation(epoch)
        end = offset + share
        if end <= self.dataset_size:
            return permutation[offset:end].tolist()
        head = permutation[offset:].tolist()
        return head + self._permutation(epoch + 1)[: last - (epoch + 1) * self.dataset_size].tolist()

    # -------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """A new dict with the sampler's position (what a ``StatefulDataLoader`` snapshots as
        each batch is drawn) and its settings. The position is global, so a run may resume on
        another number of replicas; dataset size, seed, shuffle and remainder policy must match."""
        return {
            self._EPOCH: self._epoch,
            self._POSITION: self._cursor,
            self._SEED: self.seed,
            self._SHUFFLE: self.shuffle,
            self._DATASET_SIZE: self.dataset_size,
            self._REMAINDER: self.remainder,
            self._NUM_REPLICAS: self.num_replicas,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`.

        The saved epoch is restored too, unless :meth:`set_epoch` chose one since the last
        batch was drawn: a ``StatefulDataLoader`` restores the sampler when the loop iterates
        it, after the loop's ``set_epoch``.

        Raises:
            ValueError: if a key is missing, a value is negative, or the state was saved with
                another dataset size, seed, shuffle or remainder policy.
        """
        for key in (self._EPOCH, self._POSITION, self._SEED, self._SHUFFLE, self._DATASET_SIZE, self._REMAINDER):
            if key not in state_dict:
                raise ValueError(f"sampler state_dict is missing {key!r}")
        epoch, position = (check_non_negative_int(f"sampler state_dict[{key!r}]", state_dict[key])
                           for key in (self._EPOCH, self._POSITION))
        for key, mine in ((self._DATASET_SIZE, self.dataset_size), (self._SEED, self.seed),
                          (self._SHUFFLE, self.shuffle), (self._REMAINDER, self.remainder)):
            if state_dict[key] != mine:
                raise ValueError(
                    f"sampler state_dict was saved with {key}={state_dict[key]!r}, but this sampler has "
                    f"{key}={mine!r}; resuming would train on other batches"
                )
        if not self._epoch_chosen:
            self._epoch, self._in_epoch = epoch, False
        self._iteration = None
        self._cursor, self._cursor_known = position, True

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dataset_size={self.dataset_size}, shuffle={self.shuffle}, seed={self.seed}, "
            f"remainder={self.remainder!r}, num_replicas={self.num_replicas}, rank={self.rank})"
        )


class _BatchIterator:
    """One pass over the rest of an epoch; owns the stream position of that pass."""

    def __init__(self, sampler: AdaptiveBatchSampler, position: int, end: int) -> None:
        self.sampler = sampler
        self.position = position
        self.end = end
        self.drew = False

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self) -> list[int]:
        start, size = self.sampler.scheduler.draw(self.position)
        if start >= self.end:
            self.sampler._ran_out(self, start)
            raise StopIteration
        self.position = start + size
        self.drew = True
        self.sampler._drew(self)
        return self.sampler.indices(start, size)
