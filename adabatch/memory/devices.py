"""The devices whose memory is measured, and how an allocation that failed is recognised.

A :class:`MemoryDevice` reads a step's peak memory and the memory this process may hold;
:class:`CudaMemory` reads them through ``torch.cuda`` (this package is the only part of
adabatch that touches it). :func:`is_out_of_memory` tells an out-of-memory error of any backend
from other errors, and :class:`catch_out_of_memory` is the one place that suppresses one.
"""

from __future__ import annotations

import abc
import logging
from types import TracebackType
from typing import Callable

import torch

__all__ = [
    "CudaMemory",
    "MemoryDevice",
    "OUT_OF_MEMORY_MESSAGES",
    "OutOfMemoryError",
    "accelerator_memory",
    "catch_out_of_memory",
    "default_memory_device",
    "is_out_of_memory",
    "memory_device",
]

logger = logging.getLogger("adabatch")

#: The exception CUDA (and the simulated devices of :mod:`adabatch.testing`) raise when an
#: allocation fails.
OutOfMemoryError: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

#: Messages by which other backends and libraries report a failed allocation in a RuntimeError.
OUT_OF_MEMORY_MESSAGES = (
    "out of memory",  # CUDA, HIP/ROCm, XPU: "... out of memory. Tried to allocate ..."
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "can't allocate memory",  # the CPU allocator
    "MPS backend out of memory",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` reports that an allocation failed on some backend (or in the host's
    memory: Python's ``MemoryError``)."""
    if isinstance(error, (OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_MESSAGES)


class catch_out_of_memory:  # lower case: it reads as a statement, like contextlib.suppress
    """Suppress an out-of-memory error raised in the block; :attr:`caught` tells whether one was.

    An error is out of memory when :func:`is_out_of_memory` says so; every other error
    propagates. The context manager keeps neither the error nor its traceback, so the tensors
    that the failed attempt held are freed when the block exits, before any clean-up or retry
    that follows it.

    Args:
        propagate (callable, optional): called when an out-of-memory error is raised in the
            block; if it returns ``True``, the error propagates (and :attr:`caught` stays
            ``False``), for a caller that cannot retry at that point. Default: ``None``, every
            out-of-memory error is suppressed.

    Example:
        >>> with catch_out_of_memory() as out_of_memory:
        ...     loss_fn(make_batch(batch_size)).backward()
        >>> if out_of_memory.caught:
        ...     memory.release_cached()
    """

    def __init__(self, propagate: Callable[[], bool] | None = None) -> None:
        self.propagate = propagate
        #: Whether an out-of-memory error was raised in the block and suppressed.
        self.caught = False

    def __enter__(self) -> catch_out_of_memory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None or not is_out_of_memory(exc):
            return False
        if self.propagate is not None and self.propagate():
            return False
        self.caught = True
        return True


class MemoryDevice(abc.ABC):
    """The memory of the device a model trains on, as the scheduler sees it."""

    @abc.abstractmethod
    def reset_peak(self) -> None:
        """Start a new peak measurement."""

    @abc.abstractmethod
    def peak_bytes(self) -> int:
        """The most memory held since :meth:`reset_peak`."""

    @abc.abstractmethod
    def available_bytes(self) -> int:
        """How much memory this process may hold in all."""

    def release_cached(self) -> None:
        """Give cached, unused blocks back to the device (after an out-of-memory error)."""


class CudaMemory(MemoryDevice):
    """A CUDA device's memory, read through ``torch.cuda``.

    This process may hold the device's free memory plus what PyTorch's caching allocator
    already reserves. Memory that other processes take after it is read is not foreseen.

    Args:
        device (torch.device or int, optional): the CUDA device. Default: the current one.
    """

    def __init__(self, device: torch.device | int | None = None):
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def available_bytes(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free + torch.cuda.memory_reserved(self.device))

    def release_cached(self) -> None:
        torch.cuda.empty_cache()

    def __repr__(self) -> str:
        return f"CudaMemory(device={self.device})"


def default_memory_device(optimizer: torch.optim.Optimizer) -> MemoryDevice | None:
    """A :class:`CudaMemory` for the CUDA device the optimizer's parameters live on, or
    ``None`` (no memory capping) with one info message if they are not on a CUDA device."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.device.type == "cuda":
                return CudaMemory(parameter.device)
    logger.info("adabatch: the parameters are not on a CUDA device; the batch size is not capped by memory")
    return None


def memory_device(memory: MemoryDevice | str | None, optimizer: torch.optim.Optimizer) -> MemoryDevice | None:
    """The device a ``memory`` argument names: ``"auto"`` for :func:`default_memory_device`,
    else ``memory`` itself (a :class:`MemoryDevice`, or ``None`` for no memory capping).

    Raises:
        ValueError: if ``memory`` is a string other than ``"auto"``.
    """
    if isinstance(memory, str) and memory != "auto":
        raise ValueError(f"memory must be a MemoryDevice, 'auto' or None, got {memory!r}")
    return default_memory_device(optimizer) if memory == "auto" else memory


def accelerator_memory() -> CudaMemory | None:
    """A :class:`CudaMemory` for the current CUDA device, or ``None`` if there is none.

    Command lines and scripts ask here rather than ``torch.cuda``, so that this package stays
    the only part of adabatch that touches it; ``memory.device`` is where to move the model.
    """
    return CudaMemory() if torch.cuda.is_available() else None
