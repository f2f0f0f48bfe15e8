"""The glue to torch.distributed: the only module that touches it.

Every rank must train on its share of the same global batch, change size at the same step and
take the same memory and out-of-memory decisions; one rank deciding alone deadlocks the next
collective. So whatever feeds a decision is reduced over the ranks first: noise statistics are
summed, memory caps reduced by MIN, out-of-memory flags by MAX. A :class:`Collective` does that;
:class:`ProcessGroupCollective` uses torch.distributed, and anything with the same three methods
can stand in for it in tests.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

__all__ = ["Collective", "ProcessGroupCollective", "default_collective", "world"]


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
