"""FSDP2 (``fully_shard``) under the scheduler: two real ranks on loopback (gloo, torchrun), each
run side by side with DistributedDataParallel on the same data and weights (tests/fsdp_worker.py
is one rank), and one-rank process groups in this process for what needs no second rank.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker as worker  # noqa: E402
from test_distributed import epochs_of, launch  # noqa: E402

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules  # noqa: E402

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return launch("compare", tmp_path_factory.mktemp("compare"), worker=WORKER)


@pytest.fixture(scope="module")
def out_of_memory(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return launch("oom", tmp_path_factory.mktemp("oom"), worker=WORKER)


NOISE = ("grad_sqr", "grad_var", "steps", "raw_grad_sqr", "raw_grad_var")


def assert_ranks_agree(runs: list[dict]) -> None:
    """Every rank took the same size, learning rate, memory cap and noise statistics at every
    step, trained each index once per epoch, and ends with the same weights."""
    first = runs[0]
    for other in runs[1:]:
        assert len(other["steps"]) == len(first["steps"])
        for step, (mine, theirs) in enumerate(zip(first["steps"], other["steps"])):
            for key in ("size", "lr", "cap") + tuple(key for key in NOISE if key in mine):
                assert mine[key] == theirs[key] or mine[key] != mine[key], f"step {step}: {key} differs"
        assert other["parameters"] == first["parameters"]
    for epoch, indices in epochs_of(runs).items():
        assert sorted(indices) == list(range(worker.DATASET_SIZE)), f"epoch {epoch}: each index exactly once"
    for run in runs:
        assert run["optimizer_steps"] == run["scheduler_steps"] == len(run["steps"])


def test_train_step_under_fsdp_takes_the_steps_of_ddp(compared: list[dict]) -> None:
    """In micro-batches (FSDP's gradient synchronisation off for all but the last), the same
    batches give the same weights as DistributedDataParallel's ``train_step``."""
    ddp, fsdp = [record["ddp_train_step"] for record in compared], [record["fsdp_train_step"] for record in compared]
    assert_ranks_agree(fsdp)
    assert [step["size"] for step in fsdp[0]["steps"]] == [step["size"] for step in ddp[0]["steps"]]
    assert any(step["cap"] is not None and step["size"] > step["cap"] for step in fsdp[0]["steps"]), \
        "some batches trained in several micro-batches"
    for mine, theirs in zip(fsdp[0]["parameters"], ddp[0]["parameters"]):
        assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-6)


def test_plain_loop_under_fsdp_measures_the_noise_ddp_measures(compared: list[dict]) -> None:
    """Adam and ``Adaptive()`` in the plain loop: the consecutive-steps fallback reads the local
    shards of the gradients and of Adam's second moments, and sums over the ranks, so its
    statistics are those of the whole gradients that DDP's ranks hold."""
    ddp, fsdp = [record["ddp_plain_adaptive"] for record in compared], \
        [record["fsdp_plain_adaptive"] for record in compared]
    assert_ranks_agree(fsdp)
    assert fsdp[0]["steps"][-1]["steps"] >= 8, "the statistics counted measurements"
    assert [step["size"] for step in fsdp[0]["steps"]] == [step["size"] for step in ddp[0]["steps"]]
    for index, (mine, theirs) in enumerate(zip(fsdp[0]["steps"], ddp[0]["steps"])):
        assert mine["steps"] == theirs["steps"]
        for key in ("grad_sqr", "grad_var"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, nan_ok=True), f"step {index}: {key}"


def test_train_step_under_fsdp_pairs_the_global_first_micro_batches_with_the_global_batch(
        compared: list[dict]) -> None:
    """The documented estimator under FSDP2: B_small is the first micro-batches of all the
    ranks (reduce-scattered), B_big the global batch; checked against the two gradients
    computed on the whole model and the ranks' gathered inputs before each measured step."""
    runs = [record["fsdp_train_step_adaptive"] for record in compared]
    assert_ranks_agree(runs)
    sizes = [step["size"] for step in runs[0]["steps"]]
    assert max(sizes) > sizes[0], "Adaptive() grew the batch"
    checked = 0
    for index, (step, expected) in enumerate(zip(runs[0]["steps"], runs[0]["expected"])):
        if expected is None:
            continue
        checked += 1
        for key in ("raw_grad_sqr", "raw_grad_var"):
            assert step[key] == pytest.approx(expected[key], rel=1e-4), f"step {index}: {key}"
    assert checked >= 10


def test_out_of_memory_on_one_rank_is_retried_by_all(out_of_memory: list[dict]) -> None:
    assert_ranks_agree(out_of_memory)
    assert out_of_memory[1]["out_of_memory_errors"] == 1 and out_of_memory[0]["out_of_memory_errors"] == 0
    caps = [step["cap"] for step in out_of_memory[0]["steps"]]
    assert caps[5] is not None and (caps[4] is None or caps[5] < caps[4]), "the failed step lowered the cap"
    assert out_of_memory[0]["steps"][-1]["steps"] >= 2, "the noise was measured around the failure"


def test_memory_caps_are_agreed_by_min_over_the_ranks(out_of_memory: list[dict]) -> None:
    """Each rank measures its own peaks; the cap every rank applies is the smallest of theirs."""
    before_failure = list(zip(out_of_memory[0]["steps"], out_of_memory[1]["steps"]))[:5]
    assert all(mine["cap"] == min(mine["rank_cap"], theirs["rank_cap"]) for mine, theirs in before_failure)
    assert any(mine["rank_cap"] > theirs["rank_cap"] for mine, theirs in before_failure), \
        "rank 0's device holds more: alone it would cap higher"


# ---------------------------------------------------------------- one rank, in this process
@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def small_run(model: nn.Module) -> tuple[BatchSizeScheduler, AdaptiveBatchSampler, TensorDataset]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = BatchSizeScheduler(optimizer, schedules.Adaptive(start=32, warmup=2, interval=2, throughput=False),
                                   min_batch_size=8, memory=None, noise_interval=64)
    return scheduler, AdaptiveBatchSampler(data, scheduler, seed=0), data


def test_one_sharded_rank_trains_as_one_process(one_rank: None) -> None:
    """On a mesh of one rank, FSDP2's train_step (the first half of a measured step is the small
    batch, as on one process) gives the weights and noise statistics of an unwrapped model."""
    results = []
    for wrap in (False, True):
        model = worker.sharded(worker.mlp()) if wrap else worker.mlp()
        scheduler, sampler, data = small_run(model)
        for x, y in DataLoader(data, batch_sampler=sampler):
            scheduler.train_step((x, y), lambda b: F.cross_entropy(model(b[0]), b[1]), model=model if wrap else None)
        noise = scheduler.noise_meter.noise
        results.append(([worker.whole(p).detach() for p in model.parameters()], noise.grad_sqr, noise.grad_var,
                        noise.steps))
    (plain, *plain_noise), (sharded, *sharded_noise) = results
    assert plain_noise[2] == 4, "one step in two measured"
    assert sharded_noise == pytest.approx(plain_noise, rel=1e-5)
    for mine, theirs in zip(sharded, plain):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("misuse, error, message", [
    ("no model", ValueError, r"DTensors \(a model under FSDP2's fully_shard\): pass the root module as "
                             r"train_step\(\.\.\., model=model\)"),
    ("no_sync", ValueError, r"DTensors .* \(no_sync= is DistributedDataParallel's\)"),
    ("both", ValueError, r"train_step takes model= or no_sync=, not both"),
    ("not wrapped", TypeError, r"model must be a DistributedDataParallel or a module fully_shard was applied to "
                               r"\(FSDP2\), got Linear"),
    ("a layer", ValueError, r"must be the root module fully_shard was applied to last, holding every parameter"),
    ("scaler", ValueError, r"train_step\(scaler=\.\.\.\) is not supported with an FSDP2 model"),
])
def test_train_step_refuses_a_sharded_model_it_cannot_control(one_rank: None, misuse: str, error: type,
                                                               message: str) -> None:
    model = worker.sharded(worker.mlp())
    scheduler, sampler, data = small_run(model)
    x, y = next(iter(DataLoader(data, batch_sampler=sampler)))
    kwargs = {"no model": {}, "no_sync": {"no_sync": contextlib.nullcontext},
              "both": {"model": model, "no_sync": contextlib.nullcontext}, "not wrapped": {"model": nn.Linear(8, 2)},
              "a layer": {"model": model[0]}, "scaler": {"model": model, "scaler": torch.amp.GradScaler("cpu")}}[misuse]
    with pytest.raises(error, match=message):
        scheduler.train_step((x, y), lambda b: F.cross_entropy(model(b[0]), b[1]), **kwargs)
    assert scheduler.steps == 0


@pytest.mark.parametrize("wrap", [False, True])
def test_a_checkpoint_between_the_steps_of_a_pair_keeps_no_shard(one_rank: None, wrap: bool) -> None:
    """The plain loop's kept gradient is a slice per rank under FSDP2: the scheduler's state does
    not carry it (a rank's checkpoint would hand its slice to every rank), unlike a whole one."""
    model = worker.sharded(worker.mlp()) if wrap else worker.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(32), memory=None, measure_noise=True,
                                   noise_interval=64, collective=None)
    x = torch.randn(32, 8)
    F.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
    optimizer.step()
    scheduler.step(32)  # position 32: this step's gradient is kept for the next, due at 64
    pair = scheduler.state_dict()["noise_pair"]
    assert (pair is None) == wrap


def test_train_step_gives_fsdp_its_settings_back(one_rank: None) -> None:
    """The step gathers the parameters and turns synchronisation off; afterwards the model holds
    its shards again, with the settings it had (here a user's choice for one layer)."""
    from torch.distributed.tensor import DTensor

    from adabatch.fsdp import GatheredStep

    model = worker.sharded(worker.mlp())
    model[2].set_reshard_after_backward(False, recurse=False)  # a user's choice
    scheduler, sampler, data = small_run(model)
    batches = iter(DataLoader(data, batch_sampler=sampler))
    x, y = next(batches)
    F.cross_entropy(model(x), y).backward()  # FSDP settles the root on the first forward pass
    before = GatheredStep(model).settings()
    assert [setting[2] for setting in before] == [True, True, False, True], "the root, then each Linear layer"
    for x, y in batches:
        scheduler.train_step((x, y), lambda b: F.cross_entropy(model(b[0]), b[1]), model=model)
    assert GatheredStep(model).settings() == before
    assert all(isinstance(p, DTensor) for p in model.parameters()), "every parameter resharded"


def in_micro_batches_of_16(model: nn.Module) -> BatchSizeScheduler:
    """A scheduler for batches of 32 on a simulated device where 20 samples fit, the cap measured
    before training: every step trains in two micro-batches of 16."""
    from adabatch.testing import FakeMemory

    memory = FakeMemory(capacity=1_000_000 + 20 * 40_000, fixed=1_000_000, per_sample=40_000)
    memory.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(32), min_batch_size=8, memory=memory, accumulate=True)
    scheduler.add_memory_measurements({8: memory.peak_for(8), 16: memory.peak_for(16)})
    return scheduler


@pytest.mark.parametrize("reduce_dtype", [None, torch.float64])
def test_a_retried_step_keeps_nothing_of_the_failed_one(one_rank: None, reduce_dtype: torch.dtype | None) -> None:
    """An out-of-memory error in the second micro-batch, after the first one's gradient was
    accumulated (in FSDP's own buffer when it reduces in another precision than the parameters'):
    the retried step gives the weights of a step that never failed."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    weights = []
    for fail in (False, True):
        model = worker.mlp()
        for layer in [*model[::2], model]:
            fully_shard(layer, mp_policy=MixedPrecisionPolicy(reduce_dtype=reduce_dtype))
        scheduler = in_micro_batches_of_16(model)
        forwards = []

        def fail_second(_module: nn.Module, _inputs: tuple) -> None:
            forwards.append(True)
            if fail and len(forwards) == 2:
                raise torch.OutOfMemoryError("out of memory (injected in the second micro-batch)")

        model.register_forward_pre_hook(fail_second)
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
        scheduler.train_step((x, (x[:, 0] > 0).long()), lambda b: F.cross_entropy(model(b[0]), b[1]), model=model)
        assert (len(forwards) > 2 if fail else len(forwards) == 2) and scheduler.steps == 1
        weights.append([worker.whole(p).detach() for p in model.parameters()])
    for retried, clean in zip(weights[1], weights[0]):
        torch.testing.assert_close(retried, clean)


def test_an_error_inside_a_step_propagates_and_leaves_nothing_for_the_next(one_rank: None) -> None:
    """An error that is not out of memory, raised in the second micro-batch's forward pass (the
    first one's gradient accumulated), reaches the caller as it is; the next step trains as if
    the failed one had never started."""
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    batch = (x, (x[:, 0] > 0).long())
    weights = []
    for fail in (False, True):
        model = worker.sharded(worker.mlp())
        scheduler = in_micro_batches_of_16(model)
        forwards = []

        def broken(_module: nn.Module, _inputs: tuple) -> None:
            forwards.append(True)
            if fail and len(forwards) == 2:
                raise KeyError("a bug in a layer")

        handle = model[2].register_forward_pre_hook(broken)
        if fail:
            with pytest.raises(KeyError, match="a bug in a layer"):
                scheduler.train_step(batch, lambda b: F.cross_entropy(model(b[0]), b[1]), model=model)
            assert scheduler.steps == 0
        handle.remove()
        scheduler.train_step(batch, lambda b: F.cross_entropy(model(b[0]), b[1]), model=model)
        assert scheduler.steps == 1
        weights.append([worker.whole(p).detach() for p in model.parameters()])
    for after_failure, clean in zip(weights[1], weights[0]):
        torch.testing.assert_close(after_failure, clean)
