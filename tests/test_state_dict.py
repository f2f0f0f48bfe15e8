"""The scheduler's state_dict: a resume in the plain loop is exact with Adaptive(), and a corrupt
or mismatched state is refused by name, with nothing half-loaded."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules
from adabatch.testing import FakeClock

SAMPLES = 1000
DATASET = TensorDataset(
    torch.arange(SAMPLES),
    torch.randn(SAMPLES, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
    torch.randn(SAMPLES, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
)


def adaptive_run():
    """A regression trained in the plain loop with a small, quickly deciding Adaptive()."""
    model = nn.Linear(4, 1, dtype=torch.float64)
    # Started near the solution (the targets are noise, so about zero): the gradients are mostly
    # noise, and the noise scale asks for growth within the few steps of the test.
    with torch.no_grad():
        for parameter in model.parameters():
            nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = BatchSizeScheduler(optimizer, schedules.Adaptive(start=8, warmup=3, interval=2), noise_interval=16)
    # Step times on a simulated clock (1 ms + 0.1 ms per sample), the same in every run.
    clock = FakeClock(fixed=1e-3, per_sample=1e-4)
    clock.attach(model)
    scheduler.step_times.clock = clock
    sampler = AdaptiveBatchSampler(DATASET, scheduler, shuffle=True, seed=0)
    effective = []
    optimizer.register_step_pre_hook(lambda o, args, kwargs: effective.append(o.param_groups[0]["lr"]))
    return model, optimizer, scheduler, sampler, effective


def train(model, optimizer, scheduler, sampler, steps: int) -> list[tuple[tuple[int, ...], ...]]:
    trained = []
    for index, x, y in DataLoader(DATASET, batch_sampler=sampler):
        if len(trained) == steps:
            break
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        scheduler.step(len(x))
        trained.append(tuple(index.tolist()))
    return trained


STEPS = 40


@pytest.mark.parametrize("stop", range(1, 12))
def test_adaptive_in_the_plain_loop_resumes_exactly_around_a_measured_step(stop: int) -> None:
    # With noise_interval=16 and batches of 8, every second step is measured: stopping after
    # each of the first steps checkpoints both just before and just after a measured one.
    model, optimizer, scheduler, sampler, effective = adaptive_run()
    uninterrupted = train(model, optimizer, scheduler, sampler, STEPS)
    assert len(set(map(len, uninterrupted))) > 1  # the batch grew during the run

    model, optimizer, scheduler, sampler, _ = adaptive_run()
    first = train(model, optimizer, scheduler, sampler, stop)
    state = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict()})
    model, optimizer, scheduler, sampler, resumed_lrs = adaptive_run()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    rest = train(model, optimizer, scheduler, sampler, STEPS - stop)
    assert first + rest == uninterrupted
    assert resumed_lrs == effective[stop:]


def step_scheduler(**options) -> BatchSizeScheduler:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, schedules.Step(start=8, factor=2, milestones=[1]), **options)
    AdaptiveBatchSampler(range(100), scheduler)
    return scheduler


def adaptive_scheduler() -> BatchSizeScheduler:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, schedules.Adaptive(start=8))
    AdaptiveBatchSampler(range(100), scheduler)
    return scheduler


def trained(scheduler: BatchSizeScheduler, steps: int = 3) -> BatchSizeScheduler:
    for _ in range(steps):
        scheduler.step()
    return scheduler


@pytest.mark.parametrize("entry", [[24, 24, 50, 50], [24, 24, 10**9, 10**9], [24, 20, 8, 8], [24, 24, 7, 8],
                                   [24, 24, 8], "24", [24, 24, 8.0, 8]], ids=repr)
def test_a_planned_batch_the_scheduler_could_not_have_drawn_is_refused(entry) -> None:
    state = trained(step_scheduler()).state_dict()
    state["plan"] = [entry]
    with pytest.raises(ValueError, match=r"state_dict\['plan'\] holds .* not a batch this scheduler could have drawn"):
        step_scheduler().load_state_dict(state)


def test_a_planned_batch_it_could_have_drawn_loads() -> None:
    state = trained(step_scheduler()).state_dict()
    state["plan"] = [[24, 24, 8, 8], [32, 32, 8, 8]]
    fresh = step_scheduler()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


def test_a_state_saved_with_another_kind_of_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="Step keeps no state, but its state_dict is"):
        step_scheduler().load_state_dict(trained(adaptive_scheduler()).state_dict())
    with pytest.raises(ValueError, match="Adaptive state_dict is missing"):
        adaptive_scheduler().load_state_dict(trained(step_scheduler()).state_dict())


@pytest.mark.parametrize("key", ["position", "samples_seen", "steps", "plan", "warmup_from", "warmup_begin",
                                 "dataset_size", "memory", "noise", "schedule"])
def test_a_missing_key_is_refused_by_name(key: str) -> None:
    state = trained(step_scheduler()).state_dict()
    del state[key]
    with pytest.raises(ValueError, match=f"scheduler state_dict is missing '{key}'"):
        step_scheduler().load_state_dict(state)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("memory", None, "the memory state must be a dict"),
        ("memory", {"peaks": {}, "ceiling": 0, "learned": None}, "the memory state's 'ceiling' must be a positive"),
        ("memory", {"peaks": {"eight": 100}, "ceiling": None, "learned": None}, "the memory state's 'peaks' must map"),
        ("dataset_size", "100", r"state_dict\['dataset_size'\] must be a positive integer or None, got '100'"),
        ("warmup_from", "1", r"state_dict\['warmup_from'\] must be a positive number or None"),
        ("plan", None, r"state_dict\['plan'\] must be a list"),
        ("steps", -1, r"state_dict\['steps'\] must be a non-negative integer"),
    ],
)
def test_a_bad_value_is_refused_by_name(key, value, message) -> None:
    state = trained(step_scheduler()).state_dict()
    state[key] = value
    with pytest.raises(ValueError, match=message):
        step_scheduler().load_state_dict(state)


def test_a_refused_state_leaves_the_scheduler_as_it_was() -> None:
    scheduler = trained(adaptive_scheduler(), steps=2)
    before = scheduler.state_dict()
    state = trained(adaptive_scheduler(), steps=5).state_dict()
    state["memory"] = None  # checked after the plan, the counters and the schedule would load
    with pytest.raises(ValueError):
        scheduler.load_state_dict(state)
    assert scheduler.state_dict() == before
    assert scheduler.steps == 2


def test_numpy_integers_in_a_state_are_read_as_integers() -> None:
    state = trained(step_scheduler()).state_dict()
    state["steps"] = np.int64(state["steps"])
    fresh = step_scheduler()
    fresh.load_state_dict(state)
    assert fresh.steps == 3 and type(fresh.steps) is int


def test_a_state_written_before_the_noise_pair_was_kept_loads() -> None:
    state = trained(adaptive_scheduler()).state_dict()
    del state["noise_pair"]
    fresh = adaptive_scheduler()
    fresh.load_state_dict(state)
    assert fresh.steps == 3 and not math.isnan(fresh.lr_factor)
