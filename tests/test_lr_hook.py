"""The optimizer hook that applies the learning-rate factor: installed once per optimizer, and
carried over to copies of the scheduler."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from adabatch import BatchSizeScheduler, schedules


def make_optimizer() -> torch.optim.SGD:
    return torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)


def effective_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the next ``optimizer.step()`` runs with, read by a step pre-hook."""
    seen = []
    handle = optimizer.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()
    handle.remove()
    return seen[0]


def linear_scheduler(optimizer: torch.optim.Optimizer) -> BatchSizeScheduler:
    # Factor 4: batch 8 against a reference of 2.
    return BatchSizeScheduler(optimizer, schedules.Constant(8), lr_scaling="linear", reference_batch_size=2)


def test_rebuilding_a_scheduler_on_the_same_optimizer_does_not_compound_the_factor() -> None:
    optimizer = make_optimizer()
    linear_scheduler(optimizer)
    with pytest.warns(UserWarning, match="replaces it"):
        linear_scheduler(optimizer)
    with pytest.warns(UserWarning, match="replaces it"):
        newest = linear_scheduler(optimizer)
    assert effective_lr(optimizer) == pytest.approx(0.1 * 4)
    assert optimizer.param_groups[0]["lr"] == 0.1
    newest.step(8)
    assert newest.get_last_lr() == pytest.approx([0.1 * 4])


def test_the_newest_scheduler_is_the_one_that_scales() -> None:
    optimizer = make_optimizer()
    linear_scheduler(optimizer)
    with pytest.warns(UserWarning):
        BatchSizeScheduler(optimizer, schedules.Constant(8), lr_scaling="sqrt", reference_batch_size=2)
    assert effective_lr(optimizer) == pytest.approx(0.1 * 2)


def test_an_lr_scheduler_wrapped_in_between_does_not_make_the_hook_wrap_twice() -> None:
    optimizer = make_optimizer()
    linear_scheduler(optimizer)
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=100)
    with pytest.warns(UserWarning):
        linear_scheduler(optimizer)
    assert effective_lr(optimizer) == pytest.approx(0.1 * 4)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_scales_its_own_optimizer(how: str) -> None:
    optimizer = make_optimizer()
    scheduler = linear_scheduler(optimizer)
    twin = copy.deepcopy(scheduler) if how == "deepcopy" else pickle.loads(pickle.dumps(scheduler))
    assert twin.optimizer is not optimizer
    assert effective_lr(twin.optimizer) == pytest.approx(0.1 * 4)
    twin.step(8)
    assert twin.get_last_lr() == pytest.approx([0.1 * 4])
    assert twin.optimizer.param_groups[0]["lr"] == 0.1
    # The original is untouched: it still scales its own optimizer, once.
    assert effective_lr(optimizer) == pytest.approx(0.1 * 4)
    assert scheduler.steps == 0


@pytest.mark.parametrize("returned", ["2", torch.tensor(2.0), None, float("nan"), 0.0, -1.0])
def test_an_lr_scaling_callable_must_return_a_positive_real_number(returned: object) -> None:
    scheduler = BatchSizeScheduler(make_optimizer(), schedules.Constant(8), lr_scaling=lambda ratio: returned)
    with pytest.raises(ValueError, match=r"lr_scaling returned .* it must be positive and finite \(a real number\)"):
        scheduler.lr_factor
