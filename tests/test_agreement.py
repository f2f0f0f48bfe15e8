"""What the ranks agree on, on its own: a stand-in collective records what is exchanged.

The real reductions over torch.distributed ranks are tested in tests/test_distributed.py; here
the rules that decide what is exchanged at all."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adabatch.distributed import RankAgreement
from adabatch.memory import MemoryCap
from adabatch.testing import FakeMemory


class RecordingCollective:
    """Two ranks, the other of which always reports ``other``."""

    world_size = 2

    def __init__(self, other: int) -> None:
        self.other = other
        self.calls: list[tuple[str, object]] = []

    def sum(self, values):
        self.calls.append(("sum", list(values)))
        return [v * 2 for v in values]

    def min(self, value):
        self.calls.append(("min", value))
        return min(value, self.other)

    def max(self, value):
        self.calls.append(("max", value))
        return max(value, self.other)

    def all_reduce_mean_(self, tensors):
        self.calls.append(("mean", len(tensors)))


def test_one_process_agrees_with_itself_without_exchanging_anything() -> None:
    agreement = RankAgreement(None)
    memory = MemoryCap(FakeMemory(capacity=1000, fixed=0, per_sample=10))
    memory.add_measurements({4: 40})
    assert not agreement.distributed
    assert agreement.memory_cap(memory) == memory.cap
    assert agreement.largest(7) == 7


def test_caps_are_reduced_by_min_and_no_cap_stands_for_none() -> None:
    collective = RecordingCollective(other=RankAgreement.NO_CAP)
    agreement = RankAgreement(collective)
    memory = MemoryCap(FakeMemory(capacity=1000, fixed=0, per_sample=10))
    assert agreement.memory_cap(memory) is None  # no rank has a cap yet
    memory.add_measurements({4: 40})
    assert agreement.memory_cap(memory) == memory.cap
    collective.other = 5
    assert agreement.memory_cap(memory) == 5
    assert [name for name, _ in collective.calls] == ["min", "min", "min"]


def test_nothing_is_exchanged_while_no_rank_measures_memory() -> None:
    collective = RecordingCollective(other=3)
    assert RankAgreement(collective).memory_cap(MemoryCap(None)) is None
    assert collective.calls == []


def test_an_out_of_memory_flag_is_reduced_by_max() -> None:
    collective = RecordingCollective(other=32)
    assert RankAgreement(collective).largest(0) == 32


def test_gradients_are_averaged_only_where_there_are_some() -> None:
    collective = RecordingCollective(other=0)
    used, unused = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    used.grad = torch.ones(2)
    RankAgreement(collective).average_gradients(torch.optim.SGD([used, unused], lr=0.1))
    assert collective.calls == [("mean", 1)]


def test_a_collective_named_by_a_string_other_than_auto_is_refused() -> None:
    with pytest.raises(ValueError, match="collective must be a Collective, 'auto' or None, got 'nccl'"):
        RankAgreement("nccl")
