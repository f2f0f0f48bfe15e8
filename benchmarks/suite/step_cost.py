"""What ``Adaptive()`` costs per step where it keeps the batch, on a task of the suite.

The suite times its policies one after the other, minutes apart, so two runs of identical work
differ by several percent of timing noise: too much to tell whether ``Adaptive()`` is slower
than the fixed batch on a task where it never grows (the language model). Here the variants
train side by side, each its own copy of the task's model and optimizer from the same seed, on
the same batches of the baseline's size taken from memory, through the suite's plain loop
(``zero_grad``, forward, ``backward``, the task's clipping, ``optimizer.step()``,
``scheduler.step(len(x))``), taking turns in a new random order at each step:

* ``fixed``: ``schedules.Constant(b)``, the suite's baseline;
* ``fixed again``: the same, a second time: the control, whose ratio shows the noise floor;
* ``adaptive``: ``schedules.Adaptive(start=b)`` with every default, capped at ``b``
  (``max_batch_size=b``) so that it keeps the batch while its noise statistics, step times and
  decisions run as they do in the suite.

Prints the median milliseconds per step and the ratio to ``fixed`` of sums over blocks of two
measurement cycles (``overhead.py``'s paired ratio: the measured steps count as they do in the
wall time).

Usage: ``python3 -m benchmarks.suite.step_cost [--task gpt] [--steps 1200] [--threads 1] [--json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable

import torch

from adabatch import BatchSizeScheduler, bn_safe_min_batch_size, schedules
from adabatch.noise import DEFAULT_NOISE_INTERVAL, MIN_STEPS_PER_MEASUREMENT
from benchmarks.overhead import interleave, paired_ratio

from . import TASKS
from .task import Task
from .training import plain_step

__all__ = ["VARIANTS", "measure", "step_cost", "variant_step"]

VARIANTS = ("fixed", "fixed again", "adaptive")


def variant_step(task: Task, variant: str, train_set: torch.utils.data.TensorDataset) -> tuple[
        Callable[[torch.Tensor], None], torch.nn.Module, BatchSizeScheduler]:
    """``(step, model, scheduler)``: one optimizer step of ``variant`` on the samples at the
    given indices, the new copy of the task's model it trains, and the scheduler it steps."""
    torch.manual_seed(0)
    model = task.model()
    optimizer = task.optimizer(model.parameters())
    size = task.baseline_batch_size
    schedule = schedules.Adaptive(start=size) if variant == "adaptive" else schedules.Constant(size)
    scheduler = BatchSizeScheduler(optimizer, schedule, min_batch_size=bn_safe_min_batch_size(model),
                                   max_batch_size=size, memory=None)

    def step(indices: torch.Tensor) -> None:
        plain_step(task, model, optimizer, scheduler, *train_set[indices])
    return step, model, scheduler


def measure(task: Task, steps: int, *, quick: bool = False, warmup: int = 10, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per step of each variant on ``task``, taking turns step by step in a random order."""
    train_set, _ = task.data(quick)
    generator = torch.Generator().manual_seed(seed)
    batches = torch.randint(len(train_set), (warmup + steps, task.baseline_batch_size), generator=generator)
    return interleave({variant: variant_step(task, variant, train_set)[0] for variant in VARIANTS}, batches,
                      warmup, seed)


def step_cost(task: Task, steps: int, *, quick: bool = False) -> dict[str, float]:
    """The median milliseconds per step of each variant and the paired ratios to ``fixed``."""
    durations = measure(task, steps, quick=quick)
    size = task.baseline_batch_size
    # Two measurement cycles: the default interval in samples over the batch.
    block = 2 * max(DEFAULT_NOISE_INTERVAL // size, MIN_STEPS_PER_MEASUREMENT)
    result = {f"{variant}_ms": statistics.median(durations[variant]) * 1e3 for variant in VARIANTS}
    result.update({f"{variant}_ratio": paired_ratio(durations[variant], durations["fixed"], block)
                   for variant in VARIANTS[1:]})
    result["block"] = block
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="gpt")
    parser.add_argument("--steps", type=int, default=1200, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as the suite)")
    parser.add_argument("--quick", action="store_true", help="tiny data: a smoke test")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    for name in ("steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    result = step_cost(task, args.steps, quick=args.quick)
    print(f"{task.name}, batch {task.baseline_batch_size}, {args.threads} thread(s), {args.steps} steps each, "
          f"interleaved; ratios of the median {result['block']}-step sum")
    for variant in VARIANTS:
        ratio = f"   x{result[f'{variant}_ratio']:.4f}" if variant != "fixed" else ""
        print(f"  {variant:12s} {result[f'{variant}_ms']:8.2f} ms/step{ratio}")
    if args.json:
        print(json.dumps({"task": task.name, "batch_size": task.baseline_batch_size, "threads": args.threads,
                          "steps": args.steps, **result}))


if __name__ == "__main__":
    main()
