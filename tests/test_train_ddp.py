"""Smoke test of ``scripts/train_ddp.py`` and ``scripts/train_fsdp.py`` (its recipe under FSDP2): two
gloo ranks on loopback, started by torchrun, at a tiny size.

2,000 MNIST-1D sequences (1,600 train / 400 test), 2 epochs at the demo's starting global batch
of 32 (16 per rank): 50 optimizer steps per epoch, the same count as the one-process demo, which
it can only be if the sampler split every global batch over the two ranks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytest.importorskip("mnist1d")
pytest.importorskip("torch.distributed")

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
EPOCHS = 2
EXPECTED_STEPS = EPOCHS * 1600 // 32


@pytest.fixture(scope="module", params=["train_ddp.py", "train_fsdp.py"])
def ddp_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    logdir = tmp_path_factory.mktemp("runs") / Path(request.param).stem
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(SCRIPTS / request.param),
        "--epochs", str(EPOCHS), "--num-samples", "2000", "--json", "--logdir", str(logdir),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"only rank 0 prints, one JSON line; got {completed.stdout!r}"
    return json.loads(lines[0]), logdir


def test_rank_zero_reports_a_trained_model(ddp_run: tuple[dict[str, Any], Path]) -> None:
    summary, logdir = ddp_run
    assert summary["world_size"] == 2
    assert summary["steps"] == EXPECTED_STEPS
    assert summary["batch_sizes"] == [32] * EPOCHS  # global: 16 per rank
    assert summary["test_acc"] > 0.2  # chance is 0.1
    assert len(summary["test_acc_per_epoch"]) == EPOCHS
    assert summary["train_loss_per_epoch"][-1] < summary["train_loss_per_epoch"][0]
    assert summary["logdir"] == str(logdir)


def test_only_rank_zero_writes_tensorboard_files(ddp_run: tuple[dict[str, Any], Path]) -> None:
    summary, logdir = ddp_run
    event_files = list(logdir.rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    events = EventAccumulator(str(logdir)).Reload()
    assert [event.value for event in events.Scalars("demo/test_accuracy")] == \
        pytest.approx(summary["test_acc_per_epoch"])
    assert {int(event.value) for event in events.Scalars("adabatch/batch_size")} == {32}
