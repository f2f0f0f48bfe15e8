"""MNIST-1D with PyTorch Lightning, the batch growing 32 -> 128 -> 512 through one callback.

    python3 examples/lightning_mnist1d.py [--epochs 20] [--num-samples 24000] [--logdir runs/lightning]

The LightningModule and the DataModule below are ordinary Lightning code: a DataModule whose
``train_dataloader()`` returns ``DataLoader(train_set, batch_size=32, shuffle=True)``, and a
module whose ``configure_optimizers`` returns SGD with an epoch-wise MultiStepLR. The only
adabatch line is the callback given to the Trainer, with the demo's policy (``adabatch demo``,
docs/demo.md): the batch is multiplied by 4 at epochs 4 and 8 at a constant learning rate
(Smith et al. 2018), then the learning rate is multiplied by 0.2 at epochs 12 and 16. The data
is MNIST-1D (Greydanus 2020), generated locally; the model is the demo's small BatchNorm CNN.
Curves (Lightning's and adabatch's) go to one TensorBoard run. About 90 s of CPU time on one
thread, imports and data included.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from adabatch import bn_safe_min_batch_size, schedules
from adabatch.demo import (
    DEFAULT_EPOCHS, DEFAULT_NUM_SAMPLES, EVAL_BATCH_SIZE, LR, LR_DECAY, LR_DECAY_EPOCHS, MOMENTUM, WEIGHT_DECAY,
    batch_size_curve, build_model, make_mnist1d,
)
from adabatch.integrations.lightning import AdaptiveBatchSize


class MNIST1D(pl.LightningDataModule):
    """MNIST-1D, 80% for training, in batches of 32."""

    def __init__(self, num_samples: int) -> None:
        super().__init__()
        self.train_set, self.test_set = make_mnist1d(num_samples)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=EVAL_BATCH_SIZE)


class Classifier(pl.LightningModule):
    """The demo's CNN, trained with SGD and a step decay of the learning rate."""

    def __init__(self) -> None:
        super().__init__()
        self.model = build_model()
        self.largest_batch = 0
        self.batch_sizes: list[int] = []  # the largest batch of each epoch, for the summary

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.largest_batch = max(self.largest_batch, len(x))
        return loss

    def on_train_epoch_end(self) -> None:
        self.batch_sizes.append(self.largest_batch)
        self.largest_batch = 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.model(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        decay = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(LR_DECAY_EPOCHS), gamma=LR_DECAY)
        return {"optimizer": optimizer, "lr_scheduler": decay}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="epochs to train (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES,
                        help="sequences to generate, 80%% for training (default: %(default)s)")
    parser.add_argument("--logdir", default=os.path.join("runs", "lightning"),
                        help="TensorBoard directory (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; small batches on a shared CPU run faster on one (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)

    data = MNIST1D(args.num_samples)
    classifier = Classifier()
    growth = AdaptiveBatchSize(schedules.Step(start=32, factor=4, milestones=[4, 8]),
                               min_batch_size=bn_safe_min_batch_size(classifier))
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[growth],
                         logger=TensorBoardLogger(args.logdir, name=""), enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=10)
    begin = time.perf_counter()
    trainer.fit(classifier, datamodule=data)
    summary = {"val_acc": float(trainer.callback_metrics["val_acc"]), "wall_s": time.perf_counter() - begin,
               "steps": trainer.global_step, "batch_sizes": classifier.batch_sizes, "logdir": trainer.logger.log_dir}
    print(f"validation accuracy {summary['val_acc']:.2%} in {summary['wall_s']:.1f} s, {summary['steps']:,} "
          f"optimizer steps\n  batch size      {batch_size_curve(summary['batch_sizes'])}\n"
          f"  watch it with   tensorboard --logdir {summary['logdir']}")
    return summary


if __name__ == "__main__":
    main()
