"""A model under ``torch.compile`` through a growing batch: how often it compiles.

Each change of batch size is a new input shape. TorchDynamo compiles the first shape as static
and, at the first other shape, once more with the batch dimension dynamic ("automatic dynamic
shapes"); after that no size recompiles, neither the schedule's sizes nor the balanced batches
that end an epoch nor a measured step's halves. The counting backend runs the captured graphs
eagerly, so the compiled run must also train exactly as the uncompiled one.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.utils.data import DataLoader, TensorDataset

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules

DATASET_SIZE = 300  # not a multiple of the batch sizes: every epoch ends in balanced, smaller batches
EPOCHS = 3


def schedule(kind: str) -> schedules.Schedule:
    if kind == "growth":
        return schedules.Step(start=16, factor=2, milestones=[1, 2])  # 16 -> 32 -> 64, in epochs
    return schedules.Adaptive(start=16, warmup=2, interval=2, extra_samples=0.9, throughput=False, growth_per_epoch=2)


def train(kind: str, loop: str, compile_options: dict | None) -> tuple[list[torch.Tensor], set[int], int]:
    """The final weights, the sizes the model saw, and the number of compiled frames."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    counter = CompileCounter()
    model = net if compile_options is None else torch.compile(net, backend=counter, **compile_options)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(DATASET_SIZE, 8, generator=generator)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = BatchSizeScheduler(optimizer, schedule(kind), min_batch_size=4, memory=None, noise_interval=64)
    sampler = AdaptiveBatchSampler(data, scheduler, seed=0)
    seen: set[int] = set()

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seen.add(len(batch[0]))
        return F.cross_entropy(model(batch[0]), batch[1])

    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for batch in DataLoader(data, batch_sampler=sampler):
            if loop == "plain":
                optimizer.zero_grad()
                loss_fn(batch).backward()
                optimizer.step()
                scheduler.step(len(batch[0]))
            else:
                scheduler.train_step(batch, loss_fn)
    return [p.detach().clone() for p in net.parameters()], seen, counter.frame_count


@pytest.mark.parametrize("loop", ["plain", "train_step"])
@pytest.mark.parametrize("kind", ["growth", "adaptive"])
def test_a_compiled_model_compiles_at_most_twice_through_a_growing_batch(kind: str, loop: str) -> None:
    weights, sizes, frames = train(kind, loop, {})
    eager_weights, eager_sizes, _ = train(kind, loop, None)
    assert len(sizes) >= 4, f"the model saw several batch sizes: {sorted(sizes)}"
    assert frames <= 2, f"{frames} compilations for sizes {sorted(sizes)}"
    assert sizes == eager_sizes
    for compiled, eager in zip(weights, eager_weights):
        torch.testing.assert_close(compiled, eager)


def test_a_dynamic_batch_dimension_compiles_once() -> None:
    """``torch.compile(dynamic=True)`` (or ``torch._dynamo.mark_dynamic(x, 0)`` on each input)
    skips the first, static compilation."""
    _, sizes, frames = train("adaptive", "train_step", {"dynamic": True})
    assert len(sizes) >= 4
    assert frames == 1
