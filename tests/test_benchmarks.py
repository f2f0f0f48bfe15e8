"""The benchmark scripts run and report what their docstrings say (their numbers are measured
by running them in full, not here: timings on a shared machine are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)


def test_overhead_reports_every_variant_and_the_control():
    completed = run_script("benchmarks/overhead.py", "--steps", "4", "--threads", "1", "--json")
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.splitlines()[-1])
    variants = ["plain again", "scheduler", "scheduler+noise", "plain, zeroed after", "train_step", "train_step+noise",
                "halves", "scheduler+noise Adam"]
    assert set(result) == {"batch_size", "threads", "plain_ms", "plain Adam_ms", *(f"{v}_ms" for v in variants),
                           *(f"{v}_ratio" for v in variants), "train_step/plain, zeroed after_ratio",
                           "train_step+noise/train_step_ratio"}
    assert result["batch_size"] == 256 and result["threads"] == 1
    assert all(result[f"{v}_ms"] > 0 for v in ["plain", "plain Adam", *variants])


def test_overhead_pairs_the_steps_of_every_variant():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import overhead
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    # Sums of two steps: (8, 10) against (6, 4), differences (2, 6), median sum 5.
    assert overhead.paired_ratio([3.0, 5.0, 4.0, 6.0], [2.0, 4.0, 2.0, 2.0], block=2) == pytest.approx(1 + 4 / 5)
    # One dear step in four (a measured step) counts in full, where a median of steps would drop it.
    assert overhead.paired_ratio([1.0, 1.0, 1.0, 5.0] * 3, [1.0] * 12, block=4) == pytest.approx(2.0)
    assert overhead.paired_ratio([3.0, 5.0, 4.0], [2.0, 4.0, 2.0]) == pytest.approx(1 + 4 / 8), "one block"
    durations = overhead.measure(steps=2, warmup=1)
    assert {variant: len(d) for variant, d in durations.items()} == {variant: 2 for variant in overhead.VARIANTS}


def test_ddp_overhead_times_fsdp_beside_ddp():
    completed = run_script("benchmarks/ddp_overhead.py", "--fsdp", "--batch-size", "32", "--steps", "2",
                           "--warmup", "1", "--repeats", "1", "--json")
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.splitlines()[-1])
    variants = ["ddp", "adabatch", "fsdp", "adabatch_fsdp"]
    assert set(result) == {"world_size", "global_batch_size", "threads", "ratio", *(f"{v}_ms" for v in variants),
                           "adabatch_fsdp/adabatch_ratio", "fsdp/ddp_ratio", "adabatch_fsdp/fsdp_ratio"}
    assert result["adabatch_fsdp/adabatch_ratio"] == pytest.approx(result["adabatch_fsdp_ms"] / result["adabatch_ms"],
                                                                   rel=1e-9)
