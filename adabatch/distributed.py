"""The glue to torch.distributed: the only module that touches it (with :mod:`adabatch.fsdp`,
the glue to sharded models).

Every rank must train on its share of the same global batch, change size at the same step and
take the same memory and out-of-memory decisions; one rank deciding alone deadlocks the next
collective. So whatever feeds a decision is reduced over the ranks first: noise statistics are
summed, memory caps reduced by MIN, out-of-memory flags by MAX. A :class:`Collective` does that;
:class:`ProcessGroupCollective` uses torch.distributed, and anything with the same three methods
can stand in for it in tests. :class:`RankAgreement` is what the scheduler asks: it holds the
collective (or none, on one process) and turns each decision's input into the agreed value.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

__all__ = ["Collective", "ProcessGroupCollective", "RankAgreement", "default_collective", "world"]


def world() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group, or ``(1, 0)`` outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class Collective(Protocol):
    """Reductions over the ranks of a data-parallel run."""

    world_size: int

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks."""

    def min(self, value: int) -> int:
        """The smallest value over the ranks."""

    def max(self, value: int) -> int:
        """The largest value over the ranks."""

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in place."""


class ProcessGroupCollective:
    """A :class:`Collective` over a torch.distributed process group.

    Args:
        group (ProcessGroup, optional): the group. Default: the default group.
        device (torch.device, optional): where the small reduction tensors live. Default: the
            current CUDA device under the NCCL backend, else the CPU.
    """

    def __init__(self, group: object | None = None, device: torch.device | None = None) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ProcessGroupCollective needs an initialised torch.distributed process group")
        self._dist = dist
        self.group = group
        self.world_size = dist.get_world_size(group)
        if device is None:
            nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = device

    def _reduce(self, values: Sequence[float], op: object, dtype: torch.dtype) -> list:
        tensor = torch.tensor(list(values), dtype=dtype, device=self.device)
        self._dist.all_reduce(tensor, op=op, group=self.group)
        return tensor.tolist()

    def sum(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, self._dist.ReduceOp.SUM, torch.float64)

    def min(self, value: int) -> int:
        return int(self._reduce([value], self._dist.ReduceOp.MIN, torch.int64)[0])

    def max(self, value: int) -> int:
        return int(self._reduce([value], self._dist.ReduceOp.MAX, torch.int64)[0])

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self._dist.all_reduce(flat, op=self._dist.ReduceOp.SUM, group=self.group)
        flat /= self.world_size
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def default_collective() -> ProcessGroupCollective | None:
    """A collective over the default process group when there is one with several ranks."""
    world_size, _ = world()
    return ProcessGroupCollective() if world_size > 1 else None


class RankAgreement:
    """What the ranks of a data-parallel run must decide alike, reduced over them.

    Without a collective (one process) every value is its own agreement.

    Args:
        collective (Collective or str, optional): ``"auto"`` for the default process group
            when it has several ranks, looked up again when a sampler shards over several
            replicas (the process group may be created after the scheduler); ``None`` for none.
    """

    #: Stands for "no memory cap" in a MIN reduction over ranks.
    NO_CAP = 2**62

    def __init__(self, collective: Collective | str | None = "auto") -> None:
        if isinstance(collective, str) and collective != "auto":
            raise ValueError(f"collective must be a Collective, 'auto' or None, got {collective!r}")
        self._auto = collective == "auto"
        self.collective: Collective | None = default_collective() if collective == "auto" else collective

    @property
    def distributed(self) -> bool:
        """Whether there are other ranks to agree with."""
        return self.collective is not None

    def bind(self, num_replicas: int) -> None:
        """A sampler shards over ``num_replicas``: find the process group built since, if any."""
        if self._auto and self.collective is None and num_replicas > 1:
            self.collective = default_collective()

    def memory_cap(self, memory: Any) -> int | None:
        """The smallest of the ranks' memory caps (``memory.cap``; every rank must cut batches
        alike). Nothing is exchanged while no rank measures memory (the device setting is the
        same on all)."""
        cap = memory.cap
        if self.collective is None or (memory.device is None and memory.ceiling is None):
            return cap
        agreed = self.collective.min(self.NO_CAP if cap is None else cap)
        return None if agreed == self.NO_CAP else agreed

    def apply_memory_cap(self, memory: Any, constraints: Any) -> int | None:
        """Set the agreed :meth:`memory_cap` on ``constraints`` (a
        :class:`~adabatch.BatchSizeConstraints`), so every rank caps its batches alike; returns it."""
        cap = self.memory_cap(memory)
        constraints.set_memory_cap(cap)
        return cap

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        return list(values) if self.collective is None else self.collective.sum(values)

    def largest(self, value: int) -> int:
        """The largest ``value`` over the ranks (an out-of-memory flag: the size that failed)."""
        return value if self.collective is None else self.collective.max(value)

    def average_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Replace every gradient by its mean over the ranks."""
        if self.collective is not None:
            self.collective.all_reduce_mean_(
                [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None])
