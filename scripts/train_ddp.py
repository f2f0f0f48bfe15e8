"""The MNIST-1D demo under DistributedDataParallel: one process per rank, started by torchrun.

Run it with::

    python3 -m torch.distributed.run --standalone --nproc-per-node 2 scripts/train_ddp.py

(``torchrun`` is the same launcher.) Every rank generates the same MNIST-1D split (Greydanus
2020; the generator is seeded with 42), wraps the demo's CNN in ``DistributedDataParallel`` (gloo
on the CPU, NCCL when CUDA is available) and trains under the demo's policy: the GLOBAL batch
grows 32 -> 128 -> 512 at epochs 4 and 8 (Smith et al. 2018), then the learning rate is
multiplied by 0.2 at epochs 12 and 16. Nothing in the loop names the world size:

* :class:`~adabatch.AdaptiveBatchSampler` takes the world size and rank from the default process
  group and gives each rank an equal, disjoint share of every global batch;
* :class:`~adabatch.BatchSizeScheduler` finds the same group (``collective="auto"``), so its
  memory and out-of-memory decisions are agreed over the ranks;
* ``scheduler.train_step(batch, loss_fn, no_sync=ddp.no_sync)`` runs the backward pass without
  DDP's own gradient all-reduce and averages the gradients itself once every rank has finished,
  so a rank that runs out of memory never leaves the others waiting inside backward.

BatchNorm statistics stay per rank (each normalises its own share of the batch, at least 16
samples: the BatchNorm floor); DDP broadcasts rank 0's running statistics at every forward pass,
so rank 0's model is the one evaluated. Only rank 0 writes TensorBoard files and prints: the
demo's summary, or one JSON line with ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from adabatch import AdaptiveBatchSampler
from adabatch.demo import (
    DEFAULT_EPOCHS,
    DEFAULT_NUM_SAMPLES,
    DemoConfig,
    DemoResult,
    MissingExtrasError,
    build_model,
    build_training,
    evaluate,
    log_epoch,
    format_summary,
    make_mnist1d,
)
from adabatch.distributed import default_collective

LAUNCH = "python3 -m torch.distributed.run --standalone --nproc-per-node 2 scripts/train_ddp.py"
#: One thread per process: two ranks on a 2-core CPU already use both cores.
DEFAULT_THREADS = 1


@dataclass
class Wrapped:
    """The model as the ranks train it."""

    #: What the loss function calls (``fully_shard`` changes the model itself: it is the model).
    module: nn.Module
    #: What ``train_step`` is told of it.
    step_options: dict[str, Any] = field(default_factory=dict)
    #: Whether the model's forward pass is a collective (FSDP gathers the parameters in it):
    #: every rank then evaluates, not rank 0 alone.
    collective_forward: bool = False


def wrap_ddp(model: nn.Module, device: torch.device) -> Wrapped:
    """``DistributedDataParallel``, whose all-reduce ``train_step`` replaces (``no_sync``)."""
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return Wrapped(ddp, {"no_sync": ddp.no_sync})


@dataclass
class Launcher:
    """What a script of this recipe says of itself."""

    wrap: Callable[[nn.Module, torch.device], Wrapped]
    launch: str
    description: str
    name: str  # in the default log directory's name
    summary: str  # after the demo's summary: how the ranks share the work, formatted with world_size


DDP = Launcher(wrap_ddp, LAUNCH, __doc__.split("\n")[0], "ddp",
               "data parallel   {world_size} processes ({backend}, {threads} thread(s) each), each training "
               "1/{world_size} of every batch")


def parse_args(argv: Sequence[str] | None = None, launcher: Launcher = DDP) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=launcher.description, epilog=f"Launch one process per rank: {launcher.launch}"
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="epochs to train (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES,
                        help="sequences to generate, 80%% for training (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the model initialisation and the shuffle (default: %(default)s)")
    parser.add_argument("--logdir", default=None,
                        help=f"TensorBoard directory, written by rank 0 only "
                             f"(default: runs/{launcher.name}-<date>-<time>)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch threads per process (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="rank 0 prints the summary as one JSON line on stdout")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        parser.error(f"start it with torchrun, one process per rank: {launcher.launch}")
    try:
        # The demo's own validation of the shared settings.
        DemoConfig(epochs=args.epochs, num_samples=args.num_samples, seed=args.seed, threads=args.threads)
    except ValueError as error:
        parser.error(str(error))
    return args


def train(args: argparse.Namespace, device: torch.device, launcher: Launcher = DDP) -> tuple[DemoResult, int]:
    """Train on this rank; returns what was measured (meaningful on rank 0) and the world size."""
    # Imported here so that ``--help`` does not wait for tensorboard.
    from torch.utils.tensorboard import SummaryWriter

    world_size, rank = dist.get_world_size(), dist.get_rank()
    logdir = args.logdir if args.logdir is not None else \
        os.path.join("runs", time.strftime(f"{launcher.name}-%Y%m%d-%H%M%S"))

    data_begin = time.perf_counter()
    train_set, test_set = make_mnist1d(args.num_samples)
    data_s = time.perf_counter() - data_begin
    test_set = TensorDataset(*(tensor.to(device) for tensor in test_set.tensors))

    torch.manual_seed(args.seed)
    model = build_model().to(device)
    wrapped = launcher.wrap(model, device)
    writer = SummaryWriter(logdir) if rank == 0 else None
    optimizer, lr_decay, scheduler = build_training(model, wrapped.module.parameters(), writer)
    sampler = AdaptiveBatchSampler(train_set, scheduler, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_sampler=sampler, pin_memory=device.type == "cuda")
    collective = default_collective()

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(wrapped.module(batch[0]), batch[1])

    batch_sizes: list[int] = []
    test_accs: list[float] = []
    train_losses: list[float] = []
    dist.barrier()
    begin = time.perf_counter()
    try:
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            largest_batch = 0
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            samples = 0
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = scheduler.train_step((x, y), loss_fn, **wrapped.step_options)
                loss_sum += loss * len(x)
                samples += len(x)
                largest_batch = max(largest_batch, len(x))
            lr_decay.step()
            # Every rank trained its own share: the epoch's loss is the mean over all of them.
            loss_total, sample_total = (float(loss_sum), samples) if collective is None else \
                collective.sum([float(loss_sum), samples])
            batch_sizes.append(largest_batch * world_size)
            train_losses.append(loss_total / sample_total)
            if wrapped.collective_forward or rank == 0:
                test_accs.append(evaluate(model, test_set))
            if rank == 0:
                log_epoch(writer, scheduler, test_accs[-1], train_losses[-1])
    finally:
        if writer is not None:
            writer.close()
    wall_s = time.perf_counter() - begin

    result = DemoResult(
        test_acc=test_accs[-1] if test_accs else float("nan"),
        wall_s=round(wall_s, 3),
        data_s=round(data_s, 3),
        steps=scheduler.steps,
        epochs=args.epochs,
        batch_sizes=batch_sizes,
        test_acc_per_epoch=test_accs,
        train_loss_per_epoch=[round(loss, 6) for loss in train_losses],
        train_samples=len(train_set),
        test_samples=len(test_set),
        logdir=logdir,
    )
    return result, world_size


def main(argv: Sequence[str] | None = None, launcher: Launcher = DDP) -> int:
    args = parse_args(argv, launcher)
    torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        backend = "nccl"
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend)
    try:
        result, world_size = train(args, device, launcher)
    except MissingExtrasError as error:
        print(f"train_{launcher.name}: error: {error}", file=sys.stderr)
        return 1
    finally:
        # A DistributedDataParallel model sits in a reference cycle; one left for the interpreter's
        # exit aborts the process there about one run in five (gloo, torch 2.13). Collect it first.
        gc.collect()
        dist.destroy_process_group()
    if int(os.environ["RANK"]) == 0:
        if args.json:
            print(json.dumps({**result.to_dict(), "world_size": world_size, "backend": backend,
                              "threads": args.threads}))
        else:
            print(format_summary(result))
            print("  " + launcher.summary.format(world_size=world_size, backend=backend, threads=args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
