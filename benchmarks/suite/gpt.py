"""``gpt``: a small decoder-only transformer language model over characters.

The text is built offline and deterministically from the docstrings of a fixed list of Python
standard-library modules (each module's, then those of its own classes, methods and functions,
in name order, each once), so it depends only on the Python version (3.11: about 540,000
characters). Characters outside printable ASCII become ``?``. Every tenth docstring is held
out. A sample is a window of ``CONTEXT + 1`` characters (the model reads ``CONTEXT`` and
predicts each next one), cut from the training text without overlap.

The model: token and position embeddings of width 64, two pre-norm blocks of causal
self-attention (4 heads) and a 4× GELU MLP, LayerNorm (no BatchNorm), the output tied to the
embedding. AdamW (3e-3, betas 0.9/0.95, weight decay 0.1), the learning rate warmed up over the
first 5% of the training samples and then a cosine to 1/10 (by samples, so that a larger batch
does not stretch the schedule), gradients clipped at 1.0, baseline batch 16. Quality: bits per
character on the held-out text.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .quality import Metric
from .task import Task, cosine

__all__ = ["MODULES", "TASK", "CharTransformer", "corpus"]

MODULES = (
    "abc", "argparse", "ast", "asyncio.events", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fractions", "ftplib", "functools", "glob", "gzip", "hashlib", "heapq", "http.client", "imaplib", "inspect",
    "io", "ipaddress", "itertools", "json", "logging", "mailbox", "numbers", "operator", "optparse", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "shlex", "shutil", "smtplib", "socket",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "typing", "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "xml.dom.minidom", "zipfile",
)
VOCABULARY = "\n" + "".join(chr(code) for code in range(32, 127))  # ? stands for anything else
CONTEXT = 64
WIDTH = 64
HEADS = 4
LAYERS = 2
HELD_OUT_EVERY = 10
#: Held-out windows evaluated (of about 850): enough for a stable figure, cheap to repeat.
HELD_OUT_WINDOWS = 256
QUICK_CHARACTERS = 20_000


def docstrings(modules: tuple[str, ...] = MODULES) -> list[str]:
    """The docstrings of ``modules`` and of their own classes, methods and functions, each once."""
    found: dict[str, None] = {}

    def add(obj: object) -> None:
        with warnings.catch_warnings():  # typing's deprecated aliases (typing.io) warn when read
            warnings.simplefilter("ignore", DeprecationWarning)
            doc = inspect.getdoc(obj)
        if doc:
            found.setdefault(doc)

    for name in modules:
        module = importlib.import_module(name)
        add(module)
        for _, obj in sorted(vars(module).items()):
            if getattr(obj, "__module__", None) != module.__name__ or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            add(obj)
            if inspect.isclass(obj):
                for _, member in sorted(vars(obj).items()):
                    if inspect.isfunction(member):
                        add(member)
    return list(found)


def encode(text: str) -> torch.Tensor:
    """Character codes of ``text`` in :data:`VOCABULARY`; anything outside it becomes ``?``."""
    index = {character: code for code, character in enumerate(VOCABULARY)}
    unknown = index["?"]
    return torch.tensor([index.get(character, unknown) for character in text], dtype=torch.long)


def windows(codes: torch.Tensor, limit: int | None = None) -> TensorDataset:
    """Non-overlapping windows of ``CONTEXT + 1`` characters: inputs and next characters."""
    count = (len(codes) - 1) // CONTEXT
    if limit is not None:
        count = min(count, limit)
    rows = codes[: count * CONTEXT + 1].unfold(0, CONTEXT + 1, CONTEXT)
    return TensorDataset(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, str]:
    """``(training text, held-out text)``: every tenth docstring held out."""
    docs = docstrings()
    held_out = [doc for index, doc in enumerate(docs) if index % HELD_OUT_EVERY == 0]
    train = [doc for index, doc in enumerate(docs) if index % HELD_OUT_EVERY != 0]
    return "\n\n".join(train), "\n\n".join(held_out)


@functools.lru_cache(maxsize=2)
def data(quick: bool) -> tuple[TensorDataset, TensorDataset]:
    train, held_out = corpus()
    if quick:
        train, held_out = train[:QUICK_CHARACTERS], held_out[: QUICK_CHARACTERS // 4]
    return windows(encode(train)), windows(encode(held_out), HELD_OUT_WINDOWS)


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, each added to the residual stream."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.projection = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (part.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
                   for part in self.qkv(self.attention_norm(x)).split(width, dim=2))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.projection(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.mlp_norm(x))


class CharTransformer(nn.Module):
    """A decoder-only transformer over characters: logits of the next character at each position.

    Args:
        vocabulary (int): characters. Default: 96.
        width (int): embedding width. Default: 64.
        heads (int): attention heads. Default: 4.
        layers (int): blocks. Default: 2.
        context (int): the longest input. Default: 64.
    """

    def __init__(self, vocabulary: int = len(VOCABULARY), width: int = WIDTH, heads: int = HEADS,
                 layers: int = LAYERS, context: int = CONTEXT) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.embedding.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.embedding(codes) + self.position[: codes.shape[1]]
        return self.norm(self.blocks(x)) @ self.embedding.weight.T


def next_character_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def bits_per_character(model: nn.Module, test_set: TensorDataset) -> float:
    was_training = model.training
    model.eval()
    x, y = test_set.tensors
    total = sum(float(F.cross_entropy(model(x[first: first + 256]).flatten(0, 1), y[first: first + 256].flatten(),
                                      reduction="sum")) for first in range(0, len(x), 256))
    model.train(was_training)
    return total / y.numel() / math.log(2)


def adamw(parameters) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)


TASK = Task("gpt", "character-level transformer LM on standard-library docstrings, AdamW", data, CharTransformer,
            adamw, next_character_loss, bits_per_character, Metric("bits/char", higher_is_better=False, tolerance=0.01),
            baseline_batch_size=16, epochs=3, lr_multiplier=cosine(warmup=0.05, final=0.1), clip_grad_norm=1.0)
