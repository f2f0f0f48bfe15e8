"""The effective learning rate is the user's LR scheduler's value times the batch-size factor,
at every step, and the factor never leaks into what the LR scheduler sees.

"Effective" means what the optimizer uses inside ``step()``: it is read by a step pre-hook
registered after the BatchSizeScheduler's own, and from the update of plain SGD, whose
parameters move by exactly ``lr * grad``.
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lr_schedulers

from adabatch import BatchSizeScheduler, schedules

BASE_LRS = (0.1, 0.03)
#: d(loss)/d(parameter) of every parameter, so an SGD update reveals the learning rate it used.
GRADIENT = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
STEPS = 14
#: In samples: 4 until 16 samples, 8 until 40, then 16. Each milestone falls on a batch boundary.
SIZES = [4] * 4 + [8] * 3 + [16] * (STEPS - 7)


def growing_schedule() -> schedules.Step:
    return schedules.Step(start=4, factor=2, milestones=[16, 40], unit="sample")


RULES: dict[str, tuple[object, Callable[[float], float]]] = {
    # name: (the lr_scaling argument, the factor it must give for a ratio)
    "linear": ("linear", lambda ratio: ratio),
    "sqrt": ("sqrt", math.sqrt),
    "none": ("none", lambda ratio: 1.0),
    "callable": (lambda ratio: ratio**0.75, lambda ratio: ratio**0.75),
}

LR_SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], lr_schedulers.LRScheduler]] = {
    "StepLR": lambda optimizer: lr_schedulers.StepLR(optimizer, step_size=3, gamma=0.5),
    "MultiStepLR": lambda optimizer: lr_schedulers.MultiStepLR(optimizer, milestones=[2, 5, 9], gamma=0.3),
    "ExponentialLR": lambda optimizer: lr_schedulers.ExponentialLR(optimizer, gamma=0.9),
    "CosineAnnealingLR": lambda optimizer: lr_schedulers.CosineAnnealingLR(optimizer, T_max=7, eta_min=0.001),
    "OneCycleLR": lambda optimizer: lr_schedulers.OneCycleLR(
        optimizer, max_lr=[0.5, 0.2], total_steps=STEPS + 1, cycle_momentum=False
    ),
    "LambdaLR": lambda optimizer: lr_schedulers.LambdaLR(optimizer, lr_lambda=lambda step: 1 / (1 + step)),
    "SequentialLR": lambda optimizer: lr_schedulers.SequentialLR(
        optimizer,
        [
            lr_schedulers.LinearLR(optimizer, start_factor=0.25, total_iters=3),
            lr_schedulers.ExponentialLR(optimizer, gamma=0.8),
        ],
        milestones=[4],
    ),
}


def make_optimizer() -> torch.optim.SGD:
    """Plain SGD over two parameter groups with different learning rates."""
    groups = [
        {"params": [nn.Parameter(torch.ones(3, dtype=torch.float64))], "lr": lr} for lr in BASE_LRS
    ]
    return torch.optim.SGD(groups, lr=BASE_LRS[0])


def parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [group["params"][0] for group in optimizer.param_groups]


def lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


class EffectiveLRs:
    """Records the learning rates each optimizer step runs with; build it after the scheduler."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.seen: list[list[float]] = []
        optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: self.seen.append(lrs(optimizer)))


def backward(optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    sum((parameter * GRADIENT).sum() for parameter in parameters(optimizer)).backward()


def lrs_from_update(before: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate of each group, recovered from the SGD update ``p -= lr * GRADIENT``."""
    return [((b - p.detach()) / GRADIENT).mean().item() for b, p in zip(before, parameters(optimizer))]


@pytest.mark.parametrize("warmup_steps", [0, 3])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("lr_scheduler_name", LR_SCHEDULERS)
def test_effective_lr_is_lr_scheduler_value_times_factor_at_every_step(
    lr_scheduler_name: str, rule: str, warmup_steps: int
) -> None:
    lr_scaling, expected_factor = RULES[rule]
    optimizer = make_optimizer()
    lr_scheduler = LR_SCHEDULERS[lr_scheduler_name](optimizer)
    scheduler = BatchSizeScheduler(optimizer, growing_schedule(), lr_scaling=lr_scaling, warmup_steps=warmup_steps)
    effective = EffectiveLRs(optimizer)

    for step in range(STEPS):
        user_lrs, factor = lr_scheduler.get_last_lr(), scheduler.lr_factor
        assert scheduler.batch_size == SIZES[step]
        if not warmup_steps:
            assert factor == pytest.approx(expected_factor(SIZES[step] / 4), rel=1e-12)
        before = [p.detach().clone() for p in parameters(optimizer)]
        backward(optimizer)
        optimizer.step()
        expected = [lr * factor for lr in user_lrs]
        assert effective.seen[-1] == pytest.approx(expected, rel=1e-12), f"step {step}"
        assert lrs_from_update(before, optimizer) == pytest.approx(expected, rel=1e-9), f"step {step}"
        assert lrs(optimizer) == user_lrs, "the factor is taken off again after the step"
        scheduler.step(SIZES[step])
        assert scheduler.get_last_lr() == pytest.approx(expected, rel=1e-12)
        lr_scheduler.step()


@pytest.mark.parametrize("lr_scheduler_first", [True, False], ids=["lr_scheduler_first", "lr_scheduler_last"])
@pytest.mark.parametrize("rule", ["linear", "sqrt", "callable"])
@pytest.mark.parametrize("lr_scheduler_name", LR_SCHEDULERS)
def test_lr_scheduler_never_sees_the_factor(lr_scheduler_name: str, rule: str, lr_scheduler_first: bool) -> None:
    make_lr_scheduler = LR_SCHEDULERS[lr_scheduler_name]
    alone = make_optimizer()
    alone_lr_scheduler = make_lr_scheduler(alone)

    optimizer = make_optimizer()
    if lr_scheduler_first:
        lr_scheduler = make_lr_scheduler(optimizer)
    scheduler = BatchSizeScheduler(optimizer, growing_schedule(), lr_scaling=RULES[rule][0], warmup_steps=2)
    if not lr_scheduler_first:
        lr_scheduler = make_lr_scheduler(optimizer)

    for step in range(STEPS):
        for each in (alone, optimizer):
            backward(each)
            each.step()
        scheduler.step(SIZES[step])
        alone_lr_scheduler.step()
        lr_scheduler.step()
        assert lr_scheduler.get_last_lr() == alone_lr_scheduler.get_last_lr(), f"step {step}"
        assert lrs(optimizer) == lrs(alone), f"step {step}"
    assert scheduler.lr_factor != 1.0, "the factor was in play"


# --------------------------------------------------------------------------- warmup


@pytest.mark.parametrize(
    "warmup_steps, expected_factors",
    [
        (0, [1, 1, 1, 1, 2, 2, 2, 4, 4, 4, 4, 4]),
        (1, [1, 1, 1, 1, 2, 2, 2, 4, 4, 4, 4, 4]),
        (3, [1, 1, 1, 1, 4 / 3, 5 / 3, 2, 8 / 3, 10 / 3, 4, 4, 4]),
        # The second jump comes before the first warmup ends: it ramps from the factor reached (1.6).
        (5, [1, 1, 1, 1, 1.2, 1.4, 1.6, 2.08, 2.56, 3.04, 3.52, 4]),
    ],
)
def test_warmup_moves_the_factor_linearly_after_each_jump(warmup_steps: int, expected_factors: list[float]) -> None:
    optimizer = make_optimizer()
    scheduler = BatchSizeScheduler(optimizer, growing_schedule(), lr_scaling="linear", warmup_steps=warmup_steps)
    effective = EffectiveLRs(optimizer)
    factors = []
    for size in SIZES[: len(expected_factors)]:
        factors.append(scheduler.lr_factor)
        backward(optimizer)
        optimizer.step()
        scheduler.step(size)
    assert factors == pytest.approx(expected_factors, rel=1e-12)
    for group, lr in enumerate(BASE_LRS):
        used = [seen[group] for seen in effective.seen]
        assert used == pytest.approx([lr * factor for factor in expected_factors], rel=1e-12), f"group {group}"


def test_warmup_survives_a_checkpoint_in_the_middle_of_the_ramp() -> None:
    def fresh() -> BatchSizeScheduler:
        return BatchSizeScheduler(make_optimizer(), growing_schedule(), lr_scaling="linear", warmup_steps=3)

    scheduler = fresh()
    for size in SIZES[:5]:  # the first step of the ramp after the jump to 8
        scheduler.step(size)
    resumed = fresh()
    resumed.load_state_dict(scheduler.state_dict())
    for size in SIZES[5:]:
        assert resumed.lr_factor == pytest.approx(scheduler.lr_factor, rel=1e-15)
        scheduler.step(size)
        resumed.step(size)
    assert resumed.lr_factor == 4


# --------------------------------------------------------------- steps that do not finish


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_a_step_skipped_by_the_grad_scaler_leaves_the_lr_unscaled() -> None:
    optimizer = make_optimizer()
    lr_scheduler = lr_schedulers.StepLR(optimizer, step_size=1, gamma=0.5)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(8), lr_scaling="linear", reference_batch_size=2)
    effective = EffectiveLRs(optimizer)
    scaler = torch.amp.GradScaler("cpu")

    # A step whose gradient overflowed: the scaler does not call optimizer.step() at all.
    before = [p.detach().clone() for p in parameters(optimizer)]
    optimizer.zero_grad()
    scaler.scale(sum(p.sum() for p in parameters(optimizer)) * math.inf).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step(8)
    lr_scheduler.step()
    assert effective.seen == []
    assert all(torch.equal(b, p) for b, p in zip(before, parameters(optimizer)))
    assert lrs(optimizer) == [lr * 0.5 for lr in BASE_LRS]

    optimizer.zero_grad()
    scaler.scale(sum((p * GRADIENT).sum() for p in parameters(optimizer))).backward()
    scaler.step(optimizer)
    scaler.update()
    assert effective.seen == [pytest.approx([lr * 0.5 * 4 for lr in BASE_LRS], rel=1e-12)]
    assert lrs(optimizer) == [lr * 0.5 for lr in BASE_LRS]


def failing_closure() -> float:
    raise FloatingPointError("loss is not finite")


def test_an_exception_inside_optimizer_step_leaves_the_lr_unscaled() -> None:
    optimizer = make_optimizer()
    lr_scheduler = lr_schedulers.StepLR(optimizer, step_size=1, gamma=0.5)
    BatchSizeScheduler(optimizer, schedules.Constant(8), lr_scaling="linear", reference_batch_size=2)
    with pytest.raises(FloatingPointError):
        optimizer.step(failing_closure)
    assert lrs(optimizer) == list(BASE_LRS)
    lr_scheduler.step()
    assert lr_scheduler.get_last_lr() == [lr * 0.5 for lr in BASE_LRS]


def test_the_step_after_an_exception_uses_the_right_lr() -> None:
    optimizer = make_optimizer()
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(8), lr_scaling="linear", reference_batch_size=2)
    effective = EffectiveLRs(optimizer)
    with pytest.raises(FloatingPointError):
        optimizer.step(failing_closure)
    backward(optimizer)
    optimizer.step()
    scheduler.step(8)
    assert effective.seen[-1] == pytest.approx([lr * 4 for lr in BASE_LRS], rel=1e-12)
    assert lrs(optimizer) == list(BASE_LRS)
    assert scheduler.get_last_lr() == pytest.approx([lr * 4 for lr in BASE_LRS], rel=1e-12)


# ---------------------------------------------------------------- the reference size


@pytest.mark.filterwarnings("ignore:the schedule asked for batch size")
@pytest.mark.parametrize("rule", ["linear", "sqrt", "callable"])
@pytest.mark.parametrize(
    "options, reference, sizes",
    [
        ({}, 6, [6, 6, 12, 12, 24, 24]),
        ({"multiple_of": 4}, 8, [8, 8, 12, 12, 24, 24]),  # the start, 6, rounds to 8
        ({"min_batch_size": 10}, 10, [10, 10, 12, 12, 24, 24]),  # the start is raised to the floor
        ({"max_batch_size": 12}, 6, [6, 6, 12, 12, 12, 12]),  # the cap bounds the factor too
        ({"reference_batch_size": 3}, 3, [6, 6, 12, 12, 24, 24]),
        ({"reference_batch_size": 24, "multiple_of": 4}, 24, [8, 8, 12, 12, 24, 24]),
    ],
    ids=["start", "rounded start", "floored start", "capped", "given", "given above the start"],
)
def test_factor_is_relative_to_the_reference_batch_size(
    options: dict, reference: int, sizes: list[int], rule: str
) -> None:
    lr_scaling, expected_factor = RULES[rule]
    optimizer = make_optimizer()
    schedule = schedules.Step(start=6, factor=2, milestones=[12, 36], unit="sample")
    scheduler = BatchSizeScheduler(optimizer, schedule, lr_scaling=lr_scaling, **options)
    effective = EffectiveLRs(optimizer)
    assert scheduler.reference_batch_size == reference
    for size in sizes:
        assert scheduler.batch_size == size
        assert scheduler.lr_factor == pytest.approx(expected_factor(size / reference), rel=1e-12)
        backward(optimizer)
        optimizer.step()
        scheduler.step(size)
        assert effective.seen[-1] == pytest.approx(
            [lr * expected_factor(size / reference) for lr in BASE_LRS], rel=1e-12
        )
