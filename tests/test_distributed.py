"""The pair under torch.distributed: real processes on loopback, gloo, launched by torchrun.

Every rank must train its share of the same global batch, change size at the same step and take
the same memory and out-of-memory decisions (tests/distributed_worker.py is one rank).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules  # noqa: E402

WORKER = Path(__file__).with_name("distributed_worker.py")


def launch(scenario: str, out_dir: Path, ranks: int = 2, worker: Path = WORKER, **env: str) -> list[dict]:
    """Run ``worker`` on ``ranks`` processes and return each rank's record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(worker), scenario, str(out_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(ranks)]


def epochs_of(records: list[dict]) -> dict[int, list[int]]:
    """Every index trained, by epoch, over all ranks."""
    seen: dict[int, list[int]] = {}
    for record in records:
        for epoch, indices in record["indices"]:
            seen.setdefault(epoch, []).extend(indices)
    return seen


def assert_ranks_agree(records: list[dict]) -> None:
    first = records[0]
    for other in records[1:]:
        assert len(other["steps"]) == len(first["steps"])
        for step, (mine, theirs) in enumerate(zip(first["steps"], other["steps"])):
            assert mine["size"] == theirs["size"], f"step {step}: sizes differ"
            assert mine["lr"] == theirs["lr"], f"step {step}: learning rates differ"
            assert mine["cap"] == theirs["cap"], f"step {step}: memory caps differ"
            assert mine["noise"] == theirs["noise"] or mine["noise"] != mine["noise"], f"step {step}: noise differs"
        for mine, theirs in zip(first["parameters"], other["parameters"]):
            assert theirs == pytest.approx(mine, abs=1e-6), "the ranks' models drifted apart"


def test_ranks_take_identical_decisions_at_every_step(tmp_path: Path) -> None:
    records = launch("agree", tmp_path)
    assert_ranks_agree(records)
    sizes = [step["size"] for step in records[0]["steps"]]
    assert len(set(sizes)) > 2, "the adaptive schedule and the memory cap changed the size"
    caps = {step["cap"] for step in records[0]["steps"]} - {None}
    # Rank 1's device holds less (true max 125 per rank): the agreed cap is its cap, on both ranks.
    assert caps and max(caps) <= 125
    for epoch, indices in epochs_of(records).items():
        assert sorted(indices) == list(range(worker.DATASET_SIZE)), f"epoch {epoch}: each index exactly once"
    for record in records:
        assert record["optimizer_steps"] == record["scheduler_steps"] == len(record["steps"])


def test_out_of_memory_on_one_rank_makes_all_retry_the_same_batch(tmp_path: Path) -> None:
    records = launch("oom", tmp_path)
    assert_ranks_agree(records)
    for record in records:
        assert record["optimizer_steps"] == record["scheduler_steps"] == len(record["steps"])
    for epoch, indices in epochs_of(records).items():
        assert sorted(indices) == list(range(worker.DATASET_SIZE)), f"epoch {epoch}: nothing lost or repeated"
    caps = [step["cap"] for step in records[0]["steps"]]
    assert caps[5] is not None and (caps[4] is None or caps[5] < caps[4]), "the failed step lowered the cap"


def resume_in_one_process(checkpoint: Path) -> list[int]:
    """Continue the 2-rank run's epoch alone (world size 1) and return the indices trained."""
    data = worker.dataset()
    net = worker.model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    scheduler = BatchSizeScheduler(optimizer, schedules.Step(start=32, factor=4, milestones=[1]), min_batch_size=8,
                                   lr_scaling="linear", memory=None, collective=None)
    sampler = AdaptiveBatchSampler(data, scheduler, seed=0, num_replicas=1, rank=0)
    state = torch.load(checkpoint)
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    sampler.set_epoch(state["epoch"])
    trained = []
    for x, y, index in DataLoader(data, batch_sampler=sampler):
        scheduler.train_step((x, y), lambda b: F.cross_entropy(net(b[0]), b[1]))
        trained.extend(index.tolist())
    return trained


@pytest.mark.parametrize("resumed_ranks", [1, 4])
def test_a_checkpoint_from_two_ranks_resumes_on_another_world_size(tmp_path: Path, resumed_ranks: int) -> None:
    stopped = launch("resume", tmp_path / "stopped", STOP_AFTER="3", EPOCHS="1")
    before = epochs_of(stopped)[0]
    checkpoint = tmp_path / "stopped" / "checkpoint.pt"
    if resumed_ranks == 1:
        after = resume_in_one_process(checkpoint)
    else:
        after = epochs_of(launch("resume", tmp_path / "resumed", ranks=resumed_ranks, EPOCHS="1",
                                 RESUME_FROM=str(checkpoint)))[0]
    assert len(before) == 3 * 32, "three global batches of 32 before the stop"
    assert sorted(before + after) == list(range(worker.DATASET_SIZE)), "the global stream continues: none skipped or repeated"


def test_two_ranks_with_workers_resume_after_an_epoch_exactly(tmp_path: Path) -> None:
    """The run saves after epoch 0 (as the epoch just finished) and carries on; two fresh ranks
    resume from the checkpoint with DataLoader workers, which call iter() on the sampler twice
    per epoch, and must train the rest of the run: the same shares, sizes, learning rates, weights."""
    whole = launch("resume", tmp_path / "whole", EPOCHS="3", NUM_WORKERS="2", SAVE_AFTER_EPOCH="0")
    resumed = launch("resume", tmp_path / "resumed", EPOCHS="3", NUM_WORKERS="2",
                     RESUME_FROM=str(tmp_path / "whole" / "checkpoint.pt"))
    stop = sum(epoch == 0 for epoch, _ in whole[0]["indices"])
    assert 0 < stop < len(whole[0]["steps"])
    for before, after in zip(whole, resumed):
        assert after["indices"] == before["indices"][stop:]
        assert after["steps"] == before["steps"][stop:]
        assert after["parameters"] == before["parameters"]


def test_train_step_refuses_to_skip_the_gradient_average_without_a_collective() -> None:
    """Sharded over two replicas with DDP's all-reduce turned off, a scheduler that cannot average
    the gradients would let the replicas' models drift apart silently."""
    data = worker.dataset()
    net = worker.model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(32), memory=None, collective=None)
    sampler = AdaptiveBatchSampler(data, scheduler, num_replicas=2, rank=0)
    x, y, _ = next(iter(DataLoader(data, batch_sampler=sampler)))
    with pytest.raises(RuntimeError, match=r"train_step\(no_sync=\.\.\.\) across 2 replicas needs a collective"):
        scheduler.train_step((x, y), lambda b: F.cross_entropy(net(b[0]), b[1]), no_sync=contextlib.nullcontext)
    assert scheduler.steps == 0
