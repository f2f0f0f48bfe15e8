"""``adabatch demo``: train a small BatchNorm CNN on MNIST-1D while the batch grows 32 -> 128 -> 512.

The dataset is generated locally by ``mnist1d`` (Greydanus 2020, "Scaling Down Deep Learning"),
so the demo needs no download: 24,000 sequences of length 40 by default, 80% for training. The
batch is multiplied by 4 at epochs 4 and 8 at a constant learning rate, where a step schedule
would decay the learning rate (Smith et al. 2018, "Don't Decay the Learning Rate, Increase the
Batch Size"); then the learning rate is multiplied by 0.2 at epochs 12 and 16, once the batch
has stopped growing.

``mnist1d`` and ``tqdm`` are optional (``pip install "adabatch[demo]"``); they are imported only
when the demo runs, and a missing one raises :class:`MissingExtrasError`.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import schedules
from ._validation import check_bool, check_integer, check_positive_int, check_seed
from .constraints import bn_safe_min_batch_size
from .sampler import AdaptiveBatchSampler
from .scheduler import BatchSizeScheduler

__all__ = [
    "DemoConfig",
    "DemoResult",
    "MissingExtrasError",
    "batch_size_curve",
    "build_model",
    "build_training",
    "log_epoch",
    "format_summary",
    "make_mnist1d",
    "run_demo",
    "shard_model",
]

#: Seed of the generated dataset: mnist1d's own default, so the split is the usual one.
DATASET_SEED = 42
DEFAULT_NUM_SAMPLES = 24_000
DEFAULT_EPOCHS = 20
#: The batch is multiplied by ``GROWTH_FACTOR`` at these epochs: 32 -> 128 -> 512.
START_BATCH_SIZE = 32
GROWTH_FACTOR = 4
GROWTH_EPOCHS = (4, 8)
MAX_BATCH_SIZE = 2048
#: Once the batch stops growing, the learning rate is multiplied by ``LR_DECAY`` at these epochs.
LR = 0.05
LR_DECAY = 0.2
LR_DECAY_EPOCHS = (12, 16)
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
#: Two threads, as in the measurements the policy was chosen from (a 2-core CPU).
DEFAULT_THREADS = 2
#: Evaluation batch: large enough to be fast, small enough to keep memory flat.
EVAL_BATCH_SIZE = 1200
#: Scheduler curves every this many steps (and at every batch-size change); per-step writes
#: would cost a noticeable share of a run this short.
LOG_EVERY = 10


class MissingExtrasError(ImportError):
    """Raised when the optional packages a command needs (the `demo` or `plot` extra) are not installed."""


@dataclass(frozen=True)
class DemoConfig:
    """What one run of the demo does.

    Args:
        epochs (int): passes over the training set. Default: 20.
        num_samples (int): sequences to generate, 80% of them for training. Default: 24000.
        seed (int): seed of the model's initialisation and of the shuffle; the dataset is
            always generated with seed 42. Default: 0.
        logdir (str, optional): TensorBoard directory. Default: ``runs/demo-<date>-<time>``.
        num_workers (int): DataLoader worker processes. Default: 0.
        threads (int): torch's intra-op threads, set for the whole process. On a CPU that other
            processes also use, 1 is far faster than 2 for small batches: the threads wait for
            each other. Default: 2.
        progress (bool): show a progress bar on stderr. Default: ``True``.
    """

    epochs: int = DEFAULT_EPOCHS
    num_samples: int = DEFAULT_NUM_SAMPLES
    seed: int = 0
    logdir: str | None = None
    num_workers: int = 0
    threads: int = DEFAULT_THREADS
    progress: bool = True

    def __post_init__(self) -> None:
        # The config is frozen: each checked value replaces the given one through object.__setattr__.
        for name, lowest in (("epochs", 1), ("num_samples", 100), ("num_workers", 0), ("threads", 1)):
            object.__setattr__(self, name, check_integer(name, getattr(self, name), lowest))
        object.__setattr__(self, "seed", check_seed("seed", self.seed))
        if self.logdir is not None and not isinstance(self.logdir, (str, os.PathLike)):
            raise ValueError(f"logdir must be a path or None, got {self.logdir!r}")
        object.__setattr__(self, "progress", check_bool("progress", self.progress))


@dataclass(frozen=True)
class DemoResult:
    """What one run of the demo measured.

    Args:
        test_acc (float): test accuracy after the last epoch, in ``[0, 1]``.
        wall_s (float): seconds spent training and evaluating (not generating the data).
        data_s (float): seconds spent generating the dataset.
        steps (int): optimizer steps taken.
        epochs (int): epochs trained.
        batch_sizes (list of int): the batch size of each epoch (its largest batch: the last
            one or two batches of an epoch share what is left and may be smaller, see
            ``remainder`` in :class:`~adabatch.AdaptiveBatchSampler`).
        test_acc_per_epoch (list of float): test accuracy after each epoch.
        train_loss_per_epoch (list of float): mean training loss of each epoch.
        train_samples (int): size of the training set.
        test_samples (int): size of the test set.
        logdir (str): where the TensorBoard files are.
    """

    test_acc: float
    wall_s: float
    data_s: float
    steps: int
    epochs: int
    batch_sizes: list[int]
    test_acc_per_epoch: list[float]
    train_loss_per_epoch: list[float]
    train_samples: int
    test_samples: int
    logdir: str

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-serialisable values."""
        return dataclasses.asdict(self)


def _import_extras() -> tuple[ModuleType, ModuleType]:
    """Import ``mnist1d.data`` and ``tqdm``, or say how to install them."""
    try:
        import mnist1d.data
        import tqdm
    except ImportError as error:
        raise MissingExtrasError(
            f"the demo needs the optional packages mnist1d and tqdm ({error}); install them with: "
            f'pip install "adabatch[demo]"'
        ) from error
    return mnist1d.data, tqdm


def make_mnist1d(num_samples: int = DEFAULT_NUM_SAMPLES) -> tuple[TensorDataset, TensorDataset]:
    """Generate MNIST-1D (Greydanus 2020, "Scaling Down Deep Learning") and split it 80/20.

    Args:
        num_samples (int): sequences to generate. Default: 24000.

    Returns:
        ``(train_set, test_set)``, each a :class:`TensorDataset` of ``(x, y)`` with ``x`` of
        shape ``(n, 1, 40)`` (float32) and ``y`` of shape ``(n,)`` (int64).

    Raises:
        ValueError: if ``num_samples`` is not a positive integer.
        MissingExtrasError: if ``mnist1d`` is not installed.

    Note:
        ``mnist1d`` seeds numpy's global random generator (with 42) while generating.
    """
    num_samples = check_positive_int("num_samples", num_samples)
    mnist1d_data, _ = _import_extras()
    args = mnist1d_data.get_dataset_args()
    args.num_samples = num_samples
    args.seed = DATASET_SEED
    data = mnist1d_data.make_dataset(args)

    def as_dataset(x: Any, y: Any) -> TensorDataset:
        return TensorDataset(torch.as_tensor(x, dtype=torch.float32).unsqueeze(1), torch.as_tensor(y).long())

    return as_dataset(data["x"], data["y"]), as_dataset(data["x_test"], data["y_test"])


def build_model(num_classes: int = 10) -> nn.Sequential:
    """The small 1D CNN with BatchNorm the demo trains (about 10k parameters).

    Three convolutions (the last two with stride 2, padded so that a length-40 sequence
    becomes 40, 20 and then 10 positions), each followed by BatchNorm and ReLU, then one linear
    layer over the 32 x 10 = 320 features.
    """
    return nn.Sequential(
        nn.Conv1d(1, 32, kernel_size=5, padding=2),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Conv1d(32, 32, kernel_size=3, stride=2, padding=1),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Conv1d(32, 32, kernel_size=3, stride=2, padding=1),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 10, num_classes),
    )


def shard_model(model: nn.Sequential) -> nn.Sequential:
    """The demo's CNN under FSDP2: each convolution block (convolution, BatchNorm, ReLU) and the
    classifier (flatten, linear) ``fully_shard``-ed as one unit each, then the whole model.

    Needs an initialised process group; returns ``model`` itself, which ``fully_shard`` changes.
    """
    from torch.distributed.fsdp import fully_shard

    layers = list(model.children())
    for first in range(0, len(layers), 3):
        fully_shard(layers[first:first + 3])
    fully_shard(model)
    return model


def build_training(
    model: nn.Module, parameters: Any, writer: Any
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR, BatchSizeScheduler]:
    """The demo's recipe: SGD with momentum and weight decay over ``parameters``, the learning
    rate decayed once growth has stopped, and the growth schedule with ``model``'s BatchNorm floor.

    Args:
        model (nn.Module): the model, for its BatchNorm floor.
        parameters (iterable): what the optimizer trains (``ddp.parameters()`` under DDP).
        writer (SummaryWriter, optional): where the scheduler writes its curves.
    """
    optimizer = torch.optim.SGD(parameters, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    lr_decay = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(LR_DECAY_EPOCHS), gamma=LR_DECAY)
    scheduler = BatchSizeScheduler(
        optimizer,
        schedules.Step(start=START_BATCH_SIZE, factor=GROWTH_FACTOR, milestones=list(GROWTH_EPOCHS)),
        min_batch_size=bn_safe_min_batch_size(model),
        max_batch_size=MAX_BATCH_SIZE,
        lr_scaling="none",
        writer=writer,
        log_every=LOG_EVERY,
    )
    return optimizer, lr_decay, scheduler


def log_epoch(writer: Any, scheduler: BatchSizeScheduler, test_acc: float, train_loss: float) -> None:
    """Write an epoch's test accuracy and training loss against steps and against samples seen."""
    for name, value in (("test_accuracy", test_acc), ("train_loss", train_loss)):
        writer.add_scalar(f"demo/{name}", value, scheduler.steps)
        writer.add_scalar(f"demo_vs_samples/{name}", value, scheduler.samples_seen)


@torch.no_grad()
def evaluate(model: nn.Module, test_set: TensorDataset) -> float:
    """Accuracy of ``model`` on ``test_set``, in ``[0, 1]``."""
    was_training = model.training
    model.eval()
    x, y = test_set.tensors
    correct = 0
    for first in range(0, len(y), EVAL_BATCH_SIZE):
        logits = model(x[first : first + EVAL_BATCH_SIZE])
        correct += int((logits.argmax(dim=1) == y[first : first + EVAL_BATCH_SIZE]).sum())
    model.train(was_training)
    return correct / len(y)


def default_logdir() -> str:
    """``runs/demo-<date>-<time>``, relative to the working directory."""
    return os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))


def run_demo(config: DemoConfig = DemoConfig()) -> DemoResult:
    """Generate the data, train under the growth schedule, and return what was measured.

    Args:
        config (DemoConfig): what to run. Default: the full demo (20 epochs, 24000 samples).

    Raises:
        MissingExtrasError: if ``mnist1d`` or ``tqdm`` is not installed.

    Example:
        >>> result = run_demo(DemoConfig(epochs=2, num_samples=2000, progress=False))
        >>> print(format_summary(result))
    """
    # Imported when a run starts, so that the command line's help does not wait for it.
    from torch.utils.tensorboard import SummaryWriter

    _, tqdm = _import_extras()
    torch.set_num_threads(config.threads)
    logdir = config.logdir if config.logdir is not None else default_logdir()

    data_begin = time.perf_counter()
    train_set, test_set = make_mnist1d(config.num_samples)
    data_s = time.perf_counter() - data_begin

    torch.manual_seed(config.seed)
    model = build_model()
    writer = SummaryWriter(logdir)
    optimizer, lr_decay, scheduler = build_training(model, model.parameters(), writer)
    sampler = AdaptiveBatchSampler(train_set, scheduler, shuffle=True, seed=config.seed)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=config.num_workers)

    batch_sizes: list[int] = []
    test_accs: list[float] = []
    train_losses: list[float] = []
    bar = tqdm.tqdm(
        total=config.epochs * len(train_set),
        unit="sample",
        unit_scale=True,
        file=sys.stderr,
        disable=not config.progress,
        dynamic_ncols=True,
    )
    begin = time.perf_counter()
    try:
        for epoch in range(config.epochs):
            sampler.set_epoch(epoch)
            largest_batch = 0
            loss_sum = torch.zeros(())
            samples = 0
            for x, y in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                scheduler.step(len(x))
                loss_sum += loss.detach() * len(x)
                samples += len(x)
                largest_batch = max(largest_batch, len(x))
                bar.update(len(x))
            lr_decay.step()
            batch_sizes.append(largest_batch)
            train_losses.append(float(loss_sum) / samples)
            test_accs.append(evaluate(model, test_set))
            log_epoch(writer, scheduler, test_accs[-1], train_losses[-1])
            bar.set_postfix(epoch=epoch, batch=batch_sizes[-1], test_acc=f"{test_accs[-1]:.2%}", refresh=False)
    finally:
        bar.close()
        writer.close()
    wall_s = time.perf_counter() - begin

    return DemoResult(
        test_acc=test_accs[-1],
        wall_s=round(wall_s, 3),
        data_s=round(data_s, 3),
        steps=scheduler.steps,
        epochs=config.epochs,
        batch_sizes=batch_sizes,
        test_acc_per_epoch=test_accs,
        train_loss_per_epoch=[round(loss, 6) for loss in train_losses],
        train_samples=len(train_set),
        test_samples=len(test_set),
        logdir=logdir,
    )


def batch_size_curve(batch_sizes: Sequence[int]) -> str:
    """Runs of equal per-epoch batch sizes, e.g. ``32 (epochs 0-3) -> 128 (4-7) -> 512 (8-19)``.

    Example:
        >>> batch_size_curve([32, 32, 128, 512])
        '32 (epochs 0-1) -> 128 (2) -> 512 (3)'
    """
    runs: list[tuple[int, int, int]] = []  # (size, first epoch, last epoch)
    for epoch, size in enumerate(batch_sizes):
        if runs and runs[-1][0] == size:
            runs[-1] = (size, runs[-1][1], epoch)
        else:
            runs.append((size, epoch, epoch))
    parts = []
    for index, (size, first, last) in enumerate(runs):
        span = str(first) if first == last else f"{first}-{last}"
        parts.append(f"{size} ({'epochs ' if index == 0 else ''}{span})")
    return " -> ".join(parts)


def format_summary(result: DemoResult) -> str:
    """The human-readable report of a run: accuracy, time, steps, batch sizes, how to watch it."""
    first_99 = next((epoch for epoch, acc in enumerate(result.test_acc_per_epoch) if acc >= 0.99), None)
    reached = "not reached" if first_99 is None else f"after epoch {first_99}"
    lines = [
        f"test accuracy {result.test_acc:.2%} in {result.wall_s:.1f} s, {result.steps:,} optimizer steps",
        f"  data            MNIST-1D (Greydanus 2020), {result.train_samples:,} train / {result.test_samples:,} "
        f"test, generated in {result.data_s:.1f} s",
        f"  batch size      {batch_size_curve(result.batch_sizes)}",
        f"  learning rate   {LR:g}, x{LR_DECAY:g} at epochs {', '.join(map(str, LR_DECAY_EPOCHS))}",
        f"  99% test acc    {reached}",
        f"  watch it with   tensorboard --logdir {shlex.quote(result.logdir)}",
    ]
    return "\n".join(lines)
