"""BatchSizeConstraints: rounding, floor, cap, dataset limit and replicas; its warnings; the BatchNorm floor."""

from __future__ import annotations

import doctest
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adabatch import AdaptiveBatchSampler, BatchSizeConstraints, BatchSizeScheduler, bn_safe_min_batch_size, constraints, schedules


def bound(min_batch_size=1, max_batch_size=None, multiple_of=1, dataset_size=None, num_replicas=1):
    result = BatchSizeConstraints(min_batch_size, max_batch_size, multiple_of)
    result.bind(dataset_size, num_replicas)
    return result


@pytest.mark.parametrize(
    "settings_, requested, expected",
    [
        # No bounds: fractional requests go to the nearest integer.
        (dict(), 1, 1),
        (dict(), 31.4, 31),
        (dict(), 31.6, 32),
        (dict(), 5000, 5000),
        # Nearest multiple of multiple_of.
        (dict(multiple_of=8), 99, 96),
        (dict(multiple_of=8), 101, 104),
        (dict(multiple_of=8), 60.2, 64),
        (dict(multiple_of=8), 128, 128),
        (dict(multiple_of=3), 10, 9),
        (dict(multiple_of=3), 11, 12),
        # ... per replica: 116 over 2 replicas is 58 each, nearest multiple of 8 is 56.
        (dict(multiple_of=8, num_replicas=2), 116, 112),
        (dict(multiple_of=8, num_replicas=2), 124, 128),
        (dict(multiple_of=8, num_replicas=4), 100, 96),
        # Every size is a multiple of num_replicas.
        (dict(num_replicas=3), 100, 99),
        (dict(num_replicas=3), 101, 102),
        (dict(num_replicas=4), 1, 4),
        # Floor, per replica, raised to the granularity.
        (dict(min_batch_size=16), 5, 16),
        (dict(min_batch_size=16), 16, 16),
        (dict(min_batch_size=16), 17, 17),
        (dict(min_batch_size=16, num_replicas=4), 5, 64),
        (dict(min_batch_size=16, num_replicas=4), 69, 68),
        (dict(min_batch_size=20, multiple_of=8), 1, 24),
        (dict(min_batch_size=20, multiple_of=8, num_replicas=2), 1, 48),
        # Cap on the global size, split over replicas and lowered to the granularity.
        (dict(max_batch_size=100), 500, 100),
        (dict(max_batch_size=100), 100, 100),
        (dict(max_batch_size=100, multiple_of=8), 500, 96),
        (dict(max_batch_size=100, num_replicas=3), 500, 99),
        (dict(max_batch_size=100, multiple_of=8, num_replicas=3), 500, 96),
        (dict(min_batch_size=16, max_batch_size=16), 1, 16),
        (dict(min_batch_size=16, max_batch_size=16), 10**6, 16),
        # The dataset is a cap too, whichever of the two is lower wins.
        (dict(dataset_size=1000), 5000, 1000),
        (dict(dataset_size=1000, num_replicas=3), 5000, 999),
        (dict(dataset_size=1000, multiple_of=8, num_replicas=3), 5000, 984),
        (dict(dataset_size=1000, max_batch_size=2048), 5000, 1000),
        (dict(dataset_size=1000, max_batch_size=512), 5000, 512),
        (dict(dataset_size=1000, max_batch_size=512), 300, 300),
        (dict(dataset_size=7, num_replicas=7), 100, 7),
    ],
    ids=str,
)
def test_apply(settings_, requested, expected):
    constraints_ = bound(**settings_)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert constraints_.apply(requested) == expected


@settings(max_examples=200, deadline=None)
@given(
    min_batch_size=st.integers(1, 64),
    multiple_of=st.integers(1, 16),
    num_replicas=st.integers(1, 8),
    extra_cap=st.none() | st.integers(0, 4096),
    dataset_size=st.none() | st.integers(1, 20_000),
    requested=st.floats(0.01, 50_000),
)
def test_apply_lands_on_an_allowed_size(min_batch_size, multiple_of, num_replicas, extra_cap, dataset_size,
                                        requested):
    max_batch_size = None if extra_cap is None else min_batch_size * num_replicas + extra_cap
    lowest = math.ceil(min_batch_size / multiple_of) * multiple_of
    caps = [c // num_replicas for c in (max_batch_size, dataset_size) if c is not None]
    highest = math.inf if not caps else min(caps) // multiple_of * multiple_of
    if highest < lowest or (dataset_size is not None and dataset_size // num_replicas < min_batch_size):
        with pytest.raises(ValueError):
            bound(min_batch_size, max_batch_size, multiple_of, dataset_size, num_replicas)
        return
    constraints_ = bound(min_batch_size, max_batch_size, multiple_of, dataset_size, num_replicas)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        size = constraints_.apply(requested)
        again = constraints_.apply(size)
    assert isinstance(size, int)
    assert size % num_replicas == 0
    per_replica = size // num_replicas
    assert per_replica % multiple_of == 0
    assert lowest <= per_replica <= highest
    assert size <= min(c for c in (max_batch_size, dataset_size, math.inf) if c is not None)
    if lowest < per_replica < highest:  # not clamped: the nearest allowed multiple
        assert abs(per_replica - requested / num_replicas) <= multiple_of / 2
    assert again == size, "an allowed size is kept as it is"


def test_per_replica_cap():
    assert BatchSizeConstraints().per_replica_cap == math.inf
    assert bound(max_batch_size=100, multiple_of=8, num_replicas=3).per_replica_cap == 33  # not rounded
    assert bound(dataset_size=1000, num_replicas=3).per_replica_cap == 333


def test_bind_moves_the_bounds_with_the_dataset_and_replicas():
    constraints_ = BatchSizeConstraints(min_batch_size=4, multiple_of=4)
    assert constraints_.apply(5000) == 5000
    constraints_.bind(1000, num_replicas=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert constraints_.apply(5000) == 1000
        assert constraints_.apply(1) == 8


# --------------------------------------------------------------- warnings
def test_a_request_below_the_floor_warns_once():
    constraints_ = bound(min_batch_size=16)
    with pytest.warns(UserWarning, match=r"asked for batch size 5, below min_batch_size=16 per replica; "
                                         r"training at 16 instead \(this warning is shown once\)"):
        assert constraints_.apply(5) == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert constraints_.apply(3) == 16
        assert constraints_.apply(1.5) == 16


def test_the_floor_warning_counts_all_replicas():
    constraints_ = bound(min_batch_size=16, num_replicas=4)
    with pytest.warns(UserWarning, match=r"asked for batch size 40, below min_batch_size=16 per replica; "
                                         r"training at 64 instead"):
        assert constraints_.apply(40) == 64


def test_a_request_above_the_cap_warns_once():
    constraints_ = bound(max_batch_size=100)
    with pytest.warns(UserWarning, match=r"asked for batch size 500, above max_batch_size=100; training at 100"):
        assert constraints_.apply(500) == 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert constraints_.apply(5000) == 100


def test_a_request_above_the_dataset_warns_once_naming_the_dataset():
    constraints_ = bound(max_batch_size=4096, dataset_size=1000)
    with pytest.warns(UserWarning, match=r"asked for batch size 2000, above the dataset size \(1000\); training at "
                                         r"1000"):
        assert constraints_.apply(2000) == 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert constraints_.apply(3000) == 1000


def test_each_bound_warns_once_on_its_own():
    constraints_ = bound(min_batch_size=16, max_batch_size=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for requested in (1, 500, 2, 600, 50, 3, 700):
            constraints_.apply(requested)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "below min_batch_size=16" in messages[0]
    assert "above max_batch_size=100" in messages[1]
    assert all(issubclass(w.category, UserWarning) for w in caught)


def test_requests_inside_the_bounds_do_not_warn():
    constraints_ = bound(min_batch_size=16, max_batch_size=1024, multiple_of=8, dataset_size=5000, num_replicas=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for requested in (32, 33.3, 100, 512, 1000, 1024):
            constraints_.apply(requested)


def test_the_scheduler_warns_once_for_a_schedule_past_the_cap():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = BatchSizeScheduler(
        optimizer, schedules.Step(start=64, factor=4, milestones=[100, 200], unit="sample"), max_batch_size=512
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sizes = [scheduler.target_at(position) for position in range(0, 1000, 50)]
    assert sizes[:2] == [64, 64] and sizes[2:4] == [256, 256] and set(sizes[4:]) == {512}
    assert [str(w.message) for w in caught] == [
        "the schedule asked for batch size 1024, above max_batch_size=512; training at 512 instead "
        "(this warning is shown once)"
    ]


def test_a_request_equal_to_the_cap_does_not_warn():
    constraints_ = bound(max_batch_size=100, multiple_of=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert constraints_.apply(100) == 96


# ------------------------------------------------------ BatchNorm floor
class Residual(nn.Module):
    """A model whose BatchNorm sits a few modules deep."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@pytest.mark.parametrize(
    "model, expected",
    [
        (nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4)), 16),
        (nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()), 16),
        (nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2)), 16),
        (nn.Sequential(nn.Linear(4, 4), nn.SyncBatchNorm(4)), 16),
        (nn.BatchNorm1d(4, affine=False, track_running_stats=False), 16),
        (Residual(), 16),
        (nn.Linear(4, 2), 1),
        (nn.Sequential(nn.Conv1d(1, 4, 3), nn.GroupNorm(2, 4), nn.LayerNorm(8)), 1),
        (nn.Sequential(nn.Conv1d(1, 4, 3), nn.InstanceNorm1d(4)), 1),
        (nn.Sequential(), 1),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, nn.Module) else str(value),
)
def test_bn_safe_min_batch_size(model, expected):
    assert bn_safe_min_batch_size(model) == expected


def test_bn_safe_min_batch_size_with_a_custom_floor():
    with_batch_norm = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert bn_safe_min_batch_size(with_batch_norm, floor=8) == 8
    assert bn_safe_min_batch_size(with_batch_norm, floor=32) == 32
    assert bn_safe_min_batch_size(nn.Linear(4, 4), floor=32) == 1
    assert bn_safe_min_batch_size(with_batch_norm) == constraints.DEFAULT_BN_FLOOR == 16


def test_the_bn_floor_feeds_the_scheduler():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(4), min_batch_size=bn_safe_min_batch_size(model))
    with pytest.warns(UserWarning, match="below min_batch_size=16"):
        assert scheduler.target_at(0) == 16


def test_docstring_examples_hold():
    results = doctest.testmod(constraints, verbose=False)
    assert results.attempted > 0
    assert results.failed == 0


# ------------------------------------------------------ SyncBatchNorm: a global floor
@pytest.mark.parametrize("num_replicas, floor_per_replica", [(1, 16), (2, 8), (3, 6), (4, 4), (32, 1)])
def test_a_global_floor_is_shared_among_the_replicas(num_replicas, floor_per_replica):
    constraints_ = BatchSizeConstraints(min_batch_size=16, global_floor=True)
    constraints_.bind(dataset_size=1000, num_replicas=num_replicas)
    assert constraints_.floor_per_replica == floor_per_replica
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the request is below the floor on purpose
        assert constraints_.apply(1) == floor_per_replica * num_replicas
    per_replica = BatchSizeConstraints(min_batch_size=16)
    per_replica.bind(dataset_size=1000, num_replicas=num_replicas)
    assert per_replica.floor_per_replica == 16


def test_the_scheduler_passes_sync_batch_norm_to_the_floor():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(16), min_batch_size=16, sync_batch_norm=True)
    AdaptiveBatchSampler(1000, scheduler, num_replicas=4, rank=0)
    assert scheduler.batch_size == 16 and scheduler.constraints.floor_per_replica == 4
