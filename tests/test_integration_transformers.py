"""AdaptiveBatchTrainer through the real transformers Trainer: a tiny GPT-2 built from a config,
trained on locally generated token rows (tests/transformers_worker.py has the pieces)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
import transformers_worker as worker  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.data import IterableDataset  # noqa: E402

from adabatch import schedules  # noqa: E402
from adabatch.integrations.transformers import STATE_NAME  # noqa: E402

torch.set_num_threads(1)

DATASET_SIZE = 96
#: Steps per epoch of the timetable 8 → 16 → 32: 12, 6, 3.
EPOCH_SIZES = [worker.START * worker.FACTOR**epoch for epoch in range(3)]
EXPECTED_SIZES = [size for size in EPOCH_SIZES for _ in range(DATASET_SIZE // size)]
SAVE_STEPS = 4


def sizes(steps: list[dict]) -> list[int]:
    return [sum(len(micro) for micro in step["micro_batches"]) for step in steps]


def indices(step: dict) -> list[int]:
    return [index for micro in step["micro_batches"] for index in micro]


def final_trainer_lr(trainer: worker.RecordingTrainer) -> float:
    return trainer.lr_scheduler.get_last_lr()[0]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> worker.RecordingTrainer:
    """Three epochs of the timetable, a checkpoint every SAVE_STEPS steps."""
    trainer = worker.make_trainer(tmp_path_factory.mktemp("full"), save_strategy="steps", save_steps=SAVE_STEPS)
    trainer.train()
    return trainer


def test_the_batch_grows_at_the_milestones_and_the_epochs_keep_their_meaning(full_run):
    assert sizes(full_run.steps) == EXPECTED_SIZES
    assert full_run.state.global_step == len(EXPECTED_SIZES)
    assert full_run.state.epoch == 3.0
    # The horizon of the Trainer's LR scheduler is the run's real number of steps: linear decay ends at 0.
    assert full_run.state.max_steps == len(EXPECTED_SIZES)
    assert final_trainer_lr(full_run) == 0.0


def test_each_index_is_trained_once_per_epoch(full_run):
    for epoch in range(3):
        trained = [index for step in full_run.steps if step["epoch"] == epoch for index in indices(step)]
        assert sorted(trained) == list(range(DATASET_SIZE)), f"epoch {epoch}"


def test_the_lr_factor_composes_with_the_trainers_lr_scheduler(full_run):
    # lr_scaling="linear": the effective LR is the Trainer's LR times batch / first batch.
    for step, size in zip(full_run.steps, EXPECTED_SIZES):
        assert step["lr"] == pytest.approx(step["unscaled_lr"] * size / worker.START, rel=1e-12)
    assert len({step["unscaled_lr"] for step in full_run.steps}) > 3  # warm-up, then linear decay


def test_max_steps_counts_optimizer_steps_across_growing_epochs(tmp_path):
    # 19 steps: the first epoch's 12 batches of 8, the second's 6 of 16, one of 32.
    trainer = worker.make_trainer(tmp_path, max_steps=19)
    trainer.train()
    assert sizes(trainer.steps) == EXPECTED_SIZES[:19]
    assert trainer.state.global_step == 19
    assert final_trainer_lr(trainer) == 0.0


def test_gradient_accumulation_trains_the_same_batches_with_the_same_loss(tmp_path, full_run):
    trainer = worker.make_trainer(tmp_path, gradient_accumulation_steps=2)
    trainer.train()
    assert trainer.model_accepts_loss_kwargs  # so the Trainer passes num_items_in_batch to the model
    assert [indices(step) for step in trainer.steps] == [indices(step) for step in full_run.steps]
    assert [[len(micro) for micro in step["micro_batches"]] for step in trainer.steps] == \
        [[size // 2, size // 2] for size in EXPECTED_SIZES]
    # The labels hold a different number of -100 in each row: only a count of the items over the
    # whole batch makes the two halves' losses add up to the batch's.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    expected = [entry["loss"] for entry in full_run.state.log_history if "loss" in entry]
    assert losses == pytest.approx(expected, rel=1e-4)
    for mine, theirs in zip(trainer.model.parameters(), full_run.model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("checkpoint, num_workers, ignore_data_skip", [
    (SAVE_STEPS, 0, False),  # mid-epoch 0
    (3 * SAVE_STEPS, 2, False),  # the end of epoch 0
    (4 * SAVE_STEPS, 2, True),  # mid-epoch 1, after the batch grew
    (5 * SAVE_STEPS, 0, False),  # mid-epoch 2
])
def test_a_resumed_run_trains_the_remaining_batches_at_the_same_learning_rates(
        tmp_path, full_run, checkpoint, num_workers, ignore_data_skip):
    folder = Path(full_run.args.output_dir) / f"checkpoint-{checkpoint}"
    assert (folder / STATE_NAME).is_file()
    resumed = worker.make_trainer(tmp_path, dataloader_num_workers=num_workers, ignore_data_skip=ignore_data_skip)
    resumed.train(resume_from_checkpoint=str(folder))
    rest = full_run.steps[checkpoint:]
    assert [step["step"] for step in resumed.steps] == [step["step"] for step in rest]
    assert [indices(step) for step in resumed.steps] == [indices(step) for step in rest]
    assert [step["lr"] for step in resumed.steps] == [step["lr"] for step in rest]
    assert [step["unscaled_lr"] for step in resumed.steps] == [step["unscaled_lr"] for step in rest]
    for mine, theirs in zip(resumed.model.parameters(), full_run.model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_an_adaptive_schedule_resumes_with_its_decisions(tmp_path):
    # In epochs, the horizon of the Trainer's LR scheduler is planned at the size the batch has
    # when training starts: the resumed run must keep the first run's, not plan its own.
    schedule = schedules.Adaptive(start=8, warmup=2, interval=2, extra_samples=0.9, throughput=False)
    full = worker.make_trainer(tmp_path / "full", schedule=schedule, noise_interval=8, save_strategy="steps",
                               save_steps=8)
    full.train()
    assert len(set(sizes(full.steps))) > 1, "the noise scale did not grow the batch: the test shows nothing"
    resumed = worker.make_trainer(tmp_path / "resumed", schedule=schedule, noise_interval=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-8"))
    assert [indices(step) for step in resumed.steps] == [indices(step) for step in full.steps[8:]]
    assert [step["lr"] for step in resumed.steps] == [step["lr"] for step in full.steps[8:]]
    for mine, theirs in zip(resumed.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_adaptive_without_a_start_starts_at_the_batch_the_arguments_ask_for(tmp_path):
    trainer = worker.make_trainer(tmp_path, schedule=schedules.Adaptive(), max_steps=3, per_device_train_batch_size=4,
                                  gradient_accumulation_steps=2)
    trainer.train()
    assert trainer.batch_size_scheduler.schedule.start == 8
    assert sizes(trainer.steps) == [8, 8, 8], "4 per device, accumulated twice"


def test_the_batch_grows_mid_epoch_in_order_and_drops_the_short_end(tmp_path):
    # 100 rows in order: 5 batches of 8, then of 16 from sample 40; the last 12 rows, short of 16, are dropped.
    trainer = worker.make_trainer(tmp_path, dataset_size=100, num_train_epochs=1,
                                  schedule=schedules.Step(start=8, factor=2, milestones=[40], unit="sample"),
                                  train_sampling_strategy="sequential", dataloader_drop_last=True)
    trainer.train()
    starts = list(range(0, 40, 8)) + list(range(40, 100 - 16 + 1, 16))
    assert [indices(step) for step in trainer.steps] == [list(range(s, s + (8 if s < 40 else 16))) for s in starts]


def test_adabatch_curves_go_next_to_the_trainers_in_tensorboard(tmp_path):
    trainer = worker.make_trainer(tmp_path, max_steps=14, report_to=["tensorboard"])
    trainer.train()
    (run,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "train/learning_rate" in tags
    assert [event.value for event in events.Scalars("adabatch/batch_size")] == EXPECTED_SIZES[:14]
    effective = [event.value for event in events.Scalars("adabatch/lr/group_0")]
    assert effective == pytest.approx([step["lr"] for step in trainer.steps], rel=1e-6)


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(worker.TokenRows(8))


@pytest.mark.parametrize("overrides, error, match", [
    ({"auto_find_batch_size": True}, ValueError, "auto_find_batch_size"),
    ({"train_sampling_strategy": "group_by_length"}, ValueError, "train_sampling_strategy"),
    ({"accelerator_config": {"split_batches": True}}, ValueError, "split_batches"),
    ({"lr_scaling": "cubic"}, ValueError, "lr_scaling"),
    ({"min_batch_size": 0}, ValueError, "min_batch_size"),
])
def test_arguments_that_cannot_work_are_refused_when_the_trainer_is_built(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        worker.make_trainer(tmp_path, **overrides)


def test_a_stream_without_a_length_is_refused(tmp_path):
    trainer = worker.make_trainer(tmp_path)
    trainer.train_dataset = _Stream()
    with pytest.raises(TypeError, match="train_dataset must be a map-style dataset"):
        trainer.train()


def test_a_checkpoint_without_adabatch_state_is_refused(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    trainer = worker.make_trainer(tmp_path)
    with pytest.raises(ValueError, match=STATE_NAME):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_import_adabatch_does_not_import_transformers():
    code = "import sys, adabatch, adabatch.integrations; print(sorted(m for m in ('transformers', 'accelerate') " \
           "if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_two_processes_under_torchrun_share_each_batch_and_resume_exactly(tmp_path, full_run):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(Path(worker.__file__)), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [record["world_size"] for record in records] == [2, 2]
    first, second = records
    # Every step: the same share on each rank (half the global batch, in 2 micro-batches each), the same LR.
    assert [size * 2 for size in sizes(first["steps"])] == EXPECTED_SIZES
    assert sizes(second["steps"]) == sizes(first["steps"])
    assert [step["lr"] for step in second["steps"]] == [step["lr"] for step in first["steps"]]
    assert all(len(step["micro_batches"]) == 2 for record in records for step in record["steps"])
    for epoch in range(3):
        trained = [index for record in records for step in record["steps"] if step["epoch"] == epoch
                   for index in indices(step)]
        assert sorted(trained) == list(range(DATASET_SIZE)), f"epoch {epoch}"
    # The global batches are those of one process: the ranks' halves, side by side.
    assert [sorted(indices(a) + indices(b)) for a, b in zip(first["steps"], second["steps"])] == \
        [sorted(indices(step)) for step in full_run.steps]
    for record in records:
        rest = record["steps"][worker.RESUME_STEP:]
        assert [indices(step) for step in record["resumed"]] == [indices(step) for step in rest]
        assert [step["lr"] for step in record["resumed"]] == [step["lr"] for step in rest]
        assert record["resumed_parameters"] == record["parameters"]
    for mine, theirs in zip(first["parameters"], second["parameters"]):
        assert theirs == pytest.approx(mine, abs=1e-6), "the ranks' models drifted apart"


def test_the_example_trains_a_tiny_gpt_on_the_standard_librarys_docstrings(tmp_path):
    path = Path(__file__).parents[1] / "examples" / "tiny_gpt_trainer.py"
    spec = importlib.util.spec_from_file_location("tiny_gpt_trainer", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(["--max-blocks", "96", "--epochs", "2", "--output-dir", str(tmp_path)])
    # Step(start=16, factor=2, milestones=[1, 2]) over 96 sequences: 6 steps of 16, then 3 of 32.
    assert summary["train_sequences"] == 96
    assert summary["batch_sizes"] == f"16 x {96 // 16}, 32 x {96 // 32}"
    assert summary["optimizer_steps"] == 96 // 16 + 96 // 32
    assert summary["eval_loss"] < math.log(summary["characters"])  # better than a uniform guess
