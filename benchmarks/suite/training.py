"""One run: a task trained under a policy from one seed, in the README quickstart's plain loop.

Every policy goes through the same code: an :class:`~adabatch.AdaptiveBatchSampler` feeding a
``DataLoader``, ``zero_grad``, forward, ``backward``, optional clipping, ``optimizer.step()``,
``scheduler.step(len(x))``, then the task's learning-rate recipe (a ``LambdaLR`` of the samples
seen, stepped after every optimizer step). The held-out quality is measured every
``1 / evals_per_epoch`` of an epoch (at the first step that reaches it) and once at the end;
the wall clock stops while it is measured, so ``wall_s`` is training alone (data loading
included, data generation not). The process's CPU time is kept in the same spans: with one
torch thread and no workers it is about what the wall time would be on an idle machine.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, TensorDataset

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, bn_safe_min_batch_size

from .policies import MAX_BATCH_SIZE, Policy
from .quality import Evaluation
from .task import Task

__all__ = ["Run", "noise_signals", "plain_step", "train"]


@dataclass
class Run:
    """What one (task, policy, seed) run measured.

    ``batch_sizes`` holds ``(samples seen, batch size)`` where the scheduled size changes (its
    first point at 0 samples); ``train_quality`` the final model's quality on the training set
    (beside the last point of ``curve``, on held-out data, it shows how far the task is limited
    by what the model learns from its training data rather than by how well it fits it);
    ``signals`` the smoothed noise scale ``B_simple`` (``nan`` while unmeasured), the
    learning-rate factor adabatch applied and the smoothed ``|G|²`` in units of its standard
    error (``nan`` before two measurements), at each evaluation.
    """

    task: str
    policy: str
    seed: int
    curve: list[Evaluation] = field(default_factory=list)
    batch_sizes: list[tuple[int, int]] = field(default_factory=list)
    # (samples, noise scale, LR factor, |G|² / its standard error)
    signals: list[tuple[int, float, float, float]] = field(default_factory=list)
    train_quality: float | None = None

    @property
    def final(self) -> Evaluation:
        return self.curve[-1]


def noise_signals(scheduler: BatchSizeScheduler) -> tuple[float, float]:
    """The smoothed ``B_simple`` and ``|G|²`` in units of its standard error (``nan`` unmeasured)."""
    meter = scheduler.noise_meter
    if meter is None:
        return math.nan, math.nan
    noise = meter.noise
    error = noise.standard_errors[0]
    return noise.noise_scale, noise.grad_sqr / error if error > 0 else math.nan


def plain_step(task: Task, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: BatchSizeScheduler,
               x: torch.Tensor, y: torch.Tensor) -> None:
    """One step of the README quickstart's loop on the batch ``(x, y)``: ``zero_grad``, forward,
    ``backward``, the task's clipping, ``optimizer.step()``, ``scheduler.step(len(x))``."""
    optimizer.zero_grad()
    task.loss(model, x, y).backward()
    if task.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), task.clip_grad_norm)
    optimizer.step()
    scheduler.step(len(x))


def train(task: Task, policy: Policy, seed: int, train_set: TensorDataset, test_set: TensorDataset, *,
          epochs: int, num_workers: int = 0, max_steps: int | None = None) -> Run:
    """Train ``task`` under ``policy`` from ``seed`` and return what was measured.

    Args:
        task (Task): what to train.
        policy (Policy): how the batch size (and its learning-rate factor) is set.
        seed (int): seed of the model's initialisation and of the shuffle.
        train_set (TensorDataset): the task's training set.
        test_set (TensorDataset): its held-out set.
        epochs (int): passes over ``train_set``.
        num_workers (int): DataLoader worker processes. Default: 0.
        max_steps (int, optional): stop after this many optimizer steps (for smoke tests).
            Default: no limit.
    """
    torch.manual_seed(seed)
    model = task.model()
    optimizer = task.optimizer(model.parameters())
    scheduler = BatchSizeScheduler(
        optimizer, policy.schedule(epochs), min_batch_size=bn_safe_min_batch_size(model),
        max_batch_size=MAX_BATCH_SIZE, lr_scaling=policy.lr_scaling, reference_batch_size=policy.reference_batch_size,
    )
    total_samples = epochs * len(train_set)
    recipe = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _: task.lr_multiplier(scheduler.samples_seen / total_samples))
    sampler = AdaptiveBatchSampler(train_set, scheduler, shuffle=True, seed=seed)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=num_workers)
    run = Run(task.name, policy.name, seed, batch_sizes=[(0, scheduler.target_at(0))])
    eval_every = len(train_set) / task.evals_per_epoch
    next_eval = eval_every
    wall_s = cpu_s = 0.0

    def evaluate() -> None:
        run.curve.append(Evaluation(scheduler.samples_seen, wall_s, cpu_s, scheduler.steps,
                                    task.evaluate(model, test_set)))
        noise_scale, resolution = noise_signals(scheduler)
        run.signals.append((scheduler.samples_seen, noise_scale, scheduler.lr_factor, resolution))

    def finished() -> Run:
        run.train_quality = task.evaluate(model, train_set)  # untimed, as every evaluation
        return run

    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        begin, cpu_begin = time.perf_counter(), time.process_time()
        for x, y in loader:
            plain_step(task, model, optimizer, scheduler, x, y)
            recipe.step()
            size = scheduler.target_at(scheduler.position)
            if size != run.batch_sizes[-1][1]:
                run.batch_sizes.append((scheduler.samples_seen, size))
            if scheduler.samples_seen >= next_eval or scheduler.steps == max_steps:
                wall_s += time.perf_counter() - begin
                cpu_s += time.process_time() - cpu_begin
                evaluate()
                next_eval += eval_every * math.ceil((scheduler.samples_seen - next_eval + 1) / eval_every)
                if scheduler.steps == max_steps:
                    return finished()
                begin, cpu_begin = time.perf_counter(), time.process_time()
        wall_s += time.perf_counter() - begin
        cpu_s += time.process_time() - cpu_begin
    if run.curve[-1].samples != scheduler.samples_seen:
        evaluate()
    return finished()
