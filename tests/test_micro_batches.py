"""Batches as DataLoaders yield them: nested tuples, lists, named tuples and dicts of tensors are
measured in one walk, refused at once when their tensors disagree, and cut into micro-batches that
keep their structure at every depth."""

from __future__ import annotations

import collections
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adabatch import BatchSizeScheduler, schedules
from adabatch.micro_batches import batch_length, split_batch

Pair = collections.namedtuple("Pair", ["inputs", "target"])


def nested_batches(n: int) -> dict[str, object]:
    """Batches of ``n`` samples in the shapes default_collate and common collate functions build."""
    x, y, index = torch.arange(3 * n).reshape(n, 3), torch.arange(n)[:, None], torch.arange(n)
    return {
        "tuple in tuple": ((x, y), index),
        "list of tuples": [(x, y), (index, "a name")],
        "named tuple": Pair(inputs={"x": x}, target=y),
        "nested dict": {"inputs": {"ids": x, "mask": y.bool()}, "meta": {"name": "shard-0", "index": index}},
        "ordered dict": collections.OrderedDict(x=x, y=[y, index]),
        "defaultdict": collections.defaultdict(list, {"x": x, "rows": (y,)}),
    }


def leaves(batch, path=()):
    """``(path, value)`` of every value that is not a tuple, list or dict, with the container types on the way."""
    if isinstance(batch, dict):
        items = batch.items()
    elif isinstance(batch, (tuple, list)):
        items = enumerate(batch)
    else:
        return [(path, batch)]
    return [leaf for key, value in items for leaf in leaves(value, path + ((type(batch), key),))]


# ----------------------------------------------------------------------------------- split_batch
@pytest.mark.parametrize("structure", list(nested_batches(1)))
def test_a_nested_batch_splits_at_every_depth_keeping_its_types(structure):
    batch = nested_batches(10)[structure]
    sizes = [4, 3, 3]
    micro_batches = list(split_batch(batch, sizes))
    assert [batch_length(micro_batch) for micro_batch in micro_batches] == sizes
    expected = leaves(batch)
    for micro_batch in micro_batches:
        assert type(micro_batch) is type(batch)
        assert [path for path, _ in leaves(micro_batch)] == [path for path, _ in expected]
        for (_, value), (_, whole) in zip(leaves(micro_batch), expected):
            if not isinstance(whole, torch.Tensor):
                assert value is whole, "a value that is not a tensor goes to every micro-batch as it is"
    for position, (_, whole) in enumerate(expected):
        if isinstance(whole, torch.Tensor):
            assert torch.equal(torch.cat([leaves(micro)[position][1] for micro in micro_batches]), whole)
    if structure == "defaultdict":
        assert all(micro_batch.default_factory is list for micro_batch in micro_batches)
    if structure == "named tuple":
        assert all(micro_batch.target.shape == (size, 1) for micro_batch, size in zip(micro_batches, sizes))


def test_values_without_tensors_are_passed_whole():
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    batch = {"image": torch.zeros(4, 2), "names": names, "epoch": 3}
    for micro_batch in split_batch(batch, [2, 2]):
        assert micro_batch["names"] is names and micro_batch["epoch"] == 3


# ---------------------------------------------------------------------------------- batch_length
@pytest.mark.parametrize("structure", list(nested_batches(1)))
def test_batch_length_finds_the_size_through_the_nesting(structure):
    assert batch_length(nested_batches(7)[structure]) == 7


@pytest.mark.parametrize(
    "batch, message",
    [
        ((torch.zeros(8, 3), torch.zeros(5)), "8 at batch[0] but 5 at batch[1]"),
        ([("a name", torch.zeros(6)), (torch.zeros(6), torch.zeros(4, 2))], "6 at batch[0][1] but 4 at batch[1][1]"),
        ({"inputs": {"ids": torch.zeros(8, 16), "mask": torch.ones(7, 16)}},
         "8 at batch['inputs']['ids'] but 7 at batch['inputs']['mask']"),
        (Pair(torch.zeros(3), {"y": torch.zeros(2)}), "3 at batch[0] but 2 at batch[1]['y']"),
        ((torch.zeros(8, 3), torch.tensor(0.5)), "batch[1] is a 0-dim tensor"),
        ({"loss weight": torch.tensor(2.0), "x": torch.zeros(4)}, "batch['loss weight'] is a 0-dim tensor"),
        (torch.tensor(1.0), "batch is a 0-dim tensor"),
    ],
)
def test_batch_length_names_the_sizes_and_where_they_disagree(batch, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        batch_length(batch)


def test_a_batch_without_a_tensor_has_no_size():
    with pytest.raises(TypeError, match="it holds no tensor"):
        batch_length({"names": ["a", "b"], "inputs": ([1, 2],)})


# ---------------------------------------------------------------------------------- train_step
def make_scheduler(measure: bool, **kwargs):
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(8), memory=None, measure_noise=measure,
                                   noise_interval=1 if measure else None, **kwargs)
    return model, optimizer, scheduler


@pytest.mark.parametrize("measure", [False, True], ids=["ordinary step", "measured step"])
def test_tensors_that_disagree_are_refused_before_anything_trains(measure):
    """(x of 8, y of 5) used to train on ordinary steps and fail inside torch.split on measured ones."""
    model, optimizer, scheduler = make_scheduler(measure)
    before = [p.detach().clone() for p in model.parameters()]
    steps, forwards = [], []
    optimizer.register_step_pre_hook(lambda *_: steps.append(1))
    model.register_forward_pre_hook(lambda *_: forwards.append(1))

    def loss_fn(batch):
        x, y = batch
        return F.mse_loss(model(x).mean(), y.mean())

    with pytest.raises(ValueError, match=re.escape("8 at batch[0] but 5 at batch[1]")):
        scheduler.train_step((torch.randn(8, 3), torch.randn(5, 1)), loss_fn)
    assert forwards == [] and steps == []
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert (scheduler.steps, scheduler.samples_seen) == (0, 0)


def test_a_nested_dict_batch_on_a_measured_step_is_split_into_halves():
    model, _, scheduler = make_scheduler(measure=True)
    batch = {"inputs": {"x": torch.randn(8, 3), "meta": {"id": torch.arange(8)}}, "target": torch.randn(8, 1)}
    seen = []

    def loss_fn(micro_batch):
        inputs = micro_batch["inputs"]
        seen.append((len(inputs["x"]), len(inputs["meta"]["id"]), len(micro_batch["target"])))
        return F.mse_loss(model(inputs["x"]), micro_batch["target"])

    scheduler.train_step(batch, loss_fn)
    assert seen == [(4, 4, 4), (4, 4, 4)], "the noise pair's small batch is half of every tensor"
    assert scheduler.noise_meter.noise.steps == 1
    assert scheduler.samples_seen == 8
