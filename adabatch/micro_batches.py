"""Cutting a batch into micro-batches, and undoing a failed mixed-precision step.

A batch is what a DataLoader yields: a tensor, or tuples, lists, named tuples and dicts (any
``Mapping``) of tensors, nested to any depth, as ``default_collate`` builds them. Every tensor in
it holds the batch's samples along its first dimension; values that are not tensors (a name, a
flag, a list of file names) belong to the whole batch and go to every micro-batch as they are.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Iterator, Mapping, MutableMapping, Sequence, Union

import torch

__all__ = ["Batch", "batch_length", "reset_grad_scaler_step", "split_batch"]

#: What a DataLoader yields: a tensor, or tuples, lists, named tuples and dicts of tensors, nested
#: to any depth, whose tensors share the first dimension.
Batch = Union[torch.Tensor, Sequence[Any], Mapping[Any, Any]]

_Path = tuple[Any, ...]  # the keys and indices that lead from the batch to a value


def batch_length(batch: Batch) -> int:
    """Samples in ``batch``: the first dimension that all of its tensors share.

    Raises:
        ValueError: if two tensors disagree on their first dimension, or a tensor has none
            (0-dim); the message names the sizes and where in the batch they are.
        TypeError: if the batch holds no tensor.
    """
    found = _first_dimension(batch, (), None)
    if found is None:
        raise TypeError(f"cannot tell the size of a batch of type {type(batch).__name__}: it holds no tensor")
    return found[0]


def _first_dimension(value: Any, path: _Path, found: tuple[int, _Path] | None) -> tuple[int, _Path] | None:
    """``(size, path)`` of the first tensor met in a walk over ``value`` (``found`` if met
    earlier), after checking that every other tensor has the same first dimension."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            raise ValueError(
                f"{_where(path)} is a 0-dim tensor, which has no samples to split; every tensor in a batch must "
                f"hold the batch's samples along its first dimension"
            )
        if found is None:
            return value.shape[0], path
        if value.shape[0] != found[0]:
            raise ValueError(
                f"the batch's tensors disagree on the number of samples: {found[0]} at {_where(found[1])} but "
                f"{value.shape[0]} at {_where(path)}; every tensor in a batch must hold the batch's samples along "
                f"its first dimension (pad or stack per-sample tensors of different lengths)"
            )
        return found
    children = _children(value)
    if children is not None:
        for key, child in children:
            found = _first_dimension(child, path + (key,), found)
    return found


def _children(value: Any) -> Iterable[tuple[Any, Any]] | None:
    """The ``(key, value)`` pairs of a container a batch may nest; ``None`` for anything else."""
    if isinstance(value, Mapping):
        return value.items()
    if isinstance(value, (tuple, list)):
        return enumerate(value)
    return None


def _where(path: _Path) -> str:
    return "batch" + "".join(f"[{key!r}]" for key in path)


def split_batch(batch: Batch, sizes: list[int]) -> Iterator[Batch]:
    """Yield consecutive micro-batches of ``sizes`` samples (views, no copies), keeping the
    batch's structure and container types at every depth; values that are not tensors are
    passed to every micro-batch as they are."""
    if len(sizes) == 1:
        yield batch
        return
    pieces = _split(batch, sizes)
    yield from [batch] * len(sizes) if pieces is None else pieces


def _split(value: Any, sizes: list[int]) -> Sequence[Any] | None:
    """One piece of ``value`` per micro-batch, or ``None`` when it holds no tensor (it is then
    passed whole)."""
    if isinstance(value, torch.Tensor):
        return torch.split(value, sizes)
    children = _children(value)
    if children is None:
        return None
    keys, columns, holds_tensor = [], [], False
    for key, child in children:
        pieces = _split(child, sizes)
        holds_tensor = holds_tensor or pieces is not None
        keys.append(key)
        columns.append([child] * len(sizes) if pieces is None else pieces)
    if not holds_tensor:
        return None
    return [_rebuild(value, keys, [column[index] for column in columns]) for index in range(len(sizes))]


def _rebuild(container: Any, keys: list[Any], values: list[Any]) -> Any:
    """A container of the same type as ``container`` holding ``values``, as ``default_collate``
    builds one (a mutable mapping is copied so that a defaultdict keeps its factory)."""
    if isinstance(container, Mapping):
        items = dict(zip(keys, values))
        if isinstance(container, MutableMapping):
            clone = copy.copy(container)
            clone.update(items)
            return clone
        try:
            return type(container)(items)
        except TypeError:
            return items
    if isinstance(container, tuple) and hasattr(container, "_fields"):
        return type(container)(*values)
    try:
        return type(container)(values)
    except TypeError:
        return tuple(values) if isinstance(container, tuple) else values


def reset_grad_scaler_step(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Forget what a GradScaler learned about ``optimizer`` during a step that failed (whether
    its gradients were unscaled, the infs it found), so the retried step starts clean."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None:
        states.pop(id(optimizer), None)
