"""Bad input: every mistake gets a ValueError or TypeError whose message names the parameter and the value."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from adabatch import AdaptiveBatchSampler, BatchSizeConstraints, BatchSizeScheduler, bn_safe_min_batch_size
from adabatch.demo import DemoConfig, make_mnist1d
from adabatch.layout import EpochLayout
from adabatch.loggers import TensorBoardLogger
from adabatch.probe_cli import ProbeConfig
from adabatch.schedules import Adaptive, Constant, Geometric, Lambda, Linear, Step


@pytest.fixture
def optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)


def make_scheduler(optimizer, schedule=None, **kwargs) -> BatchSizeScheduler:
    return BatchSizeScheduler(optimizer, Constant(32) if schedule is None else schedule, **kwargs)


# ------------------------------------------------------------- sizes
BAD_SIZES = [0, -4, 16.0, 2.5, True, False, "16"]


@pytest.mark.parametrize(
    "name, value",
    [(name, value) for name in ("min_batch_size", "max_batch_size", "multiple_of") for value in BAD_SIZES]
    # None means "no cap" for max_batch_size only.
    + [("min_batch_size", None), ("multiple_of", None)],
)
def test_sizes_must_be_positive_integers(optimizer, name, value):
    message = f"{name} must be a positive integer, got {re.escape(repr(value))}"
    with pytest.raises(ValueError, match=message):
        make_scheduler(optimizer, **{name: value})
    with pytest.raises(ValueError, match=message):
        BatchSizeConstraints(**{name: value})


@pytest.mark.parametrize("value", [0, -1, 8.0, True, None], ids=repr)
@pytest.mark.parametrize(
    "make, name",
    [
        (lambda start: Constant(start), "batch_size"),
        (lambda start: Step(start=start, milestones=[1]), "start"),
        (lambda start: Linear(start=start, end=64, length=1), "start"),
        (lambda start: Geometric(start=start), "start"),
    ],
    ids=["Constant", "Step", "Linear", "Geometric"],
)
def test_schedule_starts_must_be_positive_integers(make, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {re.escape(repr(value))}"):
        make(value)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Linear(start=8, end=0, length=1), "end must be a positive integer, got 0"),
        (lambda: Linear(start=8, end=4, length=1), r"end must be at least start \(8\), got 4"),
        (lambda: Linear(start=8, end=16, length=0), "length must be a positive finite number, got 0"),
        (lambda: Linear(start=8, end=16, length=math.inf), "length must be a positive finite number, got inf"),
        (lambda: Linear(start=8, end=16, length=1, begin=-1), "begin must be a non-negative finite number, got -1"),
        (lambda: Linear(start=8, end=16, length=1, unit="epochs"),
         r"unit must be one of \('epoch', 'sample'\), got 'epochs'"),
        (lambda: Geometric(start=8, factor=1), "factor must be greater than 1, got 1"),
        (lambda: Geometric(start=8, factor=0.5), "factor must be greater than 1, got 0.5"),
        (lambda: Geometric(start=8, factor=math.nan), "factor must be a positive finite number, got nan"),
        (lambda: Geometric(start=8, every=0), "every must be a positive finite number, got 0"),
        (lambda: Geometric(start=8, end=4), r"end must be at least start \(8\), got 4"),
        (lambda: Geometric(start=8, end=2.5), "end must be a positive integer, got 2.5"),
        (lambda: Geometric(start=8, unit="batch"), r"unit must be one of \('epoch', 'sample'\), got 'batch'"),
        (lambda: Step(start=8, factor=0), "factor must be a positive finite number, got 0"),
        (lambda: Step(start=8, factor=-2), "factor must be a positive finite number, got -2"),
        (lambda: Step(start=8, unit=None), r"unit must be one of \('epoch', 'sample'\), got None"),
    ],
    ids=lambda value: "" if callable(value) else value,
)
def test_schedule_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "milestones, message",
    [
        ([10, 5], r"milestones must be strictly increasing, got \[10, 5\]"),
        ([10, 10], r"milestones must be strictly increasing, got \[10, 10\]"),
        ([1, 3, 2], r"milestones must be strictly increasing, got \[1, 3, 2\]"),
        ([0, 5], "each milestone must be a positive finite number, got 0"),
        ([-1], "each milestone must be a positive finite number, got -1"),
        ([math.nan], "each milestone must be a positive finite number, got nan"),
        (["5"], "each milestone must be a positive finite number, got '5'"),
    ],
    ids=str,
)
@pytest.mark.parametrize("unit", ["epoch", "sample"])
def test_milestones_must_be_positive_and_increasing(milestones, message, unit):
    with pytest.raises(ValueError, match=message):
        Step(start=32, milestones=milestones, unit=unit)


def test_lambda_needs_a_callable():
    with pytest.raises(TypeError, match="fn must be callable, got int"):
        Lambda(64)


# ------------------------------------------------------- the scheduler
def test_min_above_max(optimizer):
    with pytest.raises(ValueError, match=r"min_batch_size \(32\) must not exceed max_batch_size \(16\)"):
        make_scheduler(optimizer, min_batch_size=32, max_batch_size=16)


def test_no_multiple_between_floor_and_cap(optimizer):
    with pytest.raises(ValueError, match=r"no batch size fits the constraints: per replica it must be a multiple of "
                                         r"multiple_of \(8\), at least min_batch_size \(5\) and at most 7"):
        make_scheduler(optimizer, min_batch_size=5, max_batch_size=7, multiple_of=8)


@pytest.mark.parametrize("lr_scaling", ["cubic", "Linear", "", 2, 1.0])
def test_unknown_lr_scaling(optimizer, lr_scaling):
    message = r"lr_scaling must be one of \('none', 'linear', 'sqrt', 'gain'\) or a callable, got " + re.escape(repr(lr_scaling))
    with pytest.raises(ValueError, match=message):
        make_scheduler(optimizer, lr_scaling=lr_scaling)


@pytest.mark.parametrize("factor", [0, -1.0, math.nan, math.inf])
def test_an_lr_scaling_callable_must_return_a_positive_factor(optimizer, factor):
    scheduler = make_scheduler(optimizer, lr_scaling=lambda ratio: factor)
    with pytest.raises(ValueError, match=f"lr_scaling returned {re.escape(repr(float(factor)))} for batch size 32; "
                                         f"it must be positive and finite"):
        scheduler.lr_factor


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(optimizer="sgd"), TypeError, "optimizer must be a torch.optim.Optimizer, got str"),
        (dict(schedule=64), TypeError, "schedule must be a Schedule or a callable, got int"),
        (dict(warmup_steps=-1), ValueError, "warmup_steps must be a non-negative integer, got -1"),
        (dict(warmup_steps=1.5), ValueError, "warmup_steps must be a non-negative integer, got 1.5"),
        (dict(reference_batch_size=0), ValueError, "reference_batch_size must be a positive integer, got 0"),
        (dict(dataset_size=0), ValueError, "dataset_size must be a positive integer, got 0"),
        (dict(dataset_size=-5), ValueError, "dataset_size must be a positive integer, got -5"),
        (dict(dataset_size=10, min_batch_size=16), ValueError,
         r"min_batch_size \(16\) is larger than each replica's share of the dataset \(10 samples"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_scheduler_arguments(optimizer, kwargs, error, message):
    arguments = dict(optimizer=optimizer, schedule=Constant(32)) | kwargs
    with pytest.raises(error, match=message):
        BatchSizeScheduler(arguments.pop("optimizer"), arguments.pop("schedule"), **arguments)


@pytest.mark.parametrize(
    "value",
    [math.nan, 0, 0.0, -8, -0.5, math.inf, "64", None],
    ids=repr,
)
def test_a_schedule_returning_a_bad_size(optimizer, value):
    message = f"the schedule asked for batch size {re.escape(repr(value))}; it must be a positive finite number"
    scheduler = make_scheduler(optimizer, lambda progress: value)
    with pytest.raises(ValueError, match=message):
        scheduler.batch_size
    sampler = AdaptiveBatchSampler(100, make_scheduler(optimizer, lambda progress: value))
    with pytest.raises(ValueError, match=message):
        next(iter(sampler))


def test_a_schedule_that_turns_bad_midway(optimizer):
    scheduler = make_scheduler(optimizer, Lambda(lambda p: 10 if p.samples < 30 else -10))
    sampler = AdaptiveBatchSampler(100, scheduler, remainder="wrap")
    batches = iter(sampler)
    for _ in range(3):
        scheduler.step(len(next(batches)))
    with pytest.raises(ValueError, match="the schedule asked for batch size -10; it must be a positive finite number"):
        next(batches)


@pytest.mark.parametrize("batch_size", [0, -3, 2.0, True])
def test_step_with_a_bad_count(optimizer, batch_size):
    scheduler = make_scheduler(optimizer)
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {batch_size!r}"):
        scheduler.step(batch_size)


def test_bn_floor_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="floor must be a positive integer, got 0"):
        bn_safe_min_batch_size(nn.BatchNorm1d(4), floor=0)


# ---------------------------------------------------------- the sampler
@pytest.mark.parametrize("dataset", [0, [], torch.utils.data.TensorDataset(torch.zeros(0, 3))],
                         ids=["zero", "empty list", "empty TensorDataset"])
def test_empty_dataset(optimizer, dataset):
    with pytest.raises(ValueError, match="the dataset is empty: an AdaptiveBatchSampler needs at least one sample"):
        AdaptiveBatchSampler(dataset, make_scheduler(optimizer))


@pytest.mark.parametrize("remainder", ["pad", "Balance", "drop_last", None])
def test_unknown_remainder(optimizer, remainder):
    with pytest.raises(ValueError, match=r"remainder must be one of \('balance', 'wrap', 'drop'\), got "
                                         + re.escape(repr(remainder))):
        AdaptiveBatchSampler(100, make_scheduler(optimizer), remainder=remainder)


@pytest.mark.parametrize(
    "num_replicas, rank, allowed",
    [(2, 2, r"\[0, 1\]"), (2, -1, r"\[0, 1\]"), (None, 1, r"\[0, 0\]"), (4, 1.0, r"\[0, 3\]"), (4, True, r"\[0, 3\]")],
)
def test_rank_out_of_range(optimizer, num_replicas, rank, allowed):
    with pytest.raises(ValueError, match=f"rank must be an integer in {allowed}, got {rank!r}"):
        AdaptiveBatchSampler(100, make_scheduler(optimizer), num_replicas=num_replicas, rank=rank)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_replicas=0), ValueError, "num_replicas must be a positive integer, got 0"),
        (dict(num_replicas=2.0), ValueError, "num_replicas must be a positive integer, got 2.0"),
        (dict(seed=1.5), ValueError, "seed must be an integer, got 1.5"),
        (dict(seed="0"), ValueError, "seed must be an integer, got '0'"),
        (dict(data_source=object()), TypeError, "data_source must be a sized dataset or an int, got object"),
        (dict(data_source=3.5), TypeError, "data_source must be a sized dataset or an int, got float"),
        (dict(scheduler="scheduler"), TypeError, "scheduler must be a BatchSizeScheduler, got str"),
        (dict(data_source=3, num_replicas=4), ValueError, r"dataset_size \(3\) must be at least num_replicas \(4\)"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_sampler_arguments(optimizer, kwargs, error, message):
    arguments = dict(data_source=100, scheduler=make_scheduler(optimizer)) | kwargs
    with pytest.raises(error, match=message):
        AdaptiveBatchSampler(arguments.pop("data_source"), arguments.pop("scheduler"), **arguments)


@pytest.mark.parametrize(
    "dataset_size, num_replicas, share",
    [(10, 1, 10), (40, 3, 13), (63, 4, 15)],
)
def test_floor_above_each_replicas_share(optimizer, dataset_size, num_replicas, share):
    scheduler = make_scheduler(optimizer, min_batch_size=16)
    message = (rf"min_batch_size \(16\) is larger than each replica's share of the dataset \({dataset_size} samples "
               rf"over {num_replicas} replica\(s\) = {share}\); lower min_batch_size")
    with pytest.raises(ValueError, match=message):
        AdaptiveBatchSampler(dataset_size, scheduler, num_replicas=num_replicas, rank=0)


@pytest.mark.parametrize("max_batch_size, num_replicas", [(16, 1), (30, 1), (40, 2), (61, 2)])
def test_balance_needs_a_cap_of_twice_the_floor(optimizer, max_batch_size, num_replicas):
    scheduler = make_scheduler(optimizer, min_batch_size=16, max_batch_size=max_batch_size)
    message = (rf"remainder='balance' needs max_batch_size of at least 2 \* min_batch_size - 1 per replica "
               rf"\(31 x {num_replicas} replica\(s\)\).*got max_batch_size={max_batch_size}\. Raise max_batch_size, "
               rf"or use remainder='wrap' or 'drop'")
    with pytest.raises(ValueError, match=message):
        AdaptiveBatchSampler(1000, scheduler, num_replicas=num_replicas)
    for remainder in ("wrap", "drop"):  # which do not need it
        AdaptiveBatchSampler(1000, make_scheduler(optimizer, min_batch_size=16, max_batch_size=max_batch_size),
                             num_replicas=num_replicas, remainder=remainder)


def test_one_scheduler_per_dataset(optimizer):
    scheduler = make_scheduler(optimizer)
    AdaptiveBatchSampler(100, scheduler)
    AdaptiveBatchSampler(100, scheduler)  # the same data again is fine
    with pytest.raises(ValueError, match=r"this scheduler already drives a sampler with dataset_size=100, "
                                         r"num_replicas=1, remainder='balance'; got dataset_size=200"):
        AdaptiveBatchSampler(200, scheduler)
    with pytest.raises(ValueError, match="remainder='wrap'. Use one scheduler per training dataset"):
        AdaptiveBatchSampler(100, scheduler, remainder="wrap")


def test_a_sampler_over_another_dataset_than_the_scheduler_was_told(optimizer):
    scheduler = make_scheduler(optimizer, dataset_size=1000)
    with pytest.raises(ValueError, match="dataset_size is 1000, but the sampler's dataset has 999 samples"):
        AdaptiveBatchSampler(999, scheduler)


# ------------------------------------------------------------ set_epoch
def train_one_epoch(scheduler: BatchSizeScheduler, sampler: AdaptiveBatchSampler, epoch: int) -> None:
    sampler.set_epoch(epoch)
    for batch in sampler:
        scheduler.step(len(batch))


def test_set_epoch_going_backwards(optimizer):
    scheduler = make_scheduler(optimizer)
    sampler = AdaptiveBatchSampler(100, scheduler)
    train_one_epoch(scheduler, sampler, 0)
    train_one_epoch(scheduler, sampler, 1)
    sampler.set_epoch(2)
    sampler.set_epoch(2)  # the same epoch again is fine
    with pytest.raises(ValueError, match=r"set_epoch\(1\): epoch 1 is already over, training is in epoch 2\. Epochs "
                                         r"only move forward; load an earlier state_dict to replay one"):
        sampler.set_epoch(1)
    with pytest.raises(ValueError, match=r"set_epoch\(0\): epoch 0 is already over"):
        sampler.set_epoch(0)


def test_set_epoch_back_into_an_epoch_already_entered(optimizer):
    scheduler = make_scheduler(optimizer)
    sampler = AdaptiveBatchSampler(100, scheduler)
    sampler.set_epoch(3)
    batches = iter(sampler)
    scheduler.step(len(next(batches)))
    with pytest.raises(ValueError, match=r"set_epoch\(2\): epoch 2 is already over, training is in epoch 3"):
        sampler.set_epoch(2)


@pytest.mark.parametrize("epoch", [-1, 1.0, True, None, "1"])
def test_set_epoch_needs_a_non_negative_integer(optimizer, epoch):
    sampler = AdaptiveBatchSampler(100, make_scheduler(optimizer))
    with pytest.raises(ValueError, match=f"epoch must be a non-negative integer, got {re.escape(repr(epoch))}"):
        sampler.set_epoch(epoch)


# ---------------------------------------------------------- state_dicts
SAMPLER_KEYS = ["epoch", "position", "seed", "shuffle", "dataset_size", "remainder"]
SCHEDULER_KEYS = ["position", "samples_seen", "steps", "warmup_from", "warmup_begin", "dataset_size"]


def trained_pair(optimizer, dataset_size=100, steps=3, **sampler_kwargs):
    """A scheduler and sampler a few steps into training."""
    scheduler = make_scheduler(optimizer, Constant(8))
    sampler = AdaptiveBatchSampler(dataset_size, scheduler, **sampler_kwargs)
    sampler.set_epoch(0)
    batches = iter(sampler)
    for _ in range(steps):
        scheduler.step(len(next(batches)))
    return scheduler, sampler


@pytest.mark.parametrize("key", SAMPLER_KEYS)
def test_sampler_state_dict_missing_a_key(optimizer, key):
    _, sampler = trained_pair(optimizer)
    state = sampler.state_dict()
    del state[key]
    with pytest.raises(ValueError, match=f"sampler state_dict is missing '{key}'"):
        sampler.load_state_dict(state)


@pytest.mark.parametrize("key", ["epoch", "position"])
@pytest.mark.parametrize("value", [-1, 2.5, True, None, "3"], ids=repr)
def test_sampler_state_dict_with_a_bad_counter(optimizer, key, value):
    _, sampler = trained_pair(optimizer)
    state = sampler.state_dict() | {key: value}
    message = rf"sampler state_dict\['{key}'\] must be a non-negative integer, got {re.escape(repr(value))}"
    with pytest.raises(ValueError, match=message):
        sampler.load_state_dict(state)


@pytest.mark.parametrize(
    "other, key, saved, mine",
    [
        (dict(dataset_size=99), "dataset_size", "100", "99"),
        (dict(seed=1), "seed", "0", "1"),
        (dict(shuffle=False), "shuffle", "True", "False"),
        (dict(remainder="wrap"), "remainder", "'balance'", "'wrap'"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else None,
)
def test_sampler_state_dict_saved_with_other_settings(optimizer, other, key, saved, mine):
    _, sampler = trained_pair(optimizer)
    state = sampler.state_dict()
    settings_ = dict(dataset_size=100, shuffle=True, seed=0, remainder="balance") | other
    dataset_size = settings_.pop("dataset_size")
    resumed = AdaptiveBatchSampler(dataset_size, make_scheduler(optimizer, Constant(8)), **settings_)
    message = (f"sampler state_dict was saved with {key}={saved}, but this sampler has {key}={mine}; "
               f"resuming would train on other batches")
    with pytest.raises(ValueError, match=re.escape(message)):
        resumed.load_state_dict(state)


@pytest.mark.parametrize("key", SCHEDULER_KEYS)
def test_scheduler_state_dict_missing_a_key(optimizer, key):
    scheduler, _ = trained_pair(optimizer)
    state = scheduler.state_dict()
    del state[key]
    with pytest.raises(ValueError, match=f"scheduler state_dict is missing '{key}'"):
        scheduler.load_state_dict(state)


@pytest.mark.parametrize("key", ["position", "samples_seen", "steps", "warmup_begin"])
@pytest.mark.parametrize("value", [-1, 1.5, False, None], ids=repr)
def test_scheduler_state_dict_with_a_bad_counter(optimizer, key, value):
    scheduler, _ = trained_pair(optimizer)
    state = scheduler.state_dict() | {key: value}
    message = rf"scheduler state_dict\['{key}'\] must be a non-negative integer, got {re.escape(repr(value))}"
    with pytest.raises(ValueError, match=message):
        scheduler.load_state_dict(state)


def test_scheduler_state_dict_saved_with_another_dataset(optimizer):
    saved, _ = trained_pair(optimizer, dataset_size=100)
    state = saved.state_dict()
    resumed, _ = trained_pair(optimizer, dataset_size=99, steps=0)
    with pytest.raises(ValueError, match=r"scheduler state_dict was saved for dataset_size=100, but this scheduler's "
                                         r"dataset has 99 samples"):
        resumed.load_state_dict(state)
    told = make_scheduler(optimizer, dataset_size=99)
    with pytest.raises(ValueError, match="saved for dataset_size=100, but this scheduler's dataset has 99 samples"):
        told.load_state_dict(state)


def test_scheduler_state_dict_loaded_before_a_sampler_over_another_dataset(optimizer):
    saved, _ = trained_pair(optimizer, dataset_size=100)
    resumed = make_scheduler(optimizer, Constant(8))
    resumed.load_state_dict(saved.state_dict())  # the dataset is not known yet
    with pytest.raises(ValueError, match="the state_dict's dataset_size is 100, but the sampler's dataset has 99 samples"):
        AdaptiveBatchSampler(99, resumed)
    AdaptiveBatchSampler(100, resumed)


# ------------------------------------------------- integers, accepted in one way everywhere
class Writer:
    """The two methods the TensorBoard logger writes with, and nothing else."""

    def add_scalar(self, tag, value, step):
        pass

    def add_custom_scalars(self, layout):
        pass


def sampler_over(optimizer, data_source=100, **kwargs) -> AdaptiveBatchSampler:
    return AdaptiveBatchSampler(data_source, make_scheduler(optimizer), **kwargs)


def bound_constraints(dataset_size, num_replicas) -> BatchSizeConstraints:
    constraints = BatchSizeConstraints()
    constraints.bind(dataset_size, num_replicas)
    return constraints


def loaded_sampler(optimizer, epoch, position) -> AdaptiveBatchSampler:
    sampler = sampler_over(optimizer)
    sampler.load_state_dict(sampler.state_dict() | {"epoch": epoch, "position": position})
    return sampler


def epoch_set(optimizer, epoch) -> AdaptiveBatchSampler:
    sampler = sampler_over(optimizer)
    sampler.set_epoch(epoch)
    return sampler


# (what to build from an integer, where the integer is kept); NumPy's integers come from
# arrays, data files and argument parsers as often as Python's do.
INTEGER_PARAMETERS = {
    "Constant.batch_size": (lambda n: Constant(n), lambda s: s.batch_size),
    "Step.start": (lambda n: Step(start=n), lambda s: s.start),
    "Linear.start": (lambda n: Linear(start=n, end=64, length=1), lambda s: s.start),
    "Linear.end": (lambda n: Linear(start=1, end=n, length=1), lambda s: s.end),
    "Geometric.start": (lambda n: Geometric(start=n), lambda s: s.start),
    "Geometric.end": (lambda n: Geometric(start=1, end=n), lambda s: s.end),
    "Adaptive.start": (lambda n: Adaptive(start=n), lambda s: s.start),
    "Adaptive.interval": (lambda n: Adaptive(interval=n), lambda s: s.interval),
    "Adaptive.warmup": (lambda n: Adaptive(warmup=n), lambda s: s.warmup),
    "BatchSizeConstraints.min_batch_size": (lambda n: BatchSizeConstraints(min_batch_size=n),
                                            lambda c: c.min_batch_size),
    "BatchSizeConstraints.max_batch_size": (lambda n: BatchSizeConstraints(max_batch_size=n),
                                            lambda c: c.max_batch_size),
    "BatchSizeConstraints.multiple_of": (lambda n: BatchSizeConstraints(multiple_of=n), lambda c: c.multiple_of),
    "BatchSizeConstraints.bind.dataset_size": (lambda n: bound_constraints(n * 10, 1), lambda c: c.dataset_size),
    "BatchSizeConstraints.bind.num_replicas": (lambda n: bound_constraints(100, n), lambda c: c.num_replicas),
    "BatchSizeConstraints.set_memory_cap": (lambda n: bound_constraints(100, 1), lambda c: c.memory_cap),
    "bn_safe_min_batch_size.floor": (lambda n: bn_safe_min_batch_size(nn.BatchNorm1d(2), floor=n), lambda f: f),
    "EpochLayout.dataset_size": (lambda n: EpochLayout(n * 10), lambda l: l.dataset_size),
    "EpochLayout.num_replicas": (lambda n: EpochLayout(100, num_replicas=n), lambda l: l.num_replicas),
    "EpochLayout.min_batch_size": (lambda n: EpochLayout(100, min_batch_size=n), lambda l: l.min_batch_size),
    "EpochLayout.multiple_of": (lambda n: EpochLayout(100, multiple_of=n), lambda l: l.multiple_of),
    "TensorBoardLogger.log_every": (lambda n: TensorBoardLogger(Writer(), log_every=n), lambda l: l.log_every),
    "DemoConfig.epochs": (lambda n: DemoConfig(epochs=n), lambda c: c.epochs),
    "DemoConfig.num_samples": (lambda n: DemoConfig(num_samples=n * 100), lambda c: c.num_samples),
    "DemoConfig.seed": (lambda n: DemoConfig(seed=n), lambda c: c.seed),
    "DemoConfig.num_workers": (lambda n: DemoConfig(num_workers=n), lambda c: c.num_workers),
    "DemoConfig.threads": (lambda n: DemoConfig(threads=n), lambda c: c.threads),
    "ProbeConfig.min_batch_size": (lambda n: ProbeConfig(min_batch_size=n), lambda c: c.min_batch_size),
    "ProbeConfig.max_batch_size": (lambda n: ProbeConfig(max_batch_size=n), lambda c: c.max_batch_size),
    "ProbeConfig.seed": (lambda n: ProbeConfig(seed=n), lambda c: c.seed),
    "ProbeConfig.threads": (lambda n: ProbeConfig(threads=n), lambda c: c.threads),
}
SAMPLER_INTEGER_PARAMETERS = {
    "AdaptiveBatchSampler.data_source": (lambda o, n: sampler_over(o, data_source=n * 50), lambda s: s.dataset_size),
    "AdaptiveBatchSampler.seed": (lambda o, n: sampler_over(o, seed=n), lambda s: s.seed),
    "AdaptiveBatchSampler.rank": (lambda o, n: sampler_over(o, num_replicas=4, rank=n), lambda s: s.rank),
    "AdaptiveBatchSampler.num_replicas": (lambda o, n: sampler_over(o, num_replicas=n), lambda s: s.num_replicas),
    "AdaptiveBatchSampler.set_epoch": (lambda o, n: epoch_set(o, n), lambda s: s.epoch),
    "AdaptiveBatchSampler.load_state_dict.epoch": (lambda o, n: loaded_sampler(o, n, 0), lambda s: s.epoch),
    "AdaptiveBatchSampler.load_state_dict.position": (lambda o, n: loaded_sampler(o, 0, n),
                                                      lambda s: s.state_dict()["position"]),
}
INTEGER_TYPES = [int, np.int64, np.int32, np.uint16]


@pytest.mark.parametrize("integer", INTEGER_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("parameter", INTEGER_PARAMETERS)
def test_every_integer_parameter_takes_numpy_integers_and_keeps_a_plain_int(parameter, integer):
    make, kept = INTEGER_PARAMETERS[parameter]
    built = make(integer(2))
    if parameter == "BatchSizeConstraints.set_memory_cap":
        built.set_memory_cap(integer(2))
    value = kept(built)
    assert type(value) is int, f"{parameter} kept a {type(value).__name__}"
    assert value in (2, 20, 200)


@pytest.mark.parametrize("integer", INTEGER_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("parameter", SAMPLER_INTEGER_PARAMETERS)
def test_every_sampler_integer_takes_numpy_integers_and_keeps_a_plain_int(optimizer, parameter, integer):
    make, kept = SAMPLER_INTEGER_PARAMETERS[parameter]
    value = kept(make(optimizer, integer(2)))
    assert type(value) is int, f"{parameter} kept a {type(value).__name__}"
    assert value in (2, 100)


def test_a_numpy_seed_shuffles_as_the_same_python_seed(optimizer):
    batches = [list(sampler_over(optimizer, seed=seed)) for seed in (7, np.int64(7))]
    assert batches[0] == batches[1]


def test_log_every_from_numpy_through_the_scheduler(optimizer):
    scheduler = make_scheduler(optimizer, writer=Writer(), log_every=np.int64(3))
    assert scheduler.logger.log_every == 3 and type(scheduler.logger.log_every) is int


# ------------------------------------------------------------------ seeds
SEED_RANGE = r"seed must be in \[-2\*\*63, 2\*\*64 - 1\], the range torch.Generator.manual_seed takes, got "


@pytest.mark.parametrize("seed", [2**70, 2**64, -2**63 - 1], ids=str)
def test_a_seed_out_of_the_generators_range(optimizer, seed):
    with pytest.raises(ValueError, match=SEED_RANGE + str(seed)):
        sampler_over(optimizer, seed=seed)
    with pytest.raises(ValueError, match=SEED_RANGE + str(seed)):
        DemoConfig(seed=seed)
    with pytest.raises(ValueError, match=SEED_RANGE + str(seed)):
        ProbeConfig(seed=seed)


@pytest.mark.parametrize("seed", [2**64 - 1, -2**63, -1], ids=str)
def test_a_seed_at_the_ends_of_the_range_shuffles_every_epoch(optimizer, seed):
    scheduler = make_scheduler(optimizer, Constant(25))
    sampler = AdaptiveBatchSampler(100, scheduler, seed=seed)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        indices = [index for batch in sampler for index in batch]
        for _ in range(4):
            scheduler.step(25)
        assert sorted(indices) == list(range(100))


@pytest.mark.parametrize("make", [lambda seed: DemoConfig(seed=seed), lambda seed: ProbeConfig(seed=seed)],
                         ids=["DemoConfig", "ProbeConfig"])
@pytest.mark.parametrize("seed", [1.5, "0", None, True], ids=repr)
def test_a_config_seed_must_be_an_integer(make, seed):
    with pytest.raises(ValueError, match=f"seed must be an integer, got {re.escape(repr(seed))}"):
        make(seed)


# ------------------------------------------------- garbage refused where it is given
@pytest.mark.parametrize("value", ["no", 1, 0, None, 1.0], ids=repr)
@pytest.mark.parametrize(
    "name, make",
    [
        ("monotone", lambda value: Adaptive(monotone=value)),
        ("accumulate", lambda value: BatchSizeConstraints(accumulate=value)),
        ("global_floor", lambda value: BatchSizeConstraints(global_floor=value)),
        ("progress", lambda value: DemoConfig(progress=value)),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_switches_must_be_bools(name, make, value):
    with pytest.raises(ValueError, match=f"{name} must be True or False, got {re.escape(repr(value))}"):
        make(value)


@pytest.mark.parametrize("value", ["no", 1, None], ids=repr)
def test_shuffle_must_be_a_bool(optimizer, value):
    with pytest.raises(ValueError, match=f"shuffle must be True or False, got {re.escape(repr(value))}"):
        sampler_over(optimizer, shuffle=value)


@pytest.mark.parametrize("switch", [True, False, np.bool_(True)], ids=repr)
def test_switches_take_numpy_bools_and_keep_a_plain_bool(optimizer, switch):
    assert Adaptive(monotone=switch).monotone is bool(switch)
    assert sampler_over(optimizer, shuffle=switch).shuffle is bool(switch)


@pytest.mark.parametrize("milestones", [5, 2.5, "10", None], ids=repr)
def test_milestones_must_be_a_sequence(milestones):
    message = f"milestones must be a sequence of numbers, got {re.escape(repr(milestones))}"
    with pytest.raises(ValueError, match=message):
        Step(start=32, milestones=milestones)


@pytest.mark.parametrize("writer, kind", [("runs/demo", "str"), (object(), "object"), (None, "NoneType")])
def test_a_writer_must_write_scalars(optimizer, writer, kind):
    message = f"writer must have add_scalar and add_custom_scalars, as a SummaryWriter has; got {kind}"
    with pytest.raises(TypeError, match=message):
        TensorBoardLogger(writer)
    if writer is not None:
        with pytest.raises(TypeError, match=message):
            make_scheduler(optimizer, writer=writer)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DemoConfig(logdir=5), "logdir must be a path or None, got 5"),
        (lambda: ProbeConfig(safety_margin=1.0), r"safety_margin must be a fraction in \[0, 1\), got 1.0"),
        (lambda: ProbeConfig(safety_margin="0.1"), r"safety_margin must be a fraction in \[0, 1\), got '0.1'"),
        (lambda: ProbeConfig(threads=np.float64(2)), "threads must be a positive integer, got"),
        (lambda: Linear(start=8, end=16, length="1"), "length must be a positive finite number, got '1'"),
        (lambda: Linear(start=8, end=16, length=1, begin="0"), "begin must be a non-negative finite number, got '0'"),
        (lambda: Adaptive(hysteresis="0.1"), r"hysteresis must be in \[0, 1\), got '0.1'"),
        (lambda: Adaptive(signal=["noise_scale"]),
         r"signal must be one of \('noise_scale', 'norm_test'\), got \['noise_scale'\]"),
        (lambda: EpochLayout(100, remainder=["wrap"]),
         r"remainder must be one of \('balance', 'wrap', 'drop'\), got \['wrap'\]"),
    ],
    ids=lambda value: "",
)
def test_a_wrong_kind_of_value_is_refused_with_its_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: bn_safe_min_batch_size("resnet"), "model must be an nn.Module, got str"),
        (lambda: bn_safe_min_batch_size(None), "model must be an nn.Module, got NoneType"),
    ],
    ids=lambda value: "",
)
def test_a_wrong_kind_of_object_is_refused_with_its_name(make, message):
    with pytest.raises(TypeError, match=message):
        make()


@pytest.mark.parametrize("num_samples", [0, 2.5, "1000"], ids=repr)
def test_the_generated_dataset_needs_a_positive_number_of_samples(num_samples):
    with pytest.raises(ValueError, match=f"num_samples must be a positive integer, got {re.escape(repr(num_samples))}"):
        make_mnist1d(num_samples)
