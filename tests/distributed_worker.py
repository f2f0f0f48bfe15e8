"""One rank of the multi-process tests in test_distributed.py, started by torchrun on loopback.

Usage: ``python -m torch.distributed.run --standalone --nproc-per-node N distributed_worker.py
SCENARIO OUT_DIR``; each rank writes ``OUT_DIR/rank<r>.json`` with what it trained.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules
from adabatch.testing import FakeClock, FakeMemory

DATASET_SIZE = 512


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(DATASET_SIZE, 8, generator=generator)
    return TensorDataset(x, (x[:, 0] > 0).long(), torch.arange(DATASET_SIZE))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))


def fail_once_on_rank_1(model: nn.Module, scheduler: BatchSizeScheduler, rank: int) -> list[bool]:
    """Make rank 1's forward pass run out of memory once, at optimizer step 5; returns the list
    that holds ``True`` once it has."""
    fired: list[bool] = []

    def fail_once(_module: nn.Module, _inputs: tuple) -> None:
        if rank == 1 and scheduler.steps == 5 and not fired:
            fired.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB (injected on rank 1)")

    model.register_forward_pre_hook(fail_once)
    return fired


def main(scenario: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    data = dataset()
    net = model()
    memory = None
    if scenario in ("agree", "oom"):
        # Ranks differ in memory: rank 1's device holds less, so the caps must be agreed.
        capacity = 10_000_000 if rank == 0 else 6_000_000
        memory = FakeMemory(capacity=capacity, fixed=1_000_000, per_sample=40_000)
        memory.attach(net)
    ddp = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    # On the smoothed noise scale (confidence=0): over 32 steps the lower bound stays below the
    # start, and this scenario needs decisions that change the size.
    schedule = schedules.Adaptive(start=32, warmup=4, interval=4, confidence=0) if scenario == "agree" else \
        schedules.Step(start=32, factor=4, milestones=[1])
    # Every other step measured (at global batch 32): the ranks must agree on which.
    scheduler = BatchSizeScheduler(optimizer, schedule, min_batch_size=8, lr_scaling="linear", memory=memory,
                                   accumulate=scenario == "oom", noise_interval=64)
    if scenario == "agree":
        # Step times from a simulated clock, so the decisions do not hang on this machine's load.
        # Rank 1's device is slower: the times the controller weighs are agreed across the ranks.
        clock = FakeClock(fixed=0.01 * (1 + rank), per_sample=1e-5 * (1 + rank))
        clock.attach(net)
        scheduler.step_times.clock = clock
    sampler = AdaptiveBatchSampler(data, scheduler, seed=0)
    effective: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, *_: effective.append(opt.param_groups[0]["lr"]))
    if scenario == "oom":
        fail_once_on_rank_1(net, scheduler, rank)
    record: dict = {"rank": rank, "world_size": world_size, "steps": [], "indices": []}
    epochs = int(os.environ.get("EPOCHS", "2"))
    stop_after = int(os.environ.get("STOP_AFTER", "0"))
    # Checkpoint the whole run after this epoch, saved as docs/resume.md's loop saves after a step:
    # with the epoch just finished. The run carries on.
    save_after_epoch = int(os.environ.get("SAVE_AFTER_EPOCH", "-1"))
    num_workers = int(os.environ.get("NUM_WORKERS", "0"))
    first_epoch = 0
    if os.environ.get("RESUME_FROM"):
        state = torch.load(os.environ["RESUME_FROM"])
        if "model" in state:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        first_epoch = state["epoch"]
    for epoch in range(first_epoch, epochs):
        sampler.set_epoch(epoch)
        for x, y, index in DataLoader(data, batch_sampler=sampler, num_workers=num_workers):
            scheduler.train_step((x, y), lambda b: F.cross_entropy(ddp(b[0]), b[1]), no_sync=ddp.no_sync)
            record["steps"].append({"size": len(x), "lr": effective[-1], "cap": scheduler.constraints.memory_cap,
                                    "noise": scheduler.noise_meter.noise.noise_scale
                                    if scheduler.noise_meter is not None else None})
            record["indices"].append([epoch, index.tolist()])
            if stop_after and scheduler.steps == stop_after:
                break
        if stop_after and scheduler.steps == stop_after:
            break
        if epoch == save_after_epoch and rank == 0:
            torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(), "epoch": epoch},
                       os.path.join(out_dir, "checkpoint.pt"))
    record["optimizer_steps"] = len(effective)
    record["scheduler_steps"] = scheduler.steps
    record["parameters"] = [p.detach().flatten().tolist() for p in net.parameters()]
    if stop_after and rank == 0:
        torch.save({"scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(), "epoch": sampler.epoch},
                   os.path.join(out_dir, "checkpoint.pt"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(record, file, allow_nan=True)
    # A DistributedDataParallel still alive when the group is destroyed can abort the process
    # at exit under gloo; collect it first.
    ddp = None  # drop the last reference
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
