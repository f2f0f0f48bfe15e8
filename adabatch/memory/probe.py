"""The probe: the largest micro-batch that fits, found before training in a few real steps.

:func:`measure_step` takes one training step and reads its peak; :func:`probe_memory` chooses
the sizes to step at, fits the same :class:`~adabatch.memory.MemoryModel` the scheduler fits
during training, and gives the model, the optimizer and the random generators back as it found
them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
from typing import Any, Callable, Iterator

import numpy
import torch

from .._validation import check_integer, check_positive_int
from .cap import DEFAULT_SAFETY_MARGIN, BatchSizeFloorError, MemoryCap, MemoryModel, _check_margin
from .devices import MemoryDevice, catch_out_of_memory

__all__ = ["DEFAULT_MAX_PROBE_STEPS", "PROBE_TOLERANCE", "ProbeResult", "measure_step", "probe_memory"]

#: Most training steps :func:`probe_memory` takes by default, those at ``min_batch_size`` included.
DEFAULT_MAX_PROBE_STEPS = 12
#: A verifying step is not taken to raise the cap by less than this fraction.
PROBE_TOLERANCE = 0.01


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
            ``scheduler.add_memory_measurements(result.peaks)`` to start training with the cap
            known (the scheduler agrees on the cap across ranks and hands it to its
            constraints, so that the first batches drawn are capped).
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
    with catch_out_of_memory() as out_of_memory:
        loss_fn(make_batch(batch_size)).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if out_of_memory.caught:
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
    ``peak(b) ≈ fixed + per_sample * b`` (see :class:`~adabatch.memory.MemoryModel`):

    1. a step at ``min_batch_size`` measures one peak (two steps if it was the optimizer's
       first: that step creates the optimizer's state after its peak, so its peak is low);
    2. the line through the origin and that peak overestimates the per-sample cost, so its
       cap is a size that fits if the line holds; the next step runs there (at least at twice
       the floor, to measure a slope, where that cap is not above the floor);
    3. :class:`~adabatch.memory.MemoryModel` fits the peaks and predicts the cap, which keeps
       ``safety_margin`` of the room above the fixed cost free, and ONE step at the predicted
       cap verifies it. Its peak refines the fit; a further step is taken only if the refit
       raises the cap by more than 1%.

    If a step runs out of memory (the peak grows faster than the line, e.g. a convolution
    algorithm that needs more workspace at large batches), its size becomes a ceiling. Far
    above the largest size that fitted, the next size is 0.8 times the ceiling (the back-off
    of :class:`~adabatch.memory.MemoryCap`, enough when the line was a little off), the factor
    squared after each further failure but never below the bracket's geometric middle; within
    a factor of 2, the next size interpolates between the largest size that fitted and the
    ceiling (whose peak was at least the memory available) to the same margin. Each is
    verified in turn, so the cap is always a size that fitted or below one. Where the line
    holds, the probe takes 3 steps, 4 with a fresh optimizer that keeps state (SGD with
    momentum, Adam), 2 or 3 when the fixed cost is nil; where the peak bends above the line,
    each step that runs out of memory costs one step more.

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
        device (MemoryDevice): where peaks are read (:class:`~adabatch.memory.CudaMemory`, or
            a :class:`~adabatch.testing.FakeMemory` attached to ``model``).
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
        TypeError: if ``device`` is not a :class:`~adabatch.memory.MemoryDevice`.
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
    min_batch_size = check_positive_int("min_batch_size", min_batch_size)
    max_probe_steps = check_positive_int("max_probe_steps", max_probe_steps)
    if max_batch_size is not None:
        max_batch_size = check_integer("max_batch_size", max_batch_size, min_batch_size,
                                       what=f"an integer of at least min_batch_size ({min_batch_size}) or None")
    margin = _check_margin(safety_margin)

    with _preserved_training_state(model, optimizer):
        model.train()
        optimizer.zero_grad(set_to_none=True)  # gradients left from before would count as fixed memory
        available = device.available_bytes()
        steps = _ProbeSteps(optimizer, make_batch, loss_fn, device)
        _measure_floor(steps, min_batch_size)
        cap = _search_cap(steps, available, margin, min_batch_size, max_batch_size, max_probe_steps)
        return _probe_result(steps, cap, available, margin)


class _ProbeSteps:
    """The training steps a probe takes, and the line fitted to the peaks of those that fitted."""

    def __init__(self, optimizer: torch.optim.Optimizer, make_batch: Callable[[int], Any],
                 loss_fn: Callable[[Any], torch.Tensor], device: MemoryDevice) -> None:
        self.optimizer = optimizer
        self.make_batch = make_batch
        self.loss_fn = loss_fn
        self.device = device
        self.memory_model = MemoryModel()
        #: ``(micro_batch_size, peak_bytes)`` of each step in order, ``None`` for one that ran out of memory.
        self.attempts: list[tuple[int, int | None]] = []

    def take(self, batch_size: int) -> bool:
        """Take one step of ``batch_size`` samples, record its peak, and return whether it fitted."""
        peak = measure_step(self.optimizer, self.make_batch, self.loss_fn, batch_size, device=self.device)
        self.attempts.append((batch_size, peak))
        if peak is not None:
            self.memory_model.record(batch_size, peak)
        return peak is not None


def _measure_floor(steps: _ProbeSteps, min_batch_size: int) -> None:
    """Measure the peak at ``min_batch_size`` with the optimizer's state held, or raise."""
    state_bytes = _optimizer_state_bytes(steps.optimizer)
    fitted = steps.take(min_batch_size)
    if fitted and _optimizer_state_bytes(steps.optimizer) > state_bytes:
        # The step created the optimizer's state after its peak; measure the floor again
        # with the state held, as every later step holds it (the larger peak is kept).
        fitted = steps.take(min_batch_size)
    if not fitted:
        raise BatchSizeFloorError(
            f"a micro-batch of {min_batch_size} samples (min_batch_size) ran out of memory while probing "
            f"{steps.device!r}; the model does not fit at the floor: lower min_batch_size, shrink the model or "
            f"its inputs, or free memory on the device"
        )
    if not steps.memory_model.peaks:
        raise RuntimeError(
            f"{steps.device!r} measured no memory for a training step of {min_batch_size} samples; a FakeMemory "
            f"must be attached to the model (FakeMemory.attach), a CudaMemory must be the device the model is on"
        )


def _search_cap(steps: _ProbeSteps, available: int, margin: float, min_batch_size: int,
                max_batch_size: int | None, max_probe_steps: int) -> int:
    """Step at the sizes :func:`_next_probe_size` chooses until it settles, and return the cap."""
    upper = math.inf if max_batch_size is None else max_batch_size
    largest_fitted = min_batch_size
    smallest_failed: int | None = None
    failures_in_a_row = 0
    while True:
        target = _next_probe_size(steps.memory_model, available, margin, largest_fitted, smallest_failed,
                                  failures_in_a_row)
        target = int(min(target, upper))
        if target <= largest_fitted:
            return max(target, min_batch_size)
        if target <= largest_fitted * (1 + PROBE_TOLERANCE) or len(steps.attempts) >= max_probe_steps:
            return largest_fitted
        if steps.take(target):
            largest_fitted = target
            failures_in_a_row = 0
        else:
            smallest_failed = target
            failures_in_a_row += 1


def _probe_result(steps: _ProbeSteps, cap: int, available: int, margin: float) -> ProbeResult:
    fixed, per_sample = steps.memory_model.fit()  # type: ignore[misc]
    return ProbeResult(
        cap=cap,
        probe_steps=len(steps.attempts),
        out_of_memory_errors=sum(peak is None for _, peak in steps.attempts),
        fixed_bytes=fixed,
        per_sample_bytes=per_sample,
        peaks=dict(steps.memory_model.peaks),
        available_bytes=available,
        safety_margin=margin,
        attempts=steps.attempts,
    )


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


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer's state (moments, momentum buffers)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))


@contextlib.contextmanager
def _preserved_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Give back, when the block exits (also by an error), everything a probe step changes.

    That is the parameters and buffers (in place, so that the optimizer and the caller keep the
    same tensor objects), the modules' training flags, the optimizer state and the random number
    generators (torch, CUDA, Python, NumPy); the gradients are set to ``None``. The copies are
    kept on the CPU, so that they hold no device memory. Where CUDA is available, reading its
    generators initialises it.
    """
    tensors = {name: _to_cpu(tensor) for name, tensor in _named_tensors(model)}
    training = {name: module.training for name, module in model.named_modules()}
    optimizer_state = _to_cpu(optimizer.state_dict())
    torch_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    python_rng = random.getstate()
    numpy_rng = numpy.random.get_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for name, tensor in _named_tensors(model):
                tensor.copy_(tensors[name])
            for name, module in model.named_modules():
                module.training = training[name]
            optimizer.zero_grad(set_to_none=True)
            optimizer.load_state_dict(optimizer_state)
            torch.set_rng_state(torch_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            random.setstate(python_rng)
            numpy.random.set_state(numpy_rng)


def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    parameters = [("parameter:" + name, p) for name, p in model.named_parameters(remove_duplicate=False)]
    buffers = [("buffer:" + name, b) for name, b in model.named_buffers(remove_duplicate=False)]
    return parameters + buffers


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
