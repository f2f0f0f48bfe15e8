"""Resume is exact wherever a run stops: the recipe of docs/resume.md, run as documented.

For a drawn set-up (a timetable in samples or in epochs or ``Adaptive``; the plain loop or
``train_step``; 0 or 2 workers; a ``DataLoader`` or torchdata's ``StatefulDataLoader``) one run
is checkpointed after every step and every epoch with the documented ``checkpoint``; hypothesis
picks a checkpoint (epoch boundaries and the steps around noise measurements come up often), a
fresh set of objects restores it from a file with the documented ``restore``, and the rest of
the run must train the same batches (indices, hence sizes) at the same effective learning
rates, to the same final weights. The loop and the two functions are executed from the
documentation's code blocks, so the page states what is tested.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules
from adabatch.testing import FakeClock

stateful_dataloader = pytest.importorskip("torchdata.stateful_dataloader")

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")

DOC = Path(__file__).resolve().parents[1] / "docs" / "resume.md"
DATASET_SIZE = 200
EPOCHS = 3
FEATURES = 3

SCHEDULES = ("Step in samples", "Step in epochs", "Adaptive")
LOOPS = ("plain", "train_step")
LOADERS = {"DataLoader": DataLoader, "StatefulDataLoader": stateful_dataloader.StatefulDataLoader}
DOCUMENTED_SECTION = {"DataLoader": "With a DataLoader", "StatefulDataLoader": "With torchdata's StatefulDataLoader"}


def dataset() -> TensorDataset:
    """A noisy linear regression. Column 0 of x is the sample's index, which the model never
    sees: the loop's ``train_step(x, y)`` reads from it which samples each step trained on."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(DATASET_SIZE, FEATURES, generator=generator, dtype=torch.float64)
    weights = torch.randn(FEATURES, 1, generator=generator, dtype=torch.float64)
    targets = features @ weights + 6 * torch.randn(DATASET_SIZE, 1, generator=generator, dtype=torch.float64)
    return TensorDataset(torch.cat([torch.arange(DATASET_SIZE, dtype=torch.float64)[:, None], features], 1), targets)


DATASET = dataset()


def documented_code(section: str) -> str:
    """The one python code block in the section of docs/resume.md under the heading ``section``."""
    blocks: dict[str | None, list[str]] = {}
    heading, fence, code = None, None, []
    for line in DOC.read_text().splitlines(keepends=True):
        if fence is None and line.startswith("```"):
            fence, code = line.strip(), []
        elif fence is not None and line.startswith("```"):
            if fence == "```python":
                blocks.setdefault(heading, []).append("".join(code))
            fence = None
        elif fence is not None:
            code.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    assert len(blocks.get(section, [])) == 1, f"docs/resume.md should hold one python block under {section!r}"
    return blocks[section][0]


@dataclass(frozen=True)
class Setup:
    schedule: str
    loop: str
    num_workers: int
    loader: str


class Record(NamedTuple):
    """One optimizer step: the samples it trained on and the learning rate it used."""

    indices: tuple[int, ...]
    effective_lr: float


class Run:
    """Every object of a training run, built from nothing, as a resumed process builds them, and
    what each step trained."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.records: list[Record] = []
        self.measured: list[bool] = []  # per step: whether it counted a noise measurement
        self.effective_lrs: list[float] = []
        self.model = nn.Linear(FEATURES, 1, dtype=torch.float64)
        with torch.no_grad():
            for parameter in self.model.parameters():
                nn.init.normal_(parameter, generator=torch.Generator().manual_seed(1))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.02, momentum=0.9)
        if setup.schedule == "Adaptive":
            # Decisions from the third measurement on, every other step; a measurement every 32 samples;
            # on the smoothed noise scale itself (confidence 0), which these few measurements leave
            # unresolved, so that the short run grows (the bound is a function of the checkpointed
            # statistics, and resumes as they do).
            schedule = schedules.Adaptive(start=8, warmup=3, interval=2, extra_samples=0.5, growth_per_epoch=4,
                                          confidence=0)
            options = {"noise_interval": 32, "max_batch_size": 48}
        elif setup.schedule == "Step in samples":
            schedule = schedules.Step(start=8, factor=2, milestones=[130, 330], unit="sample")
            options = {"lr_scaling": "linear", "warmup_steps": 2}
        else:  # the first milestone on an epoch boundary, the second inside an epoch
            schedule = schedules.Step(start=8, factor=2, milestones=[1, 1.5])
            options = {"lr_scaling": "sqrt"}
        self.scheduler = BatchSizeScheduler(self.optimizer, schedule, min_batch_size=4, memory=None, **options)
        if self.scheduler.step_times is not None:
            # Step times on a simulated clock (10 ms + 0.1 ms per sample: growth pays), the same in every run.
            clock = FakeClock(fixed=1e-2, per_sample=1e-4)
            clock.attach(self.model)
            self.scheduler.step_times.clock = clock
        self.sampler = AdaptiveBatchSampler(DATASET, self.scheduler, shuffle=True, seed=0)
        self.loader = LOADERS[setup.loader](DATASET, batch_sampler=self.sampler, num_workers=setup.num_workers)
        # Registered after the scheduler's hook: it sees the learning rate the step really uses.
        self.optimizer.register_step_pre_hook(
            lambda optimizer, args, kwargs: self.effective_lrs.append(optimizer.param_groups[0]["lr"]))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(self.model(batch[0]), batch[1])

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        indices, features = tuple(x[:, 0].long().tolist()), x[:, 1:]
        measurements = self.measurements()
        if self.setup.loop == "plain":
            self.optimizer.zero_grad()
            self.loss((features, y)).backward()
            self.optimizer.step()
            self.scheduler.step(len(x))
        else:
            self.scheduler.train_step((features, y), self.loss)
        self.records.append(Record(indices, self.effective_lrs[-1]))
        self.measured.append(self.measurements() > measurements)

    def measurements(self) -> int:
        meter = self.scheduler.noise_meter
        return 0 if meter is None else meter.noise.steps

    def train(self, save: Callable[[dict[str, Any]], None], path: Path | None = None) -> None:
        """The documented loop, with the documented checkpoint and restore; from the
        checkpoint at ``path`` if one is given."""
        namespace = {
            "torch": torch, "model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
            "sampler": self.sampler, "loader": self.loader, "epochs": EPOCHS, "train_step": self.train_step,
            "save": save, "path": path, "resuming": path is not None,
        }
        exec(documented_code(DOCUMENTED_SECTION[self.setup.loader]), namespace)
        exec(documented_code("The loop"), namespace)


class Checkpoint(NamedTuple):
    steps: int  # steps trained before it
    after_epoch: bool  # saved after an epoch (with the next epoch) rather than after a step
    state: dict[str, Any]


class Reference(NamedTuple):
    records: list[Record]
    measured: list[bool]
    checkpoints: list[Checkpoint]
    parameters: list[torch.Tensor]


@functools.lru_cache(maxsize=None)
def uninterrupted(setup: Setup) -> Reference:
    run = Run(setup)
    checkpoints: list[Checkpoint] = []

    def save(state: dict[str, Any]) -> None:
        steps = len(run.records)
        after_epoch = bool(checkpoints) and checkpoints[-1].steps == steps
        checkpoints.append(Checkpoint(steps, after_epoch, copy.deepcopy(state)))

    run.train(save)
    return Reference(run.records, run.measured, checkpoints, [p.detach().clone() for p in run.model.parameters()])


def epoch_ends(reference: Reference) -> list[int]:
    """The steps after which an epoch ended."""
    return [checkpoint.steps for checkpoint in reference.checkpoints if checkpoint.after_epoch]


def interesting_steps(reference: Reference) -> list[int]:
    """Steps worth stopping after: each side of every epoch's end and of every noise measurement."""
    measured = [step + 1 for step, counted in enumerate(reference.measured) if counted]
    steps = {near for step in epoch_ends(reference) + measured for near in (step - 1, step, step + 1)}
    return sorted(step for step in steps if 1 <= step <= len(reference.records))


def before_a_measured_plain_step(setup: Setup, reference: Reference, stop: int) -> bool:
    """Whether the step after ``stop`` is one the plain loop measures the noise on."""
    return setup.loop == "plain" and stop < len(reference.measured) and reference.measured[stop]


def assert_resumes_exactly(setup: Setup, checkpoint: Checkpoint, directory: Path) -> None:
    """Restore ``checkpoint`` from a file into a fresh run, train to the end, compare."""
    reference = uninterrupted(setup)
    path = directory / "checkpoint.pt"
    torch.save(checkpoint.state, path)
    resumed = Run(setup)
    resumed.train(lambda state: None, path)
    assert resumed.records == reference.records[checkpoint.steps:]
    for actual, expected in zip(resumed.model.parameters(), reference.parameters):
        assert torch.equal(actual, expected)


setups = st.builds(
    Setup,
    schedule=st.sampled_from(SCHEDULES),
    loop=st.sampled_from(LOOPS),
    # Workers take a while to start: one set-up in five has them.
    num_workers=st.sampled_from([0, 0, 0, 0, 2]),
    loader=st.sampled_from(list(LOADERS)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups, data=st.data())
def test_a_resumed_run_trains_what_the_uninterrupted_run_trained(
    setup: Setup, data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    reference = uninterrupted(setup)
    steps = len(reference.records)
    stop = data.draw(st.one_of(st.sampled_from(epoch_ends(reference)), st.sampled_from(interesting_steps(reference)),
                               st.integers(1, steps)), label="stop")
    saved = [checkpoint for checkpoint in reference.checkpoints if checkpoint.steps == stop]
    checkpoint = data.draw(st.sampled_from(saved), label="checkpoint") if len(saved) > 1 else saved[0]
    event("stopped after an epoch" if checkpoint.after_epoch else "stopped after a step")
    event(f"{setup.num_workers} workers")
    assert_resumes_exactly(setup, checkpoint, tmp_path_factory.mktemp("resume"))


@pytest.mark.parametrize("loader", list(LOADERS))
def test_a_plain_loop_resumed_just_before_a_noise_measurement(loader: str, tmp_path: Path) -> None:
    # The step after the stop pairs its gradient with the one kept from the step before it,
    # which the checkpoint carries (state_dict["noise_pair"]).
    setup = Setup("Adaptive", "plain", 0, loader)
    reference = uninterrupted(setup)
    stop = next(stop for stop in range(1, len(reference.records))
                if before_a_measured_plain_step(setup, reference, stop))
    checkpoint = next(checkpoint for checkpoint in reference.checkpoints if checkpoint.steps == stop)
    assert_resumes_exactly(setup, checkpoint, tmp_path)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_runs_grow_the_batch_and_the_lr_across_epochs(schedule: str, loop: str) -> None:
    # The resume property is only as strong as the runs it resumes.
    reference = uninterrupted(Setup(schedule, loop, 0, "DataLoader"))
    sizes = [len(record.indices) for record in reference.records]
    assert len(set(sizes)) >= 3 and max(sizes) >= 2 * sizes[0], sizes
    assert len({record.effective_lr for record in reference.records}) >= 3
    assert len(epoch_ends(reference)) == EPOCHS
    assert sum(reference.measured) >= 10 if schedule == "Adaptive" else not any(reference.measured)
