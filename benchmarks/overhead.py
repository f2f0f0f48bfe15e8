"""Step-time overhead of adabatch's scheduler and noise statistics on the MNIST-1D CNN.

Side by side in one run, alternating, on the demo's CNN with BatchNorm at batch 256 on the CPU
(SGD, momentum 0.9), each variant timed over the same batches, taken from memory so that only
the training step and what adabatch adds to it are timed (the sampler's own cost is
``sampler_overhead.py``'s):

* ``plain``: forward, backward, ``optimizer.step()``.
* ``scheduler``: the same with a ``BatchSizeScheduler`` wrapping the optimizer and
  ``scheduler.step(len(x))`` after each step.
* ``scheduler+noise``: the same with the noise scale measured (the plain loop's fallback: two
  squared norms and one copy of the gradients per step).
* ``train_step+noise``: ``scheduler.train_step`` with ``schedules.Adaptive`` at batch 256, the
  batch trained as two micro-batches of 128 whose first is the small batch of the estimator.

Prints the median milliseconds per step of each and its ratio to ``plain``; the goal is at most
1.02 for the scheduler with noise statistics. ``--json`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from adabatch import BatchSizeScheduler, schedules
from adabatch.demo import build_model

BATCH_SIZE = 256


def make_data(samples: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(samples, 1, 40, generator=generator), torch.randint(0, 10, (samples,),
                                                                                          generator=generator))


def timed_steps(variant: str, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Median seconds per optimizer step of ``variant`` over ``batches`` (after a short warm-up)."""
    torch.manual_seed(0)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_of: Callable = lambda batch: F.cross_entropy(model(batch[0]), batch[1])
    scheduler = None
    if variant != "plain":
        schedule = schedules.Adaptive(start=BATCH_SIZE) if variant == "train_step+noise" else \
            schedules.Constant(BATCH_SIZE)
        scheduler = BatchSizeScheduler(optimizer, schedule, min_batch_size=16, max_batch_size=BATCH_SIZE,
                                       measure_noise=variant != "scheduler", memory=None)
    warmup, durations = 5, []
    for index, (x, y) in enumerate(batches):
        begin = time.perf_counter()
        if variant == "train_step+noise":
            scheduler.train_step((x, y), loss_of)
        else:
            optimizer.zero_grad()
            loss_of((x, y)).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step(len(x))
        if index >= warmup:
            durations.append(time.perf_counter() - begin)
    return statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = make_data(BATCH_SIZE * (args.steps + 5))
    x, y = data.tensors
    batches = list(zip(x.split(BATCH_SIZE), y.split(BATCH_SIZE)))
    variants = ["plain", "scheduler", "scheduler+noise", "train_step+noise"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            times[variant].append(timed_steps(variant, batches))
    medians = {v: statistics.median(t) for v, t in times.items()}
    print(f"MNIST-1D CNN, batch {BATCH_SIZE}, {args.threads} threads, median of {args.repeats} x {args.steps} steps")
    for variant in variants:
        print(f"  {variant:18s} {medians[variant] * 1e3:7.2f} ms/step   x{medians[variant] / medians['plain']:.3f}")
    if args.json:
        print(json.dumps({"batch_size": BATCH_SIZE, **{f"{v}_ms": medians[v] * 1e3 for v in variants},
                          **{f"{v}_ratio": medians[v] / medians["plain"] for v in variants[1:]}}))


if __name__ == "__main__":
    main()
