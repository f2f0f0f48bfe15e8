"""AdaptiveBatchSize through the real Lightning Trainer, with an unchanged LightningModule and DataModule.

The module (``lightning_models.Recorder``) records every batch's indices and every optimizer
step's learning rate as the optimizer sees it; the dataset hands back each sample's index.
The two-process run is in ``test_integration_lightning_ddp.py``.
"""

from __future__ import annotations

import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, WeightedRandomSampler  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from lightning_models import LR, Data, IndexedRegression, Recorder, collate_as_dict  # noqa: E402

from adabatch import schedules  # noqa: E402
from adabatch.integrations.lightning import AdaptiveBatchSize  # noqa: E402

torch.set_num_threads(1)
SIZE = 96
EPOCHS = 4
# 8 per batch in epoch 0, 16 in epoch 1, 32 from epoch 2: 12, 6, 3, 3 batches.
GROWTH = dict(start=8, factor=2, milestones=[1, 2])
BATCHES_PER_EPOCH = [12, 6, 3, 3]


@pytest.fixture(autouse=True)
def quiet() -> None:
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|litlogger|GPU available|"
                                              "but have no .val_dataloader.).*")


def trainer(**settings: object) -> pl.Trainer:
    """A quiet one-CPU Trainer; ``settings`` override the defaults."""
    defaults = dict(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **settings})


def fit(callback: AdaptiveBatchSize, data: Data | None = None, model: Recorder | None = None,
        ckpt_path: str | None = None, **settings: object) -> tuple[Recorder, pl.Trainer]:
    model = Recorder() if model is None else model
    run = trainer(callbacks=[callback, *settings.pop("callbacks", [])], **settings)
    run.fit(model, datamodule=Data() if data is None else data, ckpt_path=ckpt_path)
    return model, run


def assert_each_index_once_per_epoch(model: Recorder, epochs: range, size: int = SIZE) -> None:
    for epoch in epochs:
        seen = sorted(index for batch in model.batches_of(epoch) for index in batch)
        assert seen == list(range(size)), f"epoch {epoch}"


def test_import_adabatch_does_not_import_lightning() -> None:
    code = ("import sys, adabatch, adabatch.integrations; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_grows_at_the_scheduled_epochs_and_each_index_is_used_once(num_workers: int) -> None:
    callback = AdaptiveBatchSize(schedules.Step(**GROWTH))
    model, run = fit(callback, Data(num_workers=num_workers))

    sizes = [[len(batch) for batch in model.batches_of(epoch)] for epoch in range(EPOCHS)]
    assert sizes == [[8] * 12, [16] * 6, [32] * 3, [32] * 3]
    assert model.epoch_lengths == BATCHES_PER_EPOCH  # what Lightning sized each epoch (and its progress bar) with
    assert_each_index_once_per_epoch(model, range(EPOCHS))
    orders = [[index for batch in model.batches_of(epoch) for index in batch] for epoch in range(EPOCHS)]
    assert len({tuple(order) for order in orders}) == EPOCHS  # shuffled, differently each epoch
    assert [e for e, _, _ in model.batches] == sorted(e for e, _, _ in model.batches)
    loader = run.train_dataloader
    assert (loader.num_workers, loader.collate_fn) == (num_workers, collate_as_dict)  # the user's settings kept
    assert callback.scheduler.steps == run.global_step == sum(BATCHES_PER_EPOCH)
    assert callback.scheduler.samples_seen == EPOCHS * SIZE
    assert run.reload_dataloaders_every_n_epochs == 0  # given back after the fit


def test_a_change_within_an_epoch_is_sized_right_from_its_start() -> None:
    # 8 until half of epoch 0 (6 batches), then 16 (3 batches); 32 from epoch 2.
    model, _ = fit(AdaptiveBatchSize(schedules.Step(start=8, factor=2, milestones=[0.5, 2])), max_epochs=3)
    assert [len(batch) for batch in model.batches_of(0)] == [8] * 6 + [16] * 3
    assert model.epoch_lengths == [9, 6, 3]
    assert_each_index_once_per_epoch(model, range(3))


def test_shuffle_false_and_seed_are_followed() -> None:
    model, _ = fit(AdaptiveBatchSize(schedules.Step(**GROWTH)), Data(shuffle=False), max_epochs=2)
    assert [index for batch in model.batches_of(1) for index in batch] == list(range(SIZE))
    first, _ = fit(AdaptiveBatchSize(schedules.Step(**GROWTH), seed=3), max_epochs=1)
    again, _ = fit(AdaptiveBatchSize(schedules.Step(**GROWTH), seed=3), max_epochs=1)
    other, _ = fit(AdaptiveBatchSize(schedules.Step(**GROWTH), seed=4), max_epochs=1)
    assert first.batches == again.batches != other.batches


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual-optimization"])
def test_lr_factor_composes_with_the_lr_scheduler_of_configure_optimizers(manual: bool) -> None:
    callback = AdaptiveBatchSize(schedules.Step(**GROWTH), lr_scaling="linear")
    model, _ = fit(callback, model=Recorder(manual=manual))

    # StepLR halves every 2 epochs; "linear" multiplies by the batch over the first batch, 8.
    expected = [LR * 0.5 ** (epoch // 2) * len(batch) / 8
                for epoch in range(EPOCHS) for batch in model.batches_of(epoch)]
    assert model.lrs == pytest.approx(expected, rel=1e-12)
    assert callback.scheduler.get_last_lr() == pytest.approx([expected[-1]])
    # Outside the step the optimizer holds StepLR's own value: nothing compounded.
    assert model.optimizers().param_groups[0]["lr"] == pytest.approx(LR * 0.5 ** (EPOCHS // 2))


def test_lr_factor_composes_with_a_per_step_lr_scheduler() -> None:
    model, _ = fit(AdaptiveBatchSize(schedules.Step(**GROWTH), lr_scaling="sqrt"), model=Recorder(lr_interval="step"))
    sizes = [len(batch) for epoch in range(EPOCHS) for batch in model.batches_of(epoch)]
    expected = [LR * 0.5 ** (step // 10) * (size / 8) ** 0.5 for step, size in enumerate(sizes)]
    assert model.lrs == pytest.approx(expected, rel=1e-12)


def test_accumulate_grad_batches_splits_each_scheduled_batch() -> None:
    # The schedule is the batch of one optimizer step: 16, then 32 from epoch 1, in 2 DataLoader batches each.
    callback = AdaptiveBatchSize(schedules.Step(start=16, factor=2, milestones=[1]), min_batch_size=4,
                                 lr_scaling="linear")
    model, run = fit(callback, accumulate_grad_batches=2, max_epochs=2)

    assert [len(batch) for batch in model.batches_of(0)] == [8] * 12
    assert [len(batch) for batch in model.batches_of(1)] == [16] * 6
    assert_each_index_once_per_epoch(model, range(2))
    assert run.global_step == callback.scheduler.steps == 6 + 3
    assert callback.scheduler.samples_seen == 2 * SIZE
    assert model.lrs == pytest.approx([LR] * 6 + [2 * LR] * 3)  # the factor follows the step's batch: 32 / 16
    assert callback.scheduler.constraints.min_batch_size == 8  # 4 for each of the 2 DataLoader batches


def test_accumulation_splits_an_epochs_balanced_tail_within_one_sample() -> None:
    # 100 samples in global batches of 24 (multiple_of=2 per DataLoader batch): 24, 24, 24, then 28 shared
    # as 14 + 14 ("balance"); each optimizer step's batch in 2 DataLoader batches of 12 (and 7 + 7).
    callback = AdaptiveBatchSize(schedules.Constant(24), multiple_of=2)
    model, run = fit(callback, Data(size=100), accumulate_grad_batches=2, max_epochs=1)
    sizes = [len(batch) for batch in model.batches_of(0)]
    assert sum(sizes) == 100 and len(sizes) % 2 == 0
    assert max(sizes) - min(sizes[-2:]) <= 12 and abs(sizes[-1] - sizes[-2]) <= 1
    assert run.global_step == len(sizes) // 2
    assert_each_index_once_per_epoch(model, range(1), size=100)


@pytest.mark.filterwarnings("ignore:.*(callbacks used to create the checkpoint|dirpath has changed)")
@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("where", ["mid-epoch", "after-mid-epoch-validation", "last-batch-of-epoch",
                                   "epoch-end-callback"])
def test_resume_trains_the_same_remaining_batches_at_the_same_learning_rates(
        tmp_path: Path, where: str, accumulate: int) -> None:
    def run(ckpt_path: str | None = None, callbacks: tuple = ()) -> tuple[Recorder, pl.Trainer]:
        # DataLoader batches of 8, 16, 32 at epochs 0, 1, 2, in optimizer steps of `accumulate` of them;
        # validation at the middle and the end of each epoch.
        callback = AdaptiveBatchSize(schedules.Step(start=8 * accumulate, factor=2, milestones=[1, 2]),
                                     lr_scaling="linear", warmup_steps=2)
        return fit(callback, ckpt_path=ckpt_path, callbacks=list(callbacks), accumulate_grad_batches=accumulate,
                   enable_checkpointing=True, default_root_dir=tmp_path, limit_val_batches=1.0,
                   val_check_interval=0.5, num_sanity_val_steps=0)

    every_step = ModelCheckpoint(dirpath=tmp_path / "steps", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "epochs", filename="{epoch}", every_n_epochs=1, save_top_k=-1,
                                  save_on_train_epoch_end=True)
    every_validation = ModelCheckpoint(dirpath=tmp_path / "validations", filename="{step}", monitor="val_loss",
                                       save_top_k=-1)
    whole, whole_run = run(callbacks=(every_step, every_epoch, every_validation))

    # Epoch 0 has 12 // accumulate optimizer steps: stop 3 before its end, after the validation
    # in its middle, after its last batch (on_train_batch_end), or after the epoch
    # (on_train_epoch_end); the batch grows after each.
    steps = 12 // accumulate
    steps_done, checkpoint = {
        "mid-epoch": (steps - 3, tmp_path / "steps" / f"step={steps - 3}.ckpt"),
        "after-mid-epoch-validation": (steps // 2, tmp_path / "validations" / f"step={steps // 2}.ckpt"),
        "last-batch-of-epoch": (steps, tmp_path / "steps" / f"step={steps}.ckpt"),
        "epoch-end-callback": (steps, tmp_path / "epochs" / "epoch=0.ckpt"),
    }[where]
    resumed, resumed_run = run(ckpt_path=str(checkpoint))

    assert resumed.batches == whole.batches[steps_done * accumulate:]  # epoch, batch_idx and indices
    assert resumed.lrs == whole.lrs[steps_done:]
    assert resumed.validated_after == [(epoch, step) for epoch, step in whole.validated_after if step > steps_done]
    assert len(whole.lrs) == resumed_run.global_step == whole_run.global_step
    assert torch.equal(resumed.net.weight, whole.net.weight)


def adaptive_growth() -> AdaptiveBatchSize:
    """An Adaptive schedule quick to decide: after 2 noise measurements (one per 8 samples), every 2 steps."""
    return AdaptiveBatchSize(schedules.Adaptive(start=8, warmup=2, interval=2, extra_samples=0.9, throughput=False,
                                                hysteresis=0.0), noise_interval=8, max_batch_size=64)


def test_an_adaptive_schedule_changes_the_size_within_an_epoch_and_each_epoch_still_ends_right() -> None:
    # Its sizes are decided as the epoch goes, so the DataLoader has no length: Lightning finds
    # each epoch's end by drawing a batch ahead, and validates and steps the epoch-wise LR there.
    model, run = fit(adaptive_growth(), Data(size=192), limit_val_batches=1.0, num_sanity_val_steps=0)

    first_epoch = [len(batch) for batch in model.batches_of(0)]
    assert first_epoch[0] == 8 and max(first_epoch) > 8  # grown within epoch 0
    assert_each_index_once_per_epoch(model, range(EPOCHS), size=192)
    assert model.epoch_lengths == [float("inf")] * EPOCHS
    epoch_ends = [sum(len(model.batches_of(e)) for e in range(epoch + 1)) for epoch in range(EPOCHS)]
    assert model.validated_after == list(enumerate(epoch_ends))
    assert model.optimizers().param_groups[0]["lr"] == pytest.approx(LR * 0.5 ** (EPOCHS // 2))  # StepLR stepped
    assert run.global_step == len(model.batches)


@pytest.mark.filterwarnings("ignore:.*(callbacks used to create the checkpoint|dirpath has changed)")
@pytest.mark.parametrize("steps_done", [3, 10], ids=["before-it-grows", "after-it-grew"])
def test_an_adaptive_schedule_resumes_the_same_decisions(tmp_path: Path, steps_done: int) -> None:
    every_step = ModelCheckpoint(dirpath=tmp_path / "steps", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    whole, _ = fit(adaptive_growth(), Data(size=192), callbacks=[every_step], enable_checkpointing=True,
                   max_epochs=2, default_root_dir=tmp_path)
    resumed, _ = fit(adaptive_growth(), Data(size=192), ckpt_path=str(tmp_path / "steps" / f"step={steps_done}.ckpt"),
                     enable_checkpointing=True, max_epochs=2, default_root_dir=tmp_path)

    assert len({len(indices) for _, _, indices in whole.batches[:steps_done]}) == (1 if steps_done == 3 else 2)
    assert resumed.batches == whole.batches[steps_done:]
    assert resumed.lrs == whole.lrs[steps_done:]
    assert torch.equal(resumed.net.weight, whole.net.weight)


def test_validation_interval_and_progress_bar_follow_the_epoch_length() -> None:
    class BarTotals(pl.Callback):
        totals: list[tuple[int, int]] = []

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            bar = trainer.progress_bar_callback.train_progress_bar
            self.totals.append((bar.total, bar.n))

    bar = BarTotals()
    model, _ = fit(AdaptiveBatchSize(schedules.Step(**GROWTH)), Data(size=128), callbacks=[bar, TQDMProgressBar()],
                   enable_progress_bar=True, limit_val_batches=1.0, val_check_interval=0.5, num_sanity_val_steps=0)
    lengths = [16, 8, 4, 4]
    assert model.epoch_lengths == lengths
    steps_before = [0, 16, 24, 28]
    assert model.validated_after == [(epoch, steps_before[epoch] + n) for epoch, length in enumerate(lengths)
                                     for n in (length // 2, length)]
    assert bar.totals == [(length, length) for length in lengths]


def test_curves_go_to_the_trainers_tensorboard_logger(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="run")
    callback = AdaptiveBatchSize(schedules.Step(**GROWTH), lr_scaling="linear")
    model, run = fit(callback, logger=logger, log_every_n_steps=1)

    events = EventAccumulator(logger.log_dir).Reload()
    batch_sizes = events.Scalars("adabatch/batch_size")
    assert [int(event.step) for event in batch_sizes] == list(range(sum(BATCHES_PER_EPOCH)))
    assert [int(event.value) for event in batch_sizes] == [len(indices) for _, _, indices in model.batches]
    assert [event.value for event in events.Scalars("adabatch/lr/group_0")] == pytest.approx(model.lrs)
    assert "train_loss" in events.Tags()["scalars"]  # Lightning's own curves, in the same run directory


class Stream(IterableDataset):
    def __iter__(self):
        return iter(IndexedRegression(8))


class CustomData(Data):
    """Returns ``make()``'s DataLoader."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def train_dataloader(self) -> DataLoader:
        return self.make(self.train_set)


@pytest.mark.parametrize("make, error, message", [
    (lambda ds: [DataLoader(ds, batch_size=8)] * 2, RuntimeError, "training on list. Return a single DataLoader"),
    (lambda ds: DataLoader(ds, batch_size=8, sampler=WeightedRandomSampler([1.0] * len(ds), len(ds)),
                           collate_fn=collate_as_dict),
     TypeError, "has a WeightedRandomSampler, which it cannot follow"),
    (lambda ds: DataLoader(Stream(), batch_size=8), TypeError, "needs a map-style dataset"),
    (lambda ds: DataLoader(ds, batch_size=None), TypeError, "must batch with batch_size="),
])
def test_a_train_dataloader_it_cannot_rebuild_is_refused_clearly(make, error, message) -> None:
    run = trainer(callbacks=[AdaptiveBatchSize(schedules.Constant(8))])
    with pytest.raises(error, match=message):
        run.fit(Recorder(), datamodule=CustomData(make))
    assert "process_dataloader" not in vars(run.strategy)  # given back after the error


def test_a_dataset_of_another_size_on_reload_is_refused() -> None:
    class Shrinking(Data):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(IndexedRegression(SIZE - 8 * self.trainer.current_epoch), batch_size=8,
                              collate_fn=collate_as_dict)

    with pytest.raises(ValueError, match="needs the same dataset all fit"):
        fit(AdaptiveBatchSize(schedules.Constant(8)), Shrinking())


def test_two_optimizers_are_refused() -> None:
    class TwoOptimizers(Recorder):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.parameters(), lr=LR), torch.optim.SGD(self.parameters(), lr=LR)]

    with pytest.raises(ValueError, match="one optimizer; configure_optimizers returned 2"):
        fit(AdaptiveBatchSize(schedules.Constant(8)), model=TwoOptimizers(manual=True))


def test_estimated_stepping_batches_in_configure_optimizers_is_refused() -> None:
    class OneCycle(Recorder):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=LR)
            total_steps = int(self.trainer.estimated_stepping_batches)
            return [optimizer], [torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=total_steps)]

    with pytest.raises(RuntimeError, match="requested before the optimizer exists"):
        fit(AdaptiveBatchSize(schedules.Constant(8)), model=OneCycle())


@pytest.mark.parametrize("options, error, message", [
    (dict(writer=object()), TypeError, "does not take writer=: the callback writes to the Trainer's TensorBoardLogger"),
    (dict(accumulate=True), TypeError, "Trainer\\(accumulate_grad_batches=k\\)"),
    (dict(batch_size=8), TypeError, "unexpected option 'batch_size'"),
    (dict(min_batch_size=0), ValueError, "min_batch_size"),
    (dict(lr_scaling="cube"), ValueError, "lr_scaling"),
    (dict(seed=1.5), ValueError, "seed"),
    (dict(remainder="keep"), ValueError, "remainder"),
])
def test_bad_options_fail_when_the_callback_is_built(options, error, message) -> None:
    with pytest.raises(error, match=message):
        AdaptiveBatchSize(schedules.Constant(8), **options)


def test_a_loader_given_to_fit_and_the_scheduler_options_passed_through() -> None:
    # The loader handed to fit() directly; Adaptive with its default "gain" scaling, the noise
    # measured from the gradients Lightning leaves after each step.
    callback = AdaptiveBatchSize(schedules.Adaptive(), min_batch_size=8, max_batch_size=48, memory=None,
                                 warmup_steps=1, log_every=2, collective=None, noise_interval=16, remainder="wrap",
                                 seed=1)
    model = Recorder()
    run = trainer(callbacks=[callback], max_epochs=3)
    run.fit(model, train_dataloaders=DataLoader(IndexedRegression(SIZE), batch_size=8, shuffle=True,
                                                collate_fn=collate_as_dict))
    sizes = [len(indices) for _, _, indices in model.batches]
    assert min(sizes) >= 8 and max(sizes) <= 48
    assert callback.scheduler.schedule.start == 8 and sizes[0] == 8, "Adaptive() starts at the DataLoader's batch_size"
    assert callback.scheduler.noise_meter is not None and callback.scheduler.noise_meter.noise.steps > 0
    assert callback.scheduler.steps == run.global_step == len(sizes)
    scheduler, sampler = callback.scheduler, callback.sampler
    assert (scheduler.constraints.max_batch_size, scheduler.warmup_steps, scheduler.lr_scaling) == (48, 1, "gain")
    assert (scheduler.memory.device, scheduler.collective, scheduler.logger) == (None, None, None)  # no TB logger
    assert (sampler.remainder, sampler.seed, sampler.shuffle) == ("wrap", 1, True)


@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_the_mnist1d_example_trains_with_a_growing_batch(tmp_path: Path) -> None:
    pytest.importorskip("mnist1d")
    example = runpy.run_path(str(Path(__file__).parent.parent / "examples" / "lightning_mnist1d.py"))
    summary = example["main"](["--epochs", "5", "--num-samples", "1000", "--logdir", str(tmp_path)])
    assert summary["batch_sizes"] == [32, 32, 32, 32, 128]  # 800 training sequences
    assert summary["steps"] == 4 * 25 + 7
    assert summary["val_acc"] > 0.2  # chance is 0.1
    events = EventAccumulator(summary["logdir"]).Reload()
    assert {"adabatch/batch_size", "train_loss", "val_acc"} <= set(events.Tags()["scalars"])
