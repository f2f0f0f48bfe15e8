"""One short end-to-end check of adabatch's memory cap on a CUDA GPU (``--fake``: on the CPU).

A ResNet-18 (He et al. 2016; written out here, so torchvision is not needed) learns 100
classes of synthetic 3x128x128 images (a fixed random template per class plus noise, generated
on the GPU) with SGD and momentum. The script, in one process:

1. finds the TRUE largest batch that trains, by exhaustive search with real steps in a fresh
   state: a step at the floor (16, the BatchNorm floor) to create the optimizer's state, then
   doubling until a step runs out of memory, then bisection to the exact size, with the
   allocator's cache emptied after every try;
2. probes a fresh model and optimizer with :func:`adabatch.memory.probe_memory` and seeds a
   :class:`~adabatch.BatchSizeScheduler` (``memory="auto"``, ``accumulate=False``) with its
   peaks;
3. trains under :class:`~adabatch.schedules.Geometric` growth (x2 every 16,384 samples from 32)
   with an :class:`~adabatch.AdaptiveBatchSampler` and ``scheduler.train_step``, until the
   batch has trained at the memory cap for 12 steps (or the time budget runs out).

It prints ONE JSON object: the device, the cap adabatch chose (and the probe's), the true
largest batch, their ratio (goal: at least 0.90), the steps the probe took, the out-of-memory
errors recovered during training, and the throughput at the start size and at the cap. Each
phase that fails records its error in the object instead of ending the script. The whole run
takes about one to two minutes on an H100.

``--fake`` runs the same logic on the CPU at a tiny size (a ResNet-18 of width 8 on 3x16x16
images, 10 classes), with a :class:`~adabatch.testing.FakeMemory` attached to each model standing
in for the GPU's memory, in a few seconds.

Run ``python scripts/gpu_check.py`` on a CUDA machine, ``python scripts/gpu_check.py --fake`` anywhere.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, bn_safe_min_batch_size, schedules
from adabatch.memory import DEFAULT_SAFETY_MARGIN, MemoryDevice, accelerator_memory, measure_step, probe_memory
from adabatch.testing import FakeMemory

GOAL_RATIO = 0.90


@dataclass(frozen=True)
class CheckConfig:
    """The sizes of one run: a full one for a GPU, a tiny one for ``--fake``."""

    image_size: int
    num_classes: int
    width: int
    start_batch_size: int
    grow_every: int  # samples between doublings
    dataset_size: int
    train_budget_s: float
    at_cap_steps: int = 12
    lr: float = 0.1
    safety_margin: float = DEFAULT_SAFETY_MARGIN
    # The simulated device of --fake: bytes it holds, a step's fixed cost, each sample's cost.
    fake_capacity: int = 0
    fake_fixed: int = 0
    fake_per_sample: int = 0


GPU = CheckConfig(image_size=128, num_classes=100, width=64, start_batch_size=32, grow_every=16_384,
                  dataset_size=100_000, train_budget_s=150.0)
FAKE = CheckConfig(image_size=16, num_classes=10, width=8, start_batch_size=32, grow_every=512,
                   dataset_size=4_000, train_budget_s=30.0,
                   fake_capacity=16 * 2**30, fake_fixed=2**30, fake_per_sample=15 * 2**30 // 300)


# ---------------------------------------------------------------------------------- the model
class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (He et al. 2016, "Deep Residual Learning")."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet18(num_classes: int, width: int = 64) -> nn.Sequential:
    """ResNet-18: the ImageNet stem (7x7 convolution with stride 2, max pooling), four stages
    of two :class:`BasicBlock` each with ``width``, 2, 4 and 8 times ``width`` channels, global
    average pooling and a linear classifier (11.2M parameters at width 64 and 100 classes)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]
    in_channels = width
    for stage, multiplier in enumerate((1, 2, 4, 8)):
        channels = width * multiplier
        for block in range(2):
            layers.append(BasicBlock(in_channels, channels, stride=2 if stage > 0 and block == 0 else 1))
            in_channels = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------- the data
class SyntheticImages:
    """Images of ``num_classes`` classes: a fixed random template per class plus unit noise."""

    def __init__(self, config: CheckConfig, device: torch.device, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        shape = (config.num_classes, 3, config.image_size, config.image_size)
        self.templates = torch.randn(shape, generator=generator).to(device)
        self.num_classes = config.num_classes
        self.device = device

    def for_labels(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.templates[labels]
        return images + torch.randn_like(images), labels

    def for_indices(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of the dataset's samples ``indices`` (sample ``i`` has class ``i % num_classes``)."""
        return self.for_labels(torch.as_tensor(indices, device=self.device) % self.num_classes)

    def random(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of ``batch_size`` samples of random classes, for the probe and the search."""
        return self.for_labels(torch.randint(self.num_classes, (batch_size,), device=self.device))


# ------------------------------------------------------------------------------ one training set-up
class Setup:
    """A fresh model and optimizer on the target device, and the memory device measuring them."""

    def __init__(self, config: CheckConfig, fake: bool, data: SyntheticImages, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = resnet18(config.num_classes, config.width).to(data.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=0.9, weight_decay=5e-4)
        self.data = data
        self.memory: MemoryDevice
        if fake:
            self.memory = FakeMemory(config.fake_capacity, config.fake_fixed, config.fake_per_sample)
            self.memory.attach(self.model)
        else:
            memory = accelerator_memory()
            assert memory is not None
            self.memory = memory

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def fits(self, batch_size: int) -> bool:
        """One real training step of ``batch_size`` samples, then the allocator's cache emptied;
        ``False`` if it ran out of memory."""
        peak = measure_step(self.optimizer, self.data.random, self.loss, batch_size, device=self.memory)
        self.memory.release_cached()
        return peak is not None


def find_true_max(setup: Setup, floor: int) -> tuple[int, int]:
    """The largest batch that trains, by doubling from ``floor`` then bisecting; and the steps taken."""
    steps = 0

    def fits(batch_size: int) -> bool:
        nonlocal steps
        steps += 1
        return setup.fits(batch_size)

    if not (fits(floor) and fits(floor)):  # the first step creates the momentum buffers
        return 0, steps
    low, high = floor, 2 * floor
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, steps


# -------------------------------------------------------------------------------------- the check
def run_check(config: CheckConfig, fake: bool) -> dict[str, Any]:
    """Search, probe and train; return everything measured (and the error of a failed phase)."""
    report: dict[str, Any] = {"mode": "fake" if fake else "cuda", "config": asdict(config), "goal_ratio": GOAL_RATIO}
    begin = time.perf_counter()
    if fake:
        device = torch.device("cpu")
        report["device"] = "cpu with " + repr(FakeMemory(config.fake_capacity, config.fake_fixed,
                                                          config.fake_per_sample))

        def synchronize() -> None:
            pass
    else:
        memory = accelerator_memory()
        assert memory is not None
        device = memory.device
        report["device"] = torch.cuda.get_device_name(device)

        def synchronize() -> None:
            torch.cuda.synchronize(device)

    data = SyntheticImages(config, device)
    floor = bn_safe_min_batch_size(resnet18(config.num_classes, config.width))
    report["min_batch_size"] = floor

    # 1. The truth, in a fresh state, before anything else holds memory.
    try:
        search = Setup(config, fake, data, seed=1)
        report["parameters"] = sum(p.numel() for p in search.model.parameters())
        search_begin = time.perf_counter()
        report["true_max"], report["true_max_search_steps"] = find_true_max(search, floor)
        report["true_max_search_s"] = round(time.perf_counter() - search_begin, 2)
        if isinstance(search.memory, FakeMemory):
            report["fake_true_max"] = search.memory.true_max_batch_size
        del search
    except Exception as error:  # noqa: BLE001 - one JSON object whatever happens
        report["true_max_error"] = _describe(error)
    _release(device)

    # 2. The probe, on a fresh model and optimizer.
    setup = Setup(config, fake, data, seed=0)
    try:
        probe_begin = time.perf_counter()
        result = probe_memory(setup.model, setup.optimizer, data.random, setup.loss, device=setup.memory,
                              min_batch_size=floor, safety_margin=config.safety_margin)
        report.update(
            probe_cap=result.cap, probe_steps=result.probe_steps,
            probe_out_of_memory_errors=result.out_of_memory_errors, probe_s=round(time.perf_counter() - probe_begin, 2),
            fixed_bytes=round(result.fixed_bytes), per_sample_bytes=round(result.per_sample_bytes),
            available_bytes=result.available_bytes, probe_attempts=result.attempts,
        )
        peaks = result.peaks
    except Exception as error:  # noqa: BLE001
        report["probe_error"] = _describe(error)
        peaks = {}

    # 3. Training under growth, capped by memory.
    try:
        report.update(train(config, setup, floor, peaks, synchronize, fake))
    except Exception as error:  # noqa: BLE001
        report["train_error"] = _describe(error)

    true_max = report.get("true_max")
    for key, cap_key in (("ratio", "cap"), ("probe_ratio", "probe_cap")):
        if true_max and report.get(cap_key):
            report[key] = round(report[cap_key] / true_max, 4)
    report["meets_goal"] = report.get("ratio") is not None and report["ratio"] >= GOAL_RATIO
    report["wall_s"] = round(time.perf_counter() - begin, 2)
    return report


def train(
    config: CheckConfig, setup: Setup, floor: int, peaks: dict[int, int], synchronize: Callable[[], None], fake: bool
) -> dict[str, Any]:
    """Grow the batch up to the memory cap with ``train_step``; what it measured."""
    scheduler = BatchSizeScheduler(
        setup.optimizer,
        schedules.Geometric(start=config.start_batch_size, factor=2, every=config.grow_every, unit="sample"),
        min_batch_size=floor,
        memory=setup.memory if fake else "auto",
        safety_margin=config.safety_margin,
        accumulate=False,
    )
    # add_measurements learns the cap; the constraints hear of it at the next step otherwise.
    scheduler.add_memory_measurements(peaks)
    seeded_cap = scheduler.memory.cap
    sampler = AdaptiveBatchSampler(config.dataset_size, scheduler, shuffle=True, seed=0)
    out_of_memory_before = _out_of_memory_count(setup.memory)

    start_times: list[tuple[int, float]] = []  # (samples, seconds) of steps at the start size
    cap_times: list[tuple[int, float]] = []  # of steps at the memory cap
    sizes: list[int] = []
    losses: list[float] = []
    begin = time.perf_counter()
    epoch = 0
    done = False
    while not done:
        sampler.set_epoch(epoch)
        for indices in sampler:
            synchronize()
            step_begin = time.perf_counter()
            batch = setup.data.for_indices(indices)
            loss = scheduler.train_step(batch, setup.loss)
            synchronize()
            seconds = time.perf_counter() - step_begin
            size = len(indices)
            sizes.append(size)
            losses.append(float(loss))
            if size == config.start_batch_size:
                start_times.append((size, seconds))
            if size == scheduler.memory.cap:
                cap_times.append((size, seconds))
            if len(cap_times) >= config.at_cap_steps or time.perf_counter() - begin > config.train_budget_s:
                done = True
                break
        epoch += 1

    return {
        "cap": scheduler.memory.cap,
        "seeded_cap": seeded_cap,
        "ceiling_after_out_of_memory": scheduler.memory.ceiling,
        "training_out_of_memory_errors": _out_of_memory_count(setup.memory) - out_of_memory_before,
        "training_steps": scheduler.steps,
        "samples_trained": scheduler.samples_seen,
        "largest_batch_trained": max(sizes),
        "batch_sizes_trained": sorted(set(sizes)),
        "reached_cap_steps": len(cap_times),
        "train_s": round(time.perf_counter() - begin, 2),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "start_batch_size": config.start_batch_size,
        # The first steps at a size pay for cuDNN's choices and the allocator's growth.
        "throughput_start": _throughput(start_times[5:25]),
        "throughput_cap": _throughput(cap_times[2:]),
    }


def _throughput(times: list[tuple[int, float]]) -> float | None:
    """Samples per second over ``(samples, seconds)`` steps, or ``None`` without any."""
    seconds = sum(s for _, s in times)
    return round(sum(n for n, _ in times) / seconds, 1) if times and seconds > 0 else None


def _out_of_memory_count(memory: MemoryDevice) -> int:
    if isinstance(memory, FakeMemory):
        return memory.out_of_memory_errors
    return int(torch.cuda.memory_stats().get("num_ooms", 0))


def _release(device: torch.device) -> None:
    """Free what a finished phase held, so that the next one starts from an empty cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _describe(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()[-2000:]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and print its one JSON object; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake", action="store_true", help="run on the CPU with a simulated device, at a tiny size")
    parser.add_argument(
        "--train-budget-s", type=float, default=None,
        help=f"most seconds of training (default: {GPU.train_budget_s:g}, fake: {FAKE.train_budget_s:g})",
    )
    parser.add_argument("--safety-margin", type=float, default=DEFAULT_SAFETY_MARGIN,
                        help="fraction of the memory above the fixed cost the cap keeps free (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = FAKE if args.fake else GPU
    overrides = {"safety_margin": args.safety_margin}
    if args.train_budget_s is not None:
        overrides["train_budget_s"] = args.train_budget_s
    config = CheckConfig(**{**asdict(config), **overrides})
    if not args.fake and accelerator_memory() is None:
        message = "no CUDA device; run with --fake to check the logic"
        print(json.dumps({"mode": "cuda", "device": None, "error": message}))
        return 1
    report = run_check(config, args.fake)
    print(json.dumps(report))
    failed = any(key.endswith("_error") for key in report)
    return 1 if failed or not math.isfinite(report.get("ratio") or math.nan) else 0


if __name__ == "__main__":
    raise SystemExit(main())
