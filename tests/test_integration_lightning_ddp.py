"""AdaptiveBatchSize under ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``: two real
processes (gloo), started by Lightning from ``lightning_ddp_worker.py``.

Every rank must train the same batch sizes at the same learning rates, the ranks together must
use each index once per epoch, and a fit resumed from a mid-epoch checkpoint must train what the
uninterrupted fit trained after it, on every rank.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("lightning") is None:  # found, not imported: the worker imports it
    pytest.skip("needs lightning", allow_module_level=True)

WORKER = Path(__file__).with_name("lightning_ddp_worker.py")
ROOT = Path(__file__).resolve().parent.parent
SIZE = 96


FITS = ("whole", "resumed", "own-sampling")


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Run the worker (Lightning starts its second rank) and return each fit's record of each rank."""
    out_dir = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(WORKER), str(out_dir)], capture_output=True, text=True,
                            timeout=240, env=env, cwd=out_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {name: [json.loads((out_dir / f"{name}-rank{rank}.json").read_text()) for rank in range(2)]
            for name in FITS}


def sizes(record: dict) -> list[int]:
    return [len(indices) for _, _, indices in record["batches"]]


def assert_ranks_share_each_epoch(records: list[dict], epochs: range) -> None:
    for epoch in epochs:
        seen = sorted(index for record in records for e, _, indices in record["batches"] if e == epoch
                      for index in indices)
        assert seen == list(range(SIZE)), f"epoch {epoch}"


@pytest.mark.parametrize("name", ["whole", "own-sampling"], ids=["lightning-sampler", "use_distributed_sampler=False"])
def test_every_rank_trains_the_same_sizes_and_the_ranks_share_each_epoch(
        fits: dict[str, list[dict]], name: str) -> None:
    records = fits[name]
    first, second = records
    assert first["num_replicas"] == second["num_replicas"] == 2
    assert sizes(first) == sizes(second)
    assert sizes(first)[:9] == [8] * 6 + [16] * 3  # per rank: global 16 in epoch 0, 32 in epoch 1
    assert first["lrs"] == second["lrs"]
    assert first["lrs"][:9] == pytest.approx([0.1] * 6 + [0.2] * 3)  # "linear": 32 / 16
    assert first["epoch_lengths"] == second["epoch_lengths"] == [6, 3, 2]
    assert_ranks_share_each_epoch(records, range(3))
    for record in records:
        assert record["global_step"] == record["scheduler_steps"] == len(record["batches"]) == 11
        assert record["samples_seen"] == 3 * SIZE  # global
    assert first["weight"] == second["weight"]
    if name == "own-sampling":  # the same order as under Lightning's DistributedSampler: its seed is the same
        assert records == fits["whole"]


def test_a_mid_epoch_checkpoint_resumes_the_same_batches_on_every_rank(fits: dict[str, list[dict]]) -> None:
    whole, resumed = fits["whole"], fits["resumed"]
    steps_done = 4  # RESUME_STEP of the worker
    for rank in range(2):
        assert resumed[rank]["batches"] == whole[rank]["batches"][steps_done:]
        assert resumed[rank]["lrs"] == whole[rank]["lrs"][steps_done:]
        assert resumed[rank]["weight"] == whole[rank]["weight"]
