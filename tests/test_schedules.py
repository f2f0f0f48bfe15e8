"""Schedules: the documented sizes in epoch and sample units, their docstring examples, and purity."""

from __future__ import annotations

import doctest
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adabatch import BatchSizeScheduler, schedules
from adabatch.schedules import Constant, Geometric, Lambda, Linear, Progress, Step, as_schedule
from adabatch.schedules import constant, geometric, lambda_schedule, linear, step

N = 1000  # samples per epoch in the examples below


def describe(value: object) -> str:
    """A test id that does not change between runs (a lambda's repr holds its address)."""
    text = repr(value)
    return type(value).__name__ if " at 0x" in text else text


def at_epoch(epoch: float) -> Progress:
    return Progress(samples=round(epoch * N), dataset_size=N)


@pytest.mark.parametrize(
    "schedule, progress, expected",
    [
        # Constant: the same size everywhere, with or without a dataset size.
        (Constant(128), Progress(samples=0), 128.0),
        (Constant(128), Progress(samples=10_000), 128.0),
        (Constant(128), at_epoch(37.5), 128.0),
        # Step in epochs: 32 until epoch 10, x5 at 10, x5 again at 15; a milestone takes effect on reaching it.
        (Step(start=32, factor=5, milestones=[10, 15]), at_epoch(0), 32.0),
        (Step(start=32, factor=5, milestones=[10, 15]), Progress(samples=9_999, dataset_size=N), 32.0),
        (Step(start=32, factor=5, milestones=[10, 15]), at_epoch(10), 160.0),
        (Step(start=32, factor=5, milestones=[10, 15]), Progress(samples=14_999, dataset_size=N), 160.0),
        (Step(start=32, factor=5, milestones=[10, 15]), at_epoch(15), 800.0),
        (Step(start=32, factor=5, milestones=[10, 15]), at_epoch(1_000), 800.0),
        (Step(start=32, factor=2, milestones=[0.5]), at_epoch(0.25), 32.0),
        (Step(start=32, factor=2, milestones=[0.5]), at_epoch(0.5), 64.0),
        (Step(start=32), at_epoch(50), 32.0),  # no milestones: a constant
        # Step in samples: no dataset size needed.
        (Step(start=32, factor=2, milestones=[100, 250], unit="sample"), Progress(samples=99), 32.0),
        (Step(start=32, factor=2, milestones=[100, 250], unit="sample"), Progress(samples=100), 64.0),
        (Step(start=32, factor=2, milestones=[100, 250], unit="sample"), Progress(samples=250), 128.0),
        (Step(start=32, factor=2, milestones=[100, 250], unit="sample"), Progress(samples=10**9), 128.0),
        # Linear in epochs: a ramp from start to end over length, then held.
        (Linear(start=32, end=512, length=10), at_epoch(0), 32.0),
        (Linear(start=32, end=512, length=10), at_epoch(5), 272.0),
        (Linear(start=32, end=512, length=10), at_epoch(2.5), 152.0),
        (Linear(start=32, end=512, length=10), at_epoch(10), 512.0),
        (Linear(start=32, end=512, length=10), at_epoch(20), 512.0),
        # Linear with a later begin: start is held until then.
        (Linear(start=32, end=512, length=10, begin=2), at_epoch(1), 32.0),
        (Linear(start=32, end=512, length=10, begin=2), at_epoch(2), 32.0),
        (Linear(start=32, end=512, length=10, begin=2), at_epoch(7), 272.0),
        (Linear(start=32, end=512, length=10, begin=2), at_epoch(12), 512.0),
        (Linear(start=64, end=64, length=3), at_epoch(1), 64.0),
        # Linear in samples: fractional sizes are left for the constraints to round.
        (Linear(start=10, end=110, length=100, unit="sample"), Progress(samples=50), 60.0),
        (Linear(start=10, end=13, length=10, unit="sample"), Progress(samples=5), 11.5),
        (Linear(start=10, end=110, length=100, unit="sample", begin=1_000), Progress(samples=1_025), 35.0),
        (Linear(start=10, end=110, length=100, unit="sample"), Progress(samples=10**9), 110.0),
        # Geometric in epochs: x factor every `every` epochs, up to end.
        (Geometric(start=32, factor=2, every=5, end=256), at_epoch(4.999), 32.0),
        (Geometric(start=32, factor=2, every=5, end=256), at_epoch(5), 64.0),
        (Geometric(start=32, factor=2, every=5, end=256), at_epoch(15), 256.0),
        (Geometric(start=32, factor=2, every=5, end=256), at_epoch(10_000), 256.0),
        (Geometric(start=32, factor=2, every=5, end=100), at_epoch(10), 100.0),  # end is not a power of the factor
        (Geometric(start=10), at_epoch(3), 80.0),  # defaults: factor 2 every epoch, no end
        (Geometric(start=10, factor=1.5), at_epoch(2), 22.5),
        # Geometric in samples.
        (Geometric(start=8, factor=3, every=100, unit="sample"), Progress(samples=99), 8.0),
        (Geometric(start=8, factor=3, every=100, unit="sample"), Progress(samples=100), 24.0),
        (Geometric(start=8, factor=3, every=100, unit="sample"), Progress(samples=250), 72.0),
        # Lambda and plain callables: whatever the function says, unrounded.
        (Lambda(lambda p: 64 if p.epoch < 3 else 256), at_epoch(2.9), 64),
        (Lambda(lambda p: 64 if p.epoch < 3 else 256), at_epoch(3), 256),
        (as_schedule(lambda p: 16 + p.samples / 10), Progress(samples=45), 20.5),
        (as_schedule(lambda p: 2 ** int(p.epoch)), at_epoch(4), 16),
    ],
    ids=describe,
)
def test_schedule_values(schedule, progress, expected):
    assert schedule(progress) == pytest.approx(expected)
    assert schedule.batch_size_at(progress) == schedule(progress)


@pytest.mark.parametrize("module", [constant, step, linear, geometric, lambda_schedule], ids=lambda m: m.__name__)
def test_docstring_examples_hold(module):
    results = doctest.testmod(module, verbose=False)
    assert results.attempted > 0
    assert results.failed == 0


def test_docstring_examples_by_value():
    assert Constant(128)(Progress(samples=10_000)) == 128.0
    assert Step(start=32, factor=5, milestones=[10, 15])(Progress(samples=12 * 1000, dataset_size=1000)) == 160.0
    assert Linear(start=32, end=512, length=10)(Progress(samples=5 * 1000, dataset_size=1000)) == 272.0
    geometric_schedule = Geometric(start=32, factor=2, every=5, end=256)
    assert [geometric_schedule(Progress(samples=e * 1000, dataset_size=1000)) for e in (0, 5, 10, 20)] == [
        32.0, 64.0, 128.0, 256.0]
    assert Lambda(lambda p: 64 if p.epoch < 3 else 256)(Progress(samples=4000, dataset_size=1000)) == 256


@pytest.mark.parametrize(
    "make",
    [
        lambda unit: Step(start=32, factor=2, milestones=[2, 500], unit=unit),
        lambda unit: Linear(start=32, end=64, length=4, unit=unit),
        lambda unit: Geometric(start=32, factor=2, every=2, unit=unit),
    ],
    ids=["Step", "Linear", "Geometric"],
)
def test_the_unit_decides_what_a_milestone_means(make):
    """The same number is a point 1000 times later in epochs than in samples (dataset of 1000)."""
    in_epochs, in_samples = make("epoch"), make("sample")
    early = Progress(samples=4, dataset_size=N)
    late = Progress(samples=4 * N, dataset_size=N)
    assert in_epochs(early) < in_samples(early)
    assert in_epochs(late) == in_samples(Progress(samples=4, dataset_size=N))


def test_sample_units_do_not_need_the_dataset_size():
    assert Step(start=8, milestones=[10], unit="sample")(Progress(samples=10)) == 16.0
    assert Linear(start=8, end=16, length=8, unit="sample")(Progress(samples=4)) == 12.0
    assert Geometric(start=8, every=10, unit="sample")(Progress(samples=25)) == 32.0


@pytest.mark.parametrize(
    "schedule",
    [
        Step(start=32, milestones=[1]),
        Linear(start=32, end=64, length=2),
        Geometric(start=32),
        Lambda(lambda p: 32 * (1 + p.epoch)),
    ],
    ids=describe,
)
def test_epoch_units_without_a_dataset_size_raise(schedule):
    with pytest.raises(ValueError, match="given in epochs, so it needs the dataset size: pass dataset_size="):
        schedule(Progress(samples=500))


def test_progress_epoch():
    assert Progress(samples=2500, dataset_size=1000).epoch == 2.5
    assert Progress(samples=2500, dataset_size=1000).in_unit("epoch") == 2.5
    assert Progress(samples=2500).in_unit("sample") == 2500.0
    # The very start of training is epoch 0 whatever the dataset, so a scheduler can report its
    # first size before a sampler has told it the dataset size.
    assert Progress(samples=0).epoch == 0.0
    with pytest.raises(ValueError, match="needs the dataset size"):
        Progress(samples=1).epoch


def test_as_schedule_keeps_schedules_and_wraps_callables():
    step_schedule = Step(start=4, milestones=[1])
    assert as_schedule(step_schedule) is step_schedule

    def doubling_every_epoch(progress: Progress) -> float:
        return 4 * 2 ** math.floor(progress.epoch)

    wrapped = as_schedule(doubling_every_epoch)
    assert isinstance(wrapped, Lambda)
    assert wrapped.fn is doubling_every_epoch
    assert [wrapped(at_epoch(e)) for e in (0, 1, 2.5)] == [4, 8, 16]


def test_a_plain_callable_drives_the_scheduler():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, lambda p: 10 + p.samples // 100, dataset_size=N)
    assert isinstance(scheduler.schedule, schedules.Lambda)
    assert scheduler.target_at(0) == 10
    assert scheduler.target_at(550) == 15


def test_geometric_without_end_is_capped_by_the_scheduler_in_a_long_run():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    # Doubling every 1000 samples: one epoch of a million-sample dataset passes ~1000 intervals.
    scheduler = BatchSizeScheduler(
        optimizer, Geometric(start=32, factor=2, every=1000, unit="sample"), max_batch_size=4096
    )
    with pytest.warns(UserWarning, match="above max_batch_size=4096; training at 4096 instead"):
        assert scheduler.target_at(2_000_000) == 4096


ALL_SCHEDULES = [
    Constant(96),
    Step(start=16, factor=3, milestones=[0.5, 2, 2.25]),
    Step(start=16, factor=1.5, milestones=[10, 700, 2_000], unit="sample"),
    Linear(start=8, end=1000, length=2.5, begin=0.5),
    Linear(start=8, end=1000, length=1_234, unit="sample"),
    Geometric(start=4, factor=1.7, every=0.3, end=900),
    Geometric(start=4, factor=2, every=250, unit="sample"),
    Lambda(lambda p: 8 + (p.samples % 97)),
    as_schedule(lambda p: 1 + p.epoch**2),
]


@settings(max_examples=25, deadline=None)
@given(samples=st.lists(st.integers(0, 4 * N), min_size=1, max_size=30), seed=st.integers(0, 2**32 - 1))
@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=describe)
def test_schedules_are_pure_functions_of_progress(schedule, samples, seed):
    """Same progress, same size, whatever was asked before and in which order."""
    forward = [schedule(Progress(samples=s, dataset_size=N)) for s in samples]
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    shuffled = {i: schedule(Progress(samples=samples[i], dataset_size=N)) for i in order}
    backward = [schedule(Progress(samples=s, dataset_size=N)) for s in reversed(samples)]
    assert [shuffled[i] for i in range(len(samples))] == forward
    assert backward[::-1] == forward


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(1, 512),
    factor=st.floats(1.01, 8),
    every=st.floats(0.01, 10),
    end_over_start=st.integers(1, 64),
    epoch=st.floats(0, 500),
)
def test_geometric_never_exceeds_end_and_never_shrinks(start, factor, every, end_over_start, epoch):
    schedule = Geometric(start=start, factor=factor, every=every, end=start * end_over_start)
    now = schedule(at_epoch(epoch))
    later = schedule(at_epoch(epoch + every))
    assert start <= now <= later <= start * end_over_start


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(1, 512),
    extra=st.integers(0, 4096),
    length=st.floats(0.01, 100),
    begin=st.floats(0, 100),
    epochs=st.lists(st.floats(0, 300), min_size=2, max_size=2),
)
def test_linear_stays_between_start_and_end_and_never_shrinks(start, extra, length, begin, epochs):
    schedule = Linear(start=start, end=start + extra, length=length, begin=begin)
    low, high = sorted(epochs)
    assert start <= schedule(at_epoch(low)) <= schedule(at_epoch(high)) <= start + extra


# ------------------------------------------------------------------ the interface's defaults
@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=describe)
def test_a_timetable_has_the_interface_a_scheduler_calls(schedule):
    """Every schedule answers what the scheduler asks, without probing for methods: a timetable
    needs no noise, ignores the signals, starts at its size at progress 0, and has no state."""
    epochs = (0, 1.5, 3)
    before = [schedule(at_epoch(e)) for e in epochs]
    assert schedule.needs_noise is False
    start = Progress(samples=0, dataset_size=N)
    assert schedule.initial_size(start) == schedule(start)
    assert schedule.observe(start, 123.0, 60, 32, largest=1024.0) is None
    assert schedule.observe(at_epoch(1.5), math.nan, 0, 32) is None
    assert schedule.state_dict() == {}
    assert schedule.load_state_dict({}) is None
    assert [schedule(at_epoch(e)) for e in epochs] == before


def test_the_default_state_dict_is_a_new_dict_each_time():
    schedule = Step(start=32, milestones=[1])
    state = schedule.state_dict()
    state["size"] = 64
    assert schedule.state_dict() == {}


def test_the_adaptive_schedule_overrides_the_defaults():
    adaptive = schedules.Adaptive(start=8)
    assert adaptive.needs_noise is True
    assert schedules.Schedule.needs_noise is False
    assert adaptive.state_dict() != {}
