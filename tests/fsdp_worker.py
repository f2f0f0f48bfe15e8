"""One rank of the FSDP2 tests in test_fsdp.py, started by torchrun on loopback (gloo).

Usage: ``python -m torch.distributed.run --standalone --nproc-per-node 2 fsdp_worker.py SCENARIO
OUT_DIR``; each rank writes ``OUT_DIR/rank<r>.json``. A scenario trains several runs on the same
data and the same initial weights, side by side in one process group:

* ``compare``: DistributedDataParallel and FSDP2 through ``train_step`` (in micro-batches), and
  through the plain loop with Adam and ``Adaptive()``; FSDP2 ``train_step`` with ``Adaptive()``,
  checked at each measured step against the two-batch estimate from the whole gradients;
* ``oom``: FSDP2 ``train_step`` on devices of different sizes (the memory caps agreed by MIN),
  with an out-of-memory error injected on rank 1 alone.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))
from distributed_worker import DATASET_SIZE, dataset, fail_once_on_rank_1  # noqa: E402

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules  # noqa: E402
from adabatch.testing import FakeMemory  # noqa: E402

EPOCHS = 2
MIN_BATCH_SIZE = 8


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 33), nn.ReLU(), nn.Linear(33, 17), nn.ReLU(), nn.Linear(17, 2))


def sharded(model: nn.Sequential) -> nn.Sequential:
    """Each Linear layer and the root under ``fully_shard`` (33 and 17 rows: uneven shards)."""
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def whole(parameter: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor)."""
    return parameter.full_tensor() if isinstance(parameter, DTensor) else parameter


def noise_record(scheduler: BatchSizeScheduler) -> dict[str, float]:
    noise = scheduler.noise_meter.noise
    return {"grad_sqr": noise.grad_sqr, "grad_var": noise.grad_var, "steps": noise.steps,
            "raw_grad_sqr": noise.last_grad_sqr, "raw_grad_var": noise.last_grad_var}


def train(model: nn.Module, scheduler: BatchSizeScheduler, optimizer: torch.optim.Optimizer, *,
          wrapped: Any, plain: bool, before_step: Callable[..., None] | None = None) -> dict[str, Any]:
    """Train ``EPOCHS`` epochs; what each step did, and the whole parameters at the end."""
    data = dataset()
    sampler = AdaptiveBatchSampler(data, scheduler, seed=0)
    effective: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, *_: effective.append(opt.param_groups[0]["lr"]))
    record: dict[str, Any] = {"steps": [], "indices": []}
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for x, y, index in DataLoader(data, batch_sampler=sampler):
            if before_step is not None:
                before_step(x, y)
            if plain:
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                scheduler.step(len(x))
            else:
                scheduler.train_step((x, y), lambda b: F.cross_entropy(model(b[0]), b[1]), model=wrapped)
            step = {"size": len(x), "lr": effective[-1], "cap": scheduler.constraints.memory_cap,
                    "rank_cap": scheduler.memory.cap}
            if scheduler.noise_meter is not None:
                step.update(noise_record(scheduler))
            record["steps"].append(step)
            record["indices"].append([epoch, index.tolist()])
    record["optimizer_steps"] = len(effective)
    record["scheduler_steps"] = scheduler.steps
    record["parameters"] = [whole(p).detach().flatten().tolist() for p in model.parameters()]
    return record


def micro_batched() -> FakeMemory:
    """A device on which 64 samples per rank do not fit in one micro-batch, so the growth to a
    global batch of 128 trains in micro-batches (in both runs alike)."""
    return FakeMemory(capacity=3_000_000, fixed=1_000_000, per_sample=40_000)


def compare() -> dict[str, Any]:
    records: dict[str, Any] = {}
    step_schedule = schedules.Step(start=32, factor=4, milestones=[1])
    for kind in ("ddp", "fsdp"):
        net = mlp()
        wrapped = DistributedDataParallel(net) if kind == "ddp" else sharded(net)
        memory = micro_batched()
        memory.attach(wrapped)
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
        scheduler = BatchSizeScheduler(optimizer, step_schedule, min_batch_size=MIN_BATCH_SIZE, lr_scaling="linear",
                                       memory=memory, accumulate=True)
        records[f"{kind}_train_step"] = train(wrapped, scheduler, optimizer, wrapped=wrapped, plain=False)
    # The DDP and FSDP2 runs must take the same decisions from the same noise statistics, so the
    # controller does not weigh step times here (FSDP2's steps take about twice as long).
    for kind in ("ddp", "fsdp"):
        net = mlp()
        wrapped = DistributedDataParallel(net) if kind == "ddp" else sharded(net)
        optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-3)
        scheduler = BatchSizeScheduler(optimizer, schedules.Adaptive(start=32, warmup=4, interval=4, throughput=False),
                                       min_batch_size=MIN_BATCH_SIZE, memory=None, noise_interval=64)
        records[f"{kind}_plain_adaptive"] = train(wrapped, scheduler, optimizer, wrapped=wrapped, plain=True)
    records["fsdp_train_step_adaptive"] = adaptive_train_step_against_whole_gradients()
    return records


def adaptive_train_step_against_whole_gradients() -> dict[str, Any]:
    """FSDP2 ``train_step`` with ``Adaptive()``: before each measured step, the whole model is
    gathered and the two gradients of the documented pair (the global first micro-batches, the
    global batch) computed on it, so the step's raw estimates can be checked."""
    world_size = dist.get_world_size()
    model = sharded(mlp())
    reference = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # A samples budget of 5% grows this model's batch within the run, so that the estimator is
    # checked at more than one size.
    scheduler = BatchSizeScheduler(optimizer, schedules.Adaptive(start=32, warmup=4, interval=4, throughput=False,
                                                                 extra_samples=0.05),
                                   min_batch_size=MIN_BATCH_SIZE, memory=None, noise_interval=64)
    expected: list[dict[str, float] | None] = []

    def before_step(x: torch.Tensor, y: torch.Tensor) -> None:
        if not scheduler.noise_sampling.due(scheduler.position, len(x) * world_size) or len(x) < 2 * MIN_BATCH_SIZE:
            expected.append(None)  # not measured, or measured by the consecutive-steps fallback (not halved)
            return
        reference.load_state_dict({name: whole(p).detach() for name, p in model.named_parameters()})
        xs, ys = [torch.empty_like(x) for _ in range(world_size)], [torch.empty_like(y) for _ in range(world_size)]
        dist.all_gather(xs, x)
        dist.all_gather(ys, y)
        first = len(x) - len(x) // 2  # the measured step's halves, as train_step cuts them
        small = sqr_norm_of_gradient(reference, torch.cat([b[:first] for b in xs]), torch.cat([b[:first] for b in ys]))
        big = sqr_norm_of_gradient(reference, torch.cat(xs), torch.cat(ys))
        batch_small, batch_big = first * world_size, len(x) * world_size
        expected.append({
            "raw_grad_sqr": (batch_big * big - batch_small * small) / (batch_big - batch_small),
            "raw_grad_var": (small - big) / (1 / batch_small - 1 / batch_big),
        })

    record = train(model, scheduler, optimizer, wrapped=model, plain=False, before_step=before_step)
    record["expected"] = expected
    return record


def sqr_norm_of_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())


def out_of_memory(rank: int) -> dict[str, Any]:
    model = sharded(mlp())
    # Ranks differ in memory: rank 1's device holds less, so the caps must be agreed.
    capacity = 10_000_000 if rank == 0 else 6_000_000
    memory = FakeMemory(capacity=capacity, fixed=1_000_000, per_sample=40_000)
    memory.attach(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Measured steps 3, 7, ... (halved), not the failing one.
    scheduler = BatchSizeScheduler(optimizer, schedules.Step(start=32, factor=4, milestones=[1]),
                                   min_batch_size=MIN_BATCH_SIZE, lr_scaling="linear", memory=memory, accumulate=True,
                                   measure_noise=True, noise_interval=128)
    fired = fail_once_on_rank_1(model, scheduler, rank)
    record = train(model, scheduler, optimizer, wrapped=model, plain=False)
    record["out_of_memory_errors"] = memory.out_of_memory_errors + len(fired)
    return record


def main(scenario: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    record = compare() if scenario == "compare" else out_of_memory(rank)
    record["dataset_size"] = DATASET_SIZE
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(record, file, allow_nan=True)
    # A DistributedDataParallel still alive when the group is destroyed can abort the process
    # at exit under gloo; collect it first.
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
