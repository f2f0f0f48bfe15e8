"""The one place where the batch size a schedule asks for becomes one that may be trained.

Every size the scheduler hands to the sampler passes through :meth:`BatchSizeConstraints.apply`:
it is rounded to a granularity, kept at or above a BatchNorm-safe floor, at or below a cap and the
memory cap, and never above the dataset. :meth:`BatchSizeConstraints.micro_batch_sizes` splits a
batch that exceeds the memory cap into micro-batches that respect the same floor. Sizes here are
global (summed over replicas) unless a name says ``per_replica``; the floor, the granularity and
the memory cap are per replica, because that is what each BatchNorm layer and each device sees.
"""

from __future__ import annotations

import math
import warnings

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._validation import check_bool, check_integer, check_positive_int, is_real

__all__ = ["BatchSizeConstraints", "bn_safe_min_batch_size", "DEFAULT_BN_FLOOR"]

#: Default per-replica floor for models with BatchNorm (see :func:`bn_safe_min_batch_size`).
DEFAULT_BN_FLOOR = 16


def bn_safe_min_batch_size(model: nn.Module, floor: int = DEFAULT_BN_FLOOR) -> int:
    """The smallest per-replica batch that is safe for ``model``'s normalisation layers.

    BatchNorm estimates its statistics from the batch, and they degrade quickly below a dozen
    or so samples: Wu & He (2018), "Group Normalization", report ResNet-50 ImageNet top-1 error
    of 23.6% with 32 images per GPU, 24.8% with 8 and 34.7% with 2. A model with BatchNorm
    layers therefore gets ``floor`` (16 by default); a model without them gets 1.

    Args:
        model (nn.Module): the model to inspect.
        floor (int): the floor for models with BatchNorm layers. Default: 16.

    Example:
        >>> bn_safe_min_batch_size(nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4)))
        16
        >>> bn_safe_min_batch_size(nn.Linear(4, 2))
        1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    floor = check_positive_int("floor", floor)
    has_batch_norm = any(isinstance(module, _BatchNorm) for module in model.modules())
    return floor if has_batch_norm else 1


class BatchSizeConstraints:
    """Bounds and granularity applied to every batch size a schedule asks for.

    A requested size is divided among ``num_replicas``, rounded to the nearest multiple of
    ``multiple_of`` per replica, then clamped to ``[min_batch_size, max_batch_size /
    num_replicas]`` per replica and to the dataset. Clamping is the documented purpose of the
    bounds, but a schedule that asks for a size outside them is still reported, once per bound,
    with a :class:`UserWarning`.

    Args:
        min_batch_size (int): smallest batch each replica may train on (the BatchNorm floor; see
            :func:`bn_safe_min_batch_size`). Default: 1.
        max_batch_size (int, optional): largest global batch. Default: the dataset size.
        multiple_of (int): every size :meth:`apply` hands out is a multiple of this per replica
            (e.g. 8 for tensor cores); where ``remainder="balance"`` ends an epoch, the rule in
            :mod:`adabatch.layout` applies. Default: 1.
        accumulate (bool): whether a batch larger than the memory cap may be trained in
            micro-batches (``BatchSizeScheduler.train_step`` does); if not, the memory cap also
            caps the batch. Default: ``False``.
        global_floor (bool): ``min_batch_size`` bounds the global batch rather than each
            replica's, for a model whose BatchNorm layers are ``SyncBatchNorm`` (they see the
            statistics of all replicas together). Default: ``False``.

    Raises:
        ValueError: if a size is not a positive integer, if ``min_batch_size`` exceeds
            ``max_batch_size``, or, once the dataset is known, if no allowed size fits in it.
    """

    def __init__(
        self, min_batch_size: int = 1, max_batch_size: int | None = None, multiple_of: int = 1, accumulate: bool = False,
        global_floor: bool = False,
    ) -> None:
        self.min_batch_size = check_positive_int("min_batch_size", min_batch_size)
        if max_batch_size is not None:
            max_batch_size = check_positive_int("max_batch_size", max_batch_size)
            if max_batch_size < self.min_batch_size:
                raise ValueError(
                    f"min_batch_size ({min_batch_size}) must not exceed max_batch_size ({max_batch_size})"
                )
        self.max_batch_size = max_batch_size
        self.multiple_of = check_positive_int("multiple_of", multiple_of)
        self.accumulate = check_bool("accumulate", accumulate)
        self.global_floor = check_bool("global_floor", global_floor)
        self.memory_cap: int | None = None
        self.dataset_size: int | None = None
        self.num_replicas = 1
        self._warned: set[str] = set()
        self._update_bounds()

    def bind(self, dataset_size: int | None, num_replicas: int = 1) -> None:
        """Fix the dataset size and the number of replicas the bounds are computed for.

        Raises:
            ValueError: if the floor does not fit in each replica's share of the dataset, or
                if no multiple of ``multiple_of`` lies between the floor and the cap.
        """
        num_replicas = check_positive_int("num_replicas", num_replicas)
        if dataset_size is not None:
            dataset_size = check_positive_int("dataset_size", dataset_size)
            if dataset_size // num_replicas < self.floor_for(num_replicas):
                raise ValueError(
                    f"min_batch_size ({self.min_batch_size}) is larger than each replica's share of the "
                    f"dataset ({dataset_size} samples over {num_replicas} replica(s) = "
                    f"{dataset_size // num_replicas}); lower min_batch_size"
                )
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self._update_bounds()

    def _update_bounds(self) -> None:
        replicas, multiple = self.num_replicas, self.multiple_of
        caps = [] if self.max_batch_size is None else [self.max_batch_size // replicas]
        if self.dataset_size is not None:
            caps.append(self.dataset_size // replicas)
        cap_per_replica = min(caps) if caps else math.inf
        self._cap_per_replica = cap_per_replica
        self._lowest = math.ceil(self.floor_per_replica / multiple) * multiple
        self._highest = math.inf if cap_per_replica == math.inf else (cap_per_replica // multiple) * multiple
        if self._highest < self._lowest:
            raise ValueError(
                f"no batch size fits the constraints: per replica it must be a multiple of "
                f"multiple_of ({multiple}), at least min_batch_size ({self.min_batch_size}) and at most "
                f"{cap_per_replica} (max_batch_size={self.max_batch_size}, dataset_size="
                f"{self.dataset_size}, num_replicas={replicas})"
            )

    def check_balance_fits(self) -> None:
        """Whether the bound dataset's epochs can end in balanced batches (``remainder="balance"``):
        a tail of up to ``2 * floor - 1`` samples per replica may have to stay one batch.

        Raises:
            ValueError: if the cap is below that.
        """
        floor, replicas = self.floor_per_replica, self.num_replicas
        tail = 2 * floor - 1 if self.dataset_size is None else min(2 * floor - 1, self.dataset_size // replicas)
        if self.per_replica_cap < tail:
            raise ValueError(
                f"remainder='balance' needs max_batch_size of at least 2 * min_batch_size - 1 per replica "
                f"({2 * floor - 1} x {replicas} replica(s)) so that the end of an epoch can always be "
                f"split without a batch below min_batch_size={floor}; got max_batch_size="
                f"{self.max_batch_size}. Raise max_batch_size, or use remainder='wrap' or 'drop'"
            )

    def floor_for(self, num_replicas: int) -> int:
        """The per-replica floor for ``num_replicas`` replicas."""
        return -(-self.min_batch_size // num_replicas) if self.global_floor else self.min_batch_size

    @property
    def floor_per_replica(self) -> int:
        """The smallest batch one replica (and one micro-batch) may get: ``min_batch_size``, or
        its share of it under ``global_floor``."""
        return self.floor_for(self.num_replicas)

    def set_memory_cap(self, memory_cap: int | None) -> None:
        """Set the largest micro-batch one replica's memory holds (``None``: no memory cap)."""
        if memory_cap is not None:
            memory_cap = check_integer("memory_cap", memory_cap, 0, what="a non-negative integer or None")
        self.memory_cap = memory_cap

    def _memory_highest(self) -> float:
        """The largest per-replica size ``apply`` hands out, the memory cap included."""
        if self.memory_cap is None or self.accumulate:
            return self._highest
        by_memory = (self.memory_cap // self.multiple_of) * self.multiple_of
        return max(self._lowest, min(self._highest, by_memory))

    def largest(self, memory: bool = True) -> float:
        """The largest global batch size :meth:`apply` hands out now (``inf`` while unbounded);
        ``memory=False``: under the static bounds only."""
        return (self._memory_highest() if memory else self._highest) * self.num_replicas

    @property
    def per_replica_cap(self) -> float:
        """The most samples one replica's batch may hold, from ``max_batch_size`` and the dataset
        (``inf`` while unbounded); sizes from :meth:`apply` are this rounded down to ``multiple_of``."""
        return self._cap_per_replica

    def apply(self, requested: float, memory: bool = True) -> int:
        """Turn a requested global batch size into the global batch size that will be trained
        (``memory=False``: under the static bounds only, without the memory cap)."""
        # Checked on every batch: plain floats and ints skip the slower abstract-type test.
        if type(requested) not in (float, int) and not is_real(requested):
            raise ValueError(f"the schedule asked for batch size {requested!r}; it must be a positive finite number")
        if not math.isfinite(requested) or requested <= 0:
            raise ValueError(f"the schedule asked for batch size {requested!r}; it must be a positive finite number")
        requested = float(requested)
        replicas, multiple = self.num_replicas, self.multiple_of
        # Warn about the request, not about where rounding to multiple_of lands.
        if requested < self.floor_per_replica * replicas:
            self._warn_once(
                "min",
                f"the schedule asked for batch size {requested:g}, below min_batch_size={self.min_batch_size} "
                f"per replica; training at {self._lowest * replicas} instead",
            )
        elif requested > self._cap_per_replica * replicas:
            by_dataset = self.dataset_size is not None and (
                self.max_batch_size is None or self.dataset_size < self.max_batch_size
            )
            bound = f"the dataset size ({self.dataset_size})" if by_dataset else f"max_batch_size={self.max_batch_size}"
            self._warn_once(
                "dataset" if by_dataset else "max",
                f"the schedule asked for batch size {requested:g}, above {bound}; "
                f"training at {int(self._highest) * replicas} instead",
            )
        per_replica = math.floor(requested / replicas / multiple + 0.5) * multiple
        per_replica = min(max(per_replica, self._lowest), self._highest)
        highest = self._memory_highest() if memory else self._highest
        if per_replica > highest:
            self._warn_once(
                "memory",
                f"the schedule asked for batch size {requested:g}, more than the memory holds; training at "
                f"{int(highest) * replicas} instead (memory cap {self.memory_cap} per replica)",
            )
            per_replica = highest
        return int(per_replica) * replicas

    def micro_batch_sizes(self, batch_size: int) -> list[int]:
        """Split one replica's batch of ``batch_size`` into as few micro-batches as fit the
        memory cap, of sizes that differ by at most one, none below ``min_batch_size``.

        If no split keeps every micro-batch both under the memory cap and at or above the
        floor (a cap below twice the floor can leave none), memory wins and a warning says so.
        """
        cap = self.memory_cap
        if cap is None or batch_size <= cap:
            return [batch_size]
        if cap < 1:
            raise ValueError(f"memory_cap is {cap}: not even one sample fits")
        count = -(-batch_size // cap)
        if batch_size // count < self.floor_per_replica:
            self._warn_once(
                "micro",
                f"a batch of {batch_size} cannot be split into micro-batches of at most {cap} (the memory cap) "
                f"and at least {self.min_batch_size} (min_batch_size); some micro-batches are below the floor",
            )
        size, extra = divmod(batch_size, count)
        return [size + 1] * extra + [size] * (count - extra)

    def _warn_once(self, reason: str, message: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(message + " (this warning is shown once)", UserWarning, stacklevel=4)

    def __repr__(self) -> str:
        return (
            f"BatchSizeConstraints(min_batch_size={self.min_batch_size}, max_batch_size={self.max_batch_size}, "
            f"multiple_of={self.multiple_of})"
        )
