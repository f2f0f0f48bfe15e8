"""A LightningModule and DataModule that record what the Trainer does, for the Lightning tests.

Nothing here knows about adabatch: the tests add ``AdaptiveBatchSize`` to the Trainer and check
that the unchanged module trains on growing batches. The dataset hands back each sample's
index, the module records the indices of every batch and the learning rate of every optimizer
step as the optimizer sees it (an optimizer step pre-hook runs inside the step).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

LR = 0.1


class IndexedRegression(Dataset):
    """``size`` samples ``{"x", "y", "index"}`` of a fixed random linear regression."""

    def __init__(self, size: int = 96) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 4, generator=generator)
        self.y = self.x @ torch.randn(4, 1, generator=generator) + 0.1 * torch.randn(size, 1, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[index], self.y[index], index


def collate_as_dict(samples: list[tuple[torch.Tensor, torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """A collate_fn of the user's own, which the rebuilt DataLoader must keep."""
    xs, ys, indices = zip(*samples)
    return {"x": torch.stack(xs), "y": torch.stack(ys), "index": torch.tensor(indices)}


class Data(pl.LightningDataModule):
    """An ordinary DataModule: a shuffled DataLoader with a fixed batch size."""

    def __init__(self, size: int = 96, batch_size: int = 8, num_workers: int = 0, shuffle: bool = True) -> None:
        super().__init__()
        self.size, self.batch_size, self.num_workers, self.shuffle = size, batch_size, num_workers, shuffle
        self.train_set = IndexedRegression(size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle,
                          num_workers=self.num_workers, collate_fn=collate_as_dict)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(IndexedRegression(16), batch_size=8, collate_fn=collate_as_dict)


class Recorder(pl.LightningModule):
    """Linear regression with SGD and an epoch-wise StepLR (halving every 2 epochs), recording
    ``batches`` (epoch, batch_idx, indices), ``lrs`` (the learning rate of each optimizer step),
    ``epoch_lengths`` (the batches Lightning expects in each epoch) and ``validated_after``
    (epoch, optimizer steps) of each validation."""

    def __init__(self, manual: bool = False, lr_interval: str = "epoch") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.automatic_optimization = not manual
        self.lr_interval = lr_interval
        self.batches: list[tuple[int, int, list[int]]] = []
        self.lrs: list[float] = []
        self.epoch_lengths: list[int | float] = []
        self.validated_after: list[tuple[int, int]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        self.batches.append((self.current_epoch, batch_idx, batch["index"].tolist()))
        loss = F.mse_loss(self.net(batch["x"]), batch["y"])
        self.log("train_loss", loss)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        if self.trainer.is_last_batch:
            self.lr_schedulers().step()
        return None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self.net(batch["x"]), batch["y"]))

    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_after.append((self.current_epoch, self.trainer.global_step))

    def on_train_epoch_start(self) -> None:
        self.epoch_lengths.append(self.trainer.num_training_batches)

    def batches_of(self, epoch: int) -> list[list[int]]:
        return [indices for e, _, indices in self.batches if e == epoch]

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.lrs.append(opt.param_groups[0]["lr"]))
        steps_per_halving = 2 if self.lr_interval == "epoch" else 10
        decay = torch.optim.lr_scheduler.StepLR(optimizer, step_size=steps_per_halving, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": self.lr_interval}}
