"""TensorBoard curves of the batch size and the learning rate.

Each quantity is written twice: against the optimizer step (tag prefix ``adabatch/``) and against
samples seen (prefix ``adabatch_vs_samples/``), so runs with different batch schedules line up on
the second set of curves.

With a ``torch.utils.tensorboard.SummaryWriter`` all of a step's values go into one event per
axis, because tensorboard's pure-Python event writer checksums every event and one
``add_scalar`` per value would write one event each. Any other writer with ``add_scalar`` and
``add_custom_scalars`` works too, one call per value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ._validation import check_positive_int

if TYPE_CHECKING:
    from .plan import PlannedBatch

__all__ = ["TensorBoardLogger", "STEP_PREFIX", "SAMPLES_PREFIX"]

STEP_PREFIX = "adabatch"
SAMPLES_PREFIX = "adabatch_vs_samples"


class TensorBoardLogger:
    """Writes the scheduler's curves to a ``SummaryWriter``.

    Args:
        writer (SummaryWriter): where to write.
        log_every (int): write every ``log_every`` optimizer steps, and at every change of the
            scheduled (target) batch size. Default: 1.
    """

    def __init__(self, writer: Any, log_every: int = 1) -> None:
        if not all(callable(getattr(writer, method, None)) for method in ("add_scalar", "add_custom_scalars")):
            raise TypeError(f"writer must have add_scalar and add_custom_scalars, as a SummaryWriter has; "
                            f"got {type(writer).__name__}")
        self.writer = writer
        self.log_every = check_positive_int("log_every", log_every)
        self._layout_written = False
        self._last_target: float | None = None

    def layout(self, num_groups: int, memory: bool = False) -> dict:
        """The custom-scalars layout: batch size and learning rate on one dashboard (and the
        memory cap and step peaks, when memory is measured)."""
        lr_tags = [f"{STEP_PREFIX}/lr/group_{i}" for i in range(num_groups)]
        lr_tags_by_samples = [f"{SAMPLES_PREFIX}/lr/group_{i}" for i in range(num_groups)]
        layout = {
            "adabatch": {
                "batch size": ["Multiline", [f"{STEP_PREFIX}/batch_size", f"{STEP_PREFIX}/target_batch_size"]],
                "learning rate (effective)": ["Multiline", lr_tags],
                "batch size vs samples": [
                    "Multiline",
                    [f"{SAMPLES_PREFIX}/batch_size", f"{SAMPLES_PREFIX}/target_batch_size"],
                ],
                "learning rate vs samples": ["Multiline", lr_tags_by_samples],
                "LR factor": ["Multiline", [f"{STEP_PREFIX}/lr_factor"]],
                "samples seen": ["Multiline", [f"{STEP_PREFIX}/samples_seen"]],
                "epoch": ["Multiline", [f"{STEP_PREFIX}/epoch"]],
            }
        }
        if memory:
            layout["adabatch"]["memory cap (micro-batch)"] = ["Multiline", [f"{STEP_PREFIX}/memory/cap"]]
            layout["adabatch"]["memory peak (bytes)"] = ["Multiline", [f"{STEP_PREFIX}/memory/peak_bytes"]]
        return layout

    def log_step(self, step: int, samples_seen: int, values: Mapping[str, float], lrs: list[float]) -> None:
        """Write one optimizer step's values.

        Args:
            step (int): optimizer steps taken, the x-axis of the ``adabatch/`` curves.
            samples_seen (int): samples trained on before this step, the x-axis of the
                ``adabatch_vs_samples/`` curves (so a batch is drawn where it starts).
            values (mapping): scalar name to value, e.g. ``batch_size``, ``target_batch_size``,
                ``lr_factor``, ``epoch``.
            lrs (list of float): effective learning rate of each parameter group.
        """
        if not self._layout_written:
            self.writer.add_custom_scalars(self.layout(len(lrs), memory="memory/peak_bytes" in values))
            self._layout_written = True
        target = values.get("target_batch_size", values.get("batch_size"))
        changed = target is not None and target != self._last_target
        self._last_target = target
        if step % self.log_every and not changed:
            return
        scalars = {name: float(value) for name, value in values.items()}
        scalars.update({f"lr/group_{i}": float(lr) for i, lr in enumerate(lrs)})
        by_step = {f"{STEP_PREFIX}/{name}": value for name, value in scalars.items()}
        by_step[f"{STEP_PREFIX}/samples_seen"] = float(samples_seen)
        self._write(by_step, step)
        self._write({f"{SAMPLES_PREFIX}/{name}": value for name, value in scalars.items()}, samples_seen)

    def log_batch(self, step: int, samples_seen: int, batch: PlannedBatch, consumed: int, lr_factor: float,
                  lrs: list[float], dataset_size: int | None = None, sources: Iterable[Any] = ()) -> None:
        """Write the step that trained ``batch``: its ``batch_size`` (``consumed``, the samples
        it trained on), ``target_batch_size``, ``lr_factor``, the ``epoch`` it started at (once
        ``dataset_size`` is known), and the ``scalars()`` of each of ``sources`` (the memory cap,
        the noise scale); the rest as :meth:`log_step`."""
        values = {"batch_size": consumed, "target_batch_size": batch.target, "lr_factor": lr_factor}
        if dataset_size is not None:
            values["epoch"] = batch.start / dataset_size
        for source in sources:
            values.update(source.scalars())
        self.log_step(step, samples_seen, values, lrs)

    def _write(self, scalars: Mapping[str, float], step: int) -> None:
        file_writer = getattr(self.writer, "_get_file_writer", None)
        if file_writer is None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()])
        file_writer().add_summary(summary, step)
