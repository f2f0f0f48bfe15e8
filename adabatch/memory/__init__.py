"""What the accelerator's memory holds: peak measurements, a fitted memory model, a batch cap.

The peak memory of a training step is close to linear in the micro-batch size ``b``:
``peak(b) ≈ fixed + per_sample * b``, where ``fixed`` holds the weights, gradients and optimizer
state and ``per_sample`` the activations of one sample. Every step a growing run takes at a new
size is a free measurement of that line; :class:`MemoryModel` fits it and turns the device's
memory into the largest micro-batch that fits, keeping a safety margin of the memory left for
activations free. This is the only package that touches ``torch.cuda``;
:class:`~adabatch.testing.FakeMemory` stands in for a device in tests and benchmarks and drives
the same code path.

:func:`probe_memory` finds the cap before training instead, in a few real steps (four in the
usual case): two at the floor, one at a safe larger size, one verifying step at the predicted cap,
backing off on an out-of-memory error; the model, optimizer and random generators are restored.

Limits of the model: the allocator's fragmentation, other processes taking memory between steps,
and inputs whose size varies from batch to batch (variable-length sequences) all move the wall
after the fit. The safety margin absorbs the first, and an out-of-memory error in
``BatchSizeScheduler.train_step`` lowers the cap and retries the same batch.

The modules: :mod:`~adabatch.memory.devices` (the devices, and recognising an out-of-memory
error), :mod:`~adabatch.memory.cap` (the fitted model and the cap), :mod:`~adabatch.memory.probe`
(the probe before training).
"""

from __future__ import annotations

from typing import Any

from .cap import DEFAULT_SAFETY_MARGIN, BatchSizeFloorError, MemoryCap, MemoryModel
from .devices import (
    OUT_OF_MEMORY_MESSAGES,
    CudaMemory,
    MemoryDevice,
    OutOfMemoryError,
    accelerator_memory,
    catch_out_of_memory,
    default_memory_device,
    is_out_of_memory,
    memory_device,
)
from .probe import DEFAULT_MAX_PROBE_STEPS, PROBE_TOLERANCE, ProbeResult, measure_step, probe_memory

__all__ = [
    "BatchSizeFloorError",
    "CudaMemory",
    "CurvedFakeMemory",
    "DEFAULT_MAX_PROBE_STEPS",
    "DEFAULT_SAFETY_MARGIN",
    "FakeMemory",
    "MemoryCap",
    "MemoryDevice",
    "MemoryModel",
    "OUT_OF_MEMORY_MESSAGES",
    "OutOfMemoryError",
    "PROBE_TOLERANCE",
    "ProbeResult",
    "accelerator_memory",
    "catch_out_of_memory",
    "default_memory_device",
    "is_out_of_memory",
    "measure_step",
    "memory_device",
    "probe_memory",
]

# The simulated devices live in adabatch.testing, which builds on .devices; they are looked up
# there on first use, so that importing this package neither imports that module nor forms a cycle.
_SIMULATED_DEVICES = ("CurvedFakeMemory", "FakeMemory")


def __getattr__(name: str) -> Any:
    if name in _SIMULATED_DEVICES:
        from .. import testing

        return getattr(testing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SIMULATED_DEVICES})
