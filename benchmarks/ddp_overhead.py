"""Step-time overhead of adabatch under DistributedDataParallel: two gloo ranks on loopback.

The demo's MNIST-1D CNN (with BatchNorm) at a fixed global batch (``--batch-size``, default 256:
128 per rank), SGD with momentum 0.9, one thread per process, on random data. Two variants, side
by side in one run:

* ``ddp``: plain DDP, a ``DistributedSampler`` and ``DataLoader(batch_size=batch // 2, drop_last=True)``,
  then ``zero_grad()``, forward, ``backward()`` (DDP all-reduces the gradients in it), ``step()``.
* ``adabatch``: an :class:`~adabatch.AdaptiveBatchSampler` driven by a
  :class:`~adabatch.BatchSizeScheduler` with ``schedules.Constant(batch)`` (world size and rank
  from the process group; ``remainder="drop"`` like ``drop_last=True``), and ``scheduler.train_step((x, y), loss_fn, no_sync=ddp.no_sync)``:
  backward under ``no_sync``, the out-of-memory flags reduced by MAX, the gradients averaged in
  one flat all-reduce, ``step()``, and the memory caps reduced by MIN in ``scheduler.step``.

Each repeat builds both variants afresh (same seed, same data) and lets them take turns step by
step, the first alternating, so that whatever else the machine does slows both alike. A step is
timed from fetching its batch to the end of the optimizer step, so the samplers' costs count.
The benchmark starts its own two processes (``torch.multiprocessing``, gloo on loopback); each
rank takes the median step of each variant per repeat and the two ranks' medians are averaged.
It prints the median over repeats of each variant's ms/step and of the per-repeat ratio
``adabatch / ddp`` (goal: at most 1.03). ``--json`` prints one JSON line.

``--fsdp`` adds the same model under FSDP2 (:func:`adabatch.demo.shard_model`: each convolution
block, the classifier and the root ``fully_shard``-ed), taking turns with the two above:

* ``fsdp``: plain FSDP2, the ``DistributedSampler`` loop (FSDP all-gathers each block in forward,
  again in backward, and reduce-scatters the gradients);
* ``adabatch_fsdp``: ``scheduler.train_step((x, y), loss_fn, model=model)``: the parameters
  gathered once per step, the out-of-memory flags reduced by MAX, FSDP's reduce-scatter in backward.

and prints the ratios ``adabatch_fsdp / adabatch`` (FSDP2 against DDP, both through adabatch),
``fsdp / ddp`` (the same without adabatch) and ``adabatch_fsdp / fsdp``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules
from adabatch.demo import build_model, shard_model

WORLD_SIZE = 2
#: The fixed global batch; ``--batch-size 32`` measures the demo's first epochs (16 per rank),
#: where the per-step collectives weigh the most.
DEFAULT_BATCH_SIZE = 256
VARIANTS = ("ddp", "adabatch")
FSDP_VARIANTS = ("fsdp", "adabatch_fsdp")
#: The ratios printed with ``--fsdp``: (numerator, denominator, what it measures).
FSDP_RATIOS = (("adabatch_fsdp", "adabatch", "FSDP2 / DDP, both through train_step"),
               ("fsdp", "ddp", "FSDP2 / DDP, plain loops"),
               ("adabatch_fsdp", "fsdp", "adabatch / plain, under FSDP2"))
Batch = tuple[torch.Tensor, torch.Tensor]


def make_data(samples: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(samples, 1, 40, generator=generator),
                         torch.randint(0, 10, (samples,), generator=generator))


class Variant:
    """One variant's model, optimizer and loader on this rank; :meth:`step` trains the next batch."""

    def __init__(self, name: str, data: TensorDataset, batch_size: int) -> None:
        torch.manual_seed(0)
        self.model = shard_model(build_model()) if "fsdp" in name else DistributedDataParallel(build_model())
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.step_options = {"model": self.model} if "fsdp" in name else {"no_sync": self.model.no_sync}
        if name in ("ddp", "fsdp"):
            sampler = DistributedSampler(data, shuffle=True, seed=0)
            loader = DataLoader(data, batch_size=batch_size // WORLD_SIZE, sampler=sampler, drop_last=True)
            self.train: Callable[[Batch], None] = self._plain_step
        else:
            self.scheduler = BatchSizeScheduler(self.optimizer, schedules.Constant(batch_size),
                                                min_batch_size=16, max_batch_size=batch_size)
            sampler = AdaptiveBatchSampler(data, self.scheduler, shuffle=True, seed=0, remainder="drop")
            loader = DataLoader(data, batch_sampler=sampler)
            self.train = self._adabatch_step
        self.batches = iter(loader)

    def loss(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def _plain_step(self, batch: Batch) -> None:
        self.optimizer.zero_grad()
        self.loss(batch).backward()
        self.optimizer.step()

    def _adabatch_step(self, batch: Batch) -> None:
        self.scheduler.train_step(batch, self.loss, **self.step_options)

    def step(self) -> float:
        """Fetch and train the next batch; returns the seconds it took."""
        begin = time.perf_counter()
        self.train(next(self.batches))
        return time.perf_counter() - begin


def timed_run(data: TensorDataset, batch_size: int, warmup: int, steps: int,
              names: tuple[str, ...] = VARIANTS) -> dict[str, float]:
    """Median seconds per step of each variant on this rank, over one pass of ``data``.

    The variants take turns step by step, the first alternating, so that whatever else the
    machine is doing slows all alike.
    """
    variants = {name: Variant(name, data, batch_size) for name in names}
    durations: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()  # the last repeat's models, not in the middle of a timed step
    dist.barrier()
    for index in range(warmup + steps):
        for name in names if index % 2 == 0 else names[::-1]:
            duration = variants[name].step()
            if index >= warmup:
                durations[name].append(duration)
    return {name: statistics.median(runs) for name, runs in durations.items()}


def worker(rank: int, port: int, args: argparse.Namespace, results: mp.SimpleQueue) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        data = make_data(args.batch_size * (args.warmup + args.steps))
        names = variants(args)
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeats):
            medians = timed_run(data, args.batch_size, args.warmup, args.steps, names)
            # Both ranks wait for each other at every step; their medians differ only by noise.
            mean = torch.tensor([medians[name] for name in names], dtype=torch.float64)
            dist.all_reduce(mean)
            for name, seconds in zip(names, (mean / WORLD_SIZE).tolist()):
                times[name].append(seconds)
        if rank == 0:
            results.put(times)
    finally:
        # A DistributedDataParallel model sits in a reference cycle; one left for the interpreter's
        # exit aborts the process there about one run in five (gloo, torch 2.13). Collect it first.
        gc.collect()
        dist.destroy_process_group()


def variants(args: argparse.Namespace) -> tuple[str, ...]:
    return VARIANTS + FSDP_VARIANTS if args.fsdp else VARIANTS


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> tuple[float, list[float]]:
    """The median over the repeats of the per-repeat ratio, and those ratios."""
    ratios = [a / b for a, b in zip(times[numerator], times[denominator])]
    return statistics.median(ratios), ratios


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"global batch, split over {WORLD_SIZE} ranks (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant and repeat")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--fsdp", action="store_true",
                        help="also time the model under FSDP2, plain and through train_step")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.batch_size % WORLD_SIZE or args.batch_size // WORLD_SIZE < 16:
        parser.error(f"--batch-size must be a multiple of {WORLD_SIZE} of at least {16 * WORLD_SIZE} "
                     f"(16 per rank: the BatchNorm floor), got {args.batch_size}")
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(free_port(), args, results), nprocs=WORLD_SIZE)
    times = results.get()
    medians = {variant: statistics.median(runs) for variant, runs in times.items()}
    ratio, ratios = median_ratio(times, "adabatch", "ddp")
    print(f"MNIST-1D CNN, {WORLD_SIZE} gloo ranks x {args.threads} thread(s), global batch {args.batch_size} "
          f"({args.batch_size // WORLD_SIZE} per rank), median of {args.repeats} x {args.steps} steps")
    for variant in variants(args):
        spread = ", ".join(f"{run * 1e3:.2f}" for run in times[variant])
        print(f"  {variant:13s} {medians[variant] * 1e3:7.2f} ms/step   (runs: {spread})")
    print(f"  ratio     x{ratio:.3f} (adabatch / ddp, median of the repeats' ratios; goal: at most 1.03)"
          f"   (runs: {', '.join(f'{run:.3f}' for run in ratios)})")
    fsdp_ratios = {}
    for numerator, denominator, meaning in FSDP_RATIOS if args.fsdp else ():
        fsdp_ratios[f"{numerator}/{denominator}"], runs = median_ratio(times, numerator, denominator)
        print(f"  ratio     x{fsdp_ratios[f'{numerator}/{denominator}']:.3f} ({numerator} / {denominator}: {meaning})"
              f"   (runs: {', '.join(f'{run:.3f}' for run in runs)})")
    if args.json:
        print(json.dumps({"world_size": WORLD_SIZE, "global_batch_size": args.batch_size, "threads": args.threads,
                          **{f"{variant}_ms": medians[variant] * 1e3 for variant in variants(args)}, "ratio": ratio,
                          **{f"{name}_ratio": value for name, value in fsdp_ratios.items()}}))


if __name__ == "__main__":
    main()
