"""Step-time overhead of adabatch's scheduler and noise statistics on the MNIST-1D CNN.

Side by side in one run on the demo's CNN with BatchNorm at batch 256 on the CPU (SGD, momentum
0.9). Every variant trains its own copy of the model on the same batches, taken from memory so
that only the training step and what adabatch adds to it are timed (the sampler's own cost is
``sampler_overhead.py``'s). The variants take turns step by step, in a new random order at each
step (a fixed rotation keeps who runs after whom, and that alone moved a variant by 2–3%), so
that a shared machine's changing load falls on all of them alike:

* ``plain``: forward, backward, ``optimizer.step()``.
* ``plain again``: the same, a second time: the control, whose ratio shows the noise floor.
* ``scheduler``: the same with a ``BatchSizeScheduler`` wrapping the optimizer and
  ``scheduler.step(len(x))`` after each step.
* ``scheduler+noise``: the same with the noise scale measured by the plain loop's fallback. By
  default one step in eight is measured at this batch size (``max(512, 8 × 256)`` samples per
  measurement): the step before it copies its gradients, the measured step copies its own and
  takes one Gram product of the two.
* ``plain, zeroed after``: the plain loop with ``optimizer.zero_grad()`` after
  ``optimizer.step()`` instead of before the forward pass, as ``train_step`` does. In a loop
  that trains one model this is the same sequence; here, where other models train between two
  of its steps, freeing the gradients early costs time of its own (up to about 5% of a step on
  this machine), so ``train_step`` is compared with this loop.
* ``train_step``: ``scheduler.train_step`` with ``schedules.Constant``, no noise statistics.
* ``train_step+noise``: ``scheduler.train_step`` with ``schedules.Adaptive`` (and its default
  AdaScale gain) at batch 256. One step in eight is measured: the batch fits in one micro-batch,
  so that step trains it as two halves of 128, the first of which is the estimator's small batch.
* ``halves``: two halves by hand at every step, without adabatch: what the split itself costs
  on this machine.
* ``plain Adam`` and ``scheduler+noise Adam``: the plain loop and ``scheduler+noise`` with Adam
  instead of SGD, where each measured pair is also preconditioned by Adam's second moments.

Prints the median milliseconds per step of each and its ratio to ``plain`` (``plain Adam`` for
the Adam variant; and of ``train_step`` to ``plain, zeroed after`` and of ``train_step+noise``
to ``train_step``): one plus the median difference of sums over ``BLOCK`` consecutive steps over
the baseline's median sum. A block spans whole cycles of measured and unmeasured steps, so the
measured steps count as they do in the wall time (a median of single steps would leave them
out: they are one step in eight), while the pairing cancels the load that both blocks saw. The
goal is at most 1.02 for the scheduler with noise statistics. ``--json`` prints one JSON line.

Usage: ``python3 benchmarks/overhead.py [--steps 1000] [--threads 2] [--json]``
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from adabatch import BatchSizeScheduler, schedules
from adabatch.demo import build_model

BATCH_SIZE = 256
#: Steps summed before two variants are compared: two cycles of the default measurement
#: interval at this batch size (one step in eight measured, the step before it kept).
BLOCK = 16
VARIANTS = ("plain", "plain again", "scheduler", "scheduler+noise", "plain, zeroed after", "train_step",
            "train_step+noise", "halves", "plain Adam", "scheduler+noise Adam")

Batch = tuple[torch.Tensor, torch.Tensor]


def make_batches(steps: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps * BATCH_SIZE, 1, 40, generator=generator)
    y = torch.randint(0, 10, (steps * BATCH_SIZE,), generator=generator)
    return list(zip(x.split(BATCH_SIZE), y.split(BATCH_SIZE)))


def make_step(variant: str) -> Callable[[Batch], None]:
    """One optimizer step of ``variant`` on a batch, on its own copy of the model."""
    torch.manual_seed(0)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3) if variant.endswith("Adam") else \
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loss_of(batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    if variant.startswith("train_step"):
        schedule = schedules.Adaptive(start=BATCH_SIZE) if variant == "train_step+noise" else \
            schedules.Constant(BATCH_SIZE)
        scheduler = BatchSizeScheduler(optimizer, schedule, min_batch_size=16, max_batch_size=BATCH_SIZE, memory=None)
        return lambda batch: scheduler.train_step(batch, loss_of)

    if variant == "halves":
        def halves(batch: Batch) -> None:
            optimizer.zero_grad()
            for x, y in zip(batch[0].chunk(2), batch[1].chunk(2)):
                (loss_of((x, y)) * 0.5).backward()
            optimizer.step()
        return halves

    if variant == "plain, zeroed after":
        def zeroed_after(batch: Batch) -> None:
            loss_of(batch).backward()
            optimizer.step()
            optimizer.zero_grad()
        return zeroed_after

    scheduler = None
    if not variant.startswith("plain"):
        scheduler = BatchSizeScheduler(optimizer, schedules.Constant(BATCH_SIZE), min_batch_size=16,
                                       max_batch_size=BATCH_SIZE, measure_noise=variant.startswith("scheduler+noise"),
                                       memory=None)

    def plain(batch: Batch) -> None:
        optimizer.zero_grad()
        loss_of(batch).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step(len(batch[0]))
    return plain


def interleave(step_of: dict[str, Callable[[Any], None]], batches: Sequence[Any], warmup: int = 10,
               seed: int = 0) -> dict[str, list[float]]:
    """Seconds per step of each variant in ``step_of``, each taking every batch in turn, in a new
    random order at each batch; the first ``warmup`` batches are not timed."""
    durations: dict[str, list[float]] = {variant: [] for variant in step_of}
    order, shuffle = list(step_of), random.Random(seed).shuffle
    for index, batch in enumerate(batches):
        shuffle(order)
        for variant in order:
            begin = time.perf_counter()
            step_of[variant](batch)
            if index >= warmup:
                durations[variant].append(time.perf_counter() - begin)
    return durations


def measure(steps: int, warmup: int = 10) -> dict[str, list[float]]:
    """Seconds per step of each variant, taking turns step by step in a random order."""
    return interleave({variant: make_step(variant) for variant in VARIANTS}, make_batches(steps + warmup), warmup)


def paired_ratio(durations: list[float], baseline: list[float], block: int = BLOCK) -> float:
    """1 + the median difference of ``block`` consecutive steps over the baseline's median
    block: each block holds whole cycles of measured and unmeasured steps, so the measured
    steps' cost counts as it does in the wall time, while a load spike still falls out."""
    block = max(1, min(block, len(baseline)))  # a run shorter than a block is one block

    def sums(values: list[float]) -> list[float]:
        return [sum(values[i:i + block]) for i in range(0, len(values) - block + 1, block)]
    blocks, base = sums(durations), sums(baseline)
    return 1 + statistics.median(a - b for a, b in zip(blocks, base)) / statistics.median(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    durations = measure(args.steps)
    medians = {variant: statistics.median(d) for variant, d in durations.items()}
    ratios = {variant: paired_ratio(durations[variant], durations["plain"]) for variant in VARIANTS[1:]
              if not variant.endswith("Adam")}
    ratios["train_step/plain, zeroed after"] = paired_ratio(durations["train_step"], durations["plain, zeroed after"])
    ratios["train_step+noise/train_step"] = paired_ratio(durations["train_step+noise"], durations["train_step"])
    ratios["scheduler+noise Adam"] = paired_ratio(durations["scheduler+noise Adam"], durations["plain Adam"])
    print(f"MNIST-1D CNN, batch {BATCH_SIZE}, {args.threads} threads, {args.steps} steps each, interleaved; "
          f"ratios of the median {BLOCK}-step sum (Adam against plain Adam)")
    for variant in VARIANTS:
        ratio = f"   x{ratios[variant]:.3f}" if variant in ratios else ""
        print(f"  {variant:20s} {medians[variant] * 1e3:7.2f} ms/step{ratio}")
    print(f"  train_step against plain, zeroed after: x{ratios['train_step/plain, zeroed after']:.3f}")
    print(f"  train_step+noise against train_step: x{ratios['train_step+noise/train_step']:.3f}")
    if args.json:
        print(json.dumps({"batch_size": BATCH_SIZE, "threads": args.threads,
                          **{f"{v}_ms": medians[v] * 1e3 for v in VARIANTS},
                          **{f"{v}_ratio": r for v, r in ratios.items()}}))


if __name__ == "__main__":
    main()
