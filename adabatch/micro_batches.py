"""Cutting a batch into micro-batches, and undoing a failed mixed-precision step."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence, Union

import torch

__all__ = ["Batch", "batch_length", "reset_grad_scaler_step", "split_batch"]

#: What a DataLoader yields: a tensor, or a tuple, list or dict of tensors sharing the first dimension.
Batch = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]


def batch_length(batch: Batch) -> int:
    """Samples in ``batch``: the first dimension of its (first) tensor."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    values = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    for value in values:
        if isinstance(value, torch.Tensor):
            return len(value)
    raise TypeError(f"cannot tell the size of a batch of type {type(batch).__name__}: it holds no tensor")


def split_batch(batch: Batch, sizes: list[int]) -> Iterator[Batch]:
    """Yield consecutive micro-batches of ``sizes`` samples (views, no copies), keeping the
    batch's structure; values that are not tensors are passed to every micro-batch as they are."""
    if len(sizes) == 1:
        yield batch
        return
    if isinstance(batch, torch.Tensor):
        yield from torch.split(batch, sizes)
        return
    if isinstance(batch, Mapping):
        pieces = {key: _split(value, sizes) for key, value in batch.items()}
        for index in range(len(sizes)):
            yield {key: value[index] for key, value in pieces.items()}
        return
    columns = [_split(value, sizes) for value in batch]
    for index in range(len(sizes)):
        micro_batch = [column[index] for column in columns]
        yield tuple(micro_batch) if isinstance(batch, tuple) else micro_batch


def _split(value: Any, sizes: list[int]) -> Sequence[Any]:
    return torch.split(value, sizes) if isinstance(value, torch.Tensor) else [value] * len(sizes)


def reset_grad_scaler_step(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Forget what a GradScaler learned about ``optimizer`` during a step that failed (whether
    its gradients were unscaled, the infs it found), so the retried step starts clean."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None:
        states.pop(id(optimizer), None)
