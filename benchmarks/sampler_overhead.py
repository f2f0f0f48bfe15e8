"""Per-batch cost of iterating :class:`~adabatch.AdaptiveBatchSampler` next to torch's ``BatchSampler``.

Both samplers shuffle ``N`` indices each epoch and cut them into batches of 256: adabatch with a
``Constant(256)`` schedule, torch with ``BatchSampler(RandomSampler(range(N)), 256,
drop_last=False)``. Whole epochs of the two are timed alternately in one process, several times,
and the medians are compared, so that the drift of a shared machine falls on both alike. A third
line times the floor any sampler of this shape pays: slicing a ready permutation into lists.

Run ``python benchmarks/sampler_overhead.py`` (``--quick`` for a smoke test, ``--json`` for one
JSON line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.data import BatchSampler, RandomSampler

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules

BATCH_SIZE = 256
FULL_N = 2_000_000
QUICK_N = 100_000
#: The goal: adabatch's sampler costs at most half of torch's per batch.
GOAL_RATIO = 0.5


def adabatch_epochs(dataset_size: int) -> Callable[[int], Iterable[list[int]]]:
    """Epoch ``e`` of an :class:`AdaptiveBatchSampler` driven by ``Constant(256)``."""
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(BATCH_SIZE))
    sampler = AdaptiveBatchSampler(dataset_size, scheduler, shuffle=True, seed=0)

    def epoch(index: int) -> Iterable[list[int]]:
        sampler.set_epoch(index)
        return sampler

    return epoch


def torch_epochs(dataset_size: int) -> Callable[[int], Iterable[list[int]]]:
    """An epoch of ``BatchSampler(RandomSampler(range(N)), 256, drop_last=False)``."""
    sampler = BatchSampler(RandomSampler(range(dataset_size)), BATCH_SIZE, drop_last=False)
    return lambda index: sampler


def slicing_epochs(dataset_size: int) -> Callable[[int], Iterable[list[int]]]:
    """The floor: a fresh permutation sliced into lists of 256, with nothing else decided."""
    generator = torch.Generator()

    def epoch(index: int) -> Iterable[list[int]]:
        generator.manual_seed(index)
        permutation = torch.randperm(dataset_size, generator=generator).numpy()
        return (permutation[first : first + BATCH_SIZE].tolist() for first in range(0, dataset_size, BATCH_SIZE))

    return epoch


def time_epoch(epochs: Callable[[int], Iterable[list[int]]], index: int) -> tuple[float, int]:
    """Seconds to draw every batch of epoch ``index``, and how many batches there were."""
    begin = time.perf_counter()
    batches = 0
    for _ in epochs(index):
        batches += 1
    return time.perf_counter() - begin, batches


def measure(dataset_size: int, repeats: int) -> dict[str, float | int]:
    """Median microseconds per batch of each sampler, timed alternately in one process."""
    contenders = {
        "adabatch": adabatch_epochs(dataset_size),
        "torch": torch_epochs(dataset_size),
        "slicing": slicing_epochs(dataset_size),
    }
    per_batch_us: dict[str, list[float]] = {name: [] for name in contenders}
    expected_batches = -(-dataset_size // BATCH_SIZE)
    names = list(contenders)
    # Epoch 0 warms caches and allocators; it is not counted.
    for index in range(repeats + 1):
        # Reverse the order every other round so neither sampler always runs first.
        for name in names if index % 2 == 0 else reversed(names):
            seconds, batches = time_epoch(contenders[name], index)
            if batches != expected_batches:
                raise RuntimeError(f"{name} drew {batches} batches in epoch {index}, expected {expected_batches}")
            if index > 0:
                per_batch_us[name].append(seconds / batches * 1e6)
    medians = {name: statistics.median(values) for name, values in per_batch_us.items()}
    return {
        "dataset_size": dataset_size,
        "batch_size": BATCH_SIZE,
        "repeats": repeats,
        "adabatch_us_per_batch": round(medians["adabatch"], 2),
        "torch_us_per_batch": round(medians["torch"], 2),
        "slicing_us_per_batch": round(medians["slicing"], 2),
        "ratio_adabatch_to_torch": round(medians["adabatch"] / medians["torch"], 3),
        "goal_ratio": GOAL_RATIO,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, measure, and print the result; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"N={QUICK_N:,} instead of {FULL_N:,}, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed epochs per sampler (default: 7, quick: 3)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    dataset_size = QUICK_N if args.quick else FULL_N
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    if repeats < 1:
        parser.error(f"--repeats must be at least 1, got {repeats}")
    result = measure(dataset_size, repeats)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"N={dataset_size:,}, batch {BATCH_SIZE}, median of {repeats} epochs each, alternated in one run")
    rows = (
        ("adabatch AdaptiveBatchSampler", result["adabatch_us_per_batch"]),
        ("torch BatchSampler(RandomSampler)", result["torch_us_per_batch"]),
        ("floor: slicing a permutation", result["slicing_us_per_batch"]),
    )
    for label, value in rows:
        print(f"  {label:<34} {value:8.2f} us/batch")
    verdict = "meets" if result["ratio_adabatch_to_torch"] <= GOAL_RATIO else "misses"
    print(f"  {'ratio adabatch / torch':<34} {result['ratio_adabatch_to_torch']:8.3f} "
          f"({verdict} the goal <= {GOAL_RATIO})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
