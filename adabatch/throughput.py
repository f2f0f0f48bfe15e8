"""Step times at each batch size, measured for free between calls of ``scheduler.step()``.

Time to a given loss is ``steps × seconds per step``, and the second factor depends on the
hardware: on a GPU a step of 512 samples may take little longer than one of 32, on two CPU
cores eight times longer. Pollux (Qiao et al. 2021) measures it while training and chooses the
batch that maximises goodput, throughput times statistical efficiency. :class:`StepTimes` keeps
what that needs: the typical seconds per step at each batch size trained so far, and the line
``t(B) = overhead + per_sample × B`` through them.

Every optimizer step is timed from the previous ``scheduler.step()`` call to this one, so the
time includes the data loading and the rest of the loop as the user runs it. A step's time is
noisy (an evaluation pass or a checkpoint in the loop makes one step look slow), so each size
keeps the median of a window of steps, and the windows' median. It also drifts: on a shared
machine the same step can take a fifth longer for a thousand steps, then recover. Only the size
being trained is timed anew, so comparing it with a size last timed long before would read the
drift as a cost of the batch size; a size not trained for ``horizon`` windows is therefore
forgotten, and the sizes compared are those timed close together. Under torch.distributed the
ranks time different steps; every ``window`` steps they average their medians (one all-reduce of
a few numbers), so every rank holds the same table and takes the same decisions.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Mapping

from ._validation import check_positive_int, is_integer, is_real

__all__ = ["StepTimes"]


class StepTimes:
    """Seconds per optimizer step at each (target) global batch size.

    Args:
        window (int): steps per summary; every rank summarises (and the ranks agree) at the
            same steps. Default: 8.
        keep (int): summaries kept per batch size; the oldest is forgotten. Default: 8.
        horizon (int): windows after its last summary that a batch size is forgotten.
            Default: 32.
        clock (callable): returns seconds. Default: :func:`time.perf_counter`.
    """

    TABLE = "table"
    WINDOW = "window"
    RUNNING = "running"
    AGES = "ages"

    def __init__(self, window: int = 8, keep: int = 8, horizon: int = 32,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.window = check_positive_int("window", window)
        self.keep = check_positive_int("keep", keep)
        self.horizon = check_positive_int("horizon", horizon)
        self.clock = clock
        self._last_tick: float | None = None
        self._pending: dict[int, list[float]] = {}  # this window's step times, by batch size
        self._steps_in_window = 0
        self._table: dict[int, list[float]] = {}  # batch size -> the medians of its last summaries
        self._ages: dict[int, int] = {}  # batch size -> windows summarised since its last summary

    def tick(self, batch_size: int, agree: Callable[[list[float]], list[float]] | None = None) -> None:
        """Time the step that just ended, trained at ``batch_size``; at the end of a window,
        summarise (with ``agree`` summing a list of numbers over the ranks, if given)."""
        now = self.clock()
        times = self._pending.setdefault(batch_size, [])
        if self._last_tick is not None:
            times.append(now - self._last_tick)
        self._last_tick = now
        self._steps_in_window += 1
        if self._steps_in_window >= self.window:
            self._summarise(agree)

    def _summarise(self, agree: Callable[[list[float]], list[float]] | None) -> None:
        # The sizes in a window are the same on every rank (the ranks train the same global
        # batches), so the ranks' lists line up; a rank that timed no step of a size (the first
        # step of a run) adds nothing to the mean.
        sizes = sorted(self._pending)
        sums = [statistics.median(times) if times else 0.0 for times in map(self._pending.get, sizes)]
        counts = [1.0 if self._pending[size] else 0.0 for size in sizes]
        if agree is not None:
            sums_and_counts = agree(sums + counts)
            sums, counts = sums_and_counts[:len(sizes)], sums_and_counts[len(sizes):]
        for size in self._ages:
            self._ages[size] += 1
        for size, total, count in zip(sizes, sums, counts):
            median = total / count if count else math.nan
            if math.isfinite(median) and median > 0:
                kept = self._table.setdefault(size, [])
                kept.append(median)
                del kept[:-self.keep]
                self._ages[size] = 0
        for size in [size for size, age in self._ages.items() if age >= self.horizon]:
            del self._table[size], self._ages[size]
        self._pending, self._steps_in_window = {}, 0

    def seconds(self, batch_size: int) -> float | None:
        """Typical seconds per step at ``batch_size``, or ``None`` if it was not timed."""
        kept = self._table.get(batch_size)
        return statistics.median(kept) if kept else None

    @property
    def sizes(self) -> list[int]:
        """The batch sizes timed within the last ``horizon`` windows, ascending."""
        return sorted(self._table)

    def line(self, errors: float = 0.0) -> tuple[float, float] | None:
        """``(overhead, per_sample)`` seconds of the least-squares line ``t(B) = overhead +
        per_sample × B`` through the timed sizes (each weighted alike), or ``None`` with fewer
        than two. Both are clipped at zero: a step never takes negative time, and a larger
        batch never less.

        Args:
            errors (float): standard errors taken off the slope, so that the cost per sample is
                one the step times resolve, not noise between two close sizes. A size's error is
                the spread of its summaries (not divided by their number: consecutive windows
                drift together); a size summarised once takes the others' relative spread, and
                while none has two summaries the slope is taken as it is. Default: 0.
        """
        sizes = self.sizes
        if len(sizes) < 2:
            return None
        times = [self.seconds(size) for size in sizes]
        mean_size, mean_time = statistics.fmean(sizes), statistics.fmean(times)
        spread = sum((size - mean_size) ** 2 for size in sizes)
        weights = [(size - mean_size) / spread for size in sizes]
        per_sample = sum(w * (t - mean_time) for w, t in zip(weights, times))
        if errors > 0:
            per_sample -= errors * self._slope_error(sizes, weights, times)
        per_sample = max(0.0, per_sample)
        overhead = max(0.0, mean_time - per_sample * mean_size)
        return overhead, per_sample

    def _slope_error(self, sizes: list[int], weights: list[float], times: list[float]) -> float:
        """The least-squares slope's standard error from the relative spread of each size's
        summaries; 0 while no size has two."""
        spreads = {size: statistics.stdev(kept) / statistics.fmean(kept)
                   for size, kept in self._table.items() if len(kept) > 1}
        if not spreads:
            return 0.0
        pooled = statistics.median(spreads.values())
        return math.sqrt(sum((w * spreads.get(size, pooled) * t) ** 2
                             for size, w, t in zip(sizes, weights, times)))

    def state_dict(self) -> dict[str, Any]:
        """The summarised table and the window in progress, as a new dict, so that a resumed run
        summarises at the same steps as one that never stopped."""
        return {self.TABLE: [[size, *times] for size, times in sorted(self._table.items())],
                self.AGES: [[size, age] for size, age in sorted(self._ages.items())],
                self.WINDOW: [self._steps_in_window, *([size, *times] for size, times in sorted(self._pending.items()))],
                self.RUNNING: self._last_tick is not None}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved. If a step had been timed before the checkpoint,
        the next one is timed from the load on, so a resumed run times it, and summarises at the
        same steps, as one that never stopped.

        Raises:
            ValueError: if the table is missing or holds a size or a time out of range.
        """
        rows = state_dict.get(self.TABLE) if isinstance(state_dict, Mapping) else None
        if not isinstance(rows, list):
            raise ValueError(f"step times state_dict must hold a {self.TABLE!r} list, got {state_dict!r}")
        window = state_dict.get(self.WINDOW, [0])  # absent from a state saved without a window
        if not isinstance(window, list) or not window or not is_integer(window[0]) or not 0 <= window[0] < self.window:
            raise ValueError(f"step times state_dict[{self.WINDOW!r}] must be [steps, [batch_size, seconds...]...], "
                             f"got {window!r}")
        running = state_dict.get(self.RUNNING, False)
        if not isinstance(running, bool):
            raise ValueError(f"step times state_dict[{self.RUNNING!r}] must be True or False, got {running!r}")
        table = self._rows(rows, minimum=2)
        pending = self._rows(window[1:], minimum=1)
        ages = state_dict.get(self.AGES, [[size, 0] for size in table])  # absent from a state saved without ages
        if not isinstance(ages, list) or not all(
                isinstance(row, (list, tuple)) and len(row) == 2 and is_integer(row[0]) and is_integer(row[1])
                and 0 <= row[1] < self.horizon for row in ages) or sorted(row[0] for row in ages) != sorted(table):
            raise ValueError(f"step times state_dict[{self.AGES!r}] must hold [batch_size, windows] for each size of "
                             f"the table, with 0 <= windows < horizon={self.horizon}, got {ages!r}")
        self._table = {size: times[-self.keep:] for size, times in table.items()}
        self._ages = {int(size): int(age) for size, age in ages}
        self._pending, self._steps_in_window = pending, int(window[0])
        self._last_tick = self.clock() if running else None

    @staticmethod
    def _rows(rows: list, minimum: int) -> dict[int, list[float]]:
        parsed: dict[int, list[float]] = {}
        for row in rows:
            if (not isinstance(row, (list, tuple)) or len(row) < minimum or not is_integer(row[0]) or row[0] < 1
                    or not all(is_real(t) and math.isfinite(t) and t > 0 for t in row[1:])):
                raise ValueError(f"step times state_dict rows are [batch_size, seconds, ...], got {row!r}")
            parsed[int(row[0])] = [float(t) for t in row[1:]]
        return parsed
