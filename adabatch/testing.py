"""Simulated memory devices and step clocks that users may import for their own tests.

:class:`FakeMemory` stands in for an accelerator's memory on a machine without one: a real
model trains on the CPU, the device counts each micro-batch's bytes (``fixed + per_sample * b``)
and raises the same ``torch.OutOfMemoryError`` that CUDA raises when they exceed its capacity, so
:class:`~adabatch.BatchSizeScheduler` and :func:`~adabatch.memory.probe_memory` run through the
same code path as on a GPU. :class:`CurvedFakeMemory` adds a term that grows with the square of
the batch, where a line fitted to small batches underestimates large ones.

:class:`FakeClock` stands in for the wall clock the scheduler times its steps with: a forward
pass of ``b`` samples takes ``fixed + per_sample * b`` simulated seconds, so an adaptive schedule
weighs the same step times in every run, and a resumed run takes the decisions of one that never
stopped.

Example:
    >>> memory = FakeMemory(capacity=10**9, fixed=10**8, per_sample=10**6)
    >>> memory.attach(model)
    >>> scheduler = BatchSizeScheduler(optimizer, schedule, memory=memory)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._validation import check_non_negative_int, check_non_negative_number, check_positive_int
from .memory.devices import MemoryDevice, OutOfMemoryError

__all__ = ["CurvedFakeMemory", "FakeClock", "FakeMemory"]


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
        self.capacity = check_positive_int("capacity", capacity)
        self.fixed = check_non_negative_int("fixed", fixed)
        self.per_sample = check_positive_int("per_sample", per_sample)
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


class CurvedFakeMemory(FakeMemory):
    """A simulated device whose step peak grows faster than a line:
    ``fixed + per_sample * b + per_sample_squared * b**2`` bytes.

    Real peaks bend upwards where, for instance, a convolution algorithm needs a workspace that
    grows with the batch; a line fitted to small batches then underestimates large ones. Tests
    and benchmarks use this device to drive the out-of-memory back-off of
    :func:`~adabatch.memory.probe_memory`.

    Args:
        capacity (int): bytes the device holds.
        fixed (int): bytes a step holds whatever the batch.
        per_sample (int): bytes each sample of a micro-batch adds, to first order.
        per_sample_squared (int): bytes each squared sample adds.
    """

    def __init__(self, capacity: int, fixed: int, per_sample: int, per_sample_squared: int) -> None:
        super().__init__(capacity, fixed, per_sample)
        self.per_sample_squared = check_non_negative_int("per_sample_squared", per_sample_squared)

    def peak_for(self, batch_size: int) -> int:
        return self.fixed + self.per_sample * batch_size + self.per_sample_squared * batch_size**2

    @property
    def true_max_batch_size(self) -> int:
        if self.per_sample_squared == 0:
            return super().true_max_batch_size
        room = self.capacity - self.fixed
        if room < 0:
            return 0
        a, b = self.per_sample_squared, self.per_sample
        # The positive root of a*x**2 + b*x - room, then corrected for rounding.
        size = (math.isqrt(b * b + 4 * a * room) - b) // (2 * a)
        while self.peak_for(size + 1) <= self.capacity:
            size += 1
        while size > 0 and self.peak_for(size) > self.capacity:
            size -= 1
        return size

    def __repr__(self) -> str:
        return (f"CurvedFakeMemory(capacity={self.capacity}, fixed={self.fixed}, per_sample={self.per_sample}, "
                f"per_sample_squared={self.per_sample_squared})")


class FakeClock:
    """A simulated clock on which a forward pass of ``b`` samples takes ``fixed + per_sample * b`` seconds.

    Set it as the scheduler's step clock (``scheduler.step_times.clock = clock``) and attach it
    to the model (:meth:`attach`); :meth:`advance` moves it by hand.

    Args:
        fixed (float): seconds each forward pass takes whatever its size. Default: 0.
        per_sample (float): seconds each sample adds. Default: 0.

    Example:
        >>> clock = FakeClock(fixed=0.002, per_sample=0.0001)
        >>> clock.attach(model)
        >>> scheduler.step_times.clock = clock
    """

    def __init__(self, fixed: float = 0.0, per_sample: float = 0.0) -> None:
        self.fixed = check_non_negative_number("fixed", fixed)
        self.per_sample = check_non_negative_number("per_sample", per_sample)
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass."""
        self.now += check_non_negative_number("seconds", seconds)

    def attach(self, module: torch.nn.Module) -> Any:
        """Advance by a forward pass's time at every forward pass of ``module``.

        Returns:
            the hook's handle (``handle.remove()`` detaches it).
        """
        return module.register_forward_pre_hook(
            lambda _, inputs: self.advance(self.fixed + self.per_sample * len(inputs[0])))

    def __repr__(self) -> str:
        return f"FakeClock(fixed={self.fixed}, per_sample={self.per_sample}, now={self.now})"
