"""The gradient noise scale: the two-batch estimators, their moving averages, and the meter that reads
them off real optimizers inside real training loops.

The measurement tests train a float64 linear least-squares model with the learning rate at zero, so
the parameters never move and the per-sample gradients over the whole dataset are known in closed
form: the true ``|G|²`` and ``tr(Σ)`` the scheduler should find.
"""

from __future__ import annotations

import copy
import json
import math
import re
from itertools import islice
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules
from adabatch.testing import FakeClock, FakeMemory
from adabatch.noise import BiasCorrectedEMA, GradientNoiseMeter, NoiseSampling, NoiseScale

DATASET_SIZE = 2048
FEATURES = 32
#: Distance of the fixed parameters from the least-squares solution: B_simple ≈ 37 at this point.
OFFSET = 0.5


def two_batch_estimates(grad_sqr_small: float, batch_small: int, grad_sqr_big: float, batch_big: int):
    """McCandlish et al. (2018), App. A.1, written out independently of the library."""
    grad_sqr = (batch_big * grad_sqr_big - batch_small * grad_sqr_small) / (batch_big - batch_small)
    grad_var = (grad_sqr_small - grad_sqr_big) / (1 / batch_small - 1 / batch_big)
    return grad_sqr, grad_var


# ------------------------------------------------------------------ least-squares model
def least_squares_data(seed: int = 0, size: int = DATASET_SIZE) -> tuple[TensorDataset, torch.Tensor]:
    """``(index, x, y)`` samples with ``y = x·w* + noise``; returns the dataset and ``w*``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, FEATURES, generator=generator, dtype=torch.float64)
    solution = torch.randn(FEATURES, 1, generator=generator, dtype=torch.float64)
    y = x @ solution + torch.randn(size, 1, generator=generator, dtype=torch.float64)
    return TensorDataset(torch.arange(size), x, y), solution


def least_squares_model(solution: torch.Tensor) -> nn.Linear:
    model = nn.Linear(FEATURES, 1, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(solution.T + OFFSET)
        model.bias.zero_()
    return model


def mean_squared_error(model: nn.Module) -> Callable:
    return lambda batch: F.mse_loss(model(batch[1]), batch[2])


def per_sample_gradients(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Closed form gradients of ``(x·w + b − y)²`` with respect to ``(w, b)``, one row per sample."""
    with torch.no_grad():
        residual = model(x) - y
        return torch.cat([2 * residual * x, 2 * residual], dim=1)


def true_noise(model: nn.Linear, dataset: TensorDataset) -> tuple[float, float]:
    """``(|G|², tr(Σ))`` over the whole dataset. ``tr(Σ)`` uses ``1/(N − 1)``: batches are drawn
    without replacement, and that is the variance the two-batch estimator is unbiased for."""
    _, x, y = dataset.tensors
    gradients = per_sample_gradients(model, x, y)
    mean = gradients.mean(0)
    return float(mean.pow(2).sum()), float((gradients - mean).pow(2).sum() / (len(gradients) - 1))


def parameters_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------ NoiseScale
@pytest.mark.parametrize(
    "grad_sqr_small, batch_small, grad_sqr_big, batch_big",
    [(2.0, 32, 1.1, 256), (5.0, 1, 3.0, 2), (0.7, 17, 0.9, 50), (1e-6, 64, 4e-7, 4096)],
)
def test_one_update_gives_the_two_batch_estimates(grad_sqr_small, batch_small, grad_sqr_big, batch_big):
    noise = NoiseScale()
    assert noise.update(grad_sqr_small, batch_small, grad_sqr_big, batch_big) is True
    grad_sqr, grad_var = two_batch_estimates(grad_sqr_small, batch_small, grad_sqr_big, batch_big)
    assert noise.last_grad_sqr == pytest.approx(grad_sqr, rel=1e-12)
    assert noise.last_grad_var == pytest.approx(grad_var, rel=1e-12)
    # The bias-corrected average of one value is that value.
    assert noise.grad_sqr == pytest.approx(grad_sqr, rel=1e-12)
    assert noise.grad_var == pytest.approx(grad_var, rel=1e-12)
    expected = math.inf if grad_sqr <= 0 else max(grad_var, 0.0) / grad_sqr
    assert noise.noise_scale == pytest.approx(expected, rel=1e-12)
    assert noise.steps == 1


def test_the_docstring_example():
    noise = NoiseScale()
    assert noise.update(grad_sqr_small=2.0, batch_small=32, grad_sqr_big=1.1, batch_big=256)
    assert round(noise.noise_scale, 1) == 33.9


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.95])
def test_bias_corrected_ema_follows_its_recurrence(decay):
    values = [3.0, -1.0, 10.0, 0.5, 2.0]
    ema = BiasCorrectedEMA(decay)
    assert math.isnan(ema.value)
    biased = 0.0
    for count, value in enumerate(values, start=1):
        ema.update(value)
        biased = decay * biased + (1 - decay) * value
        assert ema.value == pytest.approx(biased / (1 - decay**count), rel=1e-12)
        # The same thing as a weighted mean, weights decay^age: unbiased from the first update.
        weights = [decay ** (count - 1 - k) for k in range(count)]
        weighted = sum(w * v for w, v in zip(weights, values)) / sum(weights)
        assert ema.value == pytest.approx(weighted, rel=1e-12)


def test_the_first_smoothed_estimates_equal_the_first_raw_ones():
    noise = NoiseScale(decay=0.99)
    noise.update(3.0, 8, 1.0, 64)
    assert (noise.grad_sqr, noise.grad_var) == pytest.approx((noise.last_grad_sqr, noise.last_grad_var), rel=1e-12)
    first = (noise.last_grad_sqr, noise.last_grad_var)
    noise.update(2.0, 8, 1.5, 64)
    second = (noise.last_grad_sqr, noise.last_grad_var)
    for smoothed, a, b in zip((noise.grad_sqr, noise.grad_var), first, second):
        assert smoothed == pytest.approx((0.99 * a + b) / 1.99, rel=1e-12)


@pytest.mark.parametrize(
    "grad_sqr_small, batch_small, grad_sqr_big, batch_big",
    [
        (math.inf, 8, 1.0, 64),
        (1.0, 8, math.inf, 64),
        (math.nan, 8, 1.0, 64),
        (1.0, 8, -math.inf, 64),
        (1.0, 64, 1.0, 64),
        (1.0, 65, 1.0, 64),
        (1.0, 0, 1.0, 64),
        (1.0, -8, 1.0, 64),
    ],
)
def test_a_step_without_a_usable_pair_is_not_counted(grad_sqr_small, batch_small, grad_sqr_big, batch_big):
    noise = NoiseScale()
    noise.update(2.0, 8, 1.0, 64)
    before = noise.state_dict(), noise.last_grad_sqr, noise.last_grad_var
    assert noise.update(grad_sqr_small, batch_small, grad_sqr_big, batch_big) is False
    assert (noise.state_dict(), noise.last_grad_sqr, noise.last_grad_var) == before
    assert noise.steps == 1


@pytest.mark.parametrize(
    "grad_sqr_small, grad_sqr_big, noise_scale",
    [
        (2.0, 0.5, math.inf),  # |G|² estimate (16·0.5 − 8·2)/8 = −1: the gradient is all noise
        (2.0, 1.0, math.inf),  # |G|² estimate exactly 0
        (1.0, 2.0, 0.0),  # tr(Σ) estimate (1 − 2)·16 < 0: clipped to no noise
        (2.0, 1.25, 24.0),  # |G|² = (20 − 16)/8 = 0.5, tr(Σ) = 0.75·16 = 12
    ],
)
def test_noise_scale_without_signal_is_inf_and_never_negative(grad_sqr_small, grad_sqr_big, noise_scale):
    noise = NoiseScale()
    assert math.isnan(noise.noise_scale) and math.isnan(noise.grad_sqr) and math.isnan(noise.grad_var)
    assert noise.steps == 0
    noise.update(grad_sqr_small, 8, grad_sqr_big, 16)
    assert noise.noise_scale == pytest.approx(noise_scale, rel=1e-12)


def test_noise_scale_state_dict_round_trip():
    noise = NoiseScale(decay=0.9)
    steps = [(2.0, 8, 1.0, 64), (1.5, 8, 1.2, 64), (4.0, 16, 0.5, 32)]
    for step in steps:
        noise.update(*step)
    restored = NoiseScale(decay=0.9)
    restored.load_state_dict(json.loads(json.dumps(noise.state_dict())))  # as if read from a file
    assert restored.state_dict() == noise.state_dict()
    for name in ("steps", "grad_sqr", "grad_var", "noise_scale"):
        assert getattr(restored, name) == getattr(noise, name), name
    for twin in (noise, restored):
        twin.update(3.0, 4, 2.0, 40)
    assert restored.noise_scale == noise.noise_scale


def raw_estimates(noise: NoiseScale, pairs: list[tuple[float, float]]) -> None:
    """Feed raw estimates ``(|G|², tr(Σ))`` as the norms of batches of 1 and 2 samples give them."""
    for grad_sqr, grad_var in pairs:
        # |G_1|² = |G|² + tr(Σ), |G_2|² = |G|² + tr(Σ)/2: the two-batch estimates return the pair.
        assert noise.update(grad_sqr + grad_var, 1, grad_sqr + grad_var / 2, 2)


@pytest.mark.parametrize("decay, updates", [(0.95, 200), (0.95, 10), (0.5, 6), (0.9, 2)])
def test_the_standard_errors_are_the_spread_of_the_averages(decay, updates):
    # Many runs of independent raw estimates: the spread of their averages over the runs is what
    # the standard errors estimate, from one run each, whatever the decay and the measurements.
    rng = np.random.default_rng(0)
    averages, errors = [], []
    for pairs in rng.normal([2.0, 100.0], [3.0, 40.0], size=(4000, updates, 2)):
        noise = NoiseScale(decay)
        raw_estimates(noise, pairs.tolist())
        averages.append((noise.grad_sqr, noise.grad_var))
        errors.append(noise.standard_errors)
    spread = np.std(np.array(averages), axis=0)
    typical_error = np.sqrt(np.mean(np.square(errors), axis=0))
    assert typical_error == pytest.approx(spread, rel=0.1)


def test_the_standard_errors_need_two_measurements_and_grow_with_the_spread():
    noise = NoiseScale()
    raw_estimates(noise, [(1.0, 50.0)])
    assert all(math.isnan(error) for error in noise.standard_errors), "one measurement shows no spread"
    raw_estimates(noise, [(1.0, 50.0)] * 5)
    assert noise.standard_errors == pytest.approx((0.0, 0.0), abs=1e-5), "the same estimates: no spread"
    raw_estimates(noise, [(3.0, 10.0), (-1.0, 90.0)] * 20)
    narrow = noise.standard_errors
    raw_estimates(noise, [(6.0, -30.0), (-4.0, 130.0)] * 20)
    wide = noise.standard_errors
    assert 0 < narrow[0] < wide[0] and 0 < narrow[1] < wide[1]
    assert noise.scalars()["noise/grad_sqr_error"] == wide[0] and noise.scalars()["noise/grad_var_error"] == wide[1]


def test_a_state_saved_without_the_squares_loads_as_a_history_without_spread():
    noise = NoiseScale(decay=0.9)
    raw_estimates(noise, [(3.0, 10.0), (-1.0, 90.0), (2.0, 40.0)])
    restored = NoiseScale(decay=0.9)
    restored.load_state_dict({key: noise.state_dict()[key] for key in ("grad_sqr", "grad_var")})
    assert (restored.grad_sqr, restored.grad_var) == (noise.grad_sqr, noise.grad_var)
    assert restored.standard_errors == pytest.approx((0.0, 0.0), abs=1e-9)
    raw_estimates(restored, [(3.0, 10.0), (-1.0, 90.0)])
    assert all(error > 0 for error in restored.standard_errors), "later measurements spread it"


def test_the_lower_bound_takes_the_standard_errors_off_each_average():
    noise = NoiseScale()
    assert math.isnan(noise.lower_bound()), "no measurement"
    raw_estimates(noise, [(3.0, 10.0)])
    assert math.isnan(noise.lower_bound()), "one measurement has no spread"
    assert noise.lower_bound(0) == noise.noise_scale
    raw_estimates(noise, [(3.0, 10.0), (-1.0, 90.0), (2.0, 40.0)] * 10)
    grad_sqr_error, grad_var_error = noise.standard_errors
    for errors in (0.5, 1.0, 2.0):
        expected = (noise.grad_var - errors * grad_var_error) / (noise.grad_sqr + errors * grad_sqr_error)
        assert noise.lower_bound(errors) == pytest.approx(expected, rel=1e-12)
    assert noise.lower_bound(2.0) < noise.lower_bound(1.0) < noise.lower_bound(0) == noise.noise_scale


@pytest.mark.parametrize("errors", [-1, math.inf, math.nan, "1"], ids=repr)
def test_the_lower_bound_takes_a_non_negative_number_of_errors(errors):
    with pytest.raises(ValueError, match=re.escape(f"errors must be a non-negative finite number, got {errors!r}")):
        NoiseScale().lower_bound(errors)


def test_the_lower_bound_stops_at_what_the_measurements_resolve():
    # |G|² averages below zero: the point estimate is infinite, the bound is tr(Σ) over the
    # largest |G|² one standard error allows, as if |G|² were zero.
    noise = NoiseScale()
    raw_estimates(noise, [(2.0, 100.0), (-4.0, 120.0), (-1.0, 80.0)] * 10)
    assert noise.grad_sqr < 0 and noise.noise_scale == math.inf
    grad_sqr_error, grad_var_error = noise.standard_errors
    assert noise.lower_bound() == pytest.approx((noise.grad_var - grad_var_error) / grad_sqr_error, rel=1e-12)
    # A tr(Σ) no larger than its error bounds nothing.
    raw_estimates(noise, [(1.0, 300.0), (1.0, -300.0)] * 30)
    assert noise.lower_bound() == 0.0


def test_the_lower_bound_is_below_the_true_noise_scale_in_most_runs():
    # Raw estimates around |G|² = 2 and tr(Σ) = 100 (B_simple = 50), |G|²'s spread three times
    # its value, over 4000 runs of 40 measurements: the smoothed ratio is as often above the
    # truth as below, and on chance alone runs off to many times it or to infinity; the bound
    # exceeds the truth about as often as one standard error allows, and never by much.
    rng = np.random.default_rng(1)
    points, bounds = [], []
    for pairs in rng.normal([2.0, 100.0], [6.0, 40.0], size=(4000, 40, 2)):
        noise = NoiseScale()
        raw_estimates(noise, pairs.tolist())
        points.append(noise.noise_scale)
        bounds.append(noise.lower_bound())
    points, bounds = np.array(points), np.array(bounds)
    assert 0.4 < np.mean(points > 50) < 0.6
    assert np.mean(points > 200) > 0.05, "an unresolved |G|² sends the ratio far above the truth"
    assert np.mean(bounds > 50) < 0.2
    assert np.max(bounds) < 150


@pytest.mark.parametrize("decay", [1, 1.5, -0.1, math.nan, True, "0.9", None], ids=repr)
def test_decay_must_be_in_the_unit_interval(decay):
    message = re.escape(f"decay must be in [0, 1), got {decay!r}")
    with pytest.raises(ValueError, match=message):
        NoiseScale(decay)
    with pytest.raises(ValueError, match=message):
        BiasCorrectedEMA(decay)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=message):
        BatchSizeScheduler(optimizer, schedules.Constant(8), measure_noise=True, noise_decay=decay)


# ------------------------------------------------------------------ unbiasedness
@pytest.mark.parametrize("batch_small", [8, 16, 32])
def test_two_batch_estimates_are_unbiased(batch_small):
    """Per-sample "gradients" ``g_i = G + noise`` with a known ``G`` and diagonal covariance; over
    many steps the raw estimates average to ``|G|²`` and ``tr(Σ)``."""
    steps, batch_big, dimensions = 8000, 64, 16
    generator = torch.Generator().manual_seed(batch_small)
    mean = 0.5 * torch.linspace(-1, 1, dimensions, dtype=torch.float64)
    scales = torch.linspace(0.5, 2.0, dimensions, dtype=torch.float64)
    samples = mean + scales * torch.randn(steps, batch_big, dimensions, generator=generator, dtype=torch.float64)
    small = samples[:, :batch_small].mean(1).pow(2).sum(1)
    big = samples.mean(1).pow(2).sum(1)
    noise = NoiseScale()
    grad_sqrs, grad_vars = [], []
    for grad_sqr_small, grad_sqr_big in zip(small.tolist(), big.tolist()):
        assert noise.update(grad_sqr_small, batch_small, grad_sqr_big, batch_big)
        grad_sqrs.append(noise.last_grad_sqr)
        grad_vars.append(noise.last_grad_var)
    true_grad_sqr, true_grad_var = float(mean.pow(2).sum()), float(scales.pow(2).sum())
    for estimates, truth in ((grad_sqrs, true_grad_sqr), (grad_vars, true_grad_var)):
        estimates = np.asarray(estimates)
        # The test can tell a few percent of bias: the standard error of the mean is well below it.
        assert estimates.std() / math.sqrt(steps) < 0.015 * truth
        assert estimates.mean() == pytest.approx(truth, rel=0.04)
    assert noise.steps == steps


# ------------------------------------------------------------------ the meter in training loops
def train_one(loop: str, scheduler: BatchSizeScheduler, optimizer: torch.optim.Optimizer, loss_fn, batch) -> None:
    """One optimizer step, through ``train_step`` or through the plain loop."""
    if loop == "train_step":
        scheduler.train_step(batch, loss_fn)
    else:
        optimizer.zero_grad()
        loss_fn(batch).backward()
        optimizer.step()
        scheduler.step(len(batch[0]))


def train_at_fixed_parameters(loop: str, steps: int, noise_decay: float, batch_size: int = 128, seed: int = 0):
    """``steps`` steps at learning rate 0, by ``train_step`` or by the plain loop."""
    dataset, solution = least_squares_data(seed)
    model = least_squares_model(solution)
    before = parameters_of(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(batch_size), measure_noise=True, noise_interval=1,
                                   noise_decay=noise_decay)
    sampler = AdaptiveBatchSampler(dataset, scheduler, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_sampler=sampler)
    loss_fn = mean_squared_error(model)
    epoch = 0
    while scheduler.steps < steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            train_one(loop, scheduler, optimizer, loss_fn, batch)
            if scheduler.steps == steps:
                break
        epoch += 1
    assert all(torch.equal(a, b) for a, b in zip(parameters_of(model), before)), "lr=0 keeps the parameters"
    return scheduler, true_noise(model, dataset)


@pytest.mark.parametrize(
    "loop, steps, noise_decay, counted",
    [
        # Halves of one batch: unbiased, but single estimates swing, so a longer average.
        ("train_step", 400, 0.99, 400),
        # Consecutive steps: the first step has no partner.
        ("plain", 300, 0.95, 299),
    ],
)
def test_the_meter_finds_the_true_noise_scale_of_a_least_squares_model(loop, steps, noise_decay, counted):
    scheduler, (grad_sqr, grad_var) = train_at_fixed_parameters(loop, steps, noise_decay)
    noise = scheduler.noise_meter.noise
    assert noise.steps == counted
    assert grad_var / grad_sqr == pytest.approx(37, rel=0.05), "the point the test was sized for"
    assert noise.noise_scale == pytest.approx(grad_var / grad_sqr, rel=0.25)
    assert noise.grad_sqr == pytest.approx(grad_sqr, rel=0.25)
    assert noise.grad_var == pytest.approx(grad_var, rel=0.25)


def test_with_a_memory_cap_the_first_micro_batch_is_the_small_batch():
    """Every step's raw estimates equal the App. A.1 formulas applied to the closed-form mean
    gradients of the first micro-batch and of the whole batch."""
    dataset, solution = least_squares_data()
    model = least_squares_model(solution)
    _, x, y = dataset.tensors
    gradients = per_sample_gradients(model, x, y)  # before the fake device watches the forward passes
    # 20 samples fit: a batch of 50 is trained as micro-batches of 17, 17 and 16.
    fake = FakeMemory(capacity=1000 + 10 * 20, fixed=1000, per_sample=10)
    fake.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(50), memory=fake, accumulate=True,
                                   measure_noise=True, noise_interval=1)
    sampler = AdaptiveBatchSampler(dataset, scheduler, shuffle=True, seed=0)
    micro_batches: list[torch.Tensor] = []

    def loss_fn(micro_batch):
        loss = F.mse_loss(model(micro_batch[1]), micro_batch[2])  # raises where memory runs out
        micro_batches.append(micro_batch[0])
        return loss

    noise = scheduler.noise_meter.noise
    for batch in DataLoader(dataset, batch_sampler=sampler):
        micro_batches.clear()
        scheduler.train_step(batch, loss_fn)
        # An attempt that ran out of memory left micro-batches from before the one that failed.
        first = max(k for k, m in enumerate(micro_batches) if m[0] == batch[0][0])
        micro_batches[:] = micro_batches[first:]
        assert torch.equal(torch.cat(micro_batches), batch[0])
        small, big = gradients[micro_batches[0]].mean(0), gradients[batch[0]].mean(0)
        expected = two_batch_estimates(float(small.pow(2).sum()), len(micro_batches[0]),
                                       float(big.pow(2).sum()), len(batch[0]))
        # The norms pass through float32.
        assert (noise.last_grad_sqr, noise.last_grad_var) == pytest.approx(expected, rel=1e-4, abs=1e-6)
        if scheduler.steps == 12:
            break
    assert [len(m) for m in micro_batches] == [17, 17, 16]
    assert fake.out_of_memory_errors > 0
    assert noise.steps == scheduler.steps == 12


@pytest.mark.parametrize(
    "batch_size, min_batch_size, micro_batch_sizes",
    [(7, 4, [7]), (1, 1, [1]), (8, 4, [4, 4]), (9, 4, [5, 4]), (2, 1, [1, 1])],
)
def test_a_batch_too_small_to_halve_is_measured_by_the_fallback(batch_size, min_batch_size, micro_batch_sizes):
    dataset, solution = least_squares_data()
    model = least_squares_model(solution)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(batch_size), min_batch_size=min_batch_size,
                                   measure_noise=True, noise_interval=1)
    sizes: list[int] = []
    steps = 3
    for start in range(0, steps * batch_size, batch_size):
        sizes.clear()
        batch = dataset[start:start + batch_size]
        scheduler.train_step(batch, lambda b: sizes.append(len(b[0])) or F.mse_loss(model(b[1]), b[2]))
        assert sizes == micro_batch_sizes
    # Split, each step measures itself; unsplit, the plain loop's fallback pairs it with the step
    # before (from the second step on), as it would a step of the plain loop.
    counted = steps if len(micro_batch_sizes) > 1 else steps - 1
    assert scheduler.noise_meter.noise.steps == counted
    assert scheduler.steps == steps
    if len(micro_batch_sizes) == 1:  # measured as the plain loop measures the same steps
        twin = least_squares_model(solution)
        twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.01)
        plain = BatchSizeScheduler(twin_optimizer, schedules.Constant(batch_size), min_batch_size=min_batch_size,
                                   measure_noise=True, noise_interval=1)
        for start in range(0, steps * batch_size, batch_size):
            batch = dataset[start:start + batch_size]
            twin_optimizer.zero_grad()
            F.mse_loss(twin(batch[1]), batch[2]).backward()
            twin_optimizer.step()
            plain.step(batch_size)
        ours, theirs = scheduler.noise_meter.noise, plain.noise_meter.noise
        assert (ours.grad_sqr, ours.grad_var) == pytest.approx((theirs.grad_sqr, theirs.grad_var), rel=1e-6)


# ------------------------------------------------------------------ preconditioning
def adam_after_steps(optimizer_class: type, steps: int, **options) -> tuple[nn.Module, torch.optim.Optimizer]:
    generator = torch.Generator().manual_seed(3)
    model = nn.Linear(4, 3, dtype=torch.float64)
    optimizer = optimizer_class(model.parameters(), lr=0.01, **options)
    for _ in range(steps):
        optimizer.zero_grad()
        x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
        model(x).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def set_gradients(model: nn.Module, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    gradients = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in model.parameters()]
    for parameter, gradient in zip(model.parameters(), gradients):
        parameter.grad = gradient.clone()
    return gradients


def preconditioned_sqr_norm(optimizer: torch.optim.Optimizer, gradients: list[torch.Tensor]) -> float:
    """``Σ (g / (√(v / (1 − β₂^t)) + eps))²``, Adam's own update direction for gradient ``g``."""
    total = 0.0
    (group,) = optimizer.param_groups
    for parameter, gradient in zip(group["params"], gradients):
        state = optimizer.state[parameter]
        v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
        total += float((gradient / (v_hat.sqrt() + group["eps"])).pow(2).sum())
    return total


def measure_pair(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[NoiseScale, list, list]:
    """Two gradients read as the small (8 samples) and the big (32 samples) batch of one step."""
    meter = GradientNoiseMeter(optimizer)
    small = set_gradients(model, seed=10)
    meter.after_first_micro_batch(8, share=1.0)
    big = set_gradients(model, seed=11)
    assert meter.after_batch(32)
    return meter.noise, small, big


@pytest.mark.parametrize(
    "optimizer_class, options",
    [(torch.optim.Adam, {}), (torch.optim.AdamW, {"weight_decay": 0.1}), (torch.optim.Adam, {"eps": 1e-3}),
     (torch.optim.NAdam, {})],
    ids=["Adam", "AdamW", "Adam eps=1e-3", "NAdam"],
)
def test_adam_gradients_are_preconditioned_by_its_second_moment(optimizer_class, options):
    model, optimizer = adam_after_steps(optimizer_class, 3, **options)
    noise, small, big = measure_pair(model, optimizer)
    expected = two_batch_estimates(preconditioned_sqr_norm(optimizer, small), 8,
                                   preconditioned_sqr_norm(optimizer, big), 32)
    assert (noise.last_grad_sqr, noise.last_grad_var) == pytest.approx(expected, rel=1e-5)
    plain = two_batch_estimates(sum(float(g.pow(2).sum()) for g in small), 8,
                                sum(float(g.pow(2).sum()) for g in big), 32)
    assert noise.last_grad_sqr != pytest.approx(plain[0], rel=0.1), "the preconditioning changed something"


@pytest.mark.parametrize(
    "optimizer_class, steps", [(torch.optim.Adam, 0), (torch.optim.SGD, 3), (torch.optim.RMSprop, 3)],
    ids=["Adam before its first step", "SGD", "RMSprop (no betas)"],
)
def test_plain_gradients_without_an_adam_second_moment(optimizer_class, steps):
    model, optimizer = adam_after_steps(optimizer_class, steps)
    noise, small, big = measure_pair(model, optimizer)
    expected = two_batch_estimates(sum(float(g.pow(2).sum()) for g in small), 8,
                                   sum(float(g.pow(2).sum()) for g in big), 32)
    assert (noise.last_grad_sqr, noise.last_grad_var) == pytest.approx(expected, rel=1e-5)


def test_a_parameter_without_gradients_does_not_turn_off_preconditioning():
    model = nn.ModuleDict({"used": nn.Linear(4, 3, dtype=torch.float64),
                           "unused": nn.Linear(4, 3, dtype=torch.float64)})
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        optimizer.zero_grad()
        model["used"](torch.randn(16, 4, generator=generator, dtype=torch.float64)).pow(2).mean().backward()
        optimizer.step()
    meter = GradientNoiseMeter(optimizer)
    used = list(model["used"].parameters())
    small = set_gradients(model["used"], seed=10)
    meter.after_first_micro_batch(8, share=1.0)
    big = set_gradients(model["used"], seed=11)
    assert meter.after_batch(32)

    def sqr_norm(gradients):
        total = 0.0
        for parameter, gradient in zip(used, gradients):
            state = optimizer.state[parameter]
            v_hat = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
            total += float((gradient / (v_hat.sqrt() + 1e-8)).pow(2).sum())
        return total

    expected = two_batch_estimates(sqr_norm(small), 8, sqr_norm(big), 32)
    assert (meter.noise.last_grad_sqr, meter.noise.last_grad_var) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ one measurement per noise_interval samples
@pytest.mark.parametrize("loop", ["train_step", "plain"])
@pytest.mark.parametrize(
    "batch_size, noise_interval",
    # By default max(512, 8 × batch size): one step per 512 samples, at most one step in eight.
    [(8, 32), (8, 20), (16, 16), (32, 16), (12, 16), (64, None), (96, None), (200, None)],
)
def test_noise_is_measured_on_the_steps_that_reach_a_multiple_of_noise_interval(loop, batch_size, noise_interval):
    dataset, solution = least_squares_data(size=16 * batch_size)
    model = least_squares_model(solution)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(batch_size), measure_noise=True,
                                   noise_interval=noise_interval)
    backward_passes = [0]
    model.weight.register_hook(lambda gradient: backward_passes.__setitem__(0, backward_passes[0] + 1))
    sampler = AdaptiveBatchSampler(dataset, scheduler, shuffle=True, seed=0)
    measured, passes, kept = [], [], []
    for step, batch in enumerate(islice(iter(sampler), 16), start=1):
        counted_before, passes_before = scheduler.noise_meter.noise.steps, backward_passes[0]
        train_one(loop, scheduler, optimizer, mean_squared_error(model), dataset[batch])
        measured.append(scheduler.noise_meter.noise.steps > counted_before)
        passes.append(backward_passes[0] - passes_before)
        kept.append(scheduler.noise_meter._previous is not None)
    interval = noise_interval or max(512, 8 * batch_size)
    due = [(step * batch_size) // interval > ((step - 1) * batch_size) // interval for step in range(1, 17)]
    assert any(due), "the case measures some steps"
    if loop == "train_step":
        assert measured == due
        assert passes == [2 if d else 1 for d in due], "only a measured step is split in two"
        assert not any(kept), "train_step keeps no copy of the gradients"
    else:
        # A due step is paired with the step before it, whose gradient was kept for it (none
        # before the first step).
        assert measured == [d and step > 1 for step, d in enumerate(due, start=1)]
        assert kept == due[1:] + [(17 * batch_size) // interval > (16 * batch_size) // interval]
        assert passes == [1] * 16


def test_the_plain_loop_keeps_a_gradient_copy_only_when_asked():
    parameter = nn.Parameter(torch.zeros(3))
    meter = GradientNoiseMeter(torch.optim.SGD([parameter], lr=0.1))
    parameter.grad = torch.ones(3)
    assert not meter.from_consecutive_steps(4, measure=True, keep=False)  # nothing to pair with
    assert meter._previous is None
    assert not meter.from_consecutive_steps(4, measure=False, keep=True)
    assert meter._previous is not None
    parameter.grad = torch.full((3,), 2.0)
    assert meter.from_consecutive_steps(4, measure=True, keep=False)
    assert meter._previous is None
    assert not meter.from_consecutive_steps(4, measure=True, keep=True), "the copy was not kept"


@pytest.mark.parametrize("foreach_copy", [True, False], ids=["foreach_copy", "older_torch"])
def test_the_plain_loop_pairs_each_step_with_the_one_kept_before_it(foreach_copy, monkeypatch):
    """Exact values, through steps that are both measured and kept (each gradient serves two
    pairs) and a change of the parameters that have gradients (no pair across it)."""
    if not foreach_copy:
        monkeypatch.delattr(torch, "_foreach_copy_")
    first, second = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(3))
    meter = GradientNoiseMeter(torch.optim.SGD([first, second], lr=0.1))
    generator = torch.Generator().manual_seed(0)
    steps = [(4, True), (12, True), (8, True), (8, False), (4, True)]  # (batch size, second has a gradient)
    previous = None
    for batch_size, both in steps:
        first.grad = torch.randn(2, 2, generator=generator)
        second.grad = torch.randn(3, generator=generator) if both else None
        flat = torch.cat([first.grad.reshape(-1)] + ([second.grad] if both else [])).double()
        counted = meter.from_consecutive_steps(batch_size, measure=True, keep=True)
        if previous is None or previous[0].numel() != flat.numel():
            assert not counted
        else:
            assert counted
            previous_flat, previous_size = previous
            # Two independent batches: |G|² is their product, tr(Σ) their squared difference
            # over 1/B + 1/B_previous.
            expected = (float(flat @ previous_flat),
                        float((flat - previous_flat).pow(2).sum()) / (1 / batch_size + 1 / previous_size))
            # Single-precision gradients are measured in single precision.
            assert (meter.noise.last_grad_sqr, meter.noise.last_grad_var) == pytest.approx(expected, rel=1e-6)
        previous = (flat, batch_size)
    assert meter.noise.steps == 2  # steps 2 and 3; steps 4 and 5 each follow a step with other parameters


def consecutive_pairs(count: int, batch_size: int) -> tuple[float, list, list]:
    """``count`` pairs of steps through the plain loop's fallback, each step's gradient the true
    one (``|G|² = 1``) plus Gaussian noise of covariance ``Σ / batch_size``. Returns ``tr(Σ)``,
    each pair's estimates, and the two-batch estimates with each step of the pair as the small
    batch and the pair as the big one."""
    generator = torch.Generator().manual_seed(0)
    dimension = 400
    true = torch.randn(dimension, generator=generator, dtype=torch.float64)
    true /= true.norm()
    variances = torch.rand(dimension, generator=generator, dtype=torch.float64) * 2
    parameter = nn.Parameter(torch.zeros(dimension, dtype=torch.float64))
    meter = GradientNoiseMeter(torch.optim.SGD([parameter], lr=0.1))
    pairs, by_choice = [], []
    for _ in range(count):
        steps = [true + torch.randn(dimension, generator=generator, dtype=torch.float64)
                 * (variances / batch_size).sqrt() for _ in range(2)]
        parameter.grad = steps[0].clone()
        meter.from_consecutive_steps(batch_size, measure=False, keep=True)
        parameter.grad = steps[1].clone()
        assert meter.from_consecutive_steps(batch_size, measure=True, keep=False)
        pairs.append((meter.noise.last_grad_sqr, meter.noise.last_grad_var))
        mean_sqr = float(((steps[0] + steps[1]) / 2).pow(2).sum())
        by_choice.append([two_batch_estimates(float(small @ small), batch_size, mean_sqr, 2 * batch_size)
                          for small in steps])
    return float(variances.sum()), pairs, by_choice


def test_the_plain_loops_pair_averages_the_two_batch_estimate_over_both_choices_of_the_small_batch():
    """With equal sizes each pair's estimates are the mean of McCandlish's two-batch estimates
    over the two choices of the small batch: as unbiased as one choice, with less spread
    (about 1/√2 of it for |G|²)."""
    grad_var_true, pairs, by_choice = consecutive_pairs(2000, 16)
    for pair, choices in zip(pairs[:20], by_choice):
        averaged = [(first + second) / 2 for first, second in zip(*choices)]
        assert pair == pytest.approx(averaged, rel=1e-9)
    for index, true in ((0, 1.0), (1, grad_var_true)):
        paired = torch.tensor([pair[index] for pair in pairs])
        single = torch.tensor([choices[1][index] for choices in by_choice])  # this step as the small batch
        for estimates in (paired, single):
            assert abs(float(estimates.mean()) - true) < 4 * float(estimates.std()) / len(estimates) ** 0.5
        assert float(paired.std()) < 0.8 * float(single.std())


def test_noise_interval_must_be_a_positive_integer():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    for bad in (0, -512, 1.5, "512", True):
        with pytest.raises(ValueError, match=re.escape(f"noise_interval must be a positive integer, got {bad!r}")):
            BatchSizeScheduler(optimizer, schedules.Constant(8), noise_interval=bad)


# ------------------------------------------------------------------ mixed precision
def scaled_training(inf_at_micro_batch: int | None, scaler: torch.amp.GradScaler | None):
    """One step of 16 samples (two micro-batches of 8) by ``train_step``; a gradient hook puts an
    inf into the weight's gradient during micro-batch ``inf_at_micro_batch`` (0 or 1)."""
    dataset, solution = least_squares_data()
    model = least_squares_model(solution)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(16), measure_noise=True, noise_interval=1)
    backward_passes = [0]

    def poison(gradient):
        backward_passes[0] += 1
        if backward_passes[0] - 1 == inf_at_micro_batch:
            return torch.full_like(gradient, math.inf)
        return gradient

    model.weight.register_hook(poison)
    before = parameters_of(model)
    scheduler.train_step(dataset[:16], mean_squared_error(model), scaler=scaler)
    return scheduler, model, before


@pytest.mark.parametrize("inf_at_micro_batch", [0, 1])
def test_a_step_the_grad_scaler_skips_is_not_counted(inf_at_micro_batch):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scheduler, model, before = scaled_training(inf_at_micro_batch, scaler)
    assert all(torch.equal(a, b) for a, b in zip(parameters_of(model), before)), "the scaler skipped the step"
    assert scaler.get_scale() < 2.0**10
    assert scheduler.steps == 1
    assert scheduler.noise_meter.noise.steps == 0
    assert math.isnan(scheduler.noise_meter.noise.noise_scale)


def test_the_grad_scalers_scale_is_divided_out():
    plain, _, _ = scaled_training(None, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled, _, _ = scaled_training(None, scaler)
    assert scaled.noise_meter.noise.steps == plain.noise_meter.noise.steps == 1
    for name in ("last_grad_sqr", "last_grad_var"):
        assert getattr(scaled.noise_meter.noise, name) == pytest.approx(getattr(plain.noise_meter.noise, name),
                                                                      rel=1e-5), name


# ------------------------------------------------------------------ TensorBoard
NOISE_TAGS = ("noise_scale", "grad_sqr", "grad_var", "raw_grad_sqr", "raw_grad_var", "grad_sqr_error", "grad_var_error",
              "noise_scale_lower")


@pytest.mark.parametrize("loop, first_logged", [("train_step", 0), ("plain", 1)])
def test_noise_curves_are_written(loop, first_logged, tmp_path: Path):
    dataset, solution = least_squares_data()
    model = least_squares_model(solution)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    writer = SummaryWriter(str(tmp_path))
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(32), measure_noise=True, noise_interval=1, writer=writer)
    sampler = AdaptiveBatchSampler(dataset, scheduler, shuffle=True, seed=0)
    loss_fn = mean_squared_error(model)
    logged = []
    for batch in DataLoader(dataset, batch_sampler=sampler):
        train_one(loop, scheduler, optimizer, loss_fn, batch)
        noise = scheduler.noise_meter.noise
        logged.append({"noise_scale": noise.noise_scale, "grad_sqr": noise.grad_sqr, "grad_var": noise.grad_var,
                       "raw_grad_sqr": noise.last_grad_sqr, "raw_grad_var": noise.last_grad_var,
                       "grad_sqr_error": noise.standard_errors[0], "grad_var_error": noise.standard_errors[1],
                       "noise_scale_lower": noise.lower_bound()})
        if scheduler.steps == 6:
            break
    writer.close()
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    accumulator.Reload()
    for name in NOISE_TAGS:
        events = accumulator.Scalars(f"adabatch/noise/{name}")
        assert [event.step for event in events] == list(range(first_logged, 6)), name
        expected = [values[name] for values in logged[first_logged:]]
        # float32; the errors are nan at the first measurement, which shows no spread yet.
        assert [event.value for event in events] == pytest.approx(expected, rel=1e-6, nan_ok=True), name


# ------------------------------------------------------------------ AdaScale gain
def noise_state(grad_sqr: float, grad_var: float) -> dict:
    """A NoiseScale state of one update with these values, for a decay of 0.5 (exact in binary)."""
    return {"grad_sqr": {"biased": grad_sqr / 2, "updates": 1}, "grad_var": {"biased": grad_var / 2, "updates": 1}}


@pytest.mark.parametrize(
    "state, factor",
    [
        (None, 1.0),  # nothing measured yet
        (noise_state(1.0, 24.0), (24 / 8 + 1) / (24 / 32 + 1)),
        (noise_state(1.0, -3.0), 1.0),  # no noise: a larger batch changes nothing
        (noise_state(-1.0, 5.0), 4.0),  # all noise: linear scaling
        (noise_state(1e-9, 1e9), pytest.approx(4.0, rel=1e-6)),
    ],
    ids=["unmeasured", "B_simple 24", "B_simple 0", "B_simple inf", "B_simple huge"],
)
def test_gain_factor_from_the_noise_scale(state, factor):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(32), lr_scaling="gain", reference_batch_size=8,
                                   noise_decay=0.5)
    assert scheduler.noise_meter is not None, "the gain measures the noise by default"
    if state is not None:
        scheduler.noise_meter.noise.load_state_dict(state)
    assert scheduler.lr_factor == factor


@pytest.mark.parametrize("make", [torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam], ids=lambda m: m.__name__)
def test_gain_for_adam_family_optimizers_is_its_square_root(make):
    optimizer = make([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(32), lr_scaling="gain", reference_batch_size=8,
                                   noise_decay=0.5)
    scheduler.noise_meter.noise.load_state_dict(noise_state(1.0, 24.0))
    assert scheduler.lr_factor == pytest.approx(math.sqrt((24 / 8 + 1) / (24 / 32 + 1)), rel=1e-12)
    scheduler.noise_meter.noise.load_state_dict(noise_state(-1.0, 5.0))
    assert scheduler.lr_factor == 2.0, "all noise: the square-root rule"


@pytest.mark.parametrize(
    "schedule, lr_scaling, expected",
    [
        (schedules.Adaptive(), None, "gain"),
        (schedules.Step(start=8, factor=2, milestones=[1]), None, "none"),
        (lambda progress: 8, None, "none"),
        (schedules.Adaptive(), "sqrt", "sqrt"),
        (schedules.Constant(8), "gain", "gain"),
    ],
    ids=["adaptive", "timetable", "callable", "adaptive-given", "timetable-given"],
)
def test_default_lr_scaling_is_the_schedules(schedule, lr_scaling, expected):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, schedule, lr_scaling=lr_scaling)
    assert scheduler.lr_scaling == expected
    assert (scheduler.noise_meter is not None) == (expected == "gain" or isinstance(schedule, schedules.Adaptive))


def test_gain_follows_the_measured_noise_during_training():
    dataset, solution = least_squares_data()
    model = least_squares_model(solution)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    # B_0 is the schedule's start: 8, then 32 after the first 64 samples.
    scheduler = BatchSizeScheduler(optimizer, schedules.Step(start=8, factor=4, milestones=[64], unit="sample"),
                                   lr_scaling="gain", noise_interval=1)
    effective_lrs: list[float] = []
    optimizer.register_step_pre_hook(lambda o, args, kwargs: effective_lrs.append(o.param_groups[0]["lr"]))
    sampler = AdaptiveBatchSampler(dataset, scheduler, shuffle=True, seed=0)
    factors = []
    for batch in DataLoader(dataset, batch_sampler=sampler):
        factors.append(scheduler.lr_factor)
        noise_scale = scheduler.noise_meter.noise.noise_scale
        size = scheduler.batch_size
        if math.isnan(noise_scale):
            assert factors[-1] == 1.0
        elif math.isinf(noise_scale):
            assert factors[-1] == size / 8
        else:
            assert factors[-1] == pytest.approx((noise_scale / 8 + 1) / (noise_scale / size + 1), rel=1e-12)
        assert 1.0 <= factors[-1] <= size / 8
        scheduler.train_step(batch, mean_squared_error(model))
        assert effective_lrs[-1] == pytest.approx(0.001 * factors[-1], rel=1e-12)
        if scheduler.steps == 20:
            break
    assert factors[0] == 1.0 and max(factors) > 1.5, "the run measured noise and grew the batch"


# ------------------------------------------------------------------ checkpoints
def test_scheduler_state_dict_carries_the_noise_statistics():
    scheduler, _ = train_at_fixed_parameters("train_step", 10, 0.9, batch_size=32)
    state = json.loads(json.dumps(scheduler.state_dict()))
    assert state["noise"] == scheduler.noise_meter.noise.state_dict()
    assert state["schedule"] == {}  # a timetable's state: nothing
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)
    fresh = BatchSizeScheduler(optimizer, schedules.Constant(32), measure_noise=True, noise_decay=0.9)
    fresh.load_state_dict(state)
    assert fresh.noise_meter.noise.state_dict() == scheduler.noise_meter.noise.state_dict()
    assert fresh.noise_meter.noise.noise_scale == scheduler.noise_meter.noise.noise_scale
    unmeasured = BatchSizeScheduler(optimizer, schedules.Constant(32))
    assert unmeasured.noise_meter is None and unmeasured.state_dict()["noise"] is None


def plain_loop_run(stop: int | None, total: int = 12, optimizer_class: type = torch.optim.SGD):
    """The plain loop at a small learning rate; with ``stop``, checkpointed after ``stop`` steps and
    finished by fresh objects restored from the checkpoint."""
    dataset, solution = least_squares_data()

    def build():
        model = least_squares_model(solution)
        optimizer = optimizer_class(model.parameters(), lr=0.001)
        scheduler = BatchSizeScheduler(optimizer, schedules.Constant(32), measure_noise=True, noise_interval=1)
        sampler = AdaptiveBatchSampler(dataset, scheduler, shuffle=True, seed=0)
        return model, optimizer, scheduler, sampler

    def train(model, optimizer, scheduler, sampler, steps):
        for batch in DataLoader(dataset, batch_sampler=sampler):
            optimizer.zero_grad()
            mean_squared_error(model)(batch).backward()
            optimizer.step()
            scheduler.step(len(batch[0]))
            if scheduler.steps == steps:
                return

    objects = build()
    train(*objects, stop or total)
    if stop is not None:
        model, optimizer, scheduler, sampler = objects
        state = copy.deepcopy([model.state_dict(), optimizer.state_dict(), scheduler.state_dict(),
                               sampler.state_dict()])
        objects = build()
        for thing, thing_state in zip(objects, state):
            thing.load_state_dict(thing_state)
        train(*objects, total)
    return objects[2].noise_meter.noise.state_dict()


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam], ids=lambda c: c.__name__)
def test_plain_loop_noise_statistics_resume_exactly(optimizer_class):
    """The fallback's kept gradient is checkpointed (``noise_pair``): the first step after a
    resume pairs with the last one before it, so the statistics equal the uninterrupted run's.
    Every step is measured and kept, under Adam too, where the kept row is not preconditioned."""
    resumed = plain_loop_run(stop=5, optimizer_class=optimizer_class)
    uninterrupted = plain_loop_run(stop=None, optimizer_class=optimizer_class)
    assert resumed == uninterrupted
    assert uninterrupted["grad_sqr"]["updates"] == 11, "every step after the first is paired"


@pytest.mark.parametrize("groups", ["one", "two"], ids=["one group", "two groups, other eps and steps"])
def test_plain_loop_pair_is_preconditioned_by_the_measured_steps_second_moments(groups):
    """Under Adam the two gradients of a pair are divided by the same ``√v̂ + eps``, the one
    after the measured step: the kept gradient is stored as backward left it."""
    if groups == "one":
        model, optimizer = adam_after_steps(torch.optim.Adam, 3)
    else:  # the bias in a group of its own, with another eps, and fewer steps than the weight
        generator = torch.Generator().manual_seed(3)
        model = nn.Linear(4, 3, dtype=torch.float64)
        optimizer = torch.optim.Adam([{"params": [model.weight]}, {"params": [model.bias], "eps": 1e-3}], lr=0.01)
        for step in range(3):
            optimizer.zero_grad()
            model(torch.randn(16, 4, generator=generator, dtype=torch.float64)).pow(2).mean().backward()
            if step < 2:
                model.bias.grad = None
            optimizer.step()
    meter = GradientNoiseMeter(optimizer)
    first = set_gradients(model, seed=10)
    optimizer.step()
    assert not meter.from_consecutive_steps(16, measure=False, keep=True)
    assert meter.pairing_state()["gradient"].tolist() == torch.cat([g.flatten() for g in first]).tolist()
    second = set_gradients(model, seed=11)
    optimizer.step()
    assert meter.from_consecutive_steps(16, measure=True, keep=False)
    mixed = difference = 0.0
    parameters = [(p, group["eps"]) for group in optimizer.param_groups for p in group["params"]]
    for (parameter, eps), g1, g2 in zip(parameters, first, second):
        state = optimizer.state[parameter]
        denominator = (state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))).sqrt() + eps
        mixed += float((g1 / denominator * g2 / denominator).sum())
        difference += float(((g1 - g2) / denominator).pow(2).sum())
    assert (meter.noise.last_grad_sqr, meter.noise.last_grad_var) == pytest.approx((mixed, difference / (2 / 16)),
                                                                                   rel=1e-9)


def test_a_kept_gradient_stored_preconditioned_is_not_paired():
    """A checkpoint whose kept gradient has no ``preconditioned`` key was written while it was
    stored preconditioned for Adam: the resumed run skips that pair rather than mix the two."""
    model, optimizer = adam_after_steps(torch.optim.Adam, 3)
    meter = GradientNoiseMeter(optimizer)
    set_gradients(model, seed=10)
    meter.from_consecutive_steps(16, measure=False, keep=True)
    state = meter.pairing_state()
    for key, paired in ((None, True), ("preconditioned", False)):
        restored = GradientNoiseMeter(optimizer)
        restored.load_pairing_state({k: v for k, v in state.items() if k != key})
        set_gradients(model, seed=11)
        assert restored.from_consecutive_steps(16, measure=True, keep=False) is paired


# ---------------------------------------------------------------- which steps are measured
@pytest.mark.parametrize(
    "interval, start, consumed, due",
    [
        (None, 0, 32, False), (None, 480, 32, True), (None, 512, 32, False),  # one step per 512 samples
        (None, 0, 128, False), (None, 896, 128, True),  # at 128: max(512, 8 x 128) = 1,024
        (100, 90, 10, True), (100, 0, 250, True), (100, 101, 98, False),
    ],
)
def test_a_step_is_measured_when_it_reaches_a_multiple_of_the_interval(interval, start, consumed, due) -> None:
    assert NoiseSampling(interval).due(start, consumed) is due


@pytest.mark.parametrize(
    "sizes, floor, distributed, split",
    [([32], 16, False, [16, 16]), ([33], 16, False, [17, 16]), ([31], 16, False, [31]),
     ([32], 16, True, [32]), ([20, 20], 8, False, [20, 20])],
)
def test_a_measured_step_is_halved_only_on_one_process_and_above_twice_the_floor(sizes, floor, distributed, split):
    assert NoiseSampling().split(sizes, floor, distributed) == split


def test_noise_sampling_refuses_an_interval_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="noise_interval must be a positive integer, got 0"):
        NoiseSampling(0)


# ------------------------------------------------------------------ a loop that clips
def _plain_loop_noise(optimizer_name: str, max_norm: float | None) -> tuple[float, int, list[float]]:
    """A regression at fixed parameters (lr 0), every step measured or kept, with the loop
    clipping the gradient before optimizer.step(); the noise scale, the pairs counted, and the
    gradient norms the optimizer saw."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 8, dtype=torch.float64, generator=generator)
    y = x @ torch.randn(8, 1, dtype=torch.float64, generator=generator) + 0.5 * torch.randn(
        1024, 1, dtype=torch.float64, generator=generator)
    dataset = TensorDataset(x, y)
    model = nn.Linear(8, 1, dtype=torch.float64)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    optimizer = (torch.optim.SGD if optimizer_name == "sgd" else torch.optim.AdamW)(model.parameters(), lr=0.0)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(16), measure_noise=True, noise_interval=16,
                                   memory=None)
    sampler = AdaptiveBatchSampler(dataset, scheduler, shuffle=True, seed=0)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(
        math.sqrt(sum(p.grad.square().sum().item() for p in model.parameters()))))
    for inputs, targets in DataLoader(dataset, batch_sampler=sampler, num_workers=2):
        optimizer.zero_grad()
        F.mse_loss(model(inputs), targets).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        scheduler.step(len(inputs))
    return scheduler.noise_meter.noise.noise_scale, scheduler.noise_meter.noise.steps, seen


@pytest.mark.parametrize("optimizer_name, tolerance", [("sgd", 1e-9), ("adamw", 0.06)])
def test_a_loop_that_clips_measures_the_noise_of_the_gradients_backward_computed(optimizer_name, tolerance):
    unclipped, pairs, _ = _plain_loop_noise(optimizer_name, None)
    clipped, clipped_pairs, norms = _plain_loop_noise(optimizer_name, 1.0)
    assert max(norms) <= 1 + 1e-6, "every step was clipped"
    assert pairs == clipped_pairs == 63
    # Without undoing the clipping, the pairs mix two unknown factors: the estimate fell by a
    # fifth with SGD and by a seventh with AdamW on this data. Under AdamW the preconditioner is
    # built from the clipped gradients (each step clipped by its own factor), so the update the
    # optimizer takes, which the noise scale measures, differs by a few percent itself.
    assert clipped == pytest.approx(unclipped, rel=tolerance)


def test_a_step_of_several_backward_passes_keeps_their_sum_as_backward_left_it() -> None:
    """Gradient accumulation, then a clip: the kept gradient is the sum of the passes before
    the clip, which the last pass's capture holds."""
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(8), measure_noise=True, noise_interval=24,
                                   memory=None)
    generator = torch.Generator().manual_seed(0)
    for passes in (1, 2):  # samples [0, 8), then [8, 16): the step before the one that reaches 24
        optimizer.zero_grad()
        for _ in range(passes):
            model(torch.randn(4, 4, generator=generator)).square().mean().backward()
        summed = torch.cat([p.grad.flatten() for p in model.parameters()])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1 * float(summed.norm()))
        optimizer.step()
        scheduler.step(8)
    kept = scheduler.state_dict()["noise_pair"]
    assert kept is not None, "the step before a measured one keeps its gradient"
    assert torch.allclose(kept["gradient"], summed), "the sum of the passes, not the clipped gradient"


def _adaptive_loop_rescaling_gradients(scale: float, num_workers: int) -> tuple[dict[str, float], list[int],
                                                                                   list[torch.Tensor]]:
    """SGD with momentum under ``Adaptive``, whose batch changes size as it decides and at the
    balanced ends of epochs; the loop multiplies every gradient by ``scale`` before the step and
    divides the learning rate by it, which (for a power of two) trains exactly as the plain loop
    does. The noise statistics, the batch sizes and the parameters at the end."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(600, 3, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(3, 1, generator=generator, dtype=torch.float64) + 6 * torch.randn(
        600, 1, generator=generator, dtype=torch.float64)
    dataset = TensorDataset(x, y)
    model = nn.Linear(3, 1, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02 / scale, momentum=0.9)
    schedule = schedules.Adaptive(start=8, warmup=3, interval=2, extra_samples=0.5, growth_per_epoch=4, confidence=0)
    scheduler = BatchSizeScheduler(optimizer, schedule, min_batch_size=4, max_batch_size=48, noise_interval=32,
                                   memory=None)
    clock = FakeClock(fixed=1e-2, per_sample=1e-4)  # growth pays
    clock.attach(model)
    scheduler.step_times.clock = clock
    sampler = AdaptiveBatchSampler(dataset, scheduler, shuffle=True, seed=0)
    sizes = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for inputs, targets in DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers):
            optimizer.zero_grad()
            F.mse_loss(model(inputs), targets).backward()
            for parameter in model.parameters():
                parameter.grad.mul_(scale)
            optimizer.step()
            scheduler.step(len(inputs))
            sizes.append(len(inputs))
    return scheduler.noise_meter.noise.scalars(), sizes, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_steps_of_a_size_the_schedule_just_decided_are_read_as_backward_left_them(num_workers) -> None:
    """Which step is measured or kept depends on its size; the capture is armed for the batch the
    plan holds once the schedule has decided, so a step whose size just changed (or an epoch's
    balanced last batches) is read before the loop rescales it, like every other."""
    noise, sizes, parameters = _adaptive_loop_rescaling_gradients(1.0, num_workers)
    rescaled_noise, rescaled_sizes, rescaled_parameters = _adaptive_loop_rescaling_gradients(0.5, num_workers)
    assert len(set(sizes)) >= 5, "the batch changed size several times"
    assert rescaled_sizes == sizes
    assert rescaled_noise == noise
    assert all(torch.equal(a, b) for a, b in zip(rescaled_parameters, parameters))


def test_train_step_copies_no_gradient_for_the_plain_loops_measurement(monkeypatch) -> None:
    """``train_step`` measures its own steps (halved) and reads the rest as it leaves them: no
    copy is made as backward leaves the gradients, and no flat buffer of them is kept."""
    copies = []
    capture = GradientNoiseMeter.capture_gradients
    monkeypatch.setattr(GradientNoiseMeter, "capture_gradients", lambda self: copies.append(1) or capture(self))
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(16), measure_noise=True, noise_interval=32,
                                   memory=None)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        batch = (torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator))
        scheduler.train_step(batch, lambda b: F.mse_loss(model(b[0]), b[1]))
    assert scheduler.noise_meter.noise.steps == 6
    assert copies == [] and scheduler.noise_meter.pairing_state() is None


def test_a_capture_for_other_parameters_is_not_taken_for_the_steps_gradient() -> None:
    """A gradient set to ``None`` between backward and the step changes the parameters with
    gradients: the buffer is laid out anew, and the step copies its own gradient into it."""
    model = nn.ModuleDict({"a": nn.Linear(4, 3, dtype=torch.float64), "b": nn.Linear(4, 3, dtype=torch.float64)})
    meter = GradientNoiseMeter(torch.optim.SGD(model.parameters(), lr=0.0))
    set_gradients(model, seed=10)
    meter.capture_gradients()
    model["b"].weight.grad = model["b"].bias.grad = None
    meter.from_consecutive_steps(16, measure=False, keep=True)
    expected = torch.cat([p.grad.flatten() for p in model["a"].parameters()])
    assert torch.equal(meter.pairing_state()["gradient"], expected)


def test_backward_capture_watches_a_parameter_the_last_step_trained() -> None:
    """One hook, on a parameter that has a gradient when the capture is armed: a model whose
    first parameter gets no gradient is still captured, once per backward pass, before the clip."""
    from adabatch.noise.backward_capture import BackwardCapture

    unused, layer = nn.Linear(4, 4), nn.Linear(4, 1)  # `unused` takes no part in the loss
    parameters = list(unused.parameters()) + list(layer.parameters())
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    layer(x).sum().backward()
    captured = []
    capture = BackwardCapture(parameters, lambda: captured.append([p.grad.clone() for p in layer.parameters()]))
    capture.armed = False
    capture.armed = True  # after a step that trained `layer` only
    for p in parameters:
        p.grad = None
    layer(x).square().sum().backward()
    full = [p.grad.clone() for p in layer.parameters()]
    torch.nn.utils.clip_grad_norm_(parameters, 0.25 * math.sqrt(sum(float(g.square().sum()) for g in full)))
    assert len(captured) == 1 and all(torch.equal(a, b) for a, b in zip(captured[0], full))
    layer(x).sum().backward()
    assert len(captured) == 2, "each backward pass is captured while armed"
    capture.armed = False
    layer(x).sum().backward()
    assert len(captured) == 2, "nothing is captured while disarmed"


def test_a_scheduler_built_for_the_same_optimizer_replaces_the_earlier_ones_capture(monkeypatch) -> None:
    """Each scheduler copies gradients as backward leaves them for its measurement; a second one
    on the same optimizer (a notebook cell run again) takes over, and the first copies nothing."""
    copied_by = []
    capture = GradientNoiseMeter.capture_gradients
    monkeypatch.setattr(GradientNoiseMeter, "capture_gradients",
                        lambda self: copied_by.append(self) or capture(self))
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    BatchSizeScheduler(optimizer, schedules.Constant(8), measure_noise=True, memory=None)
    with pytest.warns(UserWarning, match="replaces it"):
        second = BatchSizeScheduler(optimizer, schedules.Constant(8), measure_noise=True, memory=None)
    model(torch.randn(8, 4)).sum().backward()
    assert copied_by == [second.noise_meter], "only the newer scheduler copies"
