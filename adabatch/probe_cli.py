"""``adabatch probe``: how large a micro-batch the demo's model trains in this accelerator's memory.

The probe (:func:`adabatch.memory.probe_memory`) runs a few real training steps of the demo's
MNIST-1D CNN (:func:`adabatch.demo.build_model`) on random inputs of the demo's shape, fits the
line ``peak(b) = fixed + per_sample * b`` to their peak memory, and verifies the cap it predicts
with one more step. It probes the current CUDA device; on a machine without one it says so
and probes nothing, unless a simulated device is described (``--fake-capacity``,
``--fake-fixed``, ``--fake-per-sample``): the model then trains on the CPU and a
:class:`~adabatch.testing.FakeMemory` attached to it raises the out-of-memory errors, through the
same code path. A simulated device also knows the true largest micro-batch, so the report
gives the ratio of the cap to it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ._validation import check_fraction, check_positive_int, check_seed
from .constraints import bn_safe_min_batch_size
from .demo import DEFAULT_THREADS, LR, MOMENTUM, WEIGHT_DECAY, build_model
from .memory import DEFAULT_SAFETY_MARGIN, MemoryDevice, ProbeResult, accelerator_memory, probe_memory
from .testing import FakeMemory

__all__ = ["DEFAULT_CUDA_MAX_BATCH_SIZE", "ProbeConfig", "ProbeReport", "format_report", "run_probe"]

#: The demo's sequences: one channel of 40 values, 10 classes.
INPUT_SHAPE = (1, 40)
NUM_CLASSES = 10
#: Largest size probed on a CUDA device unless told otherwise. The demo's model needs about
#: 50 kB a sample, so a large GPU would hold millions, and a convolution over more than
#: 2**31 elements leaves the kernels' 32-bit indexing; a million samples stays below it.
DEFAULT_CUDA_MAX_BATCH_SIZE = 2**20


@dataclass(frozen=True)
class ProbeConfig:
    """What one run of ``adabatch probe`` does.

    Args:
        fake_capacity (int, optional): bytes of a simulated device to probe instead of CUDA.
            Default: none (probe the current CUDA device).
        fake_fixed (int): bytes a step holds on the simulated device whatever the batch.
            Default: 0.
        fake_per_sample (int, optional): bytes each sample adds on the simulated device;
            required with ``fake_capacity``.
        min_batch_size (int, optional): the first size probed. Default: the BatchNorm floor
            of the demo's model (16).
        max_batch_size (int, optional): no size above this is probed. Default: 1,048,576 on a
            CUDA device, no limit on a simulated one.
        safety_margin (float): fraction of the memory above the fixed cost the cap keeps free.
            Default: 0.1.
        seed (int): seed of the model's initialisation. Default: 0.
        threads (int): torch's intra-op threads, set for the whole process. Default: 2.
    """

    fake_capacity: int | None = None
    fake_fixed: int = 0
    fake_per_sample: int | None = None
    min_batch_size: int | None = None
    max_batch_size: int | None = None
    safety_margin: float = DEFAULT_SAFETY_MARGIN
    seed: int = 0
    threads: int = DEFAULT_THREADS

    def __post_init__(self) -> None:
        if (self.fake_capacity is None) != (self.fake_per_sample is None):
            raise ValueError("a simulated device needs both fake_capacity and fake_per_sample, got "
                             f"fake_capacity={self.fake_capacity!r} and fake_per_sample={self.fake_per_sample!r}")
        if self.fake_capacity is None and self.fake_fixed != 0:
            raise ValueError(f"fake_fixed ({self.fake_fixed!r}) describes a simulated device; give fake_capacity "
                             f"and fake_per_sample too")
        if self.fake_capacity is not None:
            FakeMemory(self.fake_capacity, self.fake_fixed, self.fake_per_sample)  # type: ignore[arg-type]
        # The config is frozen: each checked value replaces the given one through object.__setattr__.
        for name in ("min_batch_size", "max_batch_size"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))
        object.__setattr__(self, "threads", check_positive_int("threads", self.threads))
        object.__setattr__(self, "seed", check_seed("seed", self.seed))
        object.__setattr__(self, "safety_margin",
                           check_fraction("safety_margin", self.safety_margin, what="a fraction in [0, 1)"))

    @property
    def fake(self) -> bool:
        """Whether a simulated device is probed."""
        return self.fake_capacity is not None


@dataclass(frozen=True)
class ProbeReport:
    """What one run of ``adabatch probe`` measured.

    Args:
        device (str): the device probed.
        cap (int): the largest micro-batch to train, as :func:`probe_memory` found it.
        probe_steps (int): training steps the probe took.
        out_of_memory_errors (int): those of them that ran out of memory.
        fixed_bytes (float): the fitted memory a step holds whatever the batch.
        per_sample_bytes (float): the fitted memory each sample adds.
        available_bytes (int): the memory the process could hold.
        safety_margin (float): the fraction of the room above the fixed cost the cap keeps free.
        min_batch_size (int): the first size probed.
        max_batch_size (int, optional): the largest size that could be probed.
        peaks (dict): ``{micro_batch_size: peak_bytes}`` of the steps that fitted.
        true_max (int, optional): the largest micro-batch that fits, on a simulated device.
        wall_s (float): seconds the probe took.
    """

    device: str
    cap: int
    probe_steps: int
    out_of_memory_errors: int
    fixed_bytes: float
    per_sample_bytes: float
    available_bytes: int
    safety_margin: float
    min_batch_size: int
    max_batch_size: int | None
    peaks: dict[int, int]
    true_max: int | None
    wall_s: float

    @property
    def ratio(self) -> float | None:
        """``cap / true_max`` on a simulated device, else ``None``."""
        return None if not self.true_max else self.cap / self.true_max

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable values (``peaks`` keyed by strings)."""
        values = dataclasses.asdict(self)
        values["peaks"] = {str(size): peak for size, peak in self.peaks.items()}
        values["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        return values


def run_probe(config: ProbeConfig = ProbeConfig()) -> ProbeReport | None:
    """Probe the demo's model on the configured device.

    Returns:
        the report, or ``None`` if no simulated device is configured and there is no CUDA device.

    Raises:
        BatchSizeFloorError: if a micro-batch of ``min_batch_size`` samples does not fit.
    """
    memory: MemoryDevice | None
    if config.fake:
        memory = FakeMemory(config.fake_capacity, config.fake_fixed, config.fake_per_sample)  # type: ignore[arg-type]
        target = torch.device("cpu")
        max_batch_size = config.max_batch_size
    else:
        memory = accelerator_memory()
        if memory is None:
            return None
        target = memory.device
        max_batch_size = config.max_batch_size or DEFAULT_CUDA_MAX_BATCH_SIZE
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = build_model(NUM_CLASSES).to(target)
    if isinstance(memory, FakeMemory):
        memory.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    min_batch_size = config.min_batch_size or bn_safe_min_batch_size(model)
    if max_batch_size is not None:
        max_batch_size = max(max_batch_size, min_batch_size)

    def make_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = torch.randn(batch_size, *INPUT_SHAPE, device=target)
        return inputs, torch.randint(NUM_CLASSES, (batch_size,), device=target)

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    begin = time.perf_counter()
    result: ProbeResult = probe_memory(
        model, optimizer, make_batch, loss_fn, device=memory, min_batch_size=min_batch_size,
        max_batch_size=max_batch_size, safety_margin=config.safety_margin,
    )
    wall_s = time.perf_counter() - begin
    return ProbeReport(
        device=repr(memory),
        cap=result.cap,
        probe_steps=result.probe_steps,
        out_of_memory_errors=result.out_of_memory_errors,
        fixed_bytes=round(result.fixed_bytes, 1),
        per_sample_bytes=round(result.per_sample_bytes, 1),
        available_bytes=result.available_bytes,
        safety_margin=result.safety_margin,
        min_batch_size=min_batch_size,
        max_batch_size=max_batch_size,
        peaks=result.peaks,
        true_max=memory.true_max_batch_size if isinstance(memory, FakeMemory) else None,
        wall_s=round(wall_s, 3),
    )


def _bytes(value: float) -> str:
    """``value`` bytes in the largest binary unit that keeps it at or above 1."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:,.1f} {unit}" if unit != "B" else f"{value:,.0f} B"
        value /= 1024
    raise AssertionError("unreachable")


def format_report(report: ProbeReport) -> str:
    """The human-readable report of a probe: the cap, the fitted line, the cost of finding them."""
    at_max = report.max_batch_size is not None and report.cap >= report.max_batch_size
    lines = [
        f"largest micro-batch {report.cap:,}{' (max_batch_size)' if at_max else ''} on {report.device}, "
        f"found with {report.probe_steps} training steps ({report.out_of_memory_errors} out of memory) "
        f"in {report.wall_s:.2f} s",
        f"  memory          {_bytes(report.fixed_bytes)} fixed + {_bytes(report.per_sample_bytes)} per sample, "
        f"{_bytes(report.available_bytes)} available, {report.safety_margin:.0%} of the room kept free",
        f"  sizes measured  {', '.join(f'{size:,}' for size in sorted(report.peaks))} (min_batch_size "
        f"{report.min_batch_size})",
    ]
    if report.true_max is not None and report.ratio is not None:
        lines.append(f"  true largest    {report.true_max:,} (cap / true largest = {report.ratio:.3f})")
    return "\n".join(lines)
