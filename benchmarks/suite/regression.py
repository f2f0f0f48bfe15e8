"""``regression-adam``: an MLP fitting a smooth synthetic function from noisy labels, with Adam.

Inputs are uniform in ``[-1, 1]^8``; the function is a sum of 32 random sinusoids,
``f(x) = Σ a_k sin(ω_k·x + φ_k)`` (``ω_k ~ N(0, 9/8 · I)``, ``a_k ~ N(0, 1/32)``, ``φ_k``
uniform; ``f`` has a variance of about 0.37), and the training labels carry Gaussian noise of
standard deviation 0.5, larger than ``f`` itself: every sample's gradient is mostly noise.
20,000 samples to train, 4,000 held out, all generated from a fixed seed. The model:
8 → 256 → 256 → 1 with SiLU, no normalisation; Adam (1e-3), a cosine from 1 to 0 by samples,
15 epochs, baseline batch 32. Quality: the mean squared error against the noiseless ``f`` on
the held-out inputs.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .quality import Metric
from .task import Task, cosine

__all__ = ["TASK", "make_regression"]

DIMENSIONS = 8
FREQUENCY = 3.0  # the norm of the typical ω_k
SINUSOIDS = 32
LABEL_NOISE = 0.5
DATA_SEED = 1234
NUM_TRAIN, NUM_TEST = 20_000, 4_000
QUICK_TRAIN, QUICK_TEST = 1_000, 200


def make_regression(num_train: int, num_test: int) -> tuple[TensorDataset, TensorDataset]:
    """``(train_set, test_set)``: noisy labels to train on, the noiseless function held out."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    frequencies = torch.randn(DIMENSIONS, SINUSOIDS, generator=generator) * FREQUENCY / math.sqrt(DIMENSIONS)
    phases = 2 * math.pi * torch.rand(SINUSOIDS, generator=generator)
    amplitudes = torch.randn(SINUSOIDS, generator=generator) / math.sqrt(SINUSOIDS)
    x = 2 * torch.rand(num_train + num_test, DIMENSIONS, generator=generator) - 1
    f = (torch.sin(x @ frequencies + phases) @ amplitudes).unsqueeze(1)
    labels = f[:num_train] + LABEL_NOISE * torch.randn(num_train, 1, generator=generator)
    return TensorDataset(x[:num_train], labels), TensorDataset(x[num_train:], f[num_train:])


@functools.lru_cache(maxsize=2)
def data(quick: bool) -> tuple[TensorDataset, TensorDataset]:
    return make_regression(QUICK_TRAIN, QUICK_TEST) if quick else make_regression(NUM_TRAIN, NUM_TEST)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(DIMENSIONS, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, 1))


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


@torch.no_grad()
def held_out_mse(model: nn.Module, test_set: TensorDataset) -> float:
    was_training = model.training
    model.eval()
    x, f = test_set.tensors
    error = float(F.mse_loss(model(x), f))
    model.train(was_training)
    return error


TASK = Task("regression-adam", "MLP regression of a synthetic function from noisy labels, Adam", data, mlp,
            lambda parameters: torch.optim.Adam(parameters, lr=1e-3), mse, held_out_mse,
            Metric("MSE", higher_is_better=False, tolerance=0.01), baseline_batch_size=32, epochs=15,
            lr_multiplier=cosine())
