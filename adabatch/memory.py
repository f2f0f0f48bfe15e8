"""What the accelerator's memory holds: peak measurements, a fitted memory model, a batch cap.

The peak memory of a training step is close to linear in the micro-batch size ``b``:
``peak(b) ≈ fixed + per_sample * b``, where ``fixed`` holds the weights, gradients and optimizer
state and ``per_sample`` the activations of one sample. Every step a growing run takes at a new
size is a free measurement of that line; :class:`MemoryModel` fits it and turns the device's
memory into the largest micro-batch that fits, keeping a safety margin of the memory left for
activations free. This is the only module that touches
``torch.cuda``; :class:`FakeMemory` stands in for a device in tests and benchmarks and drives
the same code path.

:func:`probe_memory` finds the cap before training instead, in a few real steps (four in the
usual case): two at the floor, one at a safe larger size, one verifying step at the predicted cap,
backing off on an out-of-memory error; the model, optimizer and random generators are restored.

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
    """Whether ``error`` reports that an allocation failed on some backend (or in the host's
    memory: Python's ``MemoryError``)."""
    if isinstance(error, (OutOfMemoryError, MemoryError)):
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
            self._relearn()
        return self.cap

    def _relearn(self) -> None:
        # A cap of 0 would leave nothing to train: one sample is the least a cap may say.
        cap = self.model.cap(self.device.available_bytes(), self.safety_margin) if self.device is not None else None
        self.learned = None if cap is None else max(1, cap)

    def add_measurements(self, peaks: dict[int, int]) -> int | None:
        """Learn from peaks measured elsewhere (``{micro_batch_size: peak_bytes}``, e.g. by a
        probe before training) and return the cap."""
        for batch_size, peak in peaks.items():
            self.model.record(batch_size, peak)
        self._relearn()
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
        """Restore the measurements and the ceiling; the cap is worked out again from the memory
        this device has now (a resumed run may be on another device)."""
        self.model.load_state_dict(state_dict)
        self.ceiling = state_dict["ceiling"]
        self.learned = state_dict["learned"]
        if self.device is not None and self.model.peaks:
            self._relearn()


# ------------------------------------------------------------------ explicit probe
# Appended below the rest of the module: the probe measures with the same MemoryDevice and fits
# with the same MemoryModel that the scheduler uses during training.

import copy  # noqa: E402
import dataclasses  # noqa: E402
import random  # noqa: E402
from typing import Callable  # noqa: E402

import numpy  # noqa: E402

__all__ += ["CurvedFakeMemory", "ProbeResult", "accelerator_memory", "measure_step", "probe_memory"]

#: Most training steps :func:`probe_memory` takes by default, those at ``min_batch_size`` included.
DEFAULT_MAX_PROBE_STEPS = 12
#: A verifying step is not taken to raise the cap by less than this fraction.
PROBE_TOLERANCE = 0.01


class CurvedFakeMemory(FakeMemory):
    """A simulated device whose step peak grows faster than a line:
    ``fixed + per_sample * b + per_sample_squared * b**2`` bytes.

    Real peaks bend upwards where, for instance, a convolution algorithm needs a workspace that
    grows with the batch; a line fitted to small batches then underestimates large ones. Tests
    and benchmarks use this device to drive the out-of-memory back-off of :func:`probe_memory`.

    Args:
        capacity (int): bytes the device holds.
        fixed (int): bytes a step holds whatever the batch.
        per_sample (int): bytes each sample of a micro-batch adds, to first order.
        per_sample_squared (int): bytes each squared sample adds.
    """

    def __init__(self, capacity: int, fixed: int, per_sample: int, per_sample_squared: int) -> None:
        super().__init__(capacity, fixed, per_sample)
        if isinstance(per_sample_squared, bool) or not isinstance(per_sample_squared, int) or per_sample_squared < 0:
            raise ValueError(f"per_sample_squared must be a non-negative integer, got {per_sample_squared!r}")
        self.per_sample_squared = per_sample_squared

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


def accelerator_memory() -> CudaMemory | None:
    """A :class:`CudaMemory` for the current CUDA device, or ``None`` if there is none.

    Command lines and scripts ask here rather than ``torch.cuda``, so that this module stays the
    only one that touches it; ``memory.device`` is where to move the model.
    """
    return CudaMemory() if torch.cuda.is_available() else None


@dataclasses.dataclass
class ProbeResult:
    """What :func:`probe_memory` measured.

    Args:
        cap (int): the largest micro-batch to train, keeping the safety margin free (unless
            ``max_probe_steps`` ran out first): a size verified by a real step, or below one
            that was.
        probe_steps (int): training steps attempted, those that ran out of memory included.
        out_of_memory_errors (int): attempts that ran out of memory.
        fixed_bytes (float): the fitted memory a step holds whatever the batch.
        per_sample_bytes (float): the fitted memory each sample of a micro-batch adds.
        peaks (dict): ``{micro_batch_size: peak_bytes}`` of the steps that fitted; pass them to
            ``scheduler.memory.add_measurements`` to start training with the cap known.
        available_bytes (int): the memory this process could hold when the probe began.
        safety_margin (float): the fraction of the room above ``fixed_bytes`` the cap keeps free.
        attempts (list): ``(micro_batch_size, peak_bytes)`` of each step in order,
            ``peak_bytes`` ``None`` for one that ran out of memory.
    """

    cap: int
    probe_steps: int
    out_of_memory_errors: int
    fixed_bytes: float
    per_sample_bytes: float
    peaks: dict[int, int]
    available_bytes: int
    safety_margin: float
    attempts: list[tuple[int, int | None]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-serialisable values (``peaks`` keyed by strings)."""
        values = dataclasses.asdict(self)
        values["peaks"] = {str(size): peak for size, peak in self.peaks.items()}
        values["attempts"] = [list(attempt) for attempt in self.attempts]
        return values


def _to_cpu(value: Any) -> Any:
    """A copy of ``value`` with every tensor copied to the CPU, so a saved state holds no device memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_to_cpu(item) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return copy.deepcopy(value)


class _SavedTrainingState:
    """Everything a probe step changes, copied to the CPU: parameters, buffers, training flags,
    optimizer state and the random number generators (torch, CUDA, Python, NumPy). Where CUDA
    is available, reading its generators initialises it."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self.tensors = {name: _to_cpu(tensor) for name, tensor in self._named_tensors()}
        self.training = {name: module.training for name, module in model.named_modules()}
        self.optimizer_state = _to_cpu(optimizer.state_dict())
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.python_rng = random.getstate()
        self.numpy_rng = numpy.random.get_state()

    def _named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        parameters = [("parameter:" + name, p) for name, p in self.model.named_parameters(remove_duplicate=False)]
        buffers = [("buffer:" + name, b) for name, b in self.model.named_buffers(remove_duplicate=False)]
        return parameters + buffers

    @torch.no_grad()
    def restore(self) -> None:
        # In place, so that the optimizer and the caller keep the same tensor objects.
        for name, tensor in self._named_tensors():
            tensor.copy_(self.tensors[name])
        for name, module in self.model.named_modules():
            module.training = self.training[name]
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.load_state_dict(self.optimizer_state)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        random.setstate(self.python_rng)
        numpy.random.set_state(self.numpy_rng)


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer's state (moments, momentum buffers)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))


def measure_step(
    optimizer: torch.optim.Optimizer,
    make_batch: Callable[[int], Any],
    loss_fn: Callable[[Any], torch.Tensor],
    batch_size: int,
    *,
    device: MemoryDevice,
) -> int | None:
    """Take one real training step on ``batch_size`` samples and return its peak memory in bytes,
    or ``None`` if it ran out of memory.

    The step is ``loss_fn(make_batch(batch_size)).backward()`` and ``optimizer.step()``, with the
    gradients set to ``None`` before and after; after an out-of-memory error, what the attempt
    held is freed and the device's cache emptied. Other errors propagate. This is the unit of
    :func:`probe_memory`, and of any search for the largest batch that fits (the benchmarks'
    and the GPU check's), so that all of them count the same steps.

    Args:
        optimizer (Optimizer): steps the parameters of the model ``loss_fn`` runs.
        make_batch (callable): ``make_batch(b)`` returns a batch of ``b`` samples.
        loss_fn (callable): ``loss_fn(batch)`` returns the mean loss, a scalar tensor.
        batch_size (int): samples in the step.
        device (MemoryDevice): where the peak is read.
    """
    optimizer.zero_grad(set_to_none=True)
    device.reset_peak()
    failed = False
    try:
        loss_fn(make_batch(batch_size)).backward()
        optimizer.step()
    except Exception as error:  # noqa: BLE001 - re-raised unless it is an out-of-memory error
        if not is_out_of_memory(error):
            raise
        failed = True
    # Outside the except clause: the error's traceback no longer pins the attempt's tensors.
    optimizer.zero_grad(set_to_none=True)
    if failed:
        device.release_cached()
        return None
    return device.peak_bytes()


def probe_memory(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    make_batch: Callable[[int], Any],
    loss_fn: Callable[[Any], torch.Tensor],
    *,
    device: MemoryDevice,
    min_batch_size: int = 1,
    max_batch_size: int | None = None,
    safety_margin: float = DEFAULT_SAFETY_MARGIN,
    max_probe_steps: int = DEFAULT_MAX_PROBE_STEPS,
) -> ProbeResult:
    """Find the largest micro-batch that fits in memory with a few real training steps.

    Searches that find the batch size by running into the wall take many failing steps:
    Lightning's ``BatchSizeFinder`` doubles the batch from 2 until a step runs out of memory
    and then bisects (about ``2 * log2(max)`` trials, each of several steps), and Accelerate's
    ``find_executable_batch_size`` starts large and shrinks by 10% after each out-of-memory
    error. This probe uses instead that a step's peak memory is close to linear in the batch,
    ``peak(b) ≈ fixed + per_sample * b`` (see :class:`MemoryModel`):

    1. a step at ``min_batch_size`` measures one peak (two steps if it was the optimizer's
       first: that step creates the optimizer's state after its peak, so its peak is low);
    2. the line through the origin and that peak overestimates the per-sample cost, so its
       cap is a size that fits if the line holds; the next step runs there (at least at twice
       the floor, to measure a slope, where that cap is not above the floor);
    3. :class:`MemoryModel` fits the peaks and predicts the cap, which keeps ``safety_margin``
       of the room above the fixed cost free, and ONE step at the predicted cap verifies it.
       Its peak refines the fit; a further step is taken only if the refit raises the cap by
       more than 1%.

    If a step runs out of memory (the peak grows faster than the line, e.g. a convolution
    algorithm that needs more workspace at large batches), its size becomes a ceiling. Far
    above the largest size that fitted, the next size is 0.8 times the ceiling (the back-off
    of :class:`MemoryCap`, enough when the line was a little off), the factor squared after
    each further failure but never below the bracket's geometric middle; within a factor of
    2, the next size interpolates between the largest size that fitted and the ceiling (whose
    peak was at least the memory available) to the same margin. Each is verified in turn, so
    the cap is always a size that fitted or below one. Where the line holds, the probe takes
    3 steps, 4 with a fresh optimizer that keeps state (SGD with momentum, Adam), 2 or 3 when
    the fixed cost is nil; a peak 30% above the line at the wall costs 2 failed steps more.

    The parameters and buffers (BatchNorm's running statistics too), the modules' training
    flags, the optimizer state and the random number generators (torch's CPU and CUDA
    generators, Python's ``random``, NumPy's global one) are restored exactly afterwards,
    also when an error propagates, and the gradients are set to ``None``. The saved copies
    are kept on the CPU, so that they take no device memory during the probe.

    With ``torch.backends.cudnn.benchmark`` on, the first step at each size also holds
    cuDNN's trial workspaces, which makes the cap more cautious, never less.

    Args:
        model (nn.Module): the model, on its device. The probe trains it in training mode
            (``model.train()``) and gives each module its flag back afterwards.
        optimizer (Optimizer): the optimizer that steps ``model``'s parameters.
        make_batch (callable): ``make_batch(b)`` returns a batch of ``b`` samples, on the
            device, shaped like the training batches (their largest inputs, for inputs whose
            size varies).
        loss_fn (callable): ``loss_fn(batch)`` runs the forward pass and returns the mean loss,
            a scalar tensor.
        device (MemoryDevice): where peaks are read (:class:`CudaMemory`, or a
            :class:`FakeMemory` attached to ``model``).
        min_batch_size (int): the smallest micro-batch to train, and the first size tried.
            Default: 1.
        max_batch_size (int, optional): no size above this is tried. Default: no limit.
        safety_margin (float): fraction of the room above the fixed cost that the cap keeps
            free. Default: 0.1.
        max_probe_steps (int): most steps to take (the steps at the floor are always taken);
            when they are spent, the cap is the largest size that fitted. Default: 12.

    Returns:
        ProbeResult: the cap, the fitted line, the peaks measured and the number of steps.

    Raises:
        BatchSizeFloorError: if a step of ``min_batch_size`` samples runs out of memory.
        RuntimeError: if ``device`` measures no memory for a step (a fake device not attached).
        TypeError: if ``device`` is not a :class:`MemoryDevice`.
        ValueError: if an argument is out of range.

    Example:
        >>> memory = CudaMemory()
        >>> result = probe_memory(
        ...     model, optimizer,
        ...     lambda b: (torch.randn(b, 3, 224, 224, device="cuda"), torch.randint(1000, (b,), device="cuda")),
        ...     lambda batch: F.cross_entropy(model(batch[0]), batch[1]),
        ...     device=memory, min_batch_size=16)
        >>> scheduler = BatchSizeScheduler(optimizer, schedule, min_batch_size=16, memory=memory)
        >>> scheduler.add_memory_measurements(result.peaks)
    """
    if not isinstance(device, MemoryDevice):
        raise TypeError(f"device must be a MemoryDevice, got {type(device).__name__}")
    for name, value in (("min_batch_size", min_batch_size), ("max_probe_steps", max_probe_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                       or max_batch_size < min_batch_size):
        raise ValueError(f"max_batch_size must be an integer of at least min_batch_size ({min_batch_size}) or "
                         f"None, got {max_batch_size!r}")
    margin = _check_margin(safety_margin)
    upper = math.inf if max_batch_size is None else max_batch_size

    saved = _SavedTrainingState(model, optimizer)
    try:
        model.train()
        optimizer.zero_grad(set_to_none=True)  # gradients left from before would count as fixed memory
        available = device.available_bytes()
        memory_model = MemoryModel()
        attempts: list[tuple[int, int | None]] = []

        def attempt(batch_size: int) -> int | None:
            peak = measure_step(optimizer, make_batch, loss_fn, batch_size, device=device)
            attempts.append((batch_size, peak))
            if peak is not None:
                memory_model.record(batch_size, peak)
            return peak

        state_bytes = _optimizer_state_bytes(optimizer)
        fitted = attempt(min_batch_size) is not None
        if fitted and _optimizer_state_bytes(optimizer) > state_bytes:
            # The step created the optimizer's state after its peak; measure the floor again
            # with the state held, as every later step holds it (the larger peak is kept).
            fitted = attempt(min_batch_size) is not None
        if not fitted:
            raise BatchSizeFloorError(
                f"a micro-batch of {min_batch_size} samples (min_batch_size) ran out of memory while probing "
                f"{device!r}; the model does not fit at the floor: lower min_batch_size, shrink the model or "
                f"its inputs, or free memory on the device"
            )
        if not memory_model.peaks:
            raise RuntimeError(
                f"{device!r} measured no memory for a training step of {min_batch_size} samples; a FakeMemory "
                f"must be attached to the model (FakeMemory.attach), a CudaMemory must be the device the model is on"
            )
        largest_fitted = min_batch_size
        smallest_failed: int | None = None
        failures_in_a_row = 0
        while True:
            target = _next_probe_size(memory_model, available, margin, largest_fitted, smallest_failed,
                                      failures_in_a_row)
            target = int(min(target, upper))
            if target <= largest_fitted:
                cap = max(target, min_batch_size)
                break
            if target <= largest_fitted * (1 + PROBE_TOLERANCE) or len(attempts) >= max_probe_steps:
                cap = largest_fitted
                break
            if attempt(target) is None:
                smallest_failed = target
                failures_in_a_row += 1
            else:
                largest_fitted = target
                failures_in_a_row = 0
        fixed, per_sample = memory_model.fit()  # type: ignore[misc]
        return ProbeResult(
            cap=cap,
            probe_steps=len(attempts),
            out_of_memory_errors=sum(peak is None for _, peak in attempts),
            fixed_bytes=fixed,
            per_sample_bytes=per_sample,
            peaks=dict(memory_model.peaks),
            available_bytes=available,
            safety_margin=margin,
            attempts=attempts,
        )
    finally:
        saved.restore()


def _next_probe_size(
    memory_model: MemoryModel,
    available: int,
    margin: float,
    largest_fitted: int,
    smallest_failed: int | None,
    failures_in_a_row: int,
) -> int:
    """The next size :func:`probe_memory` tries (or accepts, if it does not exceed ``largest_fitted``)."""
    predicted = memory_model.cap(available, margin)
    assert predicted is not None  # the floor's peak is recorded before the first call
    if smallest_failed is None:
        if len(memory_model.peaks) == 1 and predicted <= largest_fitted:
            # One peak: the line through the origin overestimates the per-sample cost, so its
            # cap fits; where that is no larger than the floor, double the floor to get a slope.
            predicted = 2 * largest_fitted
        return predicted
    # The line missed the wall: the peaks grow faster than it near the size that failed.
    if smallest_failed > 2 * largest_fitted:
        # Nothing measured near the failure. After one failure, back off as training does
        # (MemoryCap.BACK_OFF), which suffices when the line was a little off; after each further
        # failure, square the factor, but never go below the bracket's geometric middle; after a
        # success far below the failure, try that middle. The bracket's logarithm at least
        # halves with every step.
        middle = math.isqrt(largest_fitted * smallest_failed)
        backed_off = middle
        if failures_in_a_row:
            backed_off = max(middle, math.floor(smallest_failed * MemoryCap.BACK_OFF ** 2 ** (failures_in_a_row - 1)))
        return min(predicted, backed_off, smallest_failed - 1)
    if failures_in_a_row >= 2:
        # Interpolating has failed twice in a row (the margin is small, or the peak bends up
        # sharply): bisect, which at least halves the bracket.
        return min(predicted, (largest_fitted + smallest_failed) // 2)
    # Close below the failure, interpolate between the largest size that fitted and the one
    # that failed (whose peak was at least ``available``) to the same margin above the fixed cost.
    fixed, _ = memory_model.fit()  # type: ignore[misc]
    fitted_peak = memory_model.peaks[largest_fitted]
    budget = fixed + (1 - margin) * (available - fixed)
    if budget <= fitted_peak or available <= fitted_peak:
        return min(predicted, largest_fitted)
    share = (budget - fitted_peak) / (available - fitted_peak)
    interpolated = largest_fitted + math.floor(share * (smallest_failed - largest_fitted))
    return min(predicted, interpolated, smallest_failed - 1)
