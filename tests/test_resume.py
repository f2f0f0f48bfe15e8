"""Exact resume: stop after any step, rebuild every object fresh, and the rest of the run is unchanged.

The rest of a run is compared batch by batch (dataset indices, hence sizes), with the effective
learning rate of every step and the final weights of a small float64 model trained on it. A
plain ``DataLoader`` with workers draws batches ahead of training, so the sampler resumes from
the scheduler's trained position; a ``StatefulDataLoader`` snapshots the sampler itself.
"""

from __future__ import annotations

import copy
import functools
import json
import random
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules

DATASET_SIZE = 50
EPOCHS = 4
#: In epochs: the first lies on an epoch boundary, the second inside a batch of epoch 2.
MILESTONES = (1, 2.5)
REMAINDERS = ("balance", "wrap", "drop")

DATASET = TensorDataset(
    torch.arange(DATASET_SIZE),
    torch.randn(DATASET_SIZE, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
    torch.randint(0, 2, (DATASET_SIZE,), generator=torch.Generator().manual_seed(1)),
)


class Record(NamedTuple):
    """What one optimizer step trained on, and with which learning rate."""

    epoch: int
    indices: tuple[int, ...]
    effective_lr: float
    epochs_passed: float


@dataclass
class Training:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scheduler: BatchSizeScheduler
    sampler: AdaptiveBatchSampler
    loader: Iterable
    effective_lrs: list[float]


def build(remainder: str, num_workers: int, loader_class: type = DataLoader, **loader_options: Any) -> Training:
    """Every object of a training run, built from nothing, as a resumed process builds them."""
    model = nn.Linear(3, 2, dtype=torch.float64)
    with torch.no_grad():
        for parameter in model.parameters():
            nn.init.normal_(parameter, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
    scheduler = BatchSizeScheduler(
        optimizer,
        schedules.Step(start=4, factor=2, milestones=MILESTONES),
        min_batch_size=2,
        lr_scaling="linear",
        warmup_steps=3,
    )
    sampler = AdaptiveBatchSampler(DATASET, scheduler, shuffle=True, seed=0, remainder=remainder)
    loader_options = {"persistent_workers": num_workers > 0, **loader_options}
    loader = loader_class(DATASET, batch_sampler=sampler, num_workers=num_workers, **loader_options)
    effective_lrs: list[float] = []
    # Registered after the scheduler's hook, so it sees the learning rate the step really uses.
    optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: effective_lrs.append(optimizer.param_groups[0]["lr"])
    )
    return Training(model, optimizer, lr_scheduler, scheduler, sampler, loader, effective_lrs)


def train(
    training: Training,
    first_epoch: int,
    after_step: Callable[[int], None] = lambda epoch: None,
    after_epoch: Callable[[int], None] = lambda next_epoch: None,
    stop_after: int | None = None,
) -> list[Record]:
    """The usual training loop, from ``first_epoch`` to the end (or for ``stop_after`` steps)."""
    records: list[Record] = []
    for epoch in range(first_epoch, EPOCHS):
        training.sampler.set_epoch(epoch)
        for index, features, labels in training.loader:
            training.optimizer.zero_grad()
            F.cross_entropy(training.model(features), labels).backward()
            training.optimizer.step()
            training.scheduler.step(len(index))
            training.lr_scheduler.step()
            records.append(Record(epoch, tuple(index.tolist()), training.effective_lrs[-1], training.scheduler.epoch))
            after_step(epoch)
            if len(records) == stop_after:
                return records
        after_epoch(epoch + 1)
    return records


def checkpoint(training: Training, epoch: int) -> dict[str, Any]:
    """What a training script saves: every state_dict, and the epoch its loop resumes at."""
    state = {
        "epoch": epoch,
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "lr_scheduler": training.lr_scheduler.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "sampler": training.sampler.state_dict(),
    }
    if hasattr(training.loader, "state_dict"):
        state["loader"] = training.loader.state_dict()
    return copy.deepcopy(state)


def restore(training: Training, state: dict[str, Any]) -> None:
    # A copy, as if read from a file: the optimizer adopts the saved momentum tensors and would
    # otherwise update the checkpoint in place.
    state = copy.deepcopy(state)
    training.model.load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.lr_scheduler.load_state_dict(state["lr_scheduler"])
    training.scheduler.load_state_dict(state["scheduler"])
    if "loader" in state:
        training.loader.load_state_dict(state["loader"])  # restores the sampler it drew from
    else:
        training.sampler.load_state_dict(state["sampler"])


class Run(NamedTuple):
    records: list[Record]
    #: ``checkpoints[k]`` is saved after ``k`` steps.
    checkpoints: list[dict[str, Any]]
    parameters: list[torch.Tensor]


@functools.lru_cache(maxsize=None)
def uninterrupted(remainder: str, num_workers: int) -> Run:
    """A whole run, checkpointed after every step as if it could be stopped there."""
    training = build(remainder, num_workers)
    checkpoints = [checkpoint(training, 0)]

    def after_epoch(next_epoch: int) -> None:
        # After an epoch's last step a loop saves the next epoch as the one to resume at
        # (test_resume_inside_the_loop_after_an_epoch_last_step covers saving the finished one).
        checkpoints[-1] = checkpoint(training, next_epoch)

    records = train(training, 0, lambda epoch: checkpoints.append(checkpoint(training, epoch)), after_epoch)
    return Run(records, checkpoints, [p.detach().clone() for p in training.model.parameters()])


def resume(run: Run, stop: int, training: Training) -> tuple[list[Record], list[torch.Tensor]]:
    """Restore ``training`` from the checkpoint after ``stop`` steps of ``run`` and train to the end."""
    state = run.checkpoints[stop]
    restore(training, state)
    records = train(training, state["epoch"])
    return records, [p.detach() for p in training.model.parameters()]


def assert_same_parameters(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e), (a, e)


def stop_points(run: Run, seed: int) -> dict[str, int]:
    """The steps worth stopping after, by name: first, last, both sides of the first epoch
    boundary, both sides of the mid-epoch milestone, and a few chosen at random."""
    records = run.records
    first_epoch_end = next(k + 1 for k in range(len(records)) if records[k].epoch != records[k + 1].epoch)
    # The first step after which the schedule asks for the next size: the next batch is the first one grown.
    at_milestone = next(k + 1 for k, record in enumerate(records) if record.epochs_passed >= MILESTONES[1])
    stops = {
        "first step": 1,
        "last step": len(records),
        "last step of epoch 0": first_epoch_end,
        "first step of epoch 1": first_epoch_end + 1,
        "before the milestone": at_milestone - 1,
        "at the milestone": at_milestone,
    }
    for number, stop in enumerate(random.Random(seed).sample(range(1, len(records)), 2)):
        stops[f"random {number}"] = stop
    return stops


# ------------------------------------------------------------------ plain DataLoader


@pytest.mark.parametrize("remainder", REMAINDERS)
def test_the_run_grows_the_batch_and_the_lr(remainder: str) -> None:
    # The resume tests below are only as good as the run they resume: it must cross both milestones.
    records = uninterrupted(remainder, 0).records
    sizes = [len(record.indices) for record in records]
    assert {4, 8, 16} <= set(sizes)
    assert len({record.effective_lr for record in records}) > 5
    assert sorted({record.epoch for record in records}) == list(range(EPOCHS))


@pytest.mark.parametrize("remainder", REMAINDERS)
def test_workers_do_not_change_the_run(remainder: str) -> None:
    with_workers, in_process = uninterrupted(remainder, 2), uninterrupted(remainder, 0)
    assert with_workers.records == in_process.records
    assert_same_parameters(with_workers.parameters, in_process.parameters)


@pytest.mark.parametrize("remainder", REMAINDERS)
def test_resume_after_every_step_without_workers(remainder: str) -> None:
    run = uninterrupted(remainder, 0)
    for stop in range(len(run.records) + 1):
        records, parameters = resume(run, stop, build(remainder, 0))
        assert records == run.records[stop:], f"resumed after step {stop}"
        assert_same_parameters(parameters, run.parameters)


@pytest.mark.parametrize("remainder", REMAINDERS)
def test_resume_with_workers_that_drew_ahead(remainder: str) -> None:
    # The checkpoints were taken while two workers had batches of the epoch prefetched, and the
    # resumed loader prefetches again.
    run = uninterrupted(remainder, 2)
    for name, stop in stop_points(run, seed=REMAINDERS.index(remainder)).items():
        records, parameters = resume(run, stop, build(remainder, 2))
        assert records == run.records[stop:], f"resumed after the {name} ({stop})"
        assert_same_parameters(parameters, run.parameters)


def test_resume_where_the_training_really_stopped() -> None:
    # No later step touched the objects the checkpoint came from: the loop is left for good.
    run = uninterrupted("balance", 0)
    stop = stop_points(run, seed=0)["random 0"]
    stopped = build("balance", 2)
    assert train(stopped, 0, stop_after=stop) == run.records[:stop]
    state = checkpoint(stopped, run.checkpoints[stop]["epoch"])
    del stopped
    fresh = build("balance", 2)
    restore(fresh, state)
    assert train(fresh, state["epoch"]) == run.records[stop:]
    assert_same_parameters(list(fresh.model.parameters()), run.parameters)


RESUME_SCRIPT = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import test_resume

state = torch.load(sys.argv[2])
training = test_resume.build(state["remainder"], num_workers=2)
test_resume.restore(training, state)
records = test_resume.train(training, state["epoch"])
result = {"records": records, "parameters": [p.tolist() for p in training.model.parameters()]}
with open(sys.argv[3], "w") as file:
    json.dump(result, file)
"""


def test_resume_in_a_fresh_process(tmp_path: Path) -> None:
    run = uninterrupted("balance", 2)
    stop = stop_points(run, seed=0)["before the milestone"]
    path = tmp_path / "checkpoint.pt"
    torch.save({**run.checkpoints[stop], "remainder": "balance"}, path)
    subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, str(Path(__file__).parent), str(path), str(tmp_path / "rest.json")],
        check=True,
        timeout=120,
    )
    result = json.loads((tmp_path / "rest.json").read_text())
    assert [Record(epoch, tuple(indices), lr, passed) for epoch, indices, lr, passed in result["records"]] == (
        run.records[stop:]
    )
    assert result["parameters"] == [p.tolist() for p in run.parameters]


@pytest.mark.parametrize("remainder", REMAINDERS)
def test_resume_inside_the_loop_after_an_epoch_last_step(remainder: str) -> None:
    run = uninterrupted(remainder, 0)
    stop = stop_points(run, seed=0)["last step of epoch 0"]
    saved = {**run.checkpoints[stop], "epoch": run.records[stop - 1].epoch}  # the loop variable at the save
    training = build(remainder, 0)
    restore(training, saved)
    assert train(training, saved["epoch"]) == run.records[stop:]


def loader_type(name: str) -> type:
    if name == "DataLoader":
        return DataLoader
    return pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader


WORKERS = {"no workers": (0, False), "2 workers": (2, False), "2 persistent workers": (2, True)}


@pytest.mark.parametrize("stop", ["before training", "mid-epoch", "at an epoch boundary"])
def test_every_iteration_after_set_epoch_starts_at_the_same_place(stop: str) -> None:
    # A DataLoader calls iter() on its batch sampler once or more per epoch: twice when it
    # starts workers, three times when a StatefulDataLoader restores the sampler.
    training = build("balance", 0)
    # The epoch passed to set_epoch: a later one, the one in progress, the one just finished.
    steps, epoch = {"before training": (0, 1), "mid-epoch": (4, 0), "at an epoch boundary": (None, 0)}[stop]
    for batch in islice(training.sampler, steps):
        training.scheduler.step(len(batch))
    training.sampler.set_epoch(epoch)
    announced = len(training.sampler)
    first = iter(training.sampler)  # which the DataLoader drops without drawing from it
    batches = list(iter(training.sampler))
    assert batches == list(first)
    assert announced == len(batches)
    assert (len(batches) == 0) == (stop == "at an epoch boundary")


def test_an_iteration_begun_before_set_epoch_does_not_end_the_epoch_set() -> None:
    training, told = build("balance", 0), build("balance", 0)
    training.sampler.set_epoch(0)
    earlier = iter(training.sampler)
    training.scheduler.step(len(next(earlier)))
    training.sampler.set_epoch(2)
    list(earlier)  # drawn to the end of epoch 0 after set_epoch(2)
    told.sampler.set_epoch(2)
    assert list(training.sampler) == list(told.sampler) != []


def test_without_set_epoch_an_iteration_after_the_last_batch_continues_with_the_next_epoch() -> None:
    trained, told = build("balance", 0), build("balance", 0)
    for training in trained, told:
        training.sampler.set_epoch(0)
        for batch in training.sampler:
            training.scheduler.step(len(batch))
    told.sampler.set_epoch(1)
    assert list(trained.sampler) == list(told.sampler) != []
    assert trained.sampler.epoch == 1


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
@pytest.mark.parametrize("loader", ["DataLoader", "StatefulDataLoader"])
@pytest.mark.parametrize("workers", WORKERS)
def test_resume_after_an_epoch_saved_as_the_epoch_just_finished(workers: str, loader: str) -> None:
    # A loop that checkpoints after an epoch with the epoch it just finished resumes with
    # set_epoch of that epoch, which gives nothing; the next set_epoch gives the next epoch. A
    # loader with workers calls iter() on the sampler twice when it builds its iterator, and
    # the second call must start where the first did, not one epoch further.
    run = uninterrupted("balance", 0)
    num_workers, persistent_workers = WORKERS[workers]
    options = {"persistent_workers": persistent_workers}
    stopped = build("balance", num_workers, loader_type(loader), **options)
    saved: list[dict[str, Any]] = []
    train(stopped, 0, after_epoch=lambda next_epoch: saved.append(checkpoint(stopped, next_epoch - 1)))
    stop = next(k for k, record in enumerate(run.records) if record.epoch == 2)
    state = saved[1]  # after epochs 0 and 1, saved as epoch 1
    del stopped

    fresh = build("balance", num_workers, loader_type(loader), **options)
    restore(fresh, state)
    assert train(fresh, state["epoch"]) == run.records[stop:]
    assert fresh.scheduler.epoch == EPOCHS
    assert_same_parameters(list(fresh.model.parameters()), run.parameters)


# ----------------------------------------------------------------- StatefulDataLoader

ignore_torchdata_deprecation = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


@ignore_torchdata_deprecation
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("remainder", REMAINDERS)
def test_resume_a_stateful_dataloader_mid_epoch(remainder: str, num_workers: int) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    run = uninterrupted(remainder, 0)
    at_milestone = stop_points(run, seed=0)["at the milestone"]
    mid_epoch = random.Random(num_workers).choice(
        [k for k in range(1, len(run.records)) if run.records[k - 1].epoch == run.records[k].epoch]
    )
    for stop in sorted({at_milestone, mid_epoch}):
        assert run.records[stop - 1].epoch == run.records[stop].epoch, "a mid-epoch stop"
        stopped = build(remainder, num_workers, stateful.StatefulDataLoader)
        assert train(stopped, 0, stop_after=stop) == run.records[:stop]
        state = checkpoint(stopped, run.records[stop - 1].epoch)
        del stopped

        fresh = build(remainder, num_workers, stateful.StatefulDataLoader)
        restore(fresh, state)
        assert train(fresh, state["epoch"]) == run.records[stop:], f"resumed after step {stop}"
        assert_same_parameters(list(fresh.model.parameters()), run.parameters)


@ignore_torchdata_deprecation
@pytest.mark.filterwarnings("ignore:scheduler.step\\(\\) was told")
def test_resume_a_stateful_dataloader_that_snapshots_every_third_step() -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    run = uninterrupted("balance", 0)
    stop = 5
    stopped = build("balance", 2, stateful.StatefulDataLoader, snapshot_every_n_steps=3)
    train(stopped, 0, stop_after=stop)
    state = checkpoint(stopped, run.records[stop - 1].epoch)
    del stopped
    fresh = build("balance", 2, stateful.StatefulDataLoader, snapshot_every_n_steps=3)
    restore(fresh, state)
    assert train(fresh, state["epoch"]) == run.records[stop:]


# ------------------------------------------------------------------- state_dict basics


def test_sampler_state_dict_is_a_new_dict_each_call() -> None:
    training = build("balance", 0)
    first = training.sampler.state_dict()
    second = training.sampler.state_dict()
    assert first == second and first is not second
    first["position"], first["epoch"] = 999, 7
    assert training.sampler.state_dict() == second

    next(iter(training.sampler))
    assert second["position"] == 0, "an earlier state_dict is a snapshot, not a view"
    assert training.sampler.state_dict()["position"] == 4


def test_scheduler_state_dict_is_a_new_dict_each_call() -> None:
    training = build("balance", 0)
    first = training.scheduler.state_dict()
    first["position"] = 999
    assert training.scheduler.state_dict()["position"] == 0
    training.scheduler.step(4)
    assert first["position"] == 999 and training.scheduler.state_dict()["position"] == 4


@pytest.mark.parametrize("remainder", REMAINDERS)
@pytest.mark.parametrize("drawn", [0, 1, 6, 11])
def test_sampler_load_state_dict_round_trips(remainder: str, drawn: int) -> None:
    # No scheduler.step() here: the sampler resumes from its own draw position.
    original = build(remainder, 0)
    batches = iter(original.sampler)
    for _ in range(drawn):
        next(batches)
    state = original.sampler.state_dict()

    fresh = build(remainder, 0)
    fresh.sampler.load_state_dict(state)
    assert fresh.sampler.state_dict() == state
    assert list(fresh.sampler) == list(batches)
    assert fresh.sampler.state_dict() == original.sampler.state_dict()


@pytest.mark.parametrize("stop", [0, 1, 13, 29])
def test_scheduler_load_state_dict_round_trips(stop: int) -> None:
    state = uninterrupted("balance", 0).checkpoints[stop]["scheduler"]
    fresh = build("balance", 0)
    fresh.scheduler.load_state_dict(state)
    assert fresh.scheduler.state_dict() == state


# --------------------------------------------------------------------- any schedule


def prefetched(iterable: Iterable, ahead: int) -> Iterator:
    """Yield from ``iterable`` while holding ``ahead`` items drawn in advance, as DataLoader workers do."""
    iterator = iter(iterable)
    buffer = deque(islice(iterator, ahead))
    for item in iterator:
        buffer.append(item)
        yield buffer.popleft()
    yield from buffer


@pytest.mark.filterwarnings("ignore:the schedule asked for batch size")
@settings(max_examples=60, deadline=None)
@given(
    dataset_size=st.integers(6, 60),
    start=st.integers(1, 8),
    factor=st.sampled_from([1.5, 2, 3]),
    milestones=st.lists(st.floats(0.2, 3.0), min_size=0, max_size=3, unique=True).map(sorted),
    min_batch_size=st.integers(1, 3),
    multiple_of=st.sampled_from([1, 2, 4]),
    remainder=st.sampled_from(REMAINDERS),
    data=st.data(),
)
def test_resume_is_exact_for_any_schedule_and_prefetch_depth(
    dataset_size: int,
    start: int,
    factor: float,
    milestones: list[float],
    min_batch_size: int,
    multiple_of: int,
    remainder: str,
    data: st.DataObject,
) -> None:
    epochs = 3

    def fresh() -> tuple[BatchSizeScheduler, AdaptiveBatchSampler]:
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = BatchSizeScheduler(
            optimizer, schedules.Step(start, factor, milestones), min_batch_size=min_batch_size,
            multiple_of=multiple_of,
        )
        return scheduler, AdaptiveBatchSampler(dataset_size, scheduler, seed=3, remainder=remainder)

    def loop(
        scheduler: BatchSizeScheduler, sampler: AdaptiveBatchSampler, first_epoch: int, ahead: int, checkpoints=None
    ) -> list[tuple[int, list[int]]]:
        batches = []
        for epoch in range(first_epoch, epochs):
            sampler.set_epoch(epoch)
            for batch in prefetched(sampler, ahead):
                scheduler.step(len(batch))
                batches.append((epoch, batch))
                if checkpoints is not None:
                    checkpoints.append((epoch, scheduler.state_dict(), sampler.state_dict()))
            if checkpoints is not None:  # as in uninterrupted(): after an epoch, resume at the next
                checkpoints[-1] = (epoch + 1, scheduler.state_dict(), sampler.state_dict())
        return batches

    scheduler, sampler = fresh()
    checkpoints = [(0, scheduler.state_dict(), sampler.state_dict())]
    reference = loop(scheduler, sampler, 0, data.draw(st.integers(0, 3), label="ahead before the stop"), checkpoints)
    stop = data.draw(st.integers(0, len(reference)), label="stop after")
    epoch, scheduler_state, sampler_state = checkpoints[stop]
    scheduler, sampler = fresh()
    scheduler.load_state_dict(scheduler_state)
    sampler.load_state_dict(sampler_state)
    assert loop(scheduler, sampler, epoch, data.draw(st.integers(0, 3), label="ahead after")) == reference[stop:]
