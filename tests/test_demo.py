"""End-to-end tests of ``adabatch demo`` through the real command line, at a tiny size.

Each run generates 2,000 MNIST-1D sequences (1,600 train / 400 test) and trains 9 epochs,
which is enough to pass both growth milestones of the demo's schedule (epochs 4 and 8).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from adabatch.cli import main
from adabatch.demo import DemoResult, batch_size_curve, format_summary

pytest.importorskip("mnist1d")
pytest.importorskip("tqdm")

# One thread: on a CPU shared with other test processes, two threads wait for each other.
TINY = ["--num-samples", "2000", "--epochs", "9", "--threads", "1", "--json", "--no-progress"]
# Step(start=32, factor=4, milestones=[4, 8]) over 1,600 training samples:
# epochs 0-3: 1600 / 32 = 50 batches; epochs 4-7: 11 of 128, then 192 left shared as 96 + 96;
# epoch 8: 512 + 512, then 576 left shared as 288 + 288.
EXPECTED_BATCH_SIZES = [32] * 4 + [128] * 4 + [512]
EXPECTED_STEPS = 4 * 50 + 4 * 13 + 4


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m adabatch`` with ``args`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "adabatch", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def run_tiny_demo(logdir: Path, *extra: str) -> dict[str, Any]:
    completed = run_cli("demo", *TINY, "--logdir", str(logdir), *extra)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert len(lines) == 1, f"--json must print exactly one line on stdout, got {completed.stdout!r}"
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    logdir = tmp_path_factory.mktemp("runs") / "tiny"
    return run_tiny_demo(logdir), logdir


def test_json_summary_has_sane_values(tiny_run: tuple[dict[str, Any], Path]) -> None:
    summary, logdir = tiny_run
    assert summary["epochs"] == 9
    assert summary["train_samples"] == 1600 and summary["test_samples"] == 400
    assert summary["steps"] == EXPECTED_STEPS
    assert summary["batch_sizes"] == EXPECTED_BATCH_SIZES
    assert summary["test_acc"] > 0.5  # chance is 0.1
    assert summary["test_acc"] == summary["test_acc_per_epoch"][-1]
    assert len(summary["train_loss_per_epoch"]) == 9
    assert summary["train_loss_per_epoch"][-1] < summary["train_loss_per_epoch"][0]
    assert summary["wall_s"] > 0
    assert summary["logdir"] == str(logdir)


def test_tensorboard_files_hold_the_curves(tiny_run: tuple[dict[str, Any], Path]) -> None:
    summary, logdir = tiny_run
    assert list(logdir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(logdir)).Reload()
    scalar_tags = set(events.Tags()["scalars"])
    assert {"adabatch/batch_size", "adabatch_vs_samples/batch_size", "demo/test_accuracy", "demo/train_loss"} <= \
        scalar_tags
    accuracies = [event.value for event in events.Scalars("demo/test_accuracy")]
    assert accuracies == pytest.approx(summary["test_acc_per_epoch"])
    logged_sizes = {int(event.value) for event in events.Scalars("adabatch/batch_size")}
    assert {32, 128, 512} <= logged_sizes


def test_workers_train_on_the_same_batches(
    tiny_run: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    # Workers draw batches ahead of training; the sizes must not depend on how far ahead.
    summary, _ = tiny_run
    with_workers = run_tiny_demo(tmp_path / "workers", "--num-workers", "2")
    for key in ("steps", "batch_sizes", "train_loss_per_epoch", "test_acc_per_epoch"):
        assert with_workers[key] == summary[key], key


def test_no_subcommand_prints_usage() -> None:
    completed = run_cli(timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage: adabatch")
    assert "demo" in completed.stdout


def test_missing_extras_say_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # A None entry in sys.modules makes `import mnist1d` raise ImportError, as if it were absent.
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert 'pip install "adabatch[demo]"' in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--epochs", "0"], "epochs must be an integer of at least 1, got 0"),
     (["--num-samples", "10"], "num_samples must be an integer of at least 100, got 10"),
     (["--num-workers", "-1"], "num_workers must be an integer of at least 0, got -1"),
     (["--threads", "0"], "threads must be an integer of at least 1, got 0")],
)
def test_invalid_options_are_rejected(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


@pytest.mark.parametrize(
    ("batch_sizes", "curve"),
    [([32] * 4 + [128] * 4 + [512] * 12, "32 (epochs 0-3) -> 128 (4-7) -> 512 (8-19)"),
     ([64], "64 (epochs 0)"),
     ([32, 128, 128], "32 (epochs 0) -> 128 (1-2)")],
)
def test_batch_size_curve(batch_sizes: list[int], curve: str) -> None:
    assert batch_size_curve(batch_sizes) == curve


def test_human_summary_tells_how_to_watch() -> None:
    result = DemoResult(
        test_acc=0.991, wall_s=13.2, data_s=5.9, steps=3456, epochs=20, batch_sizes=[32] * 4 + [128] * 4 + [512] * 12,
        test_acc_per_epoch=[0.9] * 12 + [0.991] * 8, train_loss_per_epoch=[0.1] * 20, train_samples=19200,
        test_samples=4800, logdir="runs/my run",
    )
    summary = format_summary(result)
    assert summary.splitlines()[0] == "test accuracy 99.10% in 13.2 s, 3,456 optimizer steps"
    assert "32 (epochs 0-3) -> 128 (4-7) -> 512 (8-19)" in summary
    assert "after epoch 12" in summary
    assert "tensorboard --logdir 'runs/my run'" in summary
