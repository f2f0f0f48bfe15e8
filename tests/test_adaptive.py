"""schedules.Adaptive: the controller that grows the batch with the measured noise scale.

The controller's rules (warmup, interval, hysteresis, monotone, growth per epoch, the target) are
tested by feeding :meth:`Adaptive.observe` directly. Through the scheduler, the measured statistics
are set with ``NoiseScale.load_state_dict`` and the loop computes no gradient, so nothing else moves
them: each test decides what the controller sees. The resume test measures real gradients.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from itertools import islice
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules
from adabatch.noise import NoiseScale
from adabatch.schedules import Progress
from adabatch.schedules.adaptive import DEFAULT_START, _least_time_and_samples
from adabatch.testing import FakeClock
from adabatch.throughput import StepTimes

#: Large enough that the growth cap per epoch never binds unless a test asks for it.
NO_GROWTH_CAP = 1000.0
#: The samples-only controller grows to ``EXTRA * critical + (1 + EXTRA) * start``.
EXTRA = 0.5


def adaptive(**options: Any) -> schedules.Adaptive:
    """A controller that decides at every step, without warmup, from the noise alone (no step
    times weighed), growing to ``grown(signal, start)``, unless told otherwise."""
    return schedules.Adaptive(**{"warmup": 0, "interval": 1, "growth_per_epoch": NO_GROWTH_CAP,
                                 "extra_samples": EXTRA, "throughput": False, **options})


def asking(size: float, start: float, extra: float = EXTRA) -> float:
    """The noise scale at which the samples-only controller grows from ``start`` to ``size``."""
    return (size - (1 + extra) * start) / extra


def grown(critical: float, start: float, extra: float = EXTRA) -> float:
    """The largest size that costs at most ``extra`` more samples than ``start``:
    ``(critical + B) / (critical + start) = 1 + extra`` (McCandlish et al. 2018)."""
    return (1 + extra) * (critical + start) - critical


def timed(sizes_and_seconds: dict[int, float]) -> StepTimes:
    """Step times that say each size's step takes the given seconds."""
    step_times = StepTimes(window=1)
    for size, seconds in sizes_and_seconds.items():
        step_times.load_state_dict({"table": step_times.state_dict()["table"] + [[size, seconds]]})
    return step_times


def observe(schedule: schedules.Adaptive, signals: list[float], dataset_size: int = 10**6,
            **options: Any) -> list[float]:
    """Feed one signal per step, training each step at the size the controller holds (rounded, as
    the constraints would); returns the size after each step."""
    samples, sizes = 0, []
    for measured, signal in enumerate(signals, start=1):
        current = max(1, round(schedule.batch_size_at(Progress(samples, dataset_size))))
        samples += current
        schedule.observe(Progress(samples, dataset_size), signal, measured, current, **options)
        sizes.append(schedule.batch_size_at(Progress(samples, dataset_size)))
    return sizes


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    "options, message",
    [
        ({"start": 0}, "start must be a positive integer, got 0"),
        ({"start": 8.0}, "start must be a positive integer, got 8.0"),
        ({"signal": "gns"}, "signal must be one of ('noise_scale', 'norm_test'), got 'gns'"),
        ({"theta": 0}, "theta must be a positive finite number, got 0"),
        ({"theta": math.inf}, "theta must be a positive finite number, got inf"),
        ({"confidence": -1}, "confidence must be a non-negative finite number, got -1"),
        ({"confidence": math.nan}, "confidence must be a non-negative finite number, got nan"),
        ({"extra_samples": 1}, "extra_samples must be in [0, 1), got 1"),
        ({"extra_samples": -0.1}, "extra_samples must be in [0, 1), got -0.1"),
        ({"throughput": 1}, "throughput must be True or False, got 1"),
        ({"growth_per_epoch": 0.5}, "growth_per_epoch must be at least 1, got 0.5"),
        ({"growth_per_epoch": -2}, "growth_per_epoch must be a positive finite number, got -2"),
        ({"hysteresis": 1}, "hysteresis must be in [0, 1), got 1"),
        ({"hysteresis": -0.1}, "hysteresis must be in [0, 1), got -0.1"),
        ({"hysteresis": True}, "hysteresis must be in [0, 1), got True"),
        ({"interval": 0}, "interval must be a positive integer, got 0"),
        ({"interval": 2.0}, "interval must be a positive integer, got 2.0"),
        ({"warmup": -1}, "warmup must be a non-negative integer, got -1"),
        ({"warmup": 2.5}, "warmup must be a non-negative integer, got 2.5"),
        ({"warmup": False}, "warmup must be a non-negative integer, got False"),
    ],
)
def test_arguments_are_validated(options, message):
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        schedules.Adaptive(**options)


# ------------------------------------------------------------------ the start
@pytest.mark.parametrize("dataset_size", [None, 50, 100_000, 5_000_000])
def test_the_default_start_is_a_small_batch_whatever_the_dataset(dataset_size):
    assert schedules.Adaptive().batch_size_at(Progress(0, dataset_size)) == DEFAULT_START == 16
    assert schedules.Adaptive(start=12).batch_size_at(Progress(0, dataset_size)) == 12
    if dataset_size is not None:
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = BatchSizeScheduler(optimizer, schedules.Adaptive(), lr_scaling="linear")
        AdaptiveBatchSampler(dataset_size, scheduler)
        assert scheduler.target_at(0) == min(16, dataset_size)
        assert scheduler.reference_batch_size == min(16, dataset_size) and scheduler.lr_factor == 1.0


def test_min_batch_size_raises_the_default_start():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, schedules.Adaptive(), min_batch_size=32)
    AdaptiveBatchSampler(1000, scheduler)
    with pytest.warns(UserWarning, match="asked for batch size 16, below min_batch_size=32 per replica; training at 32"):
        assert scheduler.target_at(0) == 32 and scheduler.reference_batch_size == 32


# ------------------------------------------------------------------ the target
@pytest.mark.parametrize(
    "signal, theta, extra, noise_scale, expected",
    [
        ("noise_scale", 0.9, 0.5, 200.0, grown(200, 16, 0.5)),
        ("noise_scale", 0.9, 0.1, 200.0, grown(200, 16, 0.1)),
        ("noise_scale", 0.9, 0.0, 4096.0, 16.0),
        ("norm_test", 0.5, 0.5, 200.0, grown(800, 16, 0.5)),
        ("norm_test", 0.9, 0.1, 81.0, grown(100, 16, 0.1)),
    ],
)
def test_without_step_times_the_batch_grows_as_far_as_the_samples_allow(signal, theta, extra, noise_scale, expected):
    schedule = adaptive(start=16, signal=signal, theta=theta, extra_samples=extra)
    assert observe(schedule, [noise_scale]) == [pytest.approx(expected, rel=1e-12)]
    critical = noise_scale / (1 if signal == "noise_scale" else theta**2)
    assert (critical + expected) / (critical + 16) == pytest.approx(1 + extra), "costs exactly the extra samples"


def least_time_and_samples(fixed_per_sample: float, critical: float) -> float:
    """The size minimising ``(B + B_crit)² (a + b·B) / B`` (time times samples to a loss, up to
    constants), ``r = a / b``: the positive root of ``2B² + r·B - r·B_crit = 0``."""
    r = fixed_per_sample
    return (-r + math.sqrt(r * r + 8 * r * critical)) / 4


@pytest.mark.parametrize(
    "times, noise_scale, expected",
    [
        # t(B) = 1 ms + B/64 ms: the fixed cost is 64 samples' worth.
        ({32: 1.5e-3, 256: 5e-3}, 400.0, least_time_and_samples(64, 400)),
        ({32: 1.5e-3, 256: 5e-3}, 10_000.0, 512.0),  # 550 by the rule, past twice the largest size timed
        # Time proportional to the batch: no fixed cost, a larger batch never pays.
        ({16: 1e-3, 32: 2e-3}, 10**6, 16.0),
        # Time flat in the batch: the samples decide, but never past twice the largest size timed.
        ({16: 1e-3, 32: 1e-3}, 10**6, 64.0),
        # One size timed: half its step is taken as fixed cost (a / b = 16), and growth stops at 2 × 16.
        ({16: 1e-3}, 100.0, least_time_and_samples(16, 100)),
        ({16: 1e-3}, 36.0, 16.0),  # the rule asks for 13: never below the start
        ({16: 1e-3}, 10**6, 32.0),
    ],
)
def test_with_step_times_the_batch_takes_the_size_of_least_time_and_samples(times, noise_scale, expected):
    schedule = adaptive(start=16, throughput=True, extra_samples=0.5)
    sizes = observe(schedule, [noise_scale], step_times=timed(times))
    assert sizes == [pytest.approx(max(16, min(expected, grown(noise_scale, 16, 0.5))), rel=1e-9)]


@pytest.mark.parametrize("fixed_per_sample", [0.5, 16.0, 64.0, 1e4])
@pytest.mark.parametrize("critical", [1.0, 32.0, 600.0, 1e5])
def test_the_size_of_least_time_and_samples_minimises_their_product_below_the_critical_size(fixed_per_sample,
                                                                                          critical):
    """McCandlish et al.: S ∝ 1 + B_crit/B steps of t(B) ∝ r + B seconds, E ∝ 1 + B/B_crit samples.
    The size asked for minimises the product, and stays below B_crit: a noise scale no larger
    than the batch (as under Adam, read relative to the start) asks for no growth."""
    def cost(size: float) -> float:
        return (1 + critical / size) * (fixed_per_sample + size) * (1 + size / critical)

    size = _least_time_and_samples(fixed_per_sample, critical)
    assert size == pytest.approx(least_time_and_samples(fixed_per_sample, critical), rel=1e-9)
    assert 0 < size < critical
    assert cost(size) <= min(cost(size * 0.99), cost(size * 1.01))
    assert _least_time_and_samples(math.inf, critical) == critical, "a step that costs nothing more per sample"
    assert _least_time_and_samples(0.0, critical) == 0.0, "no fixed cost: a larger step never pays"


def test_step_times_fit_a_line_through_the_sizes_timed():
    step_times = timed({16: 2e-3, 32: 3e-3, 64: 5e-3})
    fixed, per_sample = step_times.line()
    assert fixed == pytest.approx(1e-3) and per_sample == pytest.approx(1e-3 / 16)
    assert timed({16: 1e-3}).line() is None
    assert timed({16: 3e-3, 32: 2e-3}).line() == (pytest.approx(2.5e-3), 0.0), "a larger batch never takes less"


def test_a_growth_that_does_not_pay_is_left_again():
    """The controller grows to twice the size timed, and goes back once the larger step is timed
    and found to cost as much per sample."""
    schedule = adaptive(start=16, throughput=True)
    step_times = timed({16: 1e-3})
    assert observe(schedule, [10**6], step_times=step_times) == [32.0], "tried"
    step_times = timed({16: 1e-3, 32: 2e-3})
    assert observe(schedule, [10**6], step_times=step_times) == [16.0], "left: the time doubled with the batch"
    schedule = adaptive(start=16, throughput=True)
    observe(schedule, [10**6], step_times=timed({16: 1e-3}))
    assert observe(schedule, [10**6], step_times=timed({16: 1e-3, 32: 1.1e-3})) == [64.0], "kept, and grown again"
    assert observe(schedule, [10**6], step_times=timed({16: 1e-3, 32: 1.1e-3, 64: 10e-3})) == [32.0], \
        "a size that paid is kept when the next does not"


def test_under_adam_the_noise_scale_is_relative_to_the_first_decision():
    # The first decision takes the start as critical; the noise scale then rising 9-fold asks 9 × 16.
    schedule = adaptive(start=16)
    sizes = observe(schedule, [5.0, 5.0, 45.0], preconditioned=True)
    assert sizes[0] == pytest.approx(grown(16, 16)) and sizes[1] == pytest.approx(grown(16, 16))
    assert sizes[2] == pytest.approx(grown(9 * 16, 16))
    assert schedule.state_dict()["reference_noise"] == 5.0
    absolute = observe(adaptive(start=16), [5.0, 5.0, 45.0])
    assert absolute == [pytest.approx(grown(5, 16))] * 2 + [pytest.approx(grown(45, 16))]


def measured(pairs: list[tuple[float, float]]) -> NoiseScale:
    """Noise statistics fed the raw estimates ``(|G|², tr(Σ))`` of batches of 1 and 2 samples."""
    noise = NoiseScale()
    for grad_sqr, grad_var in pairs:
        assert noise.update(grad_sqr + grad_var, 1, grad_sqr + grad_var / 2, 2)
    return noise


@pytest.mark.parametrize("confidence", [1.0, 2.0])
def test_decisions_take_the_noise_scale_at_its_lower_bound(confidence):
    # |G|² = 1 ± 9 in each measurement: the smoothed ratio is far above what the measurements
    # resolve, and the decision follows the bound instead.
    noise = measured([(10.0, 200.0), (-8.0, 200.0)] * 30)
    bound = noise.lower_bound(confidence)
    assert bound < noise.noise_scale / 2.5
    schedule = adaptive(start=16, confidence=confidence)
    assert observe(schedule, [noise.noise_scale], noise=noise) == [pytest.approx(grown(bound, 16))]
    as_it_is = adaptive(start=16, confidence=0)
    assert observe(as_it_is, [noise.noise_scale], noise=noise) == [pytest.approx(grown(noise.noise_scale, 16))]


def test_an_unresolved_noise_scale_grows_the_batch_no_further_than_the_measurements_reach():
    # |G|² averages below zero: the smoothed ratio is infinite, the bound is finite.
    noise = measured([(2.0, 100.0), (-4.0, 100.0)] * 30)
    assert noise.noise_scale == math.inf
    sizes = observe(adaptive(start=16), [noise.noise_scale], noise=noise)
    assert sizes == [pytest.approx(grown(noise.lower_bound(), 16))] and sizes[0] < grown(1000, 16)
    assert observe(adaptive(start=16), [noise.noise_scale]) == [16.0], "without the statistics: no decision"
    # Before two measurements there is no standard error, so no bound and no decision.
    assert observe(adaptive(start=16), [200.0], noise=measured([(1.0, 200.0)])) == [16.0]


@pytest.mark.parametrize("signal", [math.nan, math.inf, 0.0, -5.0])
def test_a_signal_without_a_noise_scale_is_ignored(signal):
    schedule = adaptive(start=16)
    assert observe(schedule, [signal, signal]) == [16.0, 16.0]
    assert observe(schedule, [400.0]) == [pytest.approx(grown(400, 16))]


# ------------------------------------------------------------------ when decisions are taken
@pytest.mark.parametrize("warmup, interval, first_decision", [(0, 1, 1), (5, 1, 6), (5, 4, 8), (0, 3, 3), (8, 4, 12)])
def test_decisions_wait_for_warmup_and_come_every_interval(warmup, interval, first_decision):
    # The measured steps lag the steps by one, as in the plain loop, where the first step has no pair.
    schedule = schedules.Adaptive(start=8, warmup=warmup, interval=interval, growth_per_epoch=NO_GROWTH_CAP,
                                  throughput=False)
    samples, sizes = 0, []
    for step in range(1, 21):
        samples += 8
        schedule.observe(Progress(samples, 10**6), 200.0 * step, step - 1, 8)
        sizes.append(schedule.batch_size_at(Progress(samples, 10**6)))
    decided = [step for step, (before, after) in enumerate(zip([8.0] + sizes, sizes), start=1) if after != before]
    assert decided[0] == first_decision
    assert sizes[first_decision - 1] == pytest.approx(grown(200 * first_decision, 8, schedule.extra_samples))
    assert all((step - first_decision) % interval == 0 for step in decided)
    assert len(decided) == len(range(first_decision, 21, interval))  # the signal rises: every decision grows


@pytest.mark.parametrize("monotone, after_drop", [(True, grown(800, 8)), (False, grown(50, 8))])
def test_monotone_never_shrinks(monotone, after_drop):
    sizes = observe(adaptive(start=8, monotone=monotone), [800.0, 50.0, 50.0, 8.0])
    assert sizes[0] == pytest.approx(grown(800, 8))
    assert sizes[1] == pytest.approx(after_drop)
    assert sizes[-1] == pytest.approx(grown(800, 8) if monotone else grown(8, 8))


@pytest.mark.parametrize(
    "size, hysteresis, expected",
    [(103.0, 0.05, 100.0), (97.0, 0.05, 100.0), (106.0, 0.05, 106.0), (94.0, 0.05, 94.0), (103.0, 0.02, 103.0),
     (100.5, 0.0, 100.5)],
)
def test_hysteresis_ignores_small_moves(size, hysteresis, expected):
    # extra_samples 0.5 from a start of 8: a noise scale of 2·size - 24 asks for ``size``.
    schedule = adaptive(start=8, hysteresis=hysteresis, monotone=False)
    assert observe(schedule, [2 * 100.0 - 24.0]) == [pytest.approx(100.0)]
    assert observe(schedule, [2 * size - 24.0]) == [pytest.approx(expected)]


def test_growth_is_capped_per_epoch():
    # A signal asking for 10^6 from 8: doubled at the first decision of every epoch, never more.
    schedule = adaptive(start=8, growth_per_epoch=2.0)
    samples, largest = 0, {}
    while samples < 5 * 1000:
        current = round(schedule.batch_size_at(Progress(samples, 1000)))
        samples += current
        schedule.observe(Progress(samples, 1000), 1e12, 1, current)
        epoch = samples // 1000
        largest[epoch] = max(largest.get(epoch, 0), schedule.batch_size_at(Progress(samples, 1000)))
    assert largest == {0: 16, 1: 32, 2: 64, 3: 128, 4: 256, 5: 512}


@settings(max_examples=60, deadline=None)
@given(
    signals=st.lists(st.one_of(st.floats(0.01, 1e6), st.sampled_from([math.nan, math.inf, 0.0, -1.0])), max_size=120),
    start=st.integers(1, 64),
    interval=st.integers(1, 6),
    warmup=st.integers(0, 10),
    growth=st.floats(1.0, 4.0),
    hysteresis=st.floats(0.0, 0.5),
    extra=st.floats(0.0, 0.9),
    dataset_size=st.integers(20, 400),
)
def test_sizes_are_monotone_capped_per_epoch_and_change_only_at_intervals(
    signals, start, interval, warmup, growth, hysteresis, extra, dataset_size
):
    schedule = schedules.Adaptive(start=start, interval=interval, warmup=warmup, growth_per_epoch=growth,
                                  hysteresis=hysteresis, extra_samples=extra, throughput=False)
    samples, size = 0, float(start)
    epoch, epoch_base, epoch_entry = -1, None, None
    for step, signal in enumerate(signals, start=1):
        current = max(1, round(size))
        samples += current
        schedule.observe(Progress(samples, dataset_size), signal, step - 1, current)
        if samples // dataset_size != epoch:
            # The epoch's base is the larger of the size trained and the size decided (which a
            # prefetched batch may still lag behind).
            epoch, epoch_base, epoch_entry = samples // dataset_size, max(current, size), size
        new = schedule.batch_size_at(Progress(samples, dataset_size))
        if new != size:
            assert step % interval == 0 and step - 1 >= warmup, "a decision off an interval boundary"
            assert math.isfinite(signal) and signal > 0
        assert round(new) >= round(size), "the size shrank"
        assert new <= max(epoch_base * growth, epoch_entry) * (1 + 1e-12), "grew past the cap of the epoch"
        size = new


# ------------------------------------------------------------------ through the scheduler
def set_noise_scale(scheduler: BatchSizeScheduler, noise_scale: float, measured_steps: int = 2) -> None:
    """Make the scheduler's smoothed statistics say ``noise_scale`` after ``measured_steps`` steps
    (the scheduler is built with ``noise_decay=0.5``, so the arithmetic is exact). Loaded without
    the averaged squares, they have no spread: from two steps on, their lower bound is
    ``noise_scale`` itself."""
    correction = 1 - 0.5**measured_steps
    scheduler.noise_meter.noise.load_state_dict({
        "grad_sqr": {"biased": correction, "updates": measured_steps},
        "grad_var": {"biased": noise_scale * correction, "updates": measured_steps},
    })


def scheduler_on(dataset_size: int, schedule: schedules.Adaptive, **options: Any):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, schedule, noise_decay=0.5, **options)
    assert scheduler.noise_meter is not None, "an adaptive schedule measures the noise by default"
    sampler = AdaptiveBatchSampler(dataset_size, scheduler, shuffle=True, seed=0)
    return scheduler, sampler


def test_the_scheduler_hands_the_schedule_its_noise_statistics():
    seen = []

    class Recording(schedules.Adaptive):
        def observe(self, *args: Any, **kwargs: Any) -> None:
            seen.append(kwargs["noise"])
            super().observe(*args, **kwargs)

    scheduler, sampler = scheduler_on(200, Recording(start=8))
    for batch in islice(iter(sampler), 3):
        scheduler.step(len(batch))
    assert len(seen) == 3 and all(noise is scheduler.noise_meter.noise for noise in seen)


def test_a_confident_schedule_needs_noise_averages_with_a_spread():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="noise_decay=0 keeps no spread"):
        BatchSizeScheduler(optimizer, schedules.Adaptive(), noise_decay=0.0)
    BatchSizeScheduler(optimizer, schedules.Adaptive(confidence=0), noise_decay=0.0)


@pytest.mark.filterwarnings("error:scheduler.step\\(\\) was told")
def test_a_decision_reaches_only_the_batches_drawn_after_it():
    scheduler, sampler = scheduler_on(1000, adaptive(start=8))
    batches = iter(sampler)
    drawn = [next(batches) for _ in range(4)]  # as workers prefetch
    set_noise_scale(scheduler, asking(32, 8))
    scheduler.step(len(drawn[0]))  # no gradient: only the statistics set above are seen
    assert scheduler.schedule.batch_size_at(Progress(8, 1000)) == 32.0, "decided"
    drawn += [next(batches) for _ in range(2)]
    assert [len(batch) for batch in drawn] == [8, 8, 8, 8, 32, 32]
    for batch in drawn[1:]:
        assert scheduler.batch_size == len(batch), "the plan follows the batch as drawn"
        scheduler.step(len(batch))
    assert scheduler.samples_seen == sum(len(batch) for batch in drawn)
    assert sorted(sum(drawn, [])) == sorted(set(sum(drawn, []))), "no sample twice within the epoch"


@pytest.mark.filterwarnings("error:scheduler.step\\(\\) was told")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_prefetching_workers_keep_the_size_they_drew(num_workers):
    dataset = TensorDataset(torch.arange(1000))
    scheduler, sampler = scheduler_on(len(dataset), adaptive(start=8))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, prefetch_factor=2 if num_workers
                        else None)
    sizes = []
    for step, (index,) in enumerate(islice(loader, 20)):
        if step == 2:
            set_noise_scale(scheduler, asking(32, 8))
        sizes.append(len(index))
        scheduler.step(len(index))
    decided_after = 3
    kept = sizes.index(32) - decided_after
    assert sizes == [8] * (decided_after + kept) + [32] * (20 - decided_after - kept)
    if num_workers:
        assert 1 <= kept <= num_workers * 2 + 1, "what the workers had drawn, at most their prefetch depth"
    else:
        assert kept == 0


@pytest.mark.parametrize(
    "start, noise_scale, options, expected, warning",
    [
        (8, 1000.0, {"max_batch_size": 40}, 40, None),
        (8, asking(27, 8), {"multiple_of": 8}, 24, None),
        (8, asking(29, 8), {"multiple_of": 8}, 32, None),
        (8, 1000.0, {"max_batch_size": 100, "multiple_of": 8}, 96, None),
        (4, 10.0, {"min_batch_size": 16}, round(grown(10, 16)), "below min_batch_size=16"),  # the start asked for
        (8, 5000.0, {}, 1000, None),
    ],
)
def test_constraints_apply_to_the_adaptive_size(start, noise_scale, options, expected, warning):
    # Decisions stop at the largest size the constraints allow: reaching it is no surprise
    # to warn about, and the decision recorded is the size trained.
    context = pytest.warns(UserWarning, match=warning) if warning else warnings.catch_warnings()
    with context:
        if warning is None:
            warnings.simplefilter("error")
        scheduler, sampler = scheduler_on(1000, adaptive(start=start), **options)
        first = next(iter(sampler))
        set_noise_scale(scheduler, noise_scale)
        scheduler.step(len(first))
        assert scheduler.target_at(scheduler.position) == expected
        if noise_scale >= 1000:
            assert scheduler.schedule.state_dict()["size"] == expected


def test_decisions_stop_at_the_largest_size_allowed():
    schedule = adaptive(start=8)
    schedule.observe(Progress(8, 10**6), 500.0, 1, 8, largest=100.0)
    assert schedule.batch_size_at(Progress(8, 10**6)) == 100.0
    schedule.observe(Progress(108, 10**6), 500.0, 2, 100, largest=math.inf)
    assert schedule.batch_size_at(Progress(108, 10**6)) == grown(500, 8), \
        "the bound may rise (a memory cap learned higher)"


def test_state_dict_keys():
    scheduler, sampler = scheduler_on(1000, adaptive(start=8))
    set_noise_scale(scheduler, 200.0, measured_steps=3)
    scheduler.step(len(next(iter(sampler))))
    state = scheduler.state_dict()
    assert state["schedule"] == scheduler.schedule.state_dict()
    assert state["schedule"] == {"size": grown(200, 8), "epoch": 0, "epoch_base": 8.0, "steps": 1, "base": 8.0,
                                 "kept": grown(200, 8), "reference_noise": None}
    assert state["noise"] == scheduler.noise_meter.noise.state_dict()
    fresh, _ = scheduler_on(1000, adaptive(start=8))
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.schedule.state_dict() == scheduler.schedule.state_dict()
    assert fresh.batch_size == scheduler.batch_size == round(grown(200, 8))


@pytest.mark.parametrize("lr_scaling, factor", [("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling_is_relative_to_the_adaptive_start(lr_scaling, factor):
    scheduler, sampler = scheduler_on(1000, adaptive(start=8), lr_scaling=lr_scaling)
    assert scheduler.reference_batch_size == 8 and scheduler.lr_factor == 1.0
    set_noise_scale(scheduler, asking(32, 8))
    scheduler.step(len(next(iter(sampler))))
    assert scheduler.batch_size == 32
    assert scheduler.reference_batch_size == 8
    assert scheduler.lr_factor == factor


def test_the_reference_is_the_start_before_and_after_a_sampler_binds():
    """The start does not depend on the dataset, so neither does the learning rate's reference;
    the constraints learned at binding (here a dataset smaller than the start) still apply."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, schedules.Adaptive(), lr_scaling="linear")
    assert scheduler.reference_batch_size == 16 and scheduler.lr_factor == 1.0
    AdaptiveBatchSampler(range(200_000), scheduler)
    assert scheduler.reference_batch_size == 16 and scheduler.lr_factor == 1.0
    small = BatchSizeScheduler(optimizer, schedules.Adaptive(), lr_scaling="linear")
    AdaptiveBatchSampler(range(10), small)
    assert small.reference_batch_size == 10 and small.lr_factor == 1.0


@pytest.mark.filterwarnings("error:scheduler.step\\(\\) was told")
def test_monotone_holds_while_prefetched_batches_are_trained():
    scheduler, sampler = scheduler_on(1000, adaptive(start=8))
    batches = iter(sampler)
    drawn = [next(batches) for _ in range(5)]  # two workers, prefetch_factor 2, and the batch being trained
    decided = []
    for batch, noise_scale in zip(drawn, [800.0, 50.0, 50.0]):
        set_noise_scale(scheduler, noise_scale)
        scheduler.step(len(batch))
        decided.append(scheduler.schedule.batch_size_at(Progress(scheduler.position, 1000)))
    assert decided[0] == pytest.approx(grown(800, 8))
    assert decided == sorted(decided), f"the decided size shrank: {decided}"


# ------------------------------------------------------------------ resume
RESUME_DATASET_SIZE = 192
RESUME_EPOCHS = 3
RESUME_DATASET = TensorDataset(
    torch.arange(RESUME_DATASET_SIZE),
    torch.randn(RESUME_DATASET_SIZE, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
    torch.randn(RESUME_DATASET_SIZE, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
)


class Training(NamedTuple):
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: BatchSizeScheduler
    sampler: AdaptiveBatchSampler
    loader: DataLoader


def build(num_workers: int = 2) -> Training:
    """Every object of the run, built from nothing, as a resumed process builds them."""
    model = nn.Linear(4, 1, dtype=torch.float64)
    with torch.no_grad():
        for parameter in model.parameters():
            nn.init.normal_(parameter, generator=torch.Generator().manual_seed(2))
    # A small learning rate keeps the noise scale (hence growth) above the start of 4.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    schedule = schedules.Adaptive(start=4, warmup=4, interval=3, growth_per_epoch=2.0, extra_samples=0.5)
    # A constant learning rate: this run is about growth and resuming, and grows further without the gain.
    scheduler = BatchSizeScheduler(optimizer, schedule, noise_interval=1, min_batch_size=2, max_batch_size=64, lr_scaling="none")
    # Step times on a simulated clock (a step of b samples: 5 ms + b × 0.1 ms), the same in every run.
    clock = FakeClock(fixed=5e-3, per_sample=1e-4)
    clock.attach(model)
    scheduler.step_times.clock = clock
    sampler = AdaptiveBatchSampler(RESUME_DATASET, scheduler, shuffle=True, seed=0)
    loader = DataLoader(RESUME_DATASET, batch_sampler=sampler, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    return Training(model, optimizer, scheduler, sampler, loader)


def checkpoint(training: Training, epoch: int) -> dict[str, Any]:
    return copy.deepcopy({"epoch": epoch, "model": training.model.state_dict(),
                          "optimizer": training.optimizer.state_dict(), "scheduler": training.scheduler.state_dict(),
                          "sampler": training.sampler.state_dict()})


def restore(training: Training, state: dict[str, Any]) -> None:
    state = copy.deepcopy(state)
    training.model.load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.scheduler.load_state_dict(state["scheduler"])
    training.sampler.load_state_dict(state["sampler"])


def train(training: Training, first_epoch: int, checkpoints: list | None = None) -> list[tuple[int, ...]]:
    """The loop, from ``first_epoch`` to the end; the indices of each step's batch."""
    records = []
    loss_fn = lambda batch: F.mse_loss(training.model(batch[1]), batch[2])  # noqa: E731
    for epoch in range(first_epoch, RESUME_EPOCHS):
        training.sampler.set_epoch(epoch)
        for batch in training.loader:
            training.scheduler.train_step(batch, loss_fn)
            records.append(tuple(batch[0].tolist()))
            if checkpoints is not None:
                checkpoints.append(checkpoint(training, epoch))
        if checkpoints is not None:
            checkpoints[-1] = checkpoint(training, epoch + 1)
    return records


@pytest.fixture(scope="module")
def uninterrupted():
    training = build()
    checkpoints = [checkpoint(training, 0)]
    records = train(training, 0, checkpoints)
    return records, checkpoints


def test_the_run_grows_the_batch_from_measured_noise(uninterrupted):
    records, checkpoints = uninterrupted
    sizes = [len(record) for record in records]
    assert sizes[0] == 4 and len(set(sizes)) >= 3 and max(sizes) >= 8, "it at least doubles"
    # Each growth is timed before the next: no size is more than twice the largest trained before it.
    assert all(size <= 2 * max(sizes[:k]) for k, size in enumerate(sizes) if k), sizes
    assert min(sizes) >= 2, "the floor holds (the balanced batches that end an epoch may be below the start)"
    # Every step is measured (noise_interval=1): a batch halves into the two batches of the pair,
    # except one too small to halve (below twice the floor of 2), which the plain loop's fallback
    # pairs with the step before; after a step that was halved it has no gradient kept to pair with.
    unpaired = sum(size < 4 <= before for before, size in zip(sizes, sizes[1:]))
    assert checkpoints[-1]["scheduler"]["noise"]["grad_sqr"]["updates"] == len(records) - unpaired


def test_resume_with_workers_gives_the_same_batches(uninterrupted):
    records, checkpoints = uninterrupted
    decisions = [state["scheduler"]["schedule"]["size"] for state in checkpoints]
    decided_at = [k for k in range(2, len(decisions)) if decisions[k] != decisions[k - 1]]
    assert len(decided_at) >= 3
    first_epoch_end = next(k for k in range(1, len(records)) if checkpoints[k]["epoch"] == 1)
    # Right after each decision, and two steps later, while batches drawn before it are still
    # prefetched: the checkpoint must hold both the decision and the sizes those batches were drawn with.
    stops = {1, first_epoch_end, len(records) - 1} | {k for d in decided_at for k in (d, d + 2) if k < len(records)}
    for stop in sorted(stops):
        state = checkpoints[stop]
        training = build()
        restore(training, state)
        assert train(training, state["epoch"]) == records[stop:], f"resumed after step {stop}"
        assert training.scheduler.schedule.state_dict() == checkpoints[-1]["scheduler"]["schedule"]


# ------------------------------------------------------------------ restoring a checkpoint
@pytest.mark.parametrize("key", ["size", "epoch", "epoch_base", "steps"])
def test_a_state_without_a_key_is_refused_by_name(key):
    adaptive = schedules.Adaptive(start=8)
    state = adaptive.state_dict()
    del state[key]
    with pytest.raises(ValueError, match=f"Adaptive state_dict is missing '{key}'; was it saved with another schedule"):
        adaptive.load_state_dict(state)


def test_the_state_of_a_timetable_is_refused():
    with pytest.raises(ValueError, match="Adaptive state_dict is missing 'size'"):
        schedules.Adaptive().load_state_dict(schedules.Constant(32).state_dict())


@pytest.mark.parametrize(
    "key, value, allowed",
    [("size", 0, "a positive finite number"), ("size", "64", "a positive finite number"),
     ("epoch", -2, "an integer of at least -1"), ("epoch", 1.5, "an integer of at least -1"),
     ("epoch_base", -1.0, "a non-negative finite number"), ("steps", -1, "a non-negative integer"),
     ("steps", None, "a non-negative integer")],
)
def test_a_state_with_a_bad_value_is_refused_by_name(key, value, allowed):
    adaptive = schedules.Adaptive(start=8)
    state = adaptive.state_dict() | {key: value}
    with pytest.raises(ValueError, match=re.escape(f"Adaptive state_dict['{key}'] must be {allowed}, got {value!r}")):
        adaptive.load_state_dict(state)


def test_a_restored_state_keeps_plain_numbers():
    adaptive = schedules.Adaptive(start=8)
    # A state saved before the controller weighed step times: its decision is taken as kept.
    adaptive.load_state_dict({"size": np.float64(40.0), "epoch": np.int64(3), "epoch_base": 32, "steps": np.int64(60)})
    assert adaptive.state_dict() == {"size": 40.0, "epoch": 3, "epoch_base": 32.0, "steps": 60, "base": 40.0,
                                     "kept": 40.0, "reference_noise": None}
    adaptive.load_state_dict(adaptive.state_dict() | {"base": np.int64(8), "reference_noise": np.float32(2.5)})
    assert [type(value) for value in adaptive.state_dict().values()] == [float, int, float, int, float, float, float]
