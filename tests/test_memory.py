"""The memory model and cap, the fake device, out-of-memory detection and the micro-batch split.

Peaks are ``fixed + per_sample * b`` bytes; the properties below say what the fit recovers from
such lines (exactly), from lines with one bad measurement (the slope), and from any measurements
at all (a line on or above each of them), and where the cap lands for a given memory.
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
import warnings
import weakref
from pathlib import Path
from typing import Callable

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adabatch import BatchSizeConstraints, BatchSizeScheduler, schedules
import adabatch.memory
import adabatch.testing
from adabatch.memory import (
    BatchSizeFloorError,
    MemoryCap,
    MemoryModel,
    catch_out_of_memory,
    default_memory_device,
    is_out_of_memory,
    measure_step,
)
from adabatch.testing import FakeMemory

ROOT = Path(__file__).resolve().parents[1]

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)

# Bounds that keep every product and difference below 2**53, so float arithmetic on them is exact.
FIXED = st.integers(0, 2**36)
PER_SAMPLE = st.integers(1, 2**20)
SIZE = st.integers(1, 4096)
MARGIN = st.floats(0, 0.5)


def fitted(fixed: int, per_sample: int, sizes: list[int]) -> MemoryModel:
    model = MemoryModel()
    for batch_size in sizes:
        model.record(batch_size, fixed + per_sample * batch_size)
    return model


# ------------------------------------------------------------------------------------ the fit
@PROPERTY_SETTINGS
@given(fixed=FIXED, per_sample=PER_SAMPLE, sizes=st.lists(SIZE, min_size=2, max_size=8, unique=True))
def test_exact_peaks_at_two_or_more_sizes_give_back_the_line(fixed, per_sample, sizes):
    assert fitted(fixed, per_sample, sizes).fit() == (fixed, per_sample)


@PROPERTY_SETTINGS
@given(
    fixed=FIXED,
    per_sample=PER_SAMPLE,
    sizes=st.lists(SIZE, min_size=5, max_size=9, unique=True),
    outlier=st.integers(0, 8),
    factor=st.sampled_from([0.1, 0.5, 0.9, 1.1, 2.0, 100.0]),
)
def test_one_outlier_leaves_the_slope_where_it_was(fixed, per_sample, sizes, outlier, factor):
    """With five or more sizes, fewer than half of the pairwise slopes touch the outlier, so
    their median is still the true per-sample cost; the intercept absorbs the outlier only if
    it lies above the line, keeping the fit conservative."""
    model = fitted(fixed, per_sample, sizes)
    odd_size = sizes[outlier % len(sizes)]
    odd_peak = max(1, round((fixed + per_sample * odd_size) * factor))
    model.peaks[odd_size] = odd_peak  # replace, not record: record() keeps the larger peak
    fitted_fixed, fitted_slope = model.fit()
    assert fitted_slope == pytest.approx(per_sample, rel=1e-12)
    assert fitted_fixed == pytest.approx(max(fixed, odd_peak - per_sample * odd_size), rel=1e-9, abs=1e-3)


@PROPERTY_SETTINGS
@given(measurements=st.dictionaries(SIZE, st.integers(1, 2**40), min_size=1, max_size=8))
def test_the_fitted_line_lies_on_or_above_every_measurement(measurements):
    model = MemoryModel()
    for batch_size, peak in measurements.items():
        model.record(batch_size, peak)
    fixed, per_sample = model.fit()
    assert per_sample > 0
    for batch_size, peak in measurements.items():
        rounding = 1e-12 * (abs(fixed) + per_sample * batch_size)
        assert fixed + per_sample * batch_size >= peak - rounding


@PROPERTY_SETTINGS
@given(fixed=FIXED, per_sample=PER_SAMPLE, batch_size=SIZE, room=st.integers(0, 2**36), margin=MARGIN)
def test_one_size_fits_a_line_through_the_origin_and_a_cap_below_the_true_max(
    fixed, per_sample, batch_size, room, margin
):
    peak = fixed + per_sample * batch_size
    capacity = peak + room  # the measured size fitted, so it was at most the true max
    model = fitted(fixed, per_sample, [batch_size])
    assert model.fit() == (0.0, peak / batch_size)
    assert model.cap(capacity, margin) <= (capacity - fixed) // per_sample


@PROPERTY_SETTINGS
@given(
    fixed=FIXED,
    per_sample=PER_SAMPLE,
    sizes=st.lists(SIZE, min_size=2, max_size=6, unique=True),
    room=st.integers(0, 2**36),
    margin=MARGIN,
)
def test_the_cap_keeps_the_margin_of_the_room_above_the_fixed_cost(fixed, per_sample, sizes, room, margin):
    capacity = fixed + per_sample * max(sizes) + room
    true_max = (capacity - fixed) // per_sample
    model = fitted(fixed, per_sample, sizes)
    cap = model.cap(capacity, margin)
    assert cap == max(0, math.floor((1 - margin) * (capacity - fixed) / per_sample))
    assert cap <= true_max
    assert model.cap(capacity, 0.0) == true_max
    # The largest size whose peak leaves the margin free: one sample more would eat into it.
    allowed = fixed + (1 - margin) * (capacity - fixed)
    assert fixed + per_sample * cap <= allowed * (1 + 1e-12)
    assert fixed + per_sample * (cap + 1) > allowed * (1 - 1e-12)


@pytest.mark.parametrize(
    "capacity, expected",
    [(150, 0), (200, 0), (209, 0), (210, 0), (212, 1), (1000, 72)],
    ids=["below the fixed cost", "at the fixed cost", "under one sample", "one sample, no margin left",
         "one sample", "plenty"],
)
def test_cap_at_the_edges_of_the_room(capacity, expected):
    model = fitted(200, 10, [4, 8])
    assert model.cap(capacity, 0.1) == expected


def test_no_measurement_means_no_fit_and_no_cap():
    model = MemoryModel()
    model.record(0, 100)  # an empty micro-batch says nothing about the line
    model.record(8, 0)  # nor does a peak that a device without counters reports as 0
    assert model.fit() is None
    assert model.cap(10**9) is None


@pytest.mark.parametrize("margin", [-0.1, 1.0, 1.5, float("nan"), True, "0.1"])
def test_safety_margin_must_be_a_fraction(margin):
    message = re.escape(f"safety_margin must be a fraction in [0, 1), got {margin!r}")
    with pytest.raises(ValueError, match=message):
        fitted(0, 1, [1, 2]).cap(100, margin)
    with pytest.raises(ValueError, match=message):
        MemoryCap(None, margin)
    with pytest.raises(ValueError, match=message):
        BatchSizeScheduler(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), schedules.Constant(4),
                           memory=None, safety_margin=margin)


@pytest.mark.parametrize("noise", [0, 7], ids=["exact", "noisy"])
def test_memory_model_state_dict_round_trip(noise):
    model = MemoryModel()
    for batch_size in (4, 8, 16, 33):
        model.record(batch_size, 1000 + 24 * batch_size + noise * (batch_size % 3))
    state = json.loads(json.dumps(model.state_dict()))  # keys become strings on the way
    restored = MemoryModel()
    restored.load_state_dict(state)
    assert restored.peaks == model.peaks
    assert restored.fit() == model.fit()
    assert restored.cap(5000, 0.2) == model.cap(5000, 0.2)


def test_memory_cap_state_dict_round_trip():
    fake = FakeMemory(capacity=1000, fixed=200, per_sample=16)
    cap = MemoryCap(fake)
    cap.add_measurements({8: fake.peak_for(8), 16: fake.peak_for(16)})
    cap.out_of_memory(40, min_batch_size=1)
    restored = MemoryCap(FakeMemory(capacity=1000, fixed=200, per_sample=16))
    restored.load_state_dict(json.loads(json.dumps(cap.state_dict())))
    assert (restored.learned, restored.ceiling, restored.cap) == (cap.learned, cap.ceiling, cap.cap) == (45, 32, 32)
    assert restored.fit() == cap.fit() == (200, 16)


# ------------------------------------------------------------------------------- the memory cap
@pytest.mark.parametrize(
    "failed, min_batch_size, ceiling",
    [(100, 1, 80), (10, 1, 8), (4, 1, 3), (2, 1, 1), (20, 16, 16), (17, 16, 16)],
)
def test_out_of_memory_lowers_the_ceiling_below_the_size_that_failed(failed, min_batch_size, ceiling):
    cap = MemoryCap(None)
    assert cap.out_of_memory(failed, min_batch_size) == cap.ceiling == ceiling


def test_the_ceiling_never_rises_and_bounds_the_learned_cap():
    fake = FakeMemory(capacity=1000, fixed=200, per_sample=16)
    cap = MemoryCap(fake)
    assert cap.out_of_memory(30, min_batch_size=1) == 24
    assert cap.out_of_memory(60, min_batch_size=1) == 24  # an older, larger failure changes nothing
    assert cap.add_measurements({4: fake.peak_for(4), 8: fake.peak_for(8)}) == 24  # learned 45
    assert cap.learned == 45


def test_out_of_memory_at_the_floor_names_the_size_the_floor_and_the_cap():
    cap = MemoryCap(None)
    cap.out_of_memory(30, min_batch_size=16)
    message = ("a micro-batch of 16 samples (min_batch_size=16) ran out of memory, with the memory cap at 24; "
               "the model does not fit at the BatchNorm floor")
    with pytest.raises(BatchSizeFloorError, match=re.escape(message)):
        cap.out_of_memory(16, min_batch_size=16)


def test_steps_are_measured_on_the_device():
    fake = FakeMemory(capacity=1000, fixed=200, per_sample=16)
    cap = MemoryCap(fake, safety_margin=0.1)
    cap.begin_step()
    fake.allocate(8)
    fake.allocate(4)  # the smaller micro-batch of a ragged split does not lower the peak
    assert cap.end_step(8) == math.floor(0.9 * 1000 * 8 / 328)  # one size: through the origin
    assert fake.peak_bytes() == 0  # end_step starts the next measurement
    cap.begin_step()
    fake.allocate(16)
    assert cap.end_step(16) == 45 and cap.last_peak_bytes == 456


def test_without_a_device_nothing_is_learned():
    cap = MemoryCap(None)
    assert cap.end_step(64) is None
    assert cap.add_measurements({8: 100, 16: 200}) is None
    assert cap.model.peaks == {8: 100, 16: 200}


@pytest.mark.parametrize("device, name", [("cuda", "str"), (0, "int"), (nn.Linear(1, 1), "Linear")])
def test_memory_cap_wants_a_memory_device(device, name):
    with pytest.raises(TypeError, match=re.escape(f"memory must be a MemoryDevice, 'auto' or None, got {name}")):
        MemoryCap(device)


# ---------------------------------------------------------------------------------- fake device
def test_fake_device_runs_out_of_memory_like_cuda():
    fake = FakeMemory(capacity=1000, fixed=200, per_sample=16)
    assert fake.true_max_batch_size == 50
    fake.allocate(50)
    assert fake.peak_bytes() == 1000 == fake.available_bytes()
    message = "out of memory: a micro-batch of 51 needs 1016 bytes, the fake device holds 1000"
    with pytest.raises(torch.OutOfMemoryError, match=message) as raised:
        fake.allocate(51)
    assert is_out_of_memory(raised.value)
    assert (fake.steps, fake.out_of_memory_errors, fake.peak_bytes()) == (2, 1, 1000)
    fake.reset_peak()
    assert fake.peak_bytes() == 0


def test_attached_fake_device_sees_every_forward_pass():
    fake = FakeMemory(capacity=1000, fixed=200, per_sample=16)
    model = nn.Linear(3, 1)
    handle = fake.attach(model)
    model(torch.zeros(7, 3))
    assert fake.peak_bytes() == fake.peak_for(7)
    with pytest.raises(torch.OutOfMemoryError):
        model(torch.zeros(51, 3))
    handle.remove()
    model(torch.zeros(51, 3))
    assert fake.steps == 2


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(capacity=0), "capacity must be a positive integer, got 0"),
        (dict(capacity=True), "capacity must be a positive integer, got True"),
        (dict(fixed=-1), "fixed must be a non-negative integer, got -1"),
        (dict(per_sample=1.5), "per_sample must be a positive integer, got 1.5"),
        (dict(per_sample=0), "per_sample must be a positive integer, got 0"),
    ],
    ids=str,
)
def test_fake_device_validates_its_arguments(arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FakeMemory(**{**dict(capacity=1000, fixed=0, per_sample=1), **arguments})


def test_fake_device_takes_numpy_integers_as_plain_ones():
    fake = FakeMemory(capacity=numpy.int64(1000), fixed=numpy.int32(0), per_sample=numpy.uint8(8))
    assert (fake.capacity, fake.fixed, fake.per_sample) == (1000, 0, 8)
    assert all(type(value) is int for value in (fake.capacity, fake.fixed, fake.per_sample))


def test_the_simulated_devices_are_the_same_classes_from_adabatch_memory():
    from adabatch.memory import CurvedFakeMemory, FakeMemory as FakeMemoryFromMemory

    assert FakeMemoryFromMemory is adabatch.testing.FakeMemory is adabatch.memory.FakeMemory
    assert CurvedFakeMemory is adabatch.testing.CurvedFakeMemory is adabatch.memory.CurvedFakeMemory
    for name in ("FakeMemory", "CurvedFakeMemory"):
        assert name in dir(adabatch.memory) and name in adabatch.memory.__all__


def test_adabatch_imports_no_simulated_device_and_the_testing_module_imports_on_its_own():
    code = ("import sys, adabatch, adabatch.memory; assert 'adabatch.testing' not in sys.modules; "
            "import adabatch.testing; from adabatch.memory import FakeMemory; "
            "assert FakeMemory is adabatch.testing.FakeMemory")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                               check=False, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr


# --------------------------------------------------------------------------- out-of-memory errors
@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        torch.cuda.OutOfMemoryError("anything at all"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.15 GiB total capacity)"),
        RuntimeError("HIP out of memory. Tried to allocate 20.00 MiB (GPU 0; 63.98 GiB total capacity)"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                     "you tried to allocate 85899345920 bytes. Error code 12 (Cannot allocate memory)"),
        RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB)"),
        RuntimeError("XPU out of memory. Tried to allocate 1.00 GiB"),
    ],
    ids=repr,
)
def test_out_of_memory_errors_of_every_backend_are_recognised(error):
    assert is_out_of_memory(error)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("out of memory"),
        KeyError("out of memory"),
        RuntimeError("Expected all tensors to be on the same device, but found at least two devices"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 2x1)"),
        RuntimeError("CUDA error: device-side assert triggered"),
        TypeError("unsupported operand type(s)"),
    ],
    ids=repr,
)
def test_other_errors_are_not_out_of_memory(error):
    assert not is_out_of_memory(error)


# --------------------------------------------------------------------- catching out-of-memory errors
@pytest.mark.parametrize(
    "make_error",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        lambda: RuntimeError("HIP out of memory. Tried to allocate 20.00 MiB (GPU 0; 63.98 GiB total capacity)"),
        lambda: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 85899345920 bytes"),
        lambda: MemoryError(),
    ],
    ids=["OutOfMemoryError", "HIP", "cuDNN", "CPU", "MemoryError"],
)
def test_catch_out_of_memory_suppresses_an_out_of_memory_error(make_error: Callable[[], BaseException]):
    with catch_out_of_memory() as out_of_memory:
        raise make_error()
    assert out_of_memory.caught


def test_catch_out_of_memory_catches_nothing_when_nothing_is_raised():
    with catch_out_of_memory() as out_of_memory:
        pass
    assert not out_of_memory.caught


@pytest.mark.parametrize(
    "error",
    [
        ValueError("out of memory"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 2x1)"),
        RuntimeError("CUDA error: device-side assert triggered"),
        KeyboardInterrupt(),
    ],
    ids=repr,
)
def test_catch_out_of_memory_lets_other_errors_through(error: BaseException):
    claims: list[bool] = []
    with pytest.raises(type(error)):
        with catch_out_of_memory(propagate=lambda: claims.append(True) or True) as out_of_memory:
            raise error
    assert not out_of_memory.caught
    assert claims == []  # propagate is asked about out-of-memory errors only


@pytest.mark.parametrize("claimed", [True, False])
def test_propagate_decides_whether_an_out_of_memory_error_propagates(claimed: bool):
    claims: list[bool] = []

    def propagate() -> bool:
        claims.append(claimed)
        return claimed

    raised = False
    try:
        with catch_out_of_memory(propagate=propagate) as out_of_memory:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except torch.OutOfMemoryError:
        raised = True
    assert raised is claimed and out_of_memory.caught is not claimed
    assert claims == [claimed]


def _failing_attempt(held: list[weakref.ref[torch.Tensor]]) -> None:
    activations = torch.zeros(1_000)
    held.append(weakref.ref(activations))
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_catch_out_of_memory_keeps_nothing_of_the_failed_attempt_alive():
    held: list[weakref.ref[torch.Tensor]] = []
    with catch_out_of_memory() as out_of_memory:
        _failing_attempt(held)
    assert out_of_memory.caught
    assert held[0]() is None
    assert not any(isinstance(value, BaseException) for value in vars(out_of_memory).values())
    # The check has teeth: an error that is kept (here by pytest) keeps the attempt's tensors alive.
    with pytest.raises(torch.OutOfMemoryError) as kept:
        _failing_attempt(held)
    assert held[1]() is not None
    del kept


def test_measure_step_frees_the_failed_attempt_before_emptying_the_cache():
    held: list[weakref.ref[torch.Tensor]] = []
    freed_when_emptied: list[bool] = []

    class Memory(FakeMemory):
        def release_cached(self) -> None:
            freed_when_emptied.append(all(reference() is None for reference in held))

    model = nn.Linear(3, 1)
    memory = Memory(capacity=1000, fixed=200, per_sample=16)
    memory.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def make_batch(batch_size: int) -> torch.Tensor:
        batch = torch.zeros(batch_size, 3)
        held.append(weakref.ref(batch))
        return batch

    assert measure_step(optimizer, make_batch, lambda batch: model(batch).mean(), 51, device=memory) is None
    assert freed_when_emptied == [True]
    assert measure_step(optimizer, make_batch, lambda batch: model(batch).mean(), 50, device=memory) == 1000
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------ micro-batches
def constraints_with(memory_cap: int | None, min_batch_size: int = 1, accumulate: bool = False):
    result = BatchSizeConstraints(min_batch_size=min_batch_size, accumulate=accumulate)
    result.set_memory_cap(memory_cap)
    return result


@pytest.mark.parametrize(
    "batch_size, memory_cap, expected",
    [(37, None, [37]), (37, 37, [37]), (37, 36, [19, 18]), (37, 10, [10, 9, 9, 9]), (100, 30, [25] * 4),
     (5, 1, [1] * 5)],
    ids=str,
)
def test_micro_batch_sizes(batch_size, memory_cap, expected):
    assert constraints_with(memory_cap).micro_batch_sizes(batch_size) == expected


@PROPERTY_SETTINGS
@given(batch_size=st.integers(1, 400), memory_cap=st.integers(1, 150), min_batch_size=st.integers(1, 40))
def test_micro_batches_are_fewest_even_and_above_the_floor_when_possible(batch_size, memory_cap, min_batch_size):
    constraints = constraints_with(memory_cap, min_batch_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sizes = constraints.micro_batch_sizes(batch_size)
    assert sum(sizes) == batch_size
    assert max(sizes) - min(sizes) <= 1
    if batch_size <= memory_cap:
        assert sizes == [batch_size] and not caught
        return
    assert max(sizes) <= memory_cap
    assert len(sizes) == -(-batch_size // memory_cap)
    possible = any(count * min_batch_size <= batch_size <= count * memory_cap for count in range(1, batch_size + 1))
    if possible:
        assert min(sizes) >= min_batch_size and not caught
    else:
        assert [str(warning.message) for warning in caught] == [
            f"a batch of {batch_size} cannot be split into micro-batches of at most {memory_cap} (the memory cap) "
            f"and at least {min_batch_size} (min_batch_size); some micro-batches are below the floor "
            f"(this warning is shown once)"
        ]


def test_the_floor_warning_is_shown_once():
    constraints = constraints_with(10, min_batch_size=8)
    with pytest.warns(UserWarning, match=r"a batch of 12 cannot be split .* below the floor"):
        assert constraints.micro_batch_sizes(12) == [6, 6]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert constraints.micro_batch_sizes(13) == [7, 6]


def test_a_cap_of_zero_leaves_no_split():
    with pytest.raises(ValueError, match="memory_cap is 0: not even one sample fits"):
        constraints_with(0).micro_batch_sizes(3)


@pytest.mark.parametrize("memory_cap", [-1, 2.5, True, "8"])
def test_memory_cap_must_be_a_non_negative_integer(memory_cap):
    with pytest.raises(ValueError, match=re.escape(f"memory_cap must be a non-negative integer or None, "
                                                   f"got {memory_cap!r}")):
        constraints_with(memory_cap)


@pytest.mark.parametrize(
    "accumulate, multiple_of, expected",
    [(False, 1, 45), (False, 8, 40), (True, 1, 64), (True, 8, 64)],
)
def test_the_memory_cap_caps_the_batch_unless_it_accumulates(accumulate, multiple_of, expected):
    constraints = BatchSizeConstraints(multiple_of=multiple_of, accumulate=accumulate)
    constraints.set_memory_cap(45)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert constraints.apply(64) == expected
    warned = [str(warning.message) for warning in caught]
    if accumulate:
        assert warned == []
    else:
        assert warned == [f"the schedule asked for batch size 64, more than the memory holds; training at "
                          f"{expected} instead (memory cap 45 per replica) (this warning is shown once)"]


# ---------------------------------------------------------------------------------- the device
def test_auto_on_cpu_parameters_caps_nothing_and_says_so_once(caplog):
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.INFO, logger="adabatch"):
        scheduler = BatchSizeScheduler(optimizer, schedules.Constant(4), memory="auto")
    records = [record for record in caplog.records if record.name == "adabatch"]
    assert [record.levelno for record in records] == [logging.INFO]
    assert "not on a CUDA device" in records[0].getMessage()
    assert scheduler.memory.device is None
    batch = (torch.randn(4, 3), torch.randn(4, 1))
    for _ in range(3):
        scheduler.train_step(batch, lambda b: nn.functional.mse_loss(model(b[0]), b[1]))
    assert scheduler.memory.cap is None and scheduler.constraints.memory_cap is None
    assert scheduler.steps == 3


def test_no_memory_device_logs_nothing(caplog):
    optimizer = torch.optim.SGD(nn.Linear(3, 1).parameters(), lr=0.1)
    with caplog.at_level(logging.DEBUG, logger="adabatch"):
        scheduler = BatchSizeScheduler(optimizer, schedules.Constant(4), memory=None)
    assert scheduler.memory.device is None
    assert [record for record in caplog.records if record.name == "adabatch"] == []


def test_default_memory_device_of_cpu_parameters_is_none():
    assert default_memory_device(torch.optim.SGD(nn.Linear(3, 1).parameters(), lr=0.1)) is None


@pytest.mark.parametrize(
    "memory, error, message",
    [
        ("bogus", ValueError, "memory must be a MemoryDevice, 'auto' or None, got 'bogus'"),
        ("cuda", ValueError, "memory must be a MemoryDevice, 'auto' or None, got 'cuda'"),
        (1024, TypeError, "memory must be a MemoryDevice, 'auto' or None, got int"),
    ],
)
def test_memory_must_be_a_device_auto_or_none(memory, error, message):
    optimizer = torch.optim.SGD(nn.Linear(3, 1).parameters(), lr=0.1)
    with pytest.raises(error, match=re.escape(message)):
        BatchSizeScheduler(optimizer, schedules.Constant(4), memory=memory)
