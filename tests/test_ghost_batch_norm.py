"""The suite's GhostBatchNorm: BatchNorm's statistics over ghost batches of at most the size given."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from adabatch import bn_safe_min_batch_size
from benchmarks.suite.ghost_batch_norm import GhostBatchNorm, convert_ghost_batch_norm


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
                         nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4, momentum=None)),
                         nn.Flatten(), nn.Linear(4 * 8, 3))


def trained_a_little(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    model(torch.randn(16, 1, 8, generator=generator)).sum().backward()
    return model


def test_conversion_keeps_every_parameter_and_buffer_under_its_key():
    model = trained_a_little(cnn())
    before = {key: value.clone() for key, value in model.state_dict().items()}
    parameters = list(model.parameters())
    converted = convert_ghost_batch_norm(model, virtual_batch_size=8)
    assert converted is model
    assert [type(m).__name__ for m in model.modules()].count("GhostBatchNorm") == 2
    assert not any(type(m) is nn.BatchNorm1d for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert list(model.parameters()) == parameters, "an optimizer built before still holds the same tensors"
    assert model[1].virtual_batch_size == 8 and model[3][1].momentum is None
    assert bn_safe_min_batch_size(model) == 16, "still BatchNorm to the floor"


@pytest.mark.parametrize("size", [5, 8])
def test_a_batch_up_to_the_virtual_size_is_plain_batch_norm(size):
    x = torch.randn(size, 4, 6)
    plain = nn.BatchNorm1d(4)
    ghost = convert_ghost_batch_norm(copy.deepcopy(plain), virtual_batch_size=8)
    assert isinstance(ghost, GhostBatchNorm)
    assert torch.equal(ghost(x), plain(x))
    assert torch.equal(ghost.running_mean, plain.running_mean) and torch.equal(ghost.running_var, plain.running_var)


@pytest.mark.parametrize("size, ghosts", [(9, [5, 4]), (24, [8, 8, 8]), (70, [8] * 7 + [7] * 2)])
def test_a_larger_batch_is_normalised_ghost_by_ghost(size, ghosts):
    """The fewest ghost batches of at most the virtual size, sizes differing by at most one, each
    normalised and counted in the running statistics as a batch of its own."""
    x = torch.randn(size, 4, 6, requires_grad=True)
    plain = nn.BatchNorm1d(4)
    ghost = convert_ghost_batch_norm(copy.deepcopy(plain), virtual_batch_size=8)
    expected = torch.cat([plain(part) for part in x.split(ghosts)])
    out = ghost(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(ghost.running_var, plain.running_var) and ghost.num_batches_tracked == len(ghosts)
    weights = torch.randn_like(out)
    (gradient,) = torch.autograd.grad((out * weights).sum(), x)
    (reference,) = torch.autograd.grad((expected * weights).sum(), x)
    assert torch.allclose(gradient, reference, atol=1e-6)


def test_evaluation_uses_the_running_statistics_at_any_size():
    plain = nn.BatchNorm2d(3)
    for _ in range(3):
        plain(torch.randn(6, 3, 4, 4) * 2 + 1)
    ghost = convert_ghost_batch_norm(copy.deepcopy(plain), virtual_batch_size=2).eval()
    x = torch.randn(10, 3, 4, 4)
    assert torch.equal(ghost(x), plain.eval()(x))


def test_sync_batch_norm_is_left_as_it_is_and_the_converted_model_pickles():
    model = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4), nn.BatchNorm1d(4))
    convert_ghost_batch_norm(model, 4)
    assert type(model[1]) is nn.SyncBatchNorm and type(model[2]) is GhostBatchNorm
    restored = pickle.loads(pickle.dumps(model))
    assert restored[2].virtual_batch_size == 4


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_the_virtual_batch_size_must_be_a_positive_integer(size):
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive integer"):
        convert_ghost_batch_norm(nn.BatchNorm1d(2), size)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive integer"):
        GhostBatchNorm(2, size)


def test_a_lazy_batch_norm_must_be_initialised_first():
    with pytest.raises(ValueError, match="LazyBatchNorm1d is not initialised yet"):
        convert_ghost_batch_norm(nn.Sequential(nn.LazyBatchNorm1d()), 8)


def test_an_input_of_one_dimension_is_refused():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        GhostBatchNorm(4, 8)(torch.randn(4))
