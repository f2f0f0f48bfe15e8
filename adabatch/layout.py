"""How the endless stream of shuffled epochs is cut into batches.

The sampler walks a stream made of one permutation of the dataset per epoch, laid end to end;
epoch ``e`` occupies stream positions ``[e * N, (e + 1) * N)``. A batch is a contiguous slice of
the stream. :class:`EpochLayout` decides, from a stream position and the size the scheduler
wants there, where the next batch starts and how large it is. The sampler (which draws batches,
possibly ahead of training) and the scheduler (which counts what was trained) both call it, so
they agree on every batch without talking to each other.

Remainder policies, for a dataset of ``N`` samples, ``R`` replicas and a wanted size ``b``:

``"balance"`` (default)
    Batches have size ``b`` until fewer than ``2b`` samples are left in the epoch; the rest is
    then one or two batches. Per replica, with ``L`` samples left, ``b`` wanted, floor ``f``
    (``min_batch_size``) and granularity ``m`` (``multiple_of``):

    * one batch of ``L`` if ``L <= b``, or if ``L < 2f`` (two batches would put one below the
      floor; the cap must then allow ``2f - 1``, which the scheduler checks);
    * otherwise two: the first is the multiple of ``m`` nearest ``L / 2`` (the larger on a tie)
      among those that keep both batches within ``[f, b]``, the second is the rest. They
      differ by at most ``m`` samples per replica when ``b`` is a multiple of ``m`` (every
      size the constraints hand out is). If no multiple of ``m`` fits (with ``b`` a multiple
      of ``m``: exactly when ``L < f + ceil(f / m) * m``, just above the floor), the first is
      ``ceil(L / 2)`` and they differ by at most one.

    So every batch of an epoch but the last is a multiple of ``m`` per replica, except in that
    near-floor case; the last holds what is left. Every index appears exactly once per epoch.
    If ``N`` is not a multiple of ``R``, the last ``N % R`` samples of each epoch's permutation
    (a different few each epoch when shuffling) are left out of that epoch.
``"wrap"``
    Every batch has exactly size ``b``; the last batch of an epoch is completed from the start
    of the next epoch's permutation, which then begins after it. Nothing is left out, and every
    index appears exactly once per pass over the stream; a batch that straddles two epochs may
    hold the same index twice.
``"drop"``
    Every batch has exactly size ``b``; when fewer than ``b`` samples are left in the epoch they
    are skipped, like ``drop_last=True``. The skipped tail still counts as progress.
"""

from __future__ import annotations

from typing import Callable

from ._validation import check_choice, check_positive_int, is_integer

__all__ = ["EpochLayout", "REMAINDER_POLICIES"]

REMAINDER_POLICIES = ("balance", "wrap", "drop")


class EpochLayout:
    """Cuts the stream of epochs into batches under a remainder policy.

    Args:
        dataset_size (int): samples per epoch, ``N``.
        num_replicas (int): processes that share every batch equally. Default: 1.
        remainder (str): ``"balance"``, ``"wrap"`` or ``"drop"``. Default: ``"balance"``.
        min_batch_size (int): per-replica floor that ``"balance"`` keeps tail batches above.
            Default: 1.
        multiple_of (int): per-replica granularity that ``"balance"`` rounds the first of two
            tail batches to, where the floor allows (e.g. 8 for tensor cores). Default: 1.
    """

    def __init__(
        self, dataset_size: int, num_replicas: int = 1, remainder: str = "balance", min_batch_size: int = 1,
        multiple_of: int = 1,
    ) -> None:
        if is_integer(dataset_size) and dataset_size == 0:
            raise ValueError("the dataset is empty: an AdaptiveBatchSampler needs at least one sample")
        self.dataset_size = check_positive_int("dataset_size", dataset_size)
        self.num_replicas = check_positive_int("num_replicas", num_replicas)
        self.remainder = check_choice("remainder", remainder, REMAINDER_POLICIES)
        self.min_batch_size = check_positive_int("min_batch_size", min_batch_size)
        self.multiple_of = check_positive_int("multiple_of", multiple_of)
        if self.dataset_size < self.num_replicas:
            raise ValueError(f"dataset_size ({dataset_size}) must be at least num_replicas ({num_replicas})")
        # Under "balance" each epoch uses the largest multiple of num_replicas that fits.
        self.usable = self.dataset_size - self.dataset_size % self.num_replicas

    def epoch_of(self, position: int) -> int:
        return position // self.dataset_size

    def epoch_start(self, epoch: int) -> int:
        return epoch * self.dataset_size

    def next_batch(self, position: int, target_at: Callable[[int], int]) -> tuple[int, int, int]:
        """Where the next batch starts at or after ``position``, its global size, and the size
        the scheduler wanted there.

        Args:
            position (int): stream position after the last batch.
            target_at (callable): the constrained global batch size wanted at a position.

        Returns:
            ``(start, size, target)``. ``start`` is ``position`` unless the policy skips the
            rest of an epoch, in which case it is the first position of the next epoch.
            ``size`` is ``target`` except for a balanced tail.
        """
        target = target_at(position)
        if self.remainder == "wrap":
            return position, target, target
        epoch, offset = divmod(position, self.dataset_size)
        left = self.usable - offset
        if left < self.num_replicas or (self.remainder == "drop" and left < target):
            return self.next_batch((epoch + 1) * self.dataset_size, target_at)
        if self.remainder == "drop" or left >= 2 * target:
            return position, target, target
        return position, self._tail_batch(left, target), target

    def _tail_batch(self, left: int, size: int) -> int:
        """Size of the first of the batches that share the last ``left < 2 * size`` samples."""
        replicas, floor, multiple = self.num_replicas, self.min_batch_size, self.multiple_of
        left_per_replica, size_per_replica = left // replicas, size // replicas
        if left_per_replica <= size_per_replica or left_per_replica < 2 * floor:
            return left_per_replica * replicas
        # The first batch may take from `lowest` to `highest` samples per replica and leave the
        # second within [floor, size] too; of those, the multiple of `multiple` nearest half.
        lowest = -(-max(left_per_replica - size_per_replica, floor) // multiple) * multiple
        highest = min(size_per_replica, left_per_replica - floor) // multiple * multiple
        if lowest > highest:
            return -(-left_per_replica // 2) * replicas
        nearest_half = (left_per_replica + multiple) // (2 * multiple) * multiple
        return min(max(nearest_half, lowest), highest) * replicas

    def batches_until_epoch_end(self, position: int, target_at: Callable[[int], int]) -> int:
        """How many batches :meth:`next_batch` yields from ``position`` to the end of its epoch."""
        end = self.epoch_start(self.epoch_of(position) + 1)
        count = 0
        while True:
            start, size, _ = self.next_batch(position, target_at)
            if start >= end:
                return count
            count += 1
            position = start + size

    def __repr__(self) -> str:
        return (
            f"EpochLayout(dataset_size={self.dataset_size}, num_replicas={self.num_replicas}, "
            f"remainder={self.remainder!r}, min_batch_size={self.min_batch_size}, multiple_of={self.multiple_of})"
        )
