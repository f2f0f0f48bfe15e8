"""A tiny character-level GPT trained on Python's own docstrings by AdaptiveBatchTrainer.

    python3 examples/tiny_gpt_trainer.py                      # 3 epochs, batch 16 -> 32 -> 64
    python3 examples/tiny_gpt_trainer.py --schedule adaptive  # the batch follows the noise scale
    tensorboard --logdir runs/tiny_gpt                        # the Trainer's curves and adabatch's

Nothing is downloaded: the text is the docstrings of standard-library modules, the tokens are
its characters and the model is a 2-layer GPT-2 built from a config. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

from adabatch import schedules
from adabatch.integrations.transformers import AdaptiveBatchTrainer

MODULES = ("collections", "itertools", "functools", "json", "re", "string", "textwrap", "pathlib", "heapq", "bisect",
           "random", "statistics", "fractions", "decimal", "argparse", "inspect", "logging", "datetime")


def stdlib_text(modules: tuple[str, ...] = MODULES) -> str:
    """The docstrings of ``modules`` and of their public classes and functions, one after another."""
    docs = []
    for name in modules:
        module = importlib.import_module(name)
        for member in [module, *(getattr(module, attribute) for attribute in sorted(vars(module))
                                 if not attribute.startswith("_"))]:
            doc = inspect.getdoc(member) if inspect.ismodule(member) or inspect.isclass(member) \
                or inspect.isroutine(member) else None
            if doc and doc not in docs:
                docs.append(doc)
    return "\n\n".join(docs)


class CharacterBlocks(Dataset):
    """The text cut into blocks of ``length`` character ids; the labels are the ids themselves
    (the model shifts them to predict each next character)."""

    def __init__(self, ids: torch.Tensor, length: int) -> None:
        self.blocks = ids[: len(ids) // length * length].view(-1, length)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", choices=("step", "adaptive"), default="step")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--block", type=int, default=64, help="characters per sequence")
    parser.add_argument("--max-blocks", type=int, default=2400, help="training sequences at most")
    parser.add_argument("--output-dir", default="runs/tiny_gpt")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared CPU")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    text = stdlib_text()
    vocabulary = sorted(set(text))
    index = {character: i for i, character in enumerate(vocabulary)}
    ids = torch.tensor([index[character] for character in text])
    blocks = CharacterBlocks(ids, args.block)
    held_out = max(1, len(blocks) // 10)
    train_set = torch.utils.data.Subset(blocks, range(held_out, min(len(blocks), held_out + args.max_blocks)))
    eval_set = torch.utils.data.Subset(blocks, range(held_out))

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocabulary), n_positions=args.block, n_embd=64, n_layer=2,
                                       n_head=4, bos_token_id=0, eos_token_id=0))
    if args.schedule == "step":
        schedule = schedules.Step(start=16, factor=2, milestones=[1, 2])  # 16 -> 32 -> 64 at epochs 1, 2
        options = {"lr_scaling": "sqrt"}  # AdamW: the square-root rule (Malladi et al. 2022)
    else:
        # A short run: decisions after 10 measurements (not 50), one step in four measured.
        schedule = schedules.Adaptive(start=16, warmup=10, interval=10)  # lr_scaling="gain" by default
        options = {"noise_interval": 64}
    trainer = AdaptiveBatchTrainer(
        model=model, train_dataset=train_set, eval_dataset=eval_set, schedule=schedule, max_batch_size=256, **options,
        args=TrainingArguments(args.output_dir, num_train_epochs=args.epochs, learning_rate=3e-3, warmup_steps=10,
                               use_cpu=True, report_to=["tensorboard"], logging_steps=10, save_strategy="no",
                               disable_tqdm=True, log_level="warning", dataloader_num_workers=0),
    )
    steps = _BatchSizes(trainer)
    trainer.add_callback(steps)
    result = trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    summary = {
        "train_sequences": len(train_set), "characters": len(vocabulary), "optimizer_steps": result.global_step,
        "batch_sizes": steps.summary(), "train_loss": round(result.training_loss, 4),
        "eval_loss": round(eval_loss, 4), "eval_perplexity": round(math.exp(eval_loss), 2),
        "seconds": round(result.metrics["train_runtime"], 1),
    }
    print(json.dumps(summary, indent=1))
    return summary


class _BatchSizes(TrainerCallback):
    """Counts the optimizer steps taken at each global batch size."""

    def __init__(self, trainer: AdaptiveBatchTrainer) -> None:
        self.trainer = trainer
        self.samples_seen = 0
        self.steps: dict[int, int] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        samples_seen = self.trainer.batch_size_scheduler.samples_seen
        size, self.samples_seen = samples_seen - self.samples_seen, samples_seen
        self.steps[size] = self.steps.get(size, 0) + 1

    def summary(self) -> str:
        """``"16 x 135, 32 x 68, ..."``: each batch size and its steps, in order of size."""
        return ", ".join(f"{size} x {count}" for size, count in sorted(self.steps.items()))


if __name__ == "__main__":
    main()
