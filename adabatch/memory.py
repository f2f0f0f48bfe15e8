"""What the accelerator's memory holds: peak measurements, a fitted memory model, a batch cap.

The peak memory of a training step is close to linear in the micro-batch size ``b``:
``peak(b) ≈ fixed + per_sample * b``, where ``fixed`` holds the weights, gradients and optimizer
state and ``per_sample`` the activations of one sample. Every step a growing run takes at a new
size is a free measurement of that line; :class:`MemoryModel` fits it and turns the device's
memory into the largest micro-batch that fits, keeping a safety margin of the memory left for
activations free. This is the only module that touches
``torch.cuda``; :class:`FakeMemory` stands in for a device in tests and benchmarks and drives
the same code path.

Limits of the model: the allocator's fragmentation, other processes taking memory between steps,
and inputs whose size varies from batch to batch (variable-length sequences) all move the wall
after the fit. The safety margin absorbs the first, and an out-of-memory error in
``BatchSizeScheduler.train_step`` lowers the cap and retries the same batch.
"""

from __future__ import annotations

import abc
import logging
import math
import statistics
from typing import Any

import torch

__all__ = [
    "BatchSizeFloorError",
    "CudaMemory",
    "FakeMemory",
    "MemoryCap",
    "MemoryDevice",
    "MemoryModel",
    "OUT_OF_MEMORY_MESSAGES",
    "OutOfMemoryError",
    "default_memory_device",
    "is_out_of_memory",
]

logger = logging.getLogger("adabatch")

#: The exception CUDA (and the fake device) raise when an allocation fails.
OutOfMemoryError: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

#: Messages by which other backends and libraries report a failed allocation in a RuntimeError.
OUT_OF_MEMORY_MESSAGES = (
    "out of memory",  # CUDA, HIP/ROCm, XPU: "... out of memory. Tried to allocate ..."
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "can't allocate memory",  # the CPU allocator
    "MPS backend out of memory",
)

#: Default fraction of the memory above the fixed cost (the room for activations) kept free, for
#: the allocator's fragmentation and for measurement error.
DEFAULT_SAFETY_MARGIN = 0.10


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` reports that an allocation failed on some backend."""
    if isinstance(error, OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_MESSAGES)


def _check_margin(safety_margin: float) -> float:
    if isinstance(safety_margin, bool) or not isinstance(safety_margin, (int, float)) \
            or not 0 <= safety_margin < 1:
        raise ValueError(f"safety_margin must be a fraction in [0, 1), got {safety_margin!r}")
    return float(safety_margin)


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


class FakeMemory(MemoryDevice):
    """A simulated device whose step peak is ``fixed + per_sample * b`` bytes.

    Tests and benchmarks run a real model on the CPU and call :meth:`allocate` with each
    micro-batch's size (for instance from a forward pre-hook, see :meth:`attach`); above
    ``capacity`` it raises the same ``torch.OutOfMemoryError`` CUDA raises.

    Args:
        capacity (int): bytes the device holds.
        fixed (int): bytes a step holds whatever the batch (weights, gradients, optimizer state).
        per_sample (int): bytes each sample of a micro-batch adds.
    """

    def __init__(self, capacity: int, fixed: int, per_sample: int):
        for name, value in (("capacity", capacity), ("fixed", fixed), ("per_sample", per_sample)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name != "fixed" else 0):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'fixed' else 'positive'} integer, "
                                 f"got {value!r}")
        self.capacity = capacity
        self.fixed = fixed
        self.per_sample = per_sample
        self.steps = 0  # allocations attempted, the unit of probing cost
        self.out_of_memory_errors = 0
        self._peak = 0

    def peak_for(self, batch_size: int) -> int:
        """The peak a micro-batch of ``batch_size`` samples needs."""
        return self.fixed + self.per_sample * batch_size

    @property
    def true_max_batch_size(self) -> int:
        """The largest micro-batch that fits in ``capacity``."""
        return max(0, (self.capacity - self.fixed) // self.per_sample)

    def allocate(self, batch_size: int) -> None:
        """Account for a micro-batch of ``batch_size`` samples; raise ``OutOfMemoryError`` if it does not fit."""
        self.steps += 1
        need = self.peak_for(batch_size)
        if need > self.capacity:
            self.out_of_memory_errors += 1
            raise OutOfMemoryError(
                f"out of memory: a micro-batch of {batch_size} needs {need} bytes, the fake device holds "
                f"{self.capacity}"
            )
        self._peak = max(self._peak, need)

    def attach(self, module: torch.nn.Module) -> Any:
        """Call :meth:`allocate` with the batch size of every forward pass of ``module``.

        Returns:
            the hook's handle (``handle.remove()`` detaches it).
        """
        return module.register_forward_pre_hook(lambda _, inputs: self.allocate(len(inputs[0])))

    def reset_peak(self) -> None:
        self._peak = 0

    def peak_bytes(self) -> int:
        return self._peak

    def available_bytes(self) -> int:
        return self.capacity

    def __repr__(self) -> str:
        return f"FakeMemory(capacity={self.capacity}, fixed={self.fixed}, per_sample={self.per_sample})"


def default_memory_device(optimizer: torch.optim.Optimizer) -> MemoryDevice | None:
    """A :class:`CudaMemory` for the CUDA device the optimizer's parameters live on, or
    ``None`` (no memory capping) with one info message if they are not on a CUDA device."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.device.type == "cuda":
                return CudaMemory(parameter.device)
    logger.info("adabatch: the parameters are not on a CUDA device; the batch size is not capped by memory")
    return None


class MemoryModel:
    """Fits ``peak(b) = fixed + per_sample * b`` to measured step peaks and predicts a cap.

    Each distinct micro-batch size keeps its largest measured peak. With two or more sizes the
    slope is the Theil–Sen estimate (the median of pairwise slopes, robust to an odd
    measurement) and the intercept is raised until the line lies on or above every measurement,
    so the prediction errs towards less memory. With one size the line goes through the origin,
    which overestimates the per-sample cost and so also errs low.
    """

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}

    def record(self, batch_size: int, peak_bytes: int) -> None:
        """Add a measurement: a micro-batch of ``batch_size`` peaked at ``peak_bytes``."""
        if batch_size > 0 and peak_bytes > 0:
            self.peaks[batch_size] = max(peak_bytes, self.peaks.get(batch_size, 0))

    def fit(self) -> tuple[float, float] | None:
        """``(fixed, per_sample)`` in bytes, or ``None`` before the first measurement."""
        points = sorted(self.peaks.items())
        if not points:
            return None
        slopes = [(p2 - p1) / (b2 - b1) for i, (b1, p1) in enumerate(points) for b2, p2 in points[i + 1:]]
        slope = statistics.median(slopes) if slopes else 0.0
        if slope <= 0:
            # No measurable growth with the batch: assume it all scales, which errs low.
            largest_batch, largest_peak = max(points, key=lambda point: point[1] / point[0])
            return 0.0, largest_peak / largest_batch
        fixed = max(peak - slope * batch for batch, peak in points)
        return fixed, slope

    def cap(self, available_bytes: int, safety_margin: float = DEFAULT_SAFETY_MARGIN) -> int | None:
        """The largest micro-batch whose predicted peak leaves ``safety_margin`` of the room
        above the fixed cost free (0 if none fits), or ``None`` before the first measurement."""
        _check_margin(safety_margin)
        fitted = self.fit()
        if fitted is None:
            return None
        fixed, per_sample = fitted
        return max(0, math.floor((1 - safety_margin) * (available_bytes - fixed) / per_sample))

    def state_dict(self) -> dict[str, Any]:
        return {"peaks": dict(self.peaks)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.peaks = {int(b): int(p) for b, p in state_dict["peaks"].items()}

    def __repr__(self) -> str:
        return f"MemoryModel(peaks={self.peaks})"


class BatchSizeFloorError(RuntimeError):
    """Raised when even a micro-batch of ``min_batch_size`` samples runs out of memory."""


class MemoryCap:
    """Learns the largest micro-batch that fits, from the steps training takes anyway.

    After each step, :meth:`end_step` reads the step's peak from the device, adds it to the
    :class:`MemoryModel` and, when the fit changed, turns the memory available into a cap.
    :meth:`out_of_memory` lowers a ceiling below a size that failed; the cap never rises above
    it again (the wall moved: another process, fragmentation, a longer input).

    Args:
        device (MemoryDevice, optional): where peaks are read. Without one (a CPU run), no cap
            is learned, but an out-of-memory error still lowers the ceiling.
        safety_margin (float): fraction of the room above the fixed cost kept free. Default: 0.1.
    """

    #: After an out-of-memory error the ceiling drops to this fraction of the size that failed
    #: (at least one sample lower), so that a wall that moved a lot costs few retries.
    BACK_OFF = 0.8

    def __init__(self, device: MemoryDevice | None, safety_margin: float = DEFAULT_SAFETY_MARGIN) -> None:
        if device is not None and not isinstance(device, MemoryDevice):
            raise TypeError(f"memory must be a MemoryDevice, 'auto' or None, got {type(device).__name__}")
        self.device = device
        self.safety_margin = _check_margin(safety_margin)
        self.model = MemoryModel()
        self.ceiling: int | None = None
        self.learned: int | None = None
        self.last_peak_bytes = 0
        if device is not None:
            device.reset_peak()

    @property
    def cap(self) -> int | None:
        """The largest micro-batch to train, or ``None`` while nothing limits it."""
        caps = [c for c in (self.learned, self.ceiling) if c is not None]
        return min(caps) if caps else None

    def begin_step(self) -> None:
        """Start measuring a step's peak."""
        if self.device is not None:
            self.device.reset_peak()

    def end_step(self, micro_batch_size: int) -> int | None:
        """Record the peak of a step whose largest micro-batch had ``micro_batch_size`` samples,
        and return the cap."""
        if self.device is None:
            return self.cap
        peak = self.device.peak_bytes()
        self.device.reset_peak()
        self.last_peak_bytes = peak
        before = self.model.peaks.get(micro_batch_size)
        self.model.record(micro_batch_size, peak)
        if self.model.peaks.get(micro_batch_size) != before:
            self.learned = self.model.cap(self.device.available_bytes(), self.safety_margin)
        return self.cap

    def add_measurements(self, peaks: dict[int, int]) -> int | None:
        """Learn from peaks measured elsewhere (``{micro_batch_size: peak_bytes}``, e.g. by a
        probe before training) and return the cap."""
        for batch_size, peak in peaks.items():
            self.model.record(batch_size, peak)
        if self.device is not None and self.model.peaks:
            self.learned = self.model.cap(self.device.available_bytes(), self.safety_margin)
        return self.cap

    def out_of_memory(self, micro_batch_size: int, min_batch_size: int) -> int:
        """Lower the ceiling below ``micro_batch_size``, which ran out of memory, and return the cap.

        Raises:
            BatchSizeFloorError: if ``micro_batch_size`` is already at ``min_batch_size``.
        """
        if micro_batch_size <= min_batch_size:
            raise BatchSizeFloorError(
                f"a micro-batch of {micro_batch_size} samples (min_batch_size={min_batch_size}) ran out of memory, "
                f"with the memory cap at {self.cap}; the model does not fit at the BatchNorm floor: lower "
                f"min_batch_size, shrink the model or its inputs, or free memory on the device"
            )
        lowered = min(micro_batch_size - 1, math.floor(micro_batch_size * self.BACK_OFF))
        self.ceiling = max(min_batch_size, lowered if self.ceiling is None else min(self.ceiling, lowered))
        if self.device is not None:
            self.device.release_cached()
        return self.cap  # type: ignore[return-value]

    def fit(self) -> tuple[float, float] | None:
        return self.model.fit()

    def state_dict(self) -> dict[str, Any]:
        return {"peaks": dict(self.model.peaks), "ceiling": self.ceiling, "learned": self.learned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.model.load_state_dict(state_dict)
        self.ceiling = state_dict["ceiling"]
        self.learned = state_dict["learned"]
