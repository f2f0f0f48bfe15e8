"""The fitted memory model and the batch cap it gives.

The peak memory of a training step is close to linear in the micro-batch size ``b``:
``peak(b) ≈ fixed + per_sample * b``. :class:`MemoryModel` fits that line to measured peaks and
turns the memory available into the largest micro-batch that fits; :class:`MemoryCap` feeds it
the peaks of the steps training takes and lowers a ceiling after an out-of-memory error.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping

from .._validation import check_fraction, is_integer
from .devices import MemoryDevice

__all__ = ["BatchSizeFloorError", "DEFAULT_SAFETY_MARGIN", "MemoryCap", "MemoryModel"]

#: Default fraction of the memory above the fixed cost (the room for activations) kept free, for
#: the allocator's fragmentation and for measurement error.
DEFAULT_SAFETY_MARGIN = 0.10


def _check_margin(safety_margin: float) -> float:
    return check_fraction("safety_margin", safety_margin, what="a fraction in [0, 1)")


class MemoryModel:
    """Fits ``peak(b) = fixed + per_sample * b`` to measured step peaks and predicts a cap.

    Each distinct micro-batch size keeps its largest measured peak. With two or more sizes the
    slope is the Theil–Sen estimate (the median of pairwise slopes, robust to an odd
    measurement) and the intercept is raised until the line lies on or above every measurement,
    so the prediction errs towards less memory. With one size the line goes through the origin,
    which overestimates the per-sample cost and so also errs low.
    """

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}

    def record(self, batch_size: int, peak_bytes: int) -> None:
        """Add a measurement: a micro-batch of ``batch_size`` peaked at ``peak_bytes``."""
        if batch_size > 0 and peak_bytes > 0:
            self.peaks[batch_size] = max(peak_bytes, self.peaks.get(batch_size, 0))

    def fit(self) -> tuple[float, float] | None:
        """``(fixed, per_sample)`` in bytes, or ``None`` before the first measurement."""
        points = sorted(self.peaks.items())
        if not points:
            return None
        slopes = [(p2 - p1) / (b2 - b1) for i, (b1, p1) in enumerate(points) for b2, p2 in points[i + 1:]]
        slope = statistics.median(slopes) if slopes else 0.0
        if slope <= 0:
            # No measurable growth with the batch: assume it all scales, which errs low.
            largest_batch, largest_peak = max(points, key=lambda point: point[1] / point[0])
            return 0.0, largest_peak / largest_batch
        fixed = max(peak - slope * batch for batch, peak in points)
        return fixed, slope

    def cap(self, available_bytes: int, safety_margin: float = DEFAULT_SAFETY_MARGIN) -> int | None:
        """The largest micro-batch whose predicted peak leaves ``safety_margin`` of the room
        above the fixed cost free (0 if none fits), or ``None`` before the first measurement."""
        _check_margin(safety_margin)
        fitted = self.fit()
        if fitted is None:
            return None
        fixed, per_sample = fitted
        return max(0, math.floor((1 - safety_margin) * (available_bytes - fixed) / per_sample))

    def state_dict(self) -> dict[str, Any]:
        return {"peaks": dict(self.peaks)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the peaks.

        Raises:
            ValueError: if ``peaks`` is not a mapping of positive integers to positive integers.
        """
        peaks = state_dict.get("peaks") if isinstance(state_dict, Mapping) else None
        # A state that went through JSON has its sizes as strings.
        if not isinstance(peaks, Mapping) or not all(
                _positive_int(b) is not None and _positive_int(p) is not None for b, p in peaks.items()):
            raise ValueError(f"the memory state's 'peaks' must map micro-batch sizes to peak bytes (positive "
                             f"integers), got {peaks!r}")
        self.peaks = {_positive_int(b): _positive_int(p) for b, p in peaks.items()}  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"MemoryModel(peaks={self.peaks})"


def _positive_int(value: object) -> int | None:
    """``value`` as a positive int, from an integer or a string of digits; else ``None``."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return int(value) if is_integer(value) and value > 0 else None  # type: ignore[call-overload,operator]


class BatchSizeFloorError(RuntimeError):
    """Raised when even a micro-batch of ``min_batch_size`` samples runs out of memory."""


class MemoryCap:
    """Learns the largest micro-batch that fits, from the steps training takes anyway.

    After each step, :meth:`end_step` reads the step's peak from the device, adds it to the
    :class:`MemoryModel` and, when the fit changed, turns the memory available into a cap.
    :meth:`out_of_memory` lowers a ceiling below a size that failed; the cap never rises above
    it again (the wall moved: another process, fragmentation, a longer input).

    Args:
        device (MemoryDevice, optional): where peaks are read. Without one (a CPU run), no cap
            is learned, but an out-of-memory error still lowers the ceiling.
        safety_margin (float): fraction of the room above the fixed cost kept free. Default: 0.1.
    """

    #: After an out-of-memory error the ceiling drops to this fraction of the size that failed
    #: (at least one sample lower), so that a wall that moved a lot costs few retries.
    BACK_OFF = 0.8

    def __init__(self, device: MemoryDevice | None, safety_margin: float = DEFAULT_SAFETY_MARGIN) -> None:
        if device is not None and not isinstance(device, MemoryDevice):
            raise TypeError(f"memory must be a MemoryDevice, 'auto' or None, got {type(device).__name__}")
        self.device = device
        self.safety_margin = _check_margin(safety_margin)
        self.model = MemoryModel()
        self.ceiling: int | None = None
        self.learned: int | None = None
        self.last_peak_bytes = 0
        if device is not None:
            device.reset_peak()

    @property
    def cap(self) -> int | None:
        """The largest micro-batch to train, or ``None`` while nothing limits it."""
        caps = [c for c in (self.learned, self.ceiling) if c is not None]
        return min(caps) if caps else None

    def begin_step(self) -> None:
        """Start measuring a step's peak."""
        if self.device is not None:
            self.device.reset_peak()

    def end_step(self, micro_batch_size: int) -> int | None:
        """Record the peak of a step whose largest micro-batch had ``micro_batch_size`` samples,
        and return the cap."""
        if self.device is None:
            return self.cap
        peak = self.device.peak_bytes()
        self.device.reset_peak()
        self.last_peak_bytes = peak
        before = self.model.peaks.get(micro_batch_size)
        self.model.record(micro_batch_size, peak)
        if self.model.peaks.get(micro_batch_size) != before:
            self._relearn()
        return self.cap

    def _relearn(self) -> None:
        # A cap of 0 would leave nothing to train: one sample is the least a cap may say.
        cap = self.model.cap(self.device.available_bytes(), self.safety_margin) if self.device is not None else None
        self.learned = None if cap is None else max(1, cap)

    def add_measurements(self, peaks: dict[int, int]) -> int | None:
        """Learn from peaks measured elsewhere (``{micro_batch_size: peak_bytes}``, e.g. by a
        probe before training) and return the cap."""
        for batch_size, peak in peaks.items():
            self.model.record(batch_size, peak)
        self._relearn()
        return self.cap

    def out_of_memory(self, micro_batch_size: int, min_batch_size: int) -> int:
        """Lower the ceiling below ``micro_batch_size``, which ran out of memory, and return the cap.

        Raises:
            BatchSizeFloorError: if ``micro_batch_size`` is already at ``min_batch_size``.
        """
        if micro_batch_size <= min_batch_size:
            raise BatchSizeFloorError(
                f"a micro-batch of {micro_batch_size} samples (min_batch_size={min_batch_size}) ran out of memory, "
                f"with the memory cap at {self.cap}; the model does not fit at the BatchNorm floor: lower "
                f"min_batch_size, shrink the model or its inputs, or free memory on the device"
            )
        lowered = min(micro_batch_size - 1, math.floor(micro_batch_size * self.BACK_OFF))
        self.ceiling = max(min_batch_size, lowered if self.ceiling is None else min(self.ceiling, lowered))
        if self.device is not None:
            self.device.release_cached()
        return self.cap  # type: ignore[return-value]

    def scalars(self) -> dict[str, float]:
        """The last step's peak, the cap and the fitted line, for logging; empty without a device."""
        if self.device is None:
            return {}
        values = {"memory/peak_bytes": float(self.last_peak_bytes)}
        if self.cap is not None:
            values["memory/cap"] = float(self.cap)
        fitted = self.fit()
        if fitted is not None:
            values["memory/fixed_bytes"], values["memory/per_sample_bytes"] = fitted
        return values

    def fit(self) -> tuple[float, float] | None:
        return self.model.fit()

    def state_dict(self) -> dict[str, Any]:
        return {"peaks": dict(self.model.peaks), "ceiling": self.ceiling, "learned": self.learned}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the measurements and the ceiling; the cap is worked out again from the memory
        this device has now (a resumed run may be on another device).

        Raises:
            ValueError: if ``state_dict`` is not a dict with ``peaks``, ``ceiling`` and ``learned``,
                or one of them is out of range; nothing is restored then.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"the memory state must be a dict with 'peaks', 'ceiling' and 'learned', "
                             f"got {state_dict!r}")
        for key in ("peaks", "ceiling", "learned"):
            if key not in state_dict:
                raise ValueError(f"the memory state is missing {key!r}")
        for key in ("ceiling", "learned"):
            value = state_dict[key]
            if value is not None and (not is_integer(value) or value < 1):
                raise ValueError(f"the memory state's {key!r} must be a positive integer or None, got {value!r}")
        self.model.load_state_dict(state_dict)
        self.ceiling = None if state_dict["ceiling"] is None else int(state_dict["ceiling"])
        self.learned = None if state_dict["learned"] is None else int(state_dict["learned"])
        if self.device is not None and self.model.peaks:
            self._relearn()
