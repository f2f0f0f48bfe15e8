"""Lightning fits under ``strategy="ddp"`` on 2 CPU processes (gloo), for
``test_integration_lightning_ddp.py``.

    python tests/lightning_ddp_worker.py OUT_DIR

Lightning starts the second process itself (it runs this script again); both then run three
fits in turn, in one process group (starting processes costs far more than these fits):

* ``whole``: 3 epochs, a checkpoint after every optimizer step in ``OUT_DIR/steps``;
* ``resumed``: the same fit resumed from the checkpoint of step ``RESUME_STEP`` (mid-epoch);
* ``own-sampling``: the same fit with ``Trainer(use_distributed_sampler=False)``.

The module and the DataModule are the unchanged ones of ``lightning_models``; each rank writes
what it trained in each fit to ``OUT_DIR/<fit>-rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning_models import Data, Recorder  # noqa: E402

from adabatch import schedules  # noqa: E402
from adabatch.integrations.lightning import AdaptiveBatchSize  # noqa: E402

EPOCHS = 3
#: Global batches of 16, 32, 64 at epochs 0, 1, 2: 8, 16, 32 samples per rank.
SCHEDULE = dict(start=16, factor=2, milestones=[1, 2])


RESUME_STEP = 4  # of epoch 0's 6


def fit(out_dir: Path, name: str, resume: Path | None = None, use_distributed_sampler: bool = True) -> None:
    callback = AdaptiveBatchSize(schedules.Step(**SCHEDULE), min_batch_size=4, lr_scaling="linear")
    checkpoints = ModelCheckpoint(dirpath=out_dir / name, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS,
                         use_distributed_sampler=use_distributed_sampler, callbacks=[callback, checkpoints],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    model = Recorder()
    trainer.fit(model, datamodule=Data(), ckpt_path=resume)
    record = {
        "batches": model.batches,
        "lrs": model.lrs,
        "epoch_lengths": model.epoch_lengths,
        "global_step": trainer.global_step,
        "scheduler_steps": callback.scheduler.steps,
        "samples_seen": callback.scheduler.samples_seen,
        "num_replicas": callback.sampler.num_replicas,
        "weight": model.net.weight.detach().flatten().tolist(),
    }
    (out_dir / f"{name}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    fit(out_dir, "whole")
    fit(out_dir, "resumed", resume=out_dir / "whole" / f"step={RESUME_STEP}.ckpt")
    fit(out_dir, "own-sampling", use_distributed_sampler=False)


if __name__ == "__main__":
    main()
