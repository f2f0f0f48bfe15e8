"""A tiny GPT-2 trained by AdaptiveBatchTrainer, recording what each optimizer step trained on.

tests/test_integration_transformers.py imports the pieces; run as a script under torchrun it is
one rank of the two-process test: a full run that saves checkpoints, then a run resumed from
one of them, each rank writing its record to ``OUT_DIR/rank<r>.json``.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/transformers_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

from adabatch import schedules
from adabatch.integrations.transformers import AdaptiveBatchTrainer

VOCAB = 64
LENGTH = 16
#: The timetable of most tests: 8 → 16 → 32 at epochs 1 and 2.
START, FACTOR, MILESTONES = 8, 2, (1, 2)


class TokenRows(Dataset):
    """``size`` rows of random tokens whose first two tokens spell the row's index, so that a
    batch read back from the model's inputs names the dataset indices it holds. About a quarter
    of the labels are -100, a different number in each row, so that a batch's mean loss depends
    on how the tokens are counted across its micro-batches."""

    def __init__(self, size: int) -> None:
        if size > VOCAB * VOCAB:
            raise ValueError(f"size must be at most {VOCAB * VOCAB}, got {size}")
        generator = torch.Generator().manual_seed(1234)
        self.tokens = torch.randint(0, VOCAB, (size, LENGTH), generator=generator)
        self.tokens[:, 0], self.tokens[:, 1] = torch.arange(size) // VOCAB, torch.arange(size) % VOCAB
        self.labels = self.tokens.masked_fill(torch.rand(size, LENGTH, generator=generator) < 0.25, -100)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.labels[index]}


def indices_of(input_ids: torch.Tensor) -> list[int]:
    return (input_ids[:, 0] * VOCAB + input_ids[:, 1]).tolist()


def tiny_gpt() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


class RecordingTrainer(AdaptiveBatchTrainer):
    """Records, for each optimizer step, the dataset indices of its micro-batches on this process,
    the learning rate of the Trainer's LR scheduler and the effective one adabatch applied."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[dict[str, Any]] = []
        self._micro_batches: list[list[int]] = []
        self._unscaled_lr = 0.0
        self.add_callback(_Record(self))

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        self._micro_batches.append(indices_of(inputs["input_ids"]))
        return super().training_step(model, inputs, num_items_in_batch)


class _Record(TrainerCallback):
    def __init__(self, trainer: RecordingTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self.trainer._unscaled_lr = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        trainer.steps.append({
            "step": state.global_step, "epoch": trainer.batch_sampler.epoch,
            "micro_batches": trainer._micro_batches, "unscaled_lr": trainer._unscaled_lr,
            "lr": trainer.batch_size_scheduler.get_last_lr()[0],
        })
        trainer._micro_batches = []


def make_trainer(output_dir: str | Path, *, dataset_size: int = 96, schedule: Any = None, **overrides: Any
                 ) -> RecordingTrainer:
    """A RecordingTrainer of the tiny GPT on ``dataset_size`` rows; ``overrides`` go to
    TrainingArguments, except ``lr_scaling`` (default ``"linear"``) and the other adabatch options."""
    adabatch_options = {name: overrides.pop(name) for name in ("lr_scaling", "noise_interval", "min_batch_size")
                        if name in overrides}
    settings = dict(num_train_epochs=3, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=3,
                    use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
                    dataloader_num_workers=0, seed=0)
    settings.update(overrides)
    return RecordingTrainer(
        model=tiny_gpt(), args=TrainingArguments(str(output_dir), **settings), train_dataset=TokenRows(dataset_size),
        schedule=schedule or schedules.Step(start=START, factor=FACTOR, milestones=list(MILESTONES)),
        **{"lr_scaling": "linear", **adabatch_options},
    )


def parameters(trainer: RecordingTrainer) -> list[list[float]]:
    return [p.detach().flatten().tolist() for p in trainer.model.parameters()]


#: The checkpoint the two-process run resumes from: mid-epoch 1, after the first milestone.
RESUME_STEP = 16


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    full = make_trainer(Path(out_dir) / "run", gradient_accumulation_steps=2, save_strategy="steps", save_steps=8)
    full.train()
    resumed = make_trainer(Path(out_dir) / "run", gradient_accumulation_steps=2)
    resumed.train(resume_from_checkpoint=str(Path(out_dir) / "run" / f"checkpoint-{RESUME_STEP}"))
    record = {"world_size": full.args.world_size, "steps": full.steps, "resumed": resumed.steps,
              "parameters": parameters(full), "resumed_parameters": parameters(resumed)}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
