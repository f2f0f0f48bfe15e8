"""Training steps spent finding the largest batch that fits: adabatch's probe next to two searches.

On simulated devices (:class:`~adabatch.testing.FakeMemory`, and one
:class:`~adabatch.testing.CurvedFakeMemory` whose peak grows faster than a line) of several shapes,
each method finds a batch size from a fresh model and optimizer, and every try is a real
training step (forward, backward, SGD with momentum) of a small MLP on the CPU, counted by the
device (``fake.steps``, the tries that ran out of memory included):

* ``adabatch``: :func:`adabatch.memory.probe_memory` with its default 10% safety margin, and
  ``adabatch_margin0`` with none, to compare caps with the searches, which keep no margin;
* ``binsearch``: Lightning's ``BatchSizeFinder(mode="binsearch")``: from 2 (or the floor), double
  until a step runs out of memory, then bisect between the last size that fitted and the one
  that failed. Lightning runs ``steps_per_trial=3`` steps per size by default; here 1
  (``--steps-per-trial``), its most favourable setting;
* ``shrink``: Accelerate's ``find_executable_batch_size``: start large and multiply by 0.9 after
  every out-of-memory error until a step fits. Its default start, 128, would never look above
  128; here it starts at 65,536, above every device's largest batch.

Run ``python benchmarks/memory_probe.py`` (``--quick`` for three devices, ``--json`` for one
JSON line per device and method).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from adabatch.memory import measure_step, probe_memory
from adabatch.testing import CurvedFakeMemory, FakeMemory

GIB = 2**30
CAPACITY = 80 * GIB
#: Where the shrinking search starts: above every device's largest batch.
SHRINK_START = 2**16
SHRINK_FACTOR = 0.9
BINSEARCH_START = 2
FEATURES = 16
CLASSES = 4


@dataclass(frozen=True)
class DeviceShape:
    """A simulated device: ``fixed_share`` of ``CAPACITY`` held whatever the batch, the rest
    holding about ``largest`` samples; ``curvature`` (0 for a line) is the share of the peak at
    ``largest`` that grows with the square of the batch."""

    name: str
    fixed_share: float
    largest: int
    min_batch_size: int = 1
    curvature: float = 0.0

    def build(self) -> FakeMemory:
        fixed = int(self.fixed_share * CAPACITY)
        room = CAPACITY - fixed
        if not self.curvature:
            return FakeMemory(CAPACITY, fixed, room // self.largest)
        per_sample = int((1 - self.curvature) * room / self.largest)
        per_sample_squared = int(self.curvature * room / self.largest**2)
        return CurvedFakeMemory(CAPACITY, fixed, per_sample, per_sample_squared)


SHAPES = (
    DeviceShape("small fixed, ~100", 0.05, 100),
    DeviceShape("large fixed, ~100", 0.60, 100),
    DeviceShape("small fixed, ~1k, floor 16", 0.05, 1_000, min_batch_size=16),
    DeviceShape("large fixed, ~5k", 0.60, 5_000),
    DeviceShape("small fixed, ~50k", 0.05, 50_000),
    DeviceShape("huge fixed, ~50k", 0.85, 50_000),
    DeviceShape("curved, ~2k", 0.05, 2_000, curvature=0.3),
)
QUICK_SHAPES = (SHAPES[0], SHAPES[2], SHAPES[4])


class Trainer:
    """A small MLP and SGD with momentum on the CPU, with ``device`` attached to its forward pass."""

    def __init__(self, device: FakeMemory, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, CLASSES))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.device = device
        device.attach(self.model)

    def make_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(batch_size, FEATURES), torch.randint(CLASSES, (batch_size,))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def fits(self, batch_size: int, steps: int = 1) -> bool:
        """Train ``steps`` steps of ``batch_size`` samples; ``False`` at the first that runs out of memory."""
        return all(measure_step(self.optimizer, self.make_batch, self.loss, batch_size, device=self.device) is not None
                   for _ in range(steps))


def adabatch_probe(trainer: Trainer, min_batch_size: int, safety_margin: float = 0.1) -> int:
    """:func:`probe_memory`'s cap."""
    return probe_memory(trainer.model, trainer.optimizer, trainer.make_batch, trainer.loss, device=trainer.device,
                        min_batch_size=min_batch_size, safety_margin=safety_margin).cap


def binsearch(trainer: Trainer, min_batch_size: int, steps_per_trial: int = 1) -> int:
    """Lightning's binsearch: double from 2 (or the floor) until a size fails, then bisect."""
    low, high = 1, None
    size = max(BINSEARCH_START, min_batch_size)
    largest_fitted = 0
    while True:
        if trainer.fits(size, steps_per_trial):
            largest_fitted = low = size
            if high is None:
                size *= 2
                continue
        else:
            high = size
        if high - low <= 1:
            return largest_fitted
        size = (low + high) // 2


def shrink(trainer: Trainer, min_batch_size: int) -> int:
    """Accelerate's search: start large, multiply by 0.9 after each out-of-memory error."""
    size = SHRINK_START
    while size >= min_batch_size:
        if trainer.fits(size):
            return size
        size = int(size * SHRINK_FACTOR)
    return 0


@dataclass(frozen=True)
class Row:
    """What one method found on one device."""

    device: str
    capacity: int
    fixed: int
    per_sample: int
    min_batch_size: int
    true_max: int
    method: str
    probe_steps: int
    out_of_memory_errors: int
    cap: int
    ratio: float
    seconds: float


def measure(shape: DeviceShape, steps_per_trial: int) -> list[Row]:
    """One row per method on a fresh device of ``shape``."""
    methods: dict[str, Callable[[Trainer, int], int]] = {
        "adabatch": adabatch_probe,
        "adabatch_margin0": lambda trainer, floor: adabatch_probe(trainer, floor, safety_margin=0.0),
        "binsearch": lambda trainer, floor: binsearch(trainer, floor, steps_per_trial),
        "shrink": shrink,
    }
    rows = []
    for method, search in methods.items():
        device = shape.build()
        trainer = Trainer(device)
        begin = time.perf_counter()
        cap = search(trainer, shape.min_batch_size)
        seconds = time.perf_counter() - begin
        true_max = device.true_max_batch_size
        rows.append(Row(
            device=shape.name, capacity=device.capacity, fixed=device.fixed, per_sample=device.per_sample,
            min_batch_size=shape.min_batch_size, true_max=true_max, method=method, probe_steps=device.steps,
            out_of_memory_errors=device.out_of_memory_errors, cap=cap, ratio=round(cap / true_max, 4),
            seconds=round(seconds, 3),
        ))
    return rows


LABELS = {
    "adabatch": "adabatch probe_memory (10% margin)",
    "adabatch_margin0": "adabatch probe_memory (no margin)",
    "binsearch": "binsearch (Lightning BatchSizeFinder)",
    "shrink": "x0.9 from 65,536 (Accelerate)",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, measure, and print the table (or JSON lines); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three devices instead of seven")
    parser.add_argument("--steps-per-trial", type=int, default=1,
                        help="steps binsearch runs at each size (Lightning's default: 3; default here: 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON line per device and method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.steps_per_trial < 1:
        parser.error(f"--steps-per-trial must be at least 1, got {args.steps_per_trial}")
    torch.set_num_threads(args.threads)
    rows = [row for shape in (QUICK_SHAPES if args.quick else SHAPES) for row in measure(shape, args.steps_per_trial)]
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
        return 0
    print(f"Simulated {CAPACITY // GIB} GiB devices; every try is a real SGD step of a small MLP on the CPU "
          f"(binsearch: {args.steps_per_trial} step(s) per size)")
    header = (f"{'device':<28} {'fixed':>5} {'true max':>8}  {'method':<38} {'steps':>5} {'OOMs':>4} {'cap':>7} "
              f"{'cap/true':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row.device:<28} {row.fixed / row.capacity:>5.0%} {row.true_max:>8,}  {LABELS[row.method]:<38} "
              f"{row.probe_steps:>5} {row.out_of_memory_errors:>4} {row.cap:>7,} {row.ratio:>8.3f}")
    print("-" * len(header))
    by_method = {method: [row for row in rows if row.method == method] for method in LABELS}
    baseline = sum(row.probe_steps for row in by_method["adabatch"])
    for method, method_rows in by_method.items():
        steps = sum(row.probe_steps for row in method_rows)
        worst = min(row.ratio for row in method_rows)
        print(f"  {LABELS[method]:<38} {steps:>4} steps in all ({steps / baseline:.1f}x adabatch's), "
              f"worst cap/true max {worst:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
