"""The TensorBoard curves, written by a real SummaryWriter and read back from the event files."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalars
from tensorboard.util import tensor_util
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules

DATASET_SIZE = 40
EPOCHS = 3
#: Batches of 4 in epoch 0 (10 steps), of 8 afterwards (5 per epoch): the size changes at step 10.
SIZES = [4] * 10 + [8] * 10
BASE_LRS = (0.1, 0.02)


class Logged(NamedTuple):
    """What the training loop saw at one step, to compare with what was written."""

    batch_size: int
    lr_factor: float
    lrs: list[float]
    samples_before: int


def train(log_dir: Path, num_groups: int, log_every: int = 1) -> list[Logged]:
    """A short training run of a tiny model, logging to ``log_dir``; returns each step's values."""
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(DATASET_SIZE, 3, generator=generator), torch.randint(0, 2, (DATASET_SIZE,)))
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    if num_groups == 1:
        groups = [{"params": model.parameters(), "lr": BASE_LRS[0]}]
    else:
        groups = [{"params": layer.parameters(), "lr": lr} for layer, lr in zip((model[0], model[2]), BASE_LRS)]
    optimizer = torch.optim.SGD(groups, lr=BASE_LRS[0])
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    writer = SummaryWriter(str(log_dir))
    scheduler = BatchSizeScheduler(
        optimizer,
        schedules.Step(start=4, factor=2, milestones=[1]),
        lr_scaling="linear",
        writer=writer,
        log_every=log_every,
    )
    effective: list[list[float]] = []
    optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: effective.append([group["lr"] for group in optimizer.param_groups])
    )
    sampler = AdaptiveBatchSampler(dataset, scheduler, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler)

    logged: list[Logged] = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for features, labels in loader:
            factor = scheduler.lr_factor
            optimizer.zero_grad()
            F.cross_entropy(model(features), labels).backward()
            optimizer.step()
            logged.append(Logged(len(features), factor, effective[-1], scheduler.samples_seen))
            scheduler.step(len(features))
            lr_scheduler.step()
    writer.close()
    return logged


def read(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def curve(accumulator: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    events = accumulator.Scalars(tag)
    return [event.step for event in events], [event.value for event in events]


@pytest.fixture(scope="module", params=[1, 2], ids=["one group", "two groups"])
def run(request, tmp_path_factory) -> tuple[list[Logged], EventAccumulator, int]:
    log_dir = tmp_path_factory.mktemp("runs")
    logged = train(log_dir, num_groups=request.param)
    return logged, read(log_dir), request.param


def test_the_run_changes_batch_size_and_lr(run) -> None:
    logged, _, _ = run
    assert [step.batch_size for step in logged] == SIZES
    assert len({step.lrs[0] for step in logged}) > 3


def test_per_step_curves_have_the_values_of_each_step(run) -> None:
    logged, accumulator, num_groups = run
    steps = list(range(len(logged)))
    expected = {
        "adabatch/batch_size": [step.batch_size for step in logged],
        "adabatch/lr_factor": [step.lr_factor for step in logged],
        "adabatch/samples_seen": [step.samples_before for step in logged],
        "adabatch/epoch": [step.samples_before / DATASET_SIZE for step in logged],
    }
    for group in range(num_groups):
        expected[f"adabatch/lr/group_{group}"] = [step.lrs[group] for step in logged]
    for tag, values in expected.items():
        logged_steps, logged_values = curve(accumulator, tag)
        assert logged_steps == steps, tag
        assert logged_values == pytest.approx(values, rel=1e-6), tag  # stored as float32


def test_one_lr_curve_per_param_group(run) -> None:
    _, accumulator, num_groups = run
    scalars = accumulator.Tags()["scalars"]
    lr_tags = sorted(tag for tag in scalars if tag.startswith("adabatch/lr/"))
    assert lr_tags == [f"adabatch/lr/group_{group}" for group in range(num_groups)]


def test_curves_against_samples_seen(run) -> None:
    logged, accumulator, num_groups = run
    samples = [step.samples_before for step in logged]
    names = ["batch_size", "lr_factor", "epoch"] + [f"lr/group_{group}" for group in range(num_groups)]
    for name in names:
        by_step = curve(accumulator, f"adabatch/{name}")[1]
        logged_samples, values = curve(accumulator, f"adabatch_vs_samples/{name}")
        assert logged_samples == samples, name
        assert values == by_step, name
    # The x-axis of these curves grows by the batch size, not by one per step.
    assert logged_samples[11] - logged_samples[10] == 8


def test_custom_scalars_put_batch_size_and_lr_on_one_dashboard(run) -> None:
    _, accumulator, num_groups = run
    assert custom_scalars.CONFIG_SUMMARY_TAG in accumulator.PluginTagToContent(custom_scalars.PLUGIN_NAME)
    (event,) = accumulator.Tensors(custom_scalars.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())

    def tags_of(category) -> set[str]:
        return {tag for chart in category.chart for tag in chart.multiline.tag}

    dashboards = [tags_of(category) for category in layout.category]
    lr_tags = {f"adabatch/lr/group_{group}" for group in range(num_groups)}
    assert any({"adabatch/batch_size"} | lr_tags <= tags for tags in dashboards)
    every_tag = set().union(*dashboards)
    assert every_tag <= set(accumulator.Tags()["scalars"]), "the layout names only curves that exist"


@pytest.mark.parametrize(
    "log_every, steps",
    [
        (1, list(range(20))),
        (3, [0, 3, 6, 9, 10, 12, 15, 18]),  # 10: the batch grows from 4 to 8
        (4, [0, 4, 8, 10, 12, 16]),
        (25, [0, 10]),
    ],
)
def test_log_every_writes_every_k_steps_and_at_each_batch_size_change(
    log_every: int, steps: list[int], tmp_path: Path
) -> None:
    logged = train(tmp_path, num_groups=2, log_every=log_every)
    assert [step.batch_size for step in logged] == SIZES
    accumulator = read(tmp_path)
    by_step_tags = [tag for tag in accumulator.Tags()["scalars"] if tag.startswith("adabatch/")]
    assert {"adabatch/batch_size", "adabatch/lr/group_1", "adabatch/samples_seen"} <= set(by_step_tags)
    for tag in by_step_tags:
        assert curve(accumulator, tag)[0] == steps, tag
    logged_samples, sizes = curve(accumulator, "adabatch_vs_samples/batch_size")
    assert logged_samples == [logged[step].samples_before for step in steps]
    assert sizes == [SIZES[step] for step in steps]
    lrs = curve(accumulator, "adabatch/lr/group_0")[1]
    assert lrs == pytest.approx([logged[step].lrs[0] for step in steps], rel=1e-6)
